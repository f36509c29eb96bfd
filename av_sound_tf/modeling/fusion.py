"""Audiovisual fusion (paper Sec. 3.3 and 3.4): average, regression, MLP and attention fusion.

Every fusion model takes the audio and visual models' clip scores and which modalities are
present, as four named inputs::

    h_audio [C], h_visual [C], audio_present [1], visual_present [1]

and returns fused clip scores [C]. Except for average fusion, the scores are first
standardized per class with the mean and variance of the **training split only** (paper
4.2); the statistics are constructor arguments, so they are saved inside the model and
applied wherever it is served.

Missing modality (a video without an audio track, an audio file without video): the missing
model's scores are ignored, never read as evidence. Average, regression and MLP fusion fall
back to the present modality's own scores; attention fusion sets alpha to 1 on the present
modality (alpha_a = 0 without audio, 1 without video), so its output is n_av(n_v(h_v)) or
n_av(n_a(h_a)). A clip with neither modality gets 0.5 everywhere (data preparation never
writes such a clip). Outputs are finite in every case (tests/fusion_test.py).

Attention fusion (`AttentionFusion`, Eqs. 3-6):
    alpha_a = n_attn([h_a, h_v])        (hidden 512, batch norm, ReLU, dropout 0.5, C sigmoid)
    h_av    = alpha_a * n_a(h_a) + (1 - alpha_a) * n_v(h_v)
    o_av    = n_av(h_av)
The paper calls n_a, n_v and n_av "single layer networks with 512 units and sigmoid
activations", but the weighted sum is element-wise with the C-dimensional alpha, so n_a(h_a)
must be C-dimensional. Three readings are offered by ``transform``:
  * ``per_class`` (default): one sigmoid unit per class on that class's score,
    sigmoid(w_c h_c + b_c): a single layer of C units with a diagonal weight matrix.
  * ``dense``: one dense layer of C sigmoid units (512 read as a typo of C = 527).
  * ``hidden``: ``transform_hidden`` (512) sigmoid units, then C sigmoid units (512 read as
    the hidden width).
All keep h_av in (0, 1), so "without n_av" can output h_av directly, as in Table 4.
``per_class`` won on validation mAP on the synthetic fusion task of tests/fusion_test.py
(0.912 against 0.864 for ``dense`` and 0.858 for ``hidden``, 20 epochs, batch 32, lr 3e-3;
docs/benchmarks.md), and it is the only reading that keeps alpha meaningful: with a dense
n_a, h~_a[c] mixes every class, and alpha can act as an arbitrary gate carrying the other
modality's evidence (measured there: the mean alpha_a of audio-only classes ranged 0.06-0.92
with ``dense``, 0.91-0.98 with ``per_class``, and 0.00-0.08 for visual-only classes).

Ablations (Table 4), ``variant``:
  * ``multimodal`` (default): alpha_a from [h_a, h_v].
  * ``self_unimodal``: a_a = n_attn_a(h_a), a_v = n_attn_v(h_v), alpha_a = a_a / (a_a + a_v).
  * ``cross_unimodal``: a_a = n_attn_a(h_v), a_v = n_attn_v(h_a), normalized the same way.
  * ``no_transform``: n_a and n_v are identities (on the standardized scores).
  * ``no_output_net``: n_av is the identity: o_av = h_av.
"""

import keras
from keras import layers
from keras import ops
import numpy as np

from av_sound_tf.core import constants

FUSIONS = ("average", "regression", "mlp", "attention")
TRANSFORMS = ("per_class", "dense", "hidden")
VARIANTS = ("multimodal", "self_unimodal", "cross_unimodal", "no_transform", "no_output_net")
INPUTS = ("h_audio", "h_visual", "audio_present", "visual_present")


def _attention_net(num_classes, hidden, dropout, name):
  return keras.Sequential([
      layers.Dense(hidden, use_bias=False, name=f"{name}_hidden"),
      layers.BatchNormalization(name=f"{name}_bn"),
      layers.ReLU(name=f"{name}_relu"),
      layers.Dropout(dropout, name=f"{name}_dropout"),
      layers.Dense(num_classes, activation="sigmoid", name=f"{name}_out"),
  ], name=name)


@keras.saving.register_keras_serializable(package=constants.PACKAGE)
class PerClassAffine(keras.layers.Layer):
  """sigmoid(w_c * x_c + b_c) for each class c: a transform that keeps class identity."""

  def build(self, input_shape):
    self.w = self.add_weight(name="w", shape=(input_shape[-1],), initializer="ones")
    self.b = self.add_weight(name="b", shape=(input_shape[-1],), initializer="zeros")
    self.built = True

  def call(self, x):
    return ops.sigmoid(x * self.w + self.b)


def _transform_net(num_classes, transform, hidden, name):
  if transform == "per_class":
    return keras.Sequential([PerClassAffine(name=f"{name}_per_class")], name=name)
  stack = []
  if transform == "hidden":
    stack.append(layers.Dense(hidden, activation="sigmoid", name=f"{name}_hidden"))
  stack.append(layers.Dense(num_classes, activation="sigmoid", name=f"{name}_out"))
  return keras.Sequential(stack, name=name)


@keras.saving.register_keras_serializable(package=constants.PACKAGE)
class AttentionFusion(keras.layers.Layer):
  """Sample- and class-specific attention over the audio and visual scores (Eqs. 3-6).

  Call on ``[h_audio, h_visual, audio_present, visual_present]`` with standardized scores
  [batch, C] and presence flags [batch, 1]. Returns ``(o_av, alpha_audio)``, both
  [batch, C]; alpha_visual = 1 - alpha_audio.

  Args:
    num_classes: C.
    variant: one of `VARIANTS` (Table 4).
    attention_hidden: hidden units of n_attn (paper: 512).
    dropout: dropout of n_attn (paper: 0.5).
    transform: n_a, n_v and n_av: ``per_class``, ``dense`` or ``hidden`` (module docstring).
    transform_hidden: hidden width for ``hidden`` (512).
  """

  def __init__(self, num_classes, variant="multimodal", attention_hidden=512, dropout=0.5,
               transform="per_class", transform_hidden=512, **kwargs):
    super().__init__(**kwargs)
    if variant not in VARIANTS:
      raise ValueError(f"Unknown attention variant. Expected one of {VARIANTS}. "
                       f"Received: variant={variant!r}")
    if transform not in TRANSFORMS:
      raise ValueError(f"Unknown transform. Expected one of {TRANSFORMS}. "
                       f"Received: transform={transform!r}")
    self.transform = transform
    self.num_classes = num_classes
    self.variant = variant
    self.attention_hidden = attention_hidden
    self.dropout = dropout
    self.transform_hidden = transform_hidden

  def build(self, input_shape):
    c, h = self.num_classes, self.attention_hidden
    scores_shape = (input_shape[0][0], c)
    if self.variant in ("self_unimodal", "cross_unimodal"):
      self.n_attn_audio = _attention_net(c, h, self.dropout, "n_attn_audio")
      self.n_attn_visual = _attention_net(c, h, self.dropout, "n_attn_visual")
      self.n_attn_audio.build(scores_shape)
      self.n_attn_visual.build(scores_shape)
    else:
      self.n_attn = _attention_net(c, h, self.dropout, "n_attn")
      self.n_attn.build((input_shape[0][0], 2 * c))
    if self.variant != "no_transform":
      self.n_audio = _transform_net(c, self.transform, self.transform_hidden, "n_audio")
      self.n_visual = _transform_net(c, self.transform, self.transform_hidden, "n_visual")
      self.n_audio.build(scores_shape)
      self.n_visual.build(scores_shape)
    if self.variant != "no_output_net":
      self.n_av = _transform_net(c, self.transform, self.transform_hidden, "n_av")
      self.n_av.build(scores_shape)
    self.built = True

  def call(self, inputs, training=None):
    h_a, h_v, present_a, present_v = inputs
    if self.variant in ("self_unimodal", "cross_unimodal"):
      src_a, src_v = (h_a, h_v) if self.variant == "self_unimodal" else (h_v, h_a)
      a_a = self.n_attn_audio(src_a, training=training)
      a_v = self.n_attn_visual(src_v, training=training)
      alpha_a = a_a / (a_a + a_v + 1e-7)
    else:
      alpha_a = self.n_attn(ops.concatenate([h_a, h_v], axis=-1), training=training)
    # Missing modality: all weight on the one that is present.
    both = present_a * present_v
    alpha_a = both * alpha_a + (1.0 - both) * present_a
    if self.variant == "no_transform":
      t_a, t_v = h_a, h_v
    else:
      t_a = self.n_audio(h_a, training=training)
      t_v = self.n_visual(h_v, training=training)
    h_av = alpha_a * t_a + (1.0 - alpha_a) * t_v
    if self.variant == "no_output_net":
      return h_av, alpha_a
    return self.n_av(h_av, training=training), alpha_a

  def compute_output_shape(self, input_shape):
    shape = (input_shape[0][0], self.num_classes)
    return shape, shape

  def get_config(self):
    config = super().get_config()
    config.update({"num_classes": self.num_classes, "variant": self.variant,
                   "attention_hidden": self.attention_hidden, "dropout": self.dropout,
                   "transform": self.transform, "transform_hidden": self.transform_hidden})
    return config


def _standardizer(mean, variance, name):
  if mean is None:
    return None
  return layers.Normalization(axis=-1, mean=np.asarray(mean, np.float32),
                              variance=np.maximum(np.asarray(variance, np.float32), 1e-12),
                              name=name)


@keras.saving.register_keras_serializable(package=constants.PACKAGE)
class FusionModel(keras.Model):
  """A fusion model: `fusion` in `FUSIONS`, inputs `INPUTS`, output fused scores [C].

  The attention weights alpha_audio are the second output of the ``attention_fusion`` layer
  (see `with_attention_weights`).

  Args:
    num_classes: C.
    fusion: average, regression, mlp or attention.
    audio_mean, audio_variance, visual_mean, visual_variance: per-class training-split
      statistics of h_audio and h_visual (required except for average fusion).
    variant, attention_hidden, transform, transform_hidden: attention fusion (see
      `AttentionFusion`).
    mlp_hidden: hidden units of MLP fusion (paper: 512).
    dropout: dropout of the MLP and of n_attn (paper: 0.5).
    l2: L2 weight of regression fusion (paper: 1e-5).
  """

  def __init__(self, num_classes, fusion="attention", audio_mean=None, audio_variance=None,
               visual_mean=None, visual_variance=None, variant="multimodal",
               attention_hidden=512, transform="per_class", transform_hidden=512,
               mlp_hidden=512, dropout=0.5, l2=1e-5, **kwargs):
    if fusion not in FUSIONS:
      raise ValueError(f"Unknown fusion. Expected one of {FUSIONS}. Received: fusion={fusion!r}")
    if fusion != "average" and (audio_mean is None or visual_mean is None):
      raise ValueError(f"{fusion} fusion needs the training statistics (audio_mean, "
                       "audio_variance, visual_mean, visual_variance).")
    # === Layers and functional model ===
    inputs = {
        "h_audio": keras.Input((num_classes,), name="h_audio"),
        "h_visual": keras.Input((num_classes,), name="h_visual"),
        "audio_present": keras.Input((1,), name="audio_present"),
        "visual_present": keras.Input((1,), name="visual_present"),
    }
    h_a, h_v = inputs["h_audio"], inputs["h_visual"]
    p_a, p_v = inputs["audio_present"], inputs["visual_present"]
    if fusion == "average":
      fused = layers.Lambda(_average, name="average")([h_a, h_v, p_a, p_v])
    else:
      # Standardize; a missing modality becomes the training mean (0 after standardizing).
      z_a = layers.Lambda(_mask, name="mask_audio")(
          [_standardizer(audio_mean, audio_variance, "standardize_audio")(h_a), p_a])
      z_v = layers.Lambda(_mask, name="mask_visual")(
          [_standardizer(visual_mean, visual_variance, "standardize_visual")(h_v), p_v])
      if fusion == "attention":
        fused, _ = AttentionFusion(num_classes, variant, attention_hidden, dropout, transform,
                                   transform_hidden, name="attention_fusion")(
                                       [z_a, z_v, p_a, p_v])
      else:
        x = layers.Concatenate(name="concat")([z_a, z_v])
        if fusion == "mlp":
          x = layers.Dense(mlp_hidden, use_bias=False, name="mlp_hidden")(x)
          x = layers.BatchNormalization(name="mlp_bn")(x)
          x = layers.ReLU(name="mlp_relu")(x)
          x = layers.Dropout(dropout, name="mlp_dropout")(x)
          fused = layers.Dense(num_classes, activation="sigmoid", name="mlp_out")(x)
        else:
          fused = layers.Dense(num_classes, activation="sigmoid",
                               kernel_regularizer=keras.regularizers.L2(l2),
                               name="regression")(x)
        # Fall back to the present modality's own scores when the other is missing.
        fused = layers.Lambda(_fallback, name="fallback")([fused, h_a, h_v, p_a, p_v])
    fused = layers.Identity(name="fused_scores")(fused)
    super().__init__(inputs=inputs, outputs=fused, **kwargs)
    # === Config ===
    as_list = lambda v: None if v is None else np.asarray(v, np.float64).tolist()
    self.num_classes = num_classes
    self.fusion = fusion
    self.audio_mean, self.audio_variance = as_list(audio_mean), as_list(audio_variance)
    self.visual_mean, self.visual_variance = as_list(visual_mean), as_list(visual_variance)
    self.variant = variant
    self.attention_hidden = attention_hidden
    self.transform = transform
    self.transform_hidden = transform_hidden
    self.mlp_hidden = mlp_hidden
    self.dropout = dropout
    self.l2 = l2

  def get_config(self):
    keys = ("num_classes", "fusion", "audio_mean", "audio_variance", "visual_mean",
            "visual_variance", "variant", "attention_hidden", "transform", "transform_hidden",
            "mlp_hidden", "dropout", "l2")
    config = {"name": self.name, "trainable": self.trainable}
    config.update({k: getattr(self, k) for k in keys})
    return config

  @classmethod
  def from_config(cls, config):
    return cls(**config)

  @property
  def display_name(self):
    if self.fusion != "attention":
      return {"mlp": "MLP fusion"}.get(self.fusion, f"{self.fusion.capitalize()} fusion")
    return f"Attention fusion ({self.variant.replace('_', ' ')})"


# The missing modality's scores are never read: `where`, not a product (0 * NaN = NaN).
def _mask(tensors):
  h, present = tensors
  return ops.where(present > 0, h, ops.zeros_like(h))


def _average(tensors):
  h_a, h_v, p_a, p_v = tensors
  total = _mask([h_a, p_a]) + _mask([h_v, p_v])
  count = p_a + p_v
  return ops.where(count > 0, total / ops.maximum(count, 1.0), 0.5 * ops.ones_like(h_a))


def _fallback(tensors):
  fused, h_a, h_v, p_a, p_v = tensors
  only = ops.where(p_a > 0, h_a, ops.where(p_v > 0, h_v, 0.5 * ops.ones_like(h_a)))
  return ops.where((p_a > 0) & (p_v > 0), fused, only)


def with_attention_weights(model: FusionModel) -> keras.Model:
  """{"fused_scores", "attention_weights"} view of an attention fusion model."""
  if model.fusion != "attention":
    raise ValueError(f"{model.fusion} fusion has no attention weights.")
  return keras.Model(model.input, {
      "fused_scores": model.output,
      "attention_weights": model.get_layer("attention_fusion").output[1],
  })
