"""tf.data input pipelines: prepared shards (or AudioSet's released features) -> batches,
and bin/predict's model outputs -> fusion batches (`prediction_dataset`).

The canonical order (TF guide "Better performance with the tf.data API"; official
``core/input_reader.py``):

  file list -> shard (one share per input pipeline) -> shuffle files (training) ->
  interleave TFRecord files (parallel) -> shuffle records -> parse (parallel, through
  `av_sound_tf.schema`) -> crop/pad -> batch -> augment -> prefetch.

Training streams are endless and **epoch-seeded**: pass ``e`` over the data shuffles with
seed ``(seed, e)`` and every random choice is a stateless function of the seed and a stream
position: the crop offset and the SpecAugment masks of the record at position ``i`` use
seed ``(seed, i)``, the mixup weights of batch ``b`` use ``(seed + 7919, b)``, and both
positions count from the start of training (a resumed stream starts counting where the
backup's epoch ended). No stateful random op runs in the pipeline. A run resumed at epoch
``k`` (`initial_epoch`) therefore sees exactly the batches, masks and mixing weights the
uninterrupted run saw; that is what makes BackupAndRestore exact
(tests/training_test.py::test_augmented_run_resumes_exactly). Evaluation streams are finite,
deterministic and unshuffled.

Crops: training takes a random ``num_frames`` window of each log-mel (1024 frames = 10.24 s
by default); evaluation takes the window from the start of the clip (``eval_crop="start"``)
or its centre (``"center"``). Shorter clips are padded with the log-mel floor (silence).

Batch size: pipelines batch at the global batch size; under a tf.distribute strategy Keras
distributes each global batch over the replicas (per-replica batch = global / replicas).
With several input pipelines (multi-worker), each takes every n-th file, or every n-th
record when there are fewer files than pipelines (logged).

Class balance (off by default): ``balance=True`` adds per-example loss weights
w = sum_c y_c / count_c (AST / EfficientAT), scaled so that they average 1 over the training
set; a clip of a rare class weighs more. Examples without labels get weight 1.

Augmentations (off by default): mixup (``mixup_alpha``, Beta(a, a) per example, mixed with
the batch reversed) and SpecAugment masks (``time_mask``/``freq_mask`` maximum widths: one
band of width w ~ U{0..max} frames, at a start ~ U{0..frames - w}, and one of mel bins, set
to the log-mel floor; `spec_augment`).
"""

import dataclasses
from typing import Optional, Sequence

from absl import logging
import numpy as np
import tensorflow as tf

from av_sound_tf.core import dataset_info as dataset_info_lib
from av_sound_tf.core import features as features_lib
from av_sound_tf.core import schema

KINDS = ("audio", "visual", "embedding", "audiovisual")
EVAL_CROPS = ("start", "center")


@dataclasses.dataclass(frozen=True)
class InputConfig:
  """What the pipeline produces.

  kind: ``audio`` (log-mel [num_frames, num_mel_bins]), ``visual`` (mean frame embedding
    [embedding_dim]), ``embedding`` (AudioSet's released VGGish features
    [num_instances, 128]) or ``audiovisual`` (a dict of log_mel, embedding_mean, has_audio,
    has_video: both models' inputs for fusion; nothing filtered unless require_audio, which
    drops clips without audio, as an audio student trained against an audiovisual teacher
    needs).
  """

  kind: str
  num_classes: int
  batch_size: int
  num_frames: int = 1024
  num_mel_bins: int = 64
  embedding_dim: int = 0
  num_instances: int = 10
  shuffle_buffer: int = 2048
  seed: int = 0
  eval_crop: str = "start"
  balance: bool = False
  mixup_alpha: float = 0.0
  time_mask: int = 0
  freq_mask: int = 0
  cycle_length: int = 8
  require_audio: bool = False  # audiovisual only
  log_floor: float = float(np.log(features_lib.DEFAULT_PARAMS.log_offset))

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"kind must be one of {KINDS}. Received: kind={self.kind!r}")
    if self.eval_crop not in EVAL_CROPS:
      raise ValueError(f"eval_crop must be one of {EVAL_CROPS}. Received: {self.eval_crop!r}")
    if self.batch_size < 1:
      raise ValueError(f"batch_size must be >= 1. Received: {self.batch_size}")
    if self.kind in ("visual", "audiovisual") and self.embedding_dim < 1:
      raise ValueError("The visual pipeline needs embedding_dim (the prepared data's info "
                       "has it).")


def input_config(info: Optional[dataset_info_lib.DatasetInfo], kind: str, batch_size: int,
                 **overrides) -> InputConfig:
  """The InputConfig of prepared data: classes and embedding size from its `info`.

  Args:
    info: the prepared-data folder's info; None for AudioSet's released features, whose
      ``num_classes`` then comes in `overrides`.
    kind: see `InputConfig`.
    batch_size: the global batch size.
    **overrides: any other `InputConfig` field (a run's crops, augmentation, seed).
  """
  fields = {} if info is None else dict(num_classes=info.num_classes,
                                        embedding_dim=info.embedding_dim)
  fields.update(overrides)
  return InputConfig(kind=kind, batch_size=batch_size, **fields)


def _parse_fn(config):
  if config.kind == "embedding":
    return lambda s: schema.parse_audioset_embedding_example(
        s, config.num_classes, config.num_instances)
  return lambda s: schema.parse_example(s, config.num_classes, config.num_mel_bins,
                                        config.embedding_dim)


def _checked_parse_fn(config):
  """Parses and stops on NaN/Inf in a clip's features before they can reach a loss.

  make_example refuses to write them, so a hit means a shard written by other code or
  damaged in a way that kept its CRCs intact; the error names the clip.
  """
  parse = _parse_fn(config)
  if config.kind == "embedding":  # dequantized uint8: always finite
    return parse

  def checked(serialized):
    ex = parse(serialized)
    finite = tf.logical_and(tf.reduce_all(tf.math.is_finite(ex["log_mel"])),
                            tf.reduce_all(tf.math.is_finite(ex["embedding_mean"])))
    check = tf.debugging.Assert(finite, ["Non-finite (NaN or Inf) features in clip",
                                         ex["clip_id"], "of", ex["source_path"]])
    with tf.control_dependencies([check]):
      ex["log_mel"] = tf.identity(ex["log_mel"])
      ex["embedding_mean"] = tf.identity(ex["embedding_mean"])
    return ex

  return checked


def _keep_fn(config):
  """Drops records that lack the modality (audio+visual sets may hold clips without one)."""
  if config.kind == "audio":
    return lambda ex: ex["has_audio"] > 0
  if config.kind == "visual":
    return lambda ex: ex["has_video"] > 0
  if config.kind == "audiovisual" and config.require_audio:
    return lambda ex: ex["has_audio"] > 0
  return None


def crop_or_pad(log_mel, num_frames, offset, floor):
  """Window [offset, offset + num_frames) of log_mel, padded with `floor` at the end."""
  window = log_mel[offset:offset + num_frames]
  pad = num_frames - tf.shape(window)[0]
  window = tf.pad(window, [[0, pad], [0, 0]], constant_values=floor)
  return tf.ensure_shape(window, [num_frames, log_mel.shape[-1]])


def _features(ex, config, training, seed):
  if config.kind == "visual":
    return ex["embedding_mean"]
  if config.kind == "embedding":
    return ex["audio_embedding"]
  if config.kind == "audiovisual":
    audio = dataclasses.replace(config, kind="audio")
    return {"log_mel": _features(ex, audio, training, seed),
            "embedding_mean": ex["embedding_mean"], "has_audio": ex["has_audio"],
            "has_video": ex["has_video"]}
  frames = tf.shape(ex["log_mel"])[0]
  excess = tf.maximum(frames - config.num_frames, 0)
  if training:
    offset = tf.random.stateless_uniform([], seed, 0, excess + 1, dtype=tf.int32)
  elif config.eval_crop == "center":
    offset = excess // 2
  else:
    offset = 0
  x = crop_or_pad(ex["log_mel"], config.num_frames, offset, config.log_floor)
  if training and (config.time_mask or config.freq_mask):
    x = spec_augment(x, seed, config.time_mask, config.freq_mask, config.log_floor)
  return x


def _band(seed, size, max_width):
  """(start, width) of a mask band: width ~ U{0..max_width} (at most `size`), start ~
  U{0..size - width}; stateless in `seed`."""
  width = tf.random.stateless_uniform([], seed, 0, tf.minimum(max_width, size) + 1,
                                      dtype=tf.int32)
  start = tf.random.stateless_uniform([], tf.random.experimental.stateless_fold_in(seed, 1),
                                      0, size - width + 1, dtype=tf.int32)
  return start, width


def spec_augment(log_mel, seed, time_mask, freq_mask, floor):
  """SpecAugment (Park et al. 2019) on one log-mel [frames, bins]: one band of at most
  `time_mask` frames and one of at most `freq_mask` mel bins set to `floor` (silence).

  Stateless: the bands are a function of `seed` (shape [2], int64) alone, so a resumed run
  draws the masks the uninterrupted run drew. A max width of 0 leaves that axis alone.
  """
  shape = tf.shape(log_mel)
  masked = tf.zeros_like(log_mel, dtype=tf.bool)
  for axis, max_width, salt in ((0, time_mask, 1), (1, freq_mask, 2)):
    if not max_width:
      continue
    start, width = _band(tf.random.experimental.stateless_fold_in(seed, 7000 + salt),
                         shape[axis], max_width)
    index = tf.range(shape[axis])
    inside = (index >= start) & (index < start + width)
    masked |= inside[:, None] if axis == 0 else inside[None, :]
  return tf.where(masked, tf.cast(floor, log_mel.dtype), log_mel)


def class_balance_weights(class_counts: Sequence[int], num_examples: int) -> np.ndarray:
  """Per-class terms t_c = N / (count_c * classes_present), so that the per-example weight
  w = sum_c y_c t_c averages 1 over the N training examples (sum over examples of
  sum_c y_c / count_c is the number of classes present)."""
  counts = np.asarray(class_counts, np.float64)
  present = counts > 0
  terms = np.where(present, 1.0 / np.maximum(counts, 1), 0.0)
  return (terms * num_examples / max(int(present.sum()), 1)).astype(np.float32)


def _shard(files, input_context):
  """Files (or, with too few files, records) for this input pipeline."""
  if input_context is None or input_context.num_input_pipelines <= 1:
    return files, None
  n, i = input_context.num_input_pipelines, input_context.input_pipeline_id
  if len(files) >= n:
    return files[i::n], None
  logging.warning("Only %d files for %d input pipelines: sharding by record instead of by "
                  "file (every pipeline reads every file).", len(files), n)
  return files, (n, i)


def _records(files, config, seed=None, deterministic=True):
  """Records of `files`, interleaved; the file order is shuffled when `seed` is given."""
  files = tf.constant(list(files))
  if seed is not None:
    files = tf.random.experimental.stateless_shuffle(files, seed)
  ds = tf.data.Dataset.from_tensor_slices(files)
  return ds.interleave(tf.data.TFRecordDataset,
                       cycle_length=min(config.cycle_length, int(files.shape[0])),
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)


def _block_shuffle(ds, buffer, seed):
  """Shuffles records within consecutive blocks of `buffer` with stateless seeds.

  `Dataset.shuffle` only takes a Python seed; a stateless shuffle of each block makes the
  order a pure function of (seed, epoch) so that a resumed run replays it exactly. Memory
  is the same as a shuffle buffer of that size.
  """
  def shuffle_block(k, block):
    return tf.random.experimental.stateless_shuffle(block, tf.stack([seed[0], seed[1] * 1000003 + k]))

  return ds.batch(buffer).enumerate().map(shuffle_block).unbatch()


def train_dataset(files: Sequence[str], config: InputConfig, num_examples: Optional[int] = None,
                  initial_epoch: int = 0, steps_per_epoch: Optional[int] = None,
                  class_counts: Optional[Sequence[int]] = None,
                  input_context: Optional[tf.distribute.InputContext] = None,
                  balance_examples: Optional[int] = None) -> tf.data.Dataset:
  """Endless, epoch-seeded training batches of (features, labels[, weights]).

  Args:
    files: TFRecord shards.
    config: the pipeline configuration.
    num_examples: records in `files` (for exact resumption when steps_per_epoch is not a
      whole pass); None skips nothing on resume.
    initial_epoch: the epoch training resumes at.
    steps_per_epoch: batches per epoch.
    class_counts: positives per class in the training set (required with balance=True).
    input_context: from `strategy.distribute_datasets_from_function`, or None.
    balance_examples: the training set's size for the class-balance weights (default:
      num_examples; a multi-worker pipeline passes the whole set's).
  """
  if not files:
    raise ValueError("No training files.")
  if config.balance and class_counts is None:
    raise ValueError("balance=True needs class_counts (the prepared data's info has them).")
  files, record_shard = _shard(list(files), input_context)

  def one_pass(epoch):
    seed = tf.stack([tf.constant(config.seed, tf.int64), epoch])
    ds = _records(files, config, seed)
    if record_shard:
      ds = ds.shard(*record_shard)
    return _block_shuffle(ds, config.shuffle_buffer, seed)

  # Resume: records already consumed by `initial_epoch` epochs. Exact when every record
  # yields an example (records lacking the modality are dropped after this point).
  # Without num_examples a resume starts at pass `initial_epoch` (exact when an epoch is
  # one pass over these files).
  start_pass, skip, consumed = initial_epoch, 0, 0
  if initial_epoch and steps_per_epoch:
    consumed = initial_epoch * steps_per_epoch * config.batch_size
    if num_examples:
      start_pass, skip = divmod(consumed, num_examples)
  ds = tf.data.Dataset.range(start_pass, 2**62).flat_map(one_pass).skip(skip)
  ds = ds.enumerate(start=consumed)  # stream positions seed the per-example randomness
  parse = _checked_parse_fn(config)
  keep = _keep_fn(config)
  terms = None
  if config.balance:
    balance_examples = balance_examples or num_examples
    if not balance_examples:
      raise ValueError("balance=True needs num_examples.")
    terms = tf.constant(class_balance_weights(class_counts, balance_examples))

  def to_example(i, record):
    return i, parse(record)

  ds = ds.map(to_example, num_parallel_calls=tf.data.AUTOTUNE)
  if keep:
    ds = ds.filter(lambda i, ex: keep(ex))

  def to_features(i, ex):
    seed = tf.stack([tf.cast(config.seed, tf.int64), i])
    x = _features(ex, config, True, seed)
    # An unlabeled clip (prepared with --allow_unlabeled) gets targets of -1: only a
    # distillation loss, which masks them, may train on it.
    y = ex["labels"]
    if "labeled" in ex:  # our schema (AudioSet's released features are all labeled)
      y = tf.where(ex["labeled"] > 0, y, -tf.ones_like(y))
    if terms is None:
      return x, y
    w = tf.where(tf.reduce_sum(y) > 0, tf.reduce_sum(y * terms), 1.0)
    return x, y, w

  ds = ds.map(to_features, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(config.batch_size, drop_remainder=True)
  if config.mixup_alpha > 0:
    # Batch positions count from the start of training, like the record positions: a
    # resumed stream's first batch is batch `consumed / batch_size` of the uninterrupted one.
    ds = ds.enumerate(start=consumed // config.batch_size).map(
        lambda b, batch: _mixup(batch, b, config), num_parallel_calls=tf.data.AUTOTUNE)
  return ds.prefetch(tf.data.AUTOTUNE)


def _mixup(batch, index, config):
  seed = tf.stack([tf.cast(config.seed + 7919, tf.int64), index])
  x, y = batch[0], batch[1]
  b = tf.shape(y)[0]
  g1 = tf.random.stateless_gamma([b], seed, alpha=config.mixup_alpha)
  g2 = tf.random.stateless_gamma([b], seed + 1, alpha=config.mixup_alpha)
  lam = g1 / (g1 + g2)
  lam_x = tf.reshape(lam, [-1] + [1] * (len(x.shape) - 1))
  x = lam_x * x + (1 - lam_x) * tf.reverse(x, [0])
  y = lam[:, None] * y + (1 - lam[:, None]) * tf.reverse(y, [0])
  return (x, y) + tuple(batch[2:])


def eval_dataset(files: Sequence[str], config: InputConfig, with_ids: bool = False,
                 input_context: Optional[tf.distribute.InputContext] = None) -> tf.data.Dataset:
  """Finite, deterministic batches of (features, labels[, clip_ids]) in file order."""
  if not files:
    raise ValueError("No evaluation files.")
  files, record_shard = _shard(list(files), input_context)
  ds = tf.data.TFRecordDataset(files)
  if record_shard:
    ds = ds.shard(*record_shard)
  parse = _checked_parse_fn(config)
  keep = _keep_fn(config)
  ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  if keep:
    ds = ds.filter(keep)

  def to_features(ex):
    x = _features(ex, config, False, None)
    if with_ids:
      return x, ex["labels"], ex["clip_id"]
    return x, ex["labels"]

  ds = ds.map(to_features, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.batch(config.batch_size).prefetch(tf.data.AUTOTUNE)


def prediction_dataset(path: str, num_classes: int, batch_size: int,
                       shuffle_seed: Optional[int] = None, buffer: int = 10000,
                       with_ids: bool = False,
                       num_examples: Optional[int] = None) -> tf.data.Dataset:
  """bin/predict's model outputs (`schema.PREDICTION_SPEC`) as fusion batches: (inputs dict
  for `fusion.FusionModel`, labels[, clip_ids]).

  `num_examples` (from the predictions' info) declares the cardinality so that Keras knows
  the epoch length; `shuffle_seed` reshuffles every epoch (training).
  """
  ds = tf.data.TFRecordDataset(path)
  if num_examples:
    ds = ds.apply(tf.data.experimental.assert_cardinality(num_examples))
  if shuffle_seed is not None:
    ds = ds.shuffle(buffer, seed=shuffle_seed, reshuffle_each_iteration=True)

  def split(ex):
    inputs = {k: ex[k] for k in ("h_audio", "h_visual", "audio_present", "visual_present")}
    return (inputs, ex["labels"], ex["clip_id"]) if with_ids else (inputs, ex["labels"])

  ds = ds.map(lambda s: split(schema.parse_prediction_example(s, num_classes)),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
