"""The audio MIL ConvNet (paper Table 1), the visual DNN (Sec. 3.2), the MIL head for
AudioSet's released embeddings, and the MIL aggregation layer g().

All are Keras functional models registered under `constants.PACKAGE` (``"av_sound_tf"``:
never rename it, saved ``.keras`` files refer to it). Constructor arguments are the config.

Audio model (Table 1 as a data table below): blocks B1-B4 are two 3x3 convolutions with
batch norm and ReLU followed by max pooling (4x4, 2x2, 2x2, 2x2); B5 is 2048 3x2 filters
without padding, which leaves one segment per 32 input frames minus two (30 segments for 1024
frames: a ~1 s receptive field every 0.32 s); B6 and B7 are 1x1 convolutions with 1024
filters; B8 is a 1x1 convolution with C sigmoid outputs: the segment (instance) scores. g()
aggregates them to clip (bag) scores; the paper uses global average pooling.
"""

import keras
from keras import layers
from keras import ops
import numpy as np
import tensorflow as tf

from av_sound_tf.core import constants

# Table 1: (block, filters, pool size); every block is conv3x3-BN-ReLU twice, then pooling.
CONV_BLOCKS = (("b1", 64, 4), ("b2", 128, 2), ("b3", 256, 2), ("b4", 512, 2))
B5_FILTERS, B5_KERNEL = 2048, (3, 2)
B6_FILTERS = B7_FILTERS = 1024
FRAMES_PER_SEGMENT = 32  # product of the pool sizes along time
MIN_FRAMES = 96  # B5's 3-segment kernel needs 3 x 32 frames

AGGREGATIONS = ("average", "max", "linear_softmax", "attention")


def num_segments(num_frames: int) -> int:
  """Segments the audio model outputs for `num_frames` input frames (30 for 1024)."""
  return num_frames // FRAMES_PER_SEGMENT - 2


def _scaled(filters, width):
  return max(4, int(round(filters * width)))


@keras.saving.register_keras_serializable(package=constants.PACKAGE)
class MILAggregation(keras.layers.Layer):
  """g(): segment scores [batch, segments, C] -> clip scores [batch, C].

  Methods (the paper uses ``average``; the others are from its related work):
    * ``average``: global average pooling (Kumar & Ithapu 2020; this paper).
    * ``max``: the MI-SVM-style max over segments (Kumar & Raj 2016).
    * ``linear_softmax``: sum(y^2) / sum(y) (Wang et al. 2019).
    * ``attention``: a softmax over segments of a learned per-class attention computed
      from the segment features (Kong et al. 2019).

  Called on ``[segment_scores, segment_features]``; the features are used only by
  ``attention``.

  Example:
    >>> g = MILAggregation("max")
    >>> g([np.ones([2, 30, 5], "float32"), np.ones([2, 30, 8], "float32")]).shape
    (2, 5)
  """

  def __init__(self, method="average", num_classes=None, **kwargs):
    super().__init__(**kwargs)
    if method not in AGGREGATIONS:
      raise ValueError(f"Unknown MIL aggregation. Expected one of {AGGREGATIONS}. "
                       f"Received: method={method!r}")
    if method == "attention" and not num_classes:
      raise ValueError("Attention aggregation needs num_classes.")
    self.method = method
    self.num_classes = num_classes
    self.attention = None

  def build(self, input_shape):
    scores_shape, features_shape = input_shape
    if self.method == "attention":
      self.attention = layers.Dense(self.num_classes, name="attention_logits")
      self.attention.build(features_shape)
    self.built = True

  def call(self, inputs):
    scores, features = inputs
    if self.method == "average":
      return ops.mean(scores, axis=1)
    if self.method == "max":
      return ops.max(scores, axis=1)
    if self.method == "linear_softmax":
      return ops.sum(scores * scores, axis=1) / (ops.sum(scores, axis=1) + 1e-7)
    weights = ops.softmax(self.attention(features), axis=1)  # over segments
    return ops.sum(weights * scores, axis=1)

  def compute_output_shape(self, input_shape):
    scores_shape = input_shape[0]
    return (scores_shape[0], scores_shape[2])

  def get_config(self):
    config = super().get_config()
    config.update({"method": self.method, "num_classes": self.num_classes})
    return config


@keras.saving.register_keras_serializable(package=constants.PACKAGE)
class BatchNormalization(layers.BatchNormalization):
  """Keras' batch normalization; its training step on 4-D float32 batches (the conv
  blocks) runs TensorFlow's fused kernel.

  Keras 3.6 normalizes with separate moments, normalize and gradient ops: on Table 1 at
  batch 8 x 1024 frames that is about a fifth of the CPU time of a training step (B1's
  activations are 134 MB each), and FusedBatchNormV3 (one pass forward, one backward) cuts
  the step's CPU time by about 20 % (benchmarks/train_profile.py --batch_norm=fused|keras;
  docs/benchmarks.md).
  Same variables, the same batch statistics (the moving variance is updated with the
  biased batch variance, as Keras does; the kernel returns the unbiased one), the same
  results up to float rounding (tests/models_test.py). Inference, other ranks, other
  dtypes, masks and synchronized statistics take Keras' own path unchanged. The class keeps
  Keras' name: saved weights are keyed by it, so files written before load as they did.
  """

  def call(self, inputs, training=None, mask=None):
    if not (training and self.trainable) or mask is not None or self.synchronized or len(
        inputs.shape) != 4 or self.axis not in (-1, 3) or inputs.dtype != tf.float32:
      return super().call(inputs, training=training, mask=mask)
    channels = inputs.shape[-1]
    gamma = self.gamma if self.scale else tf.ones([channels], tf.float32)
    beta = self.beta if self.center else tf.zeros([channels], tf.float32)
    outputs, mean, unbiased = tf.compat.v1.nn.fused_batch_norm(
        inputs, gamma, beta, epsilon=self.epsilon, data_format="NHWC", is_training=True)
    count = tf.cast(tf.size(inputs, tf.int64) // channels, tf.float32)
    variance = unbiased * ((count - 1.0) / count)
    self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
    self.moving_variance.assign(
        self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
    return outputs


def _conv_bn_relu(x, filters, kernel, name, padding="same", momentum=0.99):
  x = layers.Conv2D(filters, kernel, padding=padding, use_bias=False, name=f"{name}_conv")(x)
  x = BatchNormalization(momentum=momentum, name=f"{name}_bn")(x)
  return layers.ReLU(name=f"{name}_relu")(x)


def _dense_bn_relu(x, units, name, momentum=0.99):
  x = layers.Dense(units, use_bias=False, name=f"{name}_dense")(x)
  x = BatchNormalization(momentum=momentum, name=f"{name}_bn")(x)
  return layers.ReLU(name=f"{name}_relu")(x)


def _mil_head(features, num_classes, aggregation):
  """Instance features [B, S, F] -> ``segment_scores`` [B, S, C] -> ``clip_scores`` [B, C].

  Scores are computed in float32 under a mixed-precision policy (a stable loss near 0/1).
  """
  segment_scores = layers.Dense(num_classes, activation="sigmoid", dtype="float32",
                                name="segment_scores")(features)
  return MILAggregation(aggregation, num_classes, dtype="float32",
                        name="clip_scores")([segment_scores, features])


class _ConfigModel(keras.Model):
  """Functional model whose config is its constructor arguments (keras-hub style)."""

  _CONFIG_KEYS = ()

  def get_config(self):
    config = {"name": self.name, "trainable": self.trainable}
    config.update({k: getattr(self, k) for k in self._CONFIG_KEYS})
    return config

  @classmethod
  def from_config(cls, config):
    return cls(**config)


class _AudioMIL(_ConfigModel):
  """What the two audio models share: the log-mel input (checked), the MIL head's inputs
  and outputs, and the config (constructor arguments)."""

  _CONFIG_KEYS = ("num_classes", "num_mel_bins", "num_frames", "width", "aggregation")

  @staticmethod
  def _log_mel_input(num_frames, num_mel_bins):
    if num_frames is not None and num_frames < MIN_FRAMES:
      raise ValueError(f"num_frames must be >= {MIN_FRAMES}. Received: num_frames={num_frames}")
    if num_mel_bins != 64:
      # The network divides the frequency axis by 32; the segment kernel spans the last 2.
      raise ValueError(f"num_mel_bins must be 64 (Table 1). Received: {num_mel_bins}")
    return keras.Input((num_frames, num_mel_bins), name="log_mel")

  def _init_model(self, log_mel, clip_scores, num_classes, num_mel_bins, num_frames, width,
                  aggregation, **kwargs):
    super().__init__(inputs=log_mel, outputs=clip_scores, **kwargs)
    self.num_classes = num_classes
    self.num_mel_bins = num_mel_bins
    self.num_frames = num_frames
    self.width = width
    self.aggregation = aggregation


@keras.saving.register_keras_serializable(package=constants.PACKAGE)
class MILConvNet(_AudioMIL):
  """The audio multiple-instance ConvNet of Table 1.

  Input: log-mel [batch, frames, num_mel_bins] (any frames >= 96 when num_frames=None).
  Output: clip scores [batch, num_classes]; the layer named ``segment_scores`` holds the
  instance scores [batch, segments, num_classes] (see `with_segment_scores`).

  Args:
    num_classes: C (527 for AudioSet).
    num_mel_bins: mel bands of the input (64).
    num_frames: fixed input length or None for any length.
    width: multiplier on every filter count (1.0 is the paper's model, 14.7 M parameters
      for C = 527); smaller widths train the same architecture on a CPU.
    aggregation: g(), one of `AGGREGATIONS`.

  Example:
    >>> model = MILConvNet(num_classes=10, num_frames=1024, width=0.125)
    >>> model(np.zeros([1, 1024, 64], "float32")).shape
    (1, 10)
  """

  def __init__(self, num_classes=527, num_mel_bins=64, num_frames=None, width=1.0,
               aggregation="average", **kwargs):
    # Four poolings divide the frequency axis by 32; B5's 3x2 kernel spans the last 2.
    log_mel = self._log_mel_input(num_frames, num_mel_bins)
    x = layers.Reshape((-1, num_mel_bins, 1), name="add_channel")(log_mel)
    for block, filters, pool in CONV_BLOCKS:
      f = _scaled(filters, width)
      x = _conv_bn_relu(x, f, 3, f"{block}_1")
      x = _conv_bn_relu(x, f, 3, f"{block}_2")
      x = layers.MaxPooling2D(pool, strides=pool, name=f"{block}_pool")(x)
    x = _conv_bn_relu(x, _scaled(B5_FILTERS, width), B5_KERNEL, "b5", padding="valid")
    x = layers.Reshape((-1, _scaled(B5_FILTERS, width)), name="segments")(x)  # [B, S, F]
    x = _dense_bn_relu(x, _scaled(B6_FILTERS, width), "b6")
    features = _dense_bn_relu(x, _scaled(B7_FILTERS, width), "b7")
    self._init_model(log_mel, _mil_head(features, num_classes, aggregation), num_classes,
                     num_mel_bins, num_frames, width, aggregation, **kwargs)


@keras.saving.register_keras_serializable(package=constants.PACKAGE)
class VisualDNN(_ConfigModel):
  """The visual model (Sec. 3.2): a DNN on the mean frame embedding of a clip.

  Hidden layers 2048, 2048, 1024, 1024 with ReLU, dropout 0.3 after the first two, C
  sigmoid outputs.

  Args:
    num_classes: C.
    embedding_dim: size of the mean frame embedding (2048 for ResNet-152).
    width: multiplier on the hidden sizes.
    dropout: dropout rate after the first two hidden layers.
  """

  _CONFIG_KEYS = ("num_classes", "embedding_dim", "width", "dropout")
  HIDDEN = (2048, 2048, 1024, 1024)

  def __init__(self, num_classes=527, embedding_dim=2048, width=1.0, dropout=0.3, **kwargs):
    embedding = keras.Input((embedding_dim,), name="embedding_mean")
    x = embedding
    for i, units in enumerate(self.HIDDEN):
      x = layers.Dense(_scaled(units, width), activation="relu", name=f"hidden{i + 1}")(x)
      if i < 2:
        x = layers.Dropout(dropout, name=f"dropout{i + 1}")(x)
    scores = layers.Dense(num_classes, activation="sigmoid", dtype="float32",
                          name="clip_scores")(x)
    super().__init__(inputs=embedding, outputs=scores, **kwargs)
    self.num_classes = num_classes
    self.embedding_dim = embedding_dim
    self.width = width
    self.dropout = dropout


@keras.saving.register_keras_serializable(package=constants.PACKAGE)
class EmbeddingMIL(_ConfigModel):
  """A small MIL network over AudioSet's released 1 s VGGish embeddings ([10, 128]).

  Each second is an instance: two fully connected layers (BN, ReLU, dropout) and C
  sigmoid instance scores, aggregated by g() to clip scores.
  """

  _CONFIG_KEYS = ("num_classes", "num_instances", "embedding_dim", "hidden", "dropout",
                  "aggregation")

  def __init__(self, num_classes=527, num_instances=10, embedding_dim=128, hidden=512,
               dropout=0.4, aggregation="average", **kwargs):
    embeddings = keras.Input((num_instances, embedding_dim), name="audio_embedding")
    x = embeddings
    for i in range(2):
      x = _dense_bn_relu(x, hidden, f"instance{i + 1}")
      x = layers.Dropout(dropout, name=f"instance{i + 1}_dropout")(x)
    clip_scores = _mil_head(x, num_classes, aggregation)
    super().__init__(inputs=embeddings, outputs=clip_scores, **kwargs)
    self.num_classes = num_classes
    self.num_instances = num_instances
    self.embedding_dim = embedding_dim
    self.hidden = hidden
    self.dropout = dropout
    self.aggregation = aggregation


# MobileMIL: (filters, stride) of the depthwise-separable blocks after the stem. The four
# stride-2 blocks and the stem divide time and frequency by 32, as Table 1's poolings do, so
# segments, MIN_FRAMES and segment times are the same for both audio models.
MOBILE_STEM = 32
MOBILE_BLOCKS = ((64, 2), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
                 (512, 1))
MOBILE_HEAD = 512
# Batch-norm momentum of MobileMIL. With Keras' 0.99 the moving statistics of its 19
# normalizations (depthwise ones have variances near 0.03, against the initial 1) still
# carry ~5 % of their initial values after 300 steps, and the errors compound: on the demo
# data the eval-mode student scored 0.30 mAP on its own training clips, 0.81 in train mode.
MOBILE_BN_MOMENTUM = 0.9


def _separable(x, filters, stride, name, kernel=3, padding="same"):
  """MobileNet v1 block: depthwise conv-BN-ReLU, then pointwise conv-BN-ReLU."""
  x = layers.DepthwiseConv2D(kernel, strides=stride, padding=padding, use_bias=False,
                             name=f"{name}_dw")(x)
  x = BatchNormalization(momentum=MOBILE_BN_MOMENTUM, name=f"{name}_dw_bn")(x)
  x = layers.ReLU(name=f"{name}_dw_relu")(x)
  return _conv_bn_relu(x, filters, 1, f"{name}_pw", momentum=MOBILE_BN_MOMENTUM)


@keras.saving.register_keras_serializable(package=constants.PACKAGE)
class TrimFrames(keras.layers.Layer):
  """Drops trailing frames so that their number is a multiple of `multiple`.

  Strided 'same' convolutions round up where Table 1's poolings round down; trimming first
  gives MobileMIL exactly `num_segments(frames)` segments, like MILConvNet (whose pooling
  also ignores the same trailing frames).
  """

  def __init__(self, multiple=FRAMES_PER_SEGMENT, **kwargs):
    super().__init__(**kwargs)
    self.multiple = multiple

  def call(self, x):
    keep = (ops.shape(x)[1] // self.multiple) * self.multiple
    return x[:, :keep]

  def compute_output_shape(self, input_shape):
    frames = input_shape[1]
    return (input_shape[0], None if frames is None else frames // self.multiple *
            self.multiple, *input_shape[2:])

  def get_config(self):
    return {**super().get_config(), "multiple": self.multiple}


@keras.saving.register_keras_serializable(package=constants.PACKAGE)
class MobileMIL(_AudioMIL):
  """A compact audio MIL network for phones: MobileNet-style depthwise-separable blocks
  (as in YAMNet and EfficientAT), the same log-mel input and MIL head as `MILConvNet`.

  Stem: 3x3 conv, stride 2. Then `MOBILE_BLOCKS` (each stride-2 block halves time and
  frequency). Segments: a 3x2 depthwise-separable conv without padding over the last 3 x 2
  cells (one segment per 32 frames, minus two: the geometry of Table 1's B5), one dense
  layer, and the sigmoid segment scores pooled by g().

  At width 1.0 with C = 527: 1.35 M parameters and 0.27 GFLOP per 10 s clip (1001
  frames), against 14.68 M and 10.7 GFLOP for Table 1 (`count_flops`;
  tests/distill_test.py).

  Args:
    num_classes: C.
    num_mel_bins: 64 (the frequency axis is divided by 32).
    num_frames: fixed input length or None for any length >= 96.
    width: multiplier on every filter count.
    aggregation: g(), one of `AGGREGATIONS`.
  """

  def __init__(self, num_classes=527, num_mel_bins=64, num_frames=None, width=1.0,
               aggregation="average", **kwargs):
    log_mel = self._log_mel_input(num_frames, num_mel_bins)
    x = TrimFrames(FRAMES_PER_SEGMENT, name="trim_frames")(log_mel)
    x = layers.Reshape((-1, num_mel_bins, 1), name="add_channel")(x)
    x = layers.Conv2D(_scaled(MOBILE_STEM, width), 3, strides=2, padding="same",
                      use_bias=False, name="stem_conv")(x)
    x = BatchNormalization(momentum=MOBILE_BN_MOMENTUM, name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    for i, (filters, stride) in enumerate(MOBILE_BLOCKS):
      x = _separable(x, _scaled(filters, width), stride, f"block{i + 1}")
    head = _scaled(MOBILE_HEAD, width)
    x = _separable(x, head, 1, "segment", kernel=B5_KERNEL, padding="valid")
    x = layers.Reshape((-1, head), name="segments")(x)  # [B, S, F]
    features = _dense_bn_relu(x, head, "instance", momentum=MOBILE_BN_MOMENTUM)
    self._init_model(log_mel, _mil_head(features, num_classes, aggregation), num_classes,
                     num_mel_bins, num_frames, width, aggregation, **kwargs)


AUDIO_MODELS = (MILConvNet, MobileMIL)  # log-mel in, clip and segment scores out
AUDIO_ARCHITECTURES = {"mil_convnet": MILConvNet, "mobile_mil": MobileMIL}


def with_num_frames(audio_model: keras.Model, num_frames) -> keras.Model:
  """The same audio model (any of `AUDIO_MODELS`, same weights) for `num_frames` input
  frames (None: any number)."""
  config = audio_model.get_config()
  config["num_frames"] = num_frames
  rebuilt = audio_model.__class__.from_config(config)
  rebuilt.set_weights(audio_model.get_weights())
  return rebuilt


def any_length(audio_model: keras.Model) -> keras.Model:
  """`with_num_frames(audio_model, None)`."""
  return with_num_frames(audio_model, None)


def count_flops(model: keras.Model, num_frames: int = 1001) -> dict:
  """Floating-point operations (multiply and add counted separately) of one forward pass
  for one clip of `num_frames` log-mel frames (1001 = 10 s), by TensorFlow's graph
  profiler, and the parameter count."""
  from tensorflow.python.framework import convert_to_constants  # pylint: disable=g-import-not-at-top
  fixed = with_num_frames(model, num_frames)
  fn = tf.function(lambda x: fixed(x, training=False)).get_concrete_function(
      tf.TensorSpec([1, num_frames, model.input.shape[-1]], tf.float32))
  frozen = convert_to_constants.convert_variables_to_constants_v2(fn)
  options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
  options["output"] = "none"
  profile = tf.compat.v1.profiler.profile(graph=frozen.graph, options=options)
  return {"flops": int(profile.total_float_ops), "parameters": int(model.count_params()),
          "num_frames": num_frames}


def with_segment_scores(model: keras.Model) -> keras.Model:
  """A view of a MIL model that returns {"clip_scores", "segment_scores"} (shared weights)."""
  return keras.Model(model.input, {
      "clip_scores": model.output,
      "segment_scores": model.get_layer("segment_scores").output,
  }, name=f"{model.name}_with_segments")



def randomize_weights(model: keras.Model, seed: int = 0) -> keras.Model:
  """Draws every weight at random (He-scaled normals; batch-norm gammas and variances around
  1) so that an untrained model's scores vary: a fresh MobileMIL scores 0.5 everywhere.
  For benchmarks and tests that need outputs worth comparing; returns `model`."""
  rng = np.random.default_rng(seed)
  for v in model.weights:
    shape = tuple(v.shape)
    if "variance" in v.path:
      value = rng.uniform(0.5, 2.0, shape)
    elif "gamma" in v.path:
      value = rng.uniform(0.5, 1.5, shape)
    else:
      value = rng.normal(0.0, 1.0 / np.sqrt(np.prod(shape[:-1]) if len(shape) > 1 else 1),
                         shape)
    v.assign(value.astype("float32"))
  return model
