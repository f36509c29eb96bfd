"""Training the audio, visual and embedding models: strategies, callbacks, SeCoST.

`train(config)` builds the input pipelines, creates the model, optimizer and metrics in the
strategy's scope, and fits with:

* BackupAndRestore (``<model_dir>/backup``): a killed run restarts at the last finished
  epoch with the same weights, optimizer state and (epoch-seeded) data order, so it ends
  where the uninterrupted run would have. Use ``steps_per_epoch`` to make epochs, and so
  backups, as frequent as you like.
* `metrics.ValidationMAP` (exact scikit-learn mAP on the validation split after each
  epoch) and ModelCheckpoint on ``val_mAP`` (model selection; the best value so far is
  carried across restarts from ``history.csv``).
* TensorBoard logs (``<model_dir>/logs``), ``history.csv``, Keras progress bars.

Outputs in ``model_dir``: ``model.keras`` (the selected model), ``saved_model/`` (a
TensorFlow SavedModel of it), ``config.json`` (the final configuration, to repeat the run),
``history.csv``, ``validation_metrics.json``.

SeCoST (Kumar & Ithapu, "SeCoST: Sequential Co-Supervision for Large Scale Weakly Labeled
Audio Event Detection", ICASSP 2020), cited by the paper for its audio model: training runs
in ``secost_stages + 1`` stages. Stage 0 trains on the labels. Stage s >= 1 trains a freshly
initialized student on the targets ``alpha * y + (1 - alpha) * p_{s-1}(x)``, where
``p_{s-1}`` is the selected model of the previous stage evaluated on the same (cropped,
augmented) input; the student then becomes the teacher of the next stage. We keep alpha
constant across stages (``secost_alpha``, default 0.5): the teacher's soft scores carry
the co-occurrence structure the weak labels lack, and the label term keeps each stage
anchored to the annotation so errors cannot compound. Every stage has the same schedule
and its own model selection; the last stage's model is the output, and the validation mAP
of every stage is reported.
"""

import csv
import dataclasses
import json
from typing import Optional, Tuple

from absl import logging
import keras
from keras import ops
import numpy as np
import tensorflow as tf

from av_sound_tf.core import files
from av_sound_tf.core import labels as labels_lib
from av_sound_tf.core import metrics as metrics_lib
from av_sound_tf.core import model_files
from av_sound_tf.modeling import models
from av_sound_tf.train import pipeline
from av_sound_tf.core import schema

STRATEGIES = ("mirrored", "multi_worker_mirrored", "one_device", "default")


def configure_cpu_replicas(num: int):
  """Splits the CPU into `num` logical devices (for multi-replica runs without GPUs).

  Must run before TensorFlow initializes its devices.
  """
  if num <= 1:
    return
  cpus = tf.config.list_physical_devices("CPU")
  try:
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(num)])
  except RuntimeError as e:
    raise RuntimeError("configure_cpu_replicas must run before TensorFlow initializes "
                       "devices (call it first thing in the program).") from e


def get_strategy(name: str = "mirrored") -> tf.distribute.Strategy:
  """A tf.distribute strategy by name (official common/distribute_utils.py style).

  * ``mirrored``: all local GPUs; without GPUs, all logical CPU devices (one unless
    `configure_cpu_replicas` split the CPU), the same code path.
  * ``multi_worker_mirrored``: synchronous training over the workers in ``TF_CONFIG``.
  * ``one_device``: the first GPU, else the CPU.
  * ``default``: no distribution.
  """
  if name == "mirrored":
    gpus = tf.config.list_logical_devices("GPU")
    devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
    return tf.distribute.MirroredStrategy(devices=devices)
  if name == "multi_worker_mirrored":
    return tf.distribute.MultiWorkerMirroredStrategy()
  if name == "one_device":
    gpus = tf.config.list_logical_devices("GPU")
    return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
  if name == "default":
    return tf.distribute.get_strategy()
  raise ValueError(f"Unknown strategy. Expected one of {STRATEGIES}. Received: {name!r}")


@dataclasses.dataclass
class TrainConfig:
  """Everything a training run depends on (written to config.json)."""

  kind: str  # audio, visual or embedding
  model_dir: str
  data_dir: str = ""  # prepared shards (audio, visual)
  train_splits: Tuple[str, ...] = ("train",)
  validation_splits: Tuple[str, ...] = ("validation",)
  # kind=embedding: AudioSet released-feature TFRecord globs instead of data_dir/splits.
  train_pattern: str = ""
  validation_pattern: str = ""
  num_classes: int = 0  # 0: from dataset_info.json (527 for AudioSet features)
  width: float = 1.0
  aggregation: str = "average"
  num_frames: int = 1024
  dropout: float = 0.3
  batch_size: int = 32
  epochs: int = 10
  steps_per_epoch: int = 0  # 0: one pass over the training data
  learning_rate: float = 1e-3
  lr_schedule: str = "constant"  # or cosine: decays to 0 over all training steps
  seed: int = 0
  deterministic: bool = False
  precision: str = "float32"  # or mixed_bfloat16 (docs/benchmarks.md; bfloat16_warning)
  strategy: str = "mirrored"
  balance: bool = False
  mixup_alpha: float = 0.0
  time_mask: int = 0
  freq_mask: int = 0
  eval_crop: str = "start"
  shuffle_buffer: int = 2048
  verify_shards: bool = True  # read every shard once before training (names a bad file)
  skip_corrupt_shards: bool = False  # leave damaged shards out (listed in the summary)
  model_selection: str = "best"  # best: highest val_mAP epoch; last: the final weights
  secost_stages: int = 0
  secost_alpha: float = 0.5
  # The audio network: mil_convnet (Table 1) or mobile_mil (the compact on-device student).
  architecture: str = "mil_convnet"
  # Knowledge distillation (bin/distill): an audio teacher, or audio + visual + fusion
  # models whose fused scores teach an audio-only student.
  teacher_audio_model: str = ""
  teacher_visual_model: str = ""
  teacher_fusion_model: str = ""
  distill_alpha: float = 0.5  # weight of the labels; 1 - alpha goes to the teacher
  distill_temperature: float = 1.0
  # Audiovisual teacher only: per class and clip, alpha_a * fused + (1 - alpha_a) * audio,
  # with alpha_a the attention fusion's weight on audio (the visual modality teaches only
  # where the fusion itself leans on the audio).
  distill_gate: bool = False
  # Per-class Platt scaling of the teacher's scores on the validation splits before it
  # teaches (`calibrate_teacher`): a fusion model selected by mAP ranks well but can be
  # badly calibrated (negatives near 0.2), and distillation copies scores, not ranks.
  distill_calibrate: bool = True
  # Splits of unlabeled clips (prepare_data --allow_unlabeled) trained on the teacher only.
  unlabeled_splits: Tuple[str, ...] = ()
  verbose: int = 1

  def to_dict(self):
    d = dataclasses.asdict(self)
    d["train_splits"], d["validation_splits"] = list(self.train_splits), list(
        self.validation_splits)
    d["unlabeled_splits"] = list(self.unlabeled_splits)
    return d


class Distiller(keras.Model):
  """Trains `student` on alpha * L(y, p) + (1 - alpha) * T^2 * L(q_T, p_T).

  L is the compiled loss (binary cross-entropy), p the student's and q the teacher's clip
  scores, and x_T = sigmoid(logit(x) / T) softens both (Hinton et al. 2015, per class for
  sigmoid outputs; T^2 keeps the gradient scale). With T = 1 this is L against
  alpha * y + (1 - alpha) * q, SeCoST's target (the loss is linear in the target).

  The student sees only the log-mel: when the input is a dict (an audiovisual teacher's
  inputs), its "log_mel" entry. Unlabeled clips (targets of -1 from the pipeline) get only
  the teacher term; the label term averages over the whole batch, so it weighs in
  proportion to the labeled share of the batch.
  """

  def __init__(self, student, teacher, alpha, temperature=1.0, **kwargs):
    super().__init__(**kwargs)
    if not 0.0 <= alpha <= 1.0 or temperature <= 0:
      raise ValueError(f"Need 0 <= alpha <= 1 and temperature > 0. Received: alpha={alpha}, "
                       f"temperature={temperature}")
    self.student = student
    self.teacher = teacher
    self.teacher.trainable = False
    self.alpha = alpha
    self.temperature = temperature

  def call(self, x, training=False):
    return self.student(x["log_mel"] if isinstance(x, dict) else x, training=training)

  def _soften(self, p):
    if self.temperature == 1.0:
      return p
    p = ops.clip(p, 1e-7, 1.0 - 1e-7)
    return ops.sigmoid((ops.log(p) - ops.log1p(-p)) / self.temperature)

  def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
    soft = ops.stop_gradient(self.teacher(x, training=False))
    labeled = ops.cast(y[:, 0] >= 0, y_pred.dtype)  # unlabeled clips carry -1
    hard_weight = labeled if sample_weight is None else labeled * sample_weight
    hard = super().compute_loss(x, ops.maximum(y, 0.0), y_pred, hard_weight, training)
    distill = super().compute_loss(x, self._soften(soft), self._soften(y_pred), sample_weight,
                                   training)
    return self.alpha * hard + (1.0 - self.alpha) * self.temperature ** 2 * distill


class BackupAndRestore(keras.callbacks.BackupAndRestore):
  """Keras' BackupAndRestore plus the random-seed generator states (dropout masks).

  Keras 3.6 saves weights and optimizer state but not the ``SeedGenerator`` states that
  drive dropout, so a resumed run would draw other masks than the uninterrupted one. They
  are saved next to the backup as ``seed_generators.json`` and restored with it.
  """

  def _seed_variables(self):
    return [v for v in self.model.variables if "seed_generator_state" in v.path]

  def _seed_path(self):
    return tf.io.gfile.join(self.backup_dir, "seed_generators.json")

  def on_train_begin(self, logs=None):
    super().on_train_begin(logs)
    if tf.io.gfile.exists(self._seed_path()) and tf.io.gfile.exists(self._weights_path):
      with tf.io.gfile.GFile(self._seed_path()) as f:
        states = json.load(f)
      variables = self._seed_variables()
      if len(states) == len(variables):  # in model order: names get uniquified per process
        for v, state in zip(variables, states):
          v.assign(np.asarray(state, dtype=v.dtype))

  def _save_model(self):
    super()._save_model()
    states = [np.asarray(v.numpy()).tolist() for v in self._seed_variables()]
    files.write_json(self._seed_path(), states)


@dataclasses.dataclass
class _Data:
  train_files: list
  validation_files: list
  num_examples: int
  class_counts: Optional[list]
  num_classes: int
  embedding_dim: int
  label_map: Optional[labels_lib.LabelMap]
  skipped_shards: list = dataclasses.field(default_factory=list)


def _split_files(data_dir, splits):
  files = []
  for split in splits:
    files.extend(schema.list_shards(data_dir, split))
  return files


def load_data(config: TrainConfig) -> _Data:
  """Finds the shards and dataset statistics a run needs."""
  if config.kind == "embedding":
    train_files = sorted(tf.io.gfile.glob(config.train_pattern))
    val_files = sorted(tf.io.gfile.glob(config.validation_pattern))
    if not train_files or not val_files:
      raise FileNotFoundError(f"No files match --train_pattern={config.train_pattern!r} or "
                              f"--validation_pattern={config.validation_pattern!r}")
    return _Data(train_files, val_files, 0, None, config.num_classes or 527, 0, None)
  info = schema.read_dataset_info(config.data_dir)
  splits = info["splits"]
  for split in (tuple(config.train_splits) + tuple(config.validation_splits) +
                tuple(config.unlabeled_splits)):
    if split not in splits:
      raise ValueError(f"Split {split!r} is not in {config.data_dir} (splits: {sorted(splits)})")
  teacher = bool(config.teacher_audio_model)  # SeCoST stage 0 has none: no unlabeled clips
  for split in tuple(config.train_splits) + tuple(config.validation_splits):
    if splits[split].get("num_unlabeled") and not (
        teacher and split in config.train_splits):
      raise ValueError(f"Split {split!r} holds {splits[split]['num_unlabeled']} unlabeled "
                       "clips: train on them only with a teacher (bin/distill "
                       "--unlabeled_splits), never validate on them.")
  if config.unlabeled_splits and not teacher:
    raise ValueError("--unlabeled_splits needs a distillation teacher (bin/distill).")
  if config.unlabeled_splits and config.mixup_alpha:
    raise ValueError("Mixup cannot mix unlabeled clips' missing labels: drop --mixup_alpha.")
  num_examples = sum(splits[s]["num_examples"] for s in
                     tuple(config.train_splits) + tuple(config.unlabeled_splits))
  counts = None
  if all("class_counts" in splits[s] for s in config.train_splits):
    counts = np.sum([splits[s]["class_counts"] for s in config.train_splits], axis=0).tolist()
  label_map = labels_lib.LabelMap.from_csv(
      tf.io.gfile.join(config.data_dir, info.get("labels_file", schema.LABELS_FILE)))
  train_files = _split_files(config.data_dir,
                             tuple(config.train_splits) + tuple(config.unlabeled_splits))
  val_files = _split_files(config.data_dir, config.validation_splits)
  skipped = []
  if config.verify_shards:
    train_files, bad, records = schema.check_shards(
        train_files, config.skip_corrupt_shards, expected_records=num_examples)
    skipped += bad
    if bad:  # steps per epoch follow what is left; class counts are then approximate
      logging.warning("Training on %d of %d records: %d damaged shard(s) skipped.",
                      records, num_examples, len(bad))
      num_examples = records
    val_records = sum(splits[s]["num_examples"] for s in config.validation_splits)
    val_files, bad, _ = schema.check_shards(val_files, config.skip_corrupt_shards,
                                            expected_records=val_records)
    skipped += bad
    if not train_files or not val_files:
      raise ValueError("Every training or validation shard is damaged: re-run "
                       "bin/prepare_data.")
  return _Data(train_files, val_files, num_examples, counts, info["num_classes"],
               int(info.get("embedding_dim") or 0), label_map, skipped)


class StopOnNonFiniteLoss(keras.callbacks.Callback):
  """Stops with a clear error when the loss turns NaN/Inf (inputs are checked upstream, so
  this is divergence). The backup still holds the last finished epoch."""

  def on_train_batch_end(self, batch, logs=None):
    loss = (logs or {}).get("loss")
    if loss is not None and not np.isfinite(float(loss)):
      raise FloatingPointError(
          f"The training loss became {float(loss)} at batch {batch}: the model diverged. "
          "Lower --learning_rate (or use --lr_schedule=cosine) and rerun; the run resumes "
          "from its last finished epoch.")


def input_config(config: TrainConfig, data: _Data, batch_size=None) -> pipeline.InputConfig:
  return pipeline.InputConfig(
      kind=config.kind, num_classes=data.num_classes,
      batch_size=batch_size or config.batch_size, num_frames=config.num_frames,
      embedding_dim=data.embedding_dim, shuffle_buffer=config.shuffle_buffer,
      seed=config.seed, eval_crop=config.eval_crop, balance=config.balance,
      mixup_alpha=config.mixup_alpha, time_mask=config.time_mask, freq_mask=config.freq_mask)


def build_model(config: TrainConfig, data: _Data) -> keras.Model:
  if config.kind == "audio":
    if config.architecture not in models.AUDIO_ARCHITECTURES:
      raise ValueError(f"Unknown architecture {config.architecture!r}; use one of "
                       f"{sorted(models.AUDIO_ARCHITECTURES)}.")
    return models.AUDIO_ARCHITECTURES[config.architecture](
        num_classes=data.num_classes, num_frames=config.num_frames, width=config.width,
        aggregation=config.aggregation)
  if config.kind == "visual":
    return models.VisualDNN(num_classes=data.num_classes, embedding_dim=data.embedding_dim,
                            width=config.width, dropout=config.dropout)
  return models.EmbeddingMIL(num_classes=data.num_classes, aggregation=config.aggregation)


def _load(path, what):
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(f"{what} not found: {path}")
  return model_files.load_keras_model(path, what)


def distillation_teacher(config: TrainConfig, data: _Data) -> Optional[keras.Model]:
  """The teacher of bin/distill, or None.

  Audio teacher: its clip scores for the student's log-mel crop. Audiovisual teacher: the
  fusion model over the audio model's scores for that crop and the visual model's scores
  for the clip's mean frame embedding, with the presence flags (a clip without video gets
  the fusion model's audio-only fallback).
  """
  if not config.teacher_audio_model:
    if config.teacher_visual_model or config.teacher_fusion_model:
      raise ValueError("A distillation teacher needs --teacher_audio_model.")
    return None
  audio = models.any_length(_load(config.teacher_audio_model, "Teacher audio model"))
  if not (config.teacher_visual_model or config.teacher_fusion_model):
    return audio
  if not (config.teacher_visual_model and config.teacher_fusion_model):
    raise ValueError("An audiovisual teacher needs --teacher_visual_model and "
                     "--teacher_fusion_model (and --teacher_audio_model).")
  visual = _load(config.teacher_visual_model, "Teacher visual model")
  fusion_model = _load(config.teacher_fusion_model, "Teacher fusion model")
  for model, what in ((audio, "audio"), (visual, "visual"), (fusion_model, "fusion")):
    if model.output.shape[-1] != data.num_classes:
      raise ValueError(f"The teacher {what} model predicts {model.output.shape[-1]} classes; "
                       f"the data has {data.num_classes}.")
  inputs = {
      "log_mel": keras.Input((None, audio.input.shape[-1]), name="log_mel"),
      "embedding_mean": keras.Input((data.embedding_dim,), name="embedding_mean"),
      "has_audio": keras.Input((), dtype="int64", name="has_audio"),
      "has_video": keras.Input((), dtype="int64", name="has_video"),
  }
  present = lambda flag: ops.expand_dims(ops.cast(flag, "float32"), -1)  # pylint: disable=unnecessary-lambda-assignment
  h_audio = audio(inputs["log_mel"])
  fusion_inputs = {
      "h_audio": h_audio, "h_visual": visual(inputs["embedding_mean"]),
      "audio_present": present(inputs["has_audio"]),
      "visual_present": present(inputs["has_video"])}
  if not config.distill_gate:
    return keras.Model(inputs, fusion_model(fusion_inputs), name="audiovisual_teacher")
  from av_sound_tf.modeling import fusion as fusion_lib  # pylint: disable=g-import-not-at-top
  out = fusion_lib.with_attention_weights(fusion_model)(fusion_inputs)
  alpha = out["attention_weights"]
  gated = alpha * out["fused_scores"] + (1.0 - alpha) * h_audio
  return keras.Model(inputs, gated, name="gated_audiovisual_teacher")


class PlattScaling(keras.layers.Layer):
  """p -> sigmoid(slope * logit(p) + intercept), per class (fixed, not trained)."""

  def __init__(self, slope, intercept, **kwargs):
    super().__init__(trainable=False, **kwargs)
    self.slope = np.asarray(slope, np.float32)
    self.intercept = np.asarray(intercept, np.float32)

  def call(self, p):
    p = ops.clip(p, 1e-7, 1.0 - 1e-7)
    return ops.sigmoid(self.slope * (ops.log(p) - ops.log1p(-p)) + self.intercept)


def calibrate_teacher(teacher: keras.Model, dataset: tf.data.Dataset):
  """Fits per-class Platt scaling of `teacher`'s scores on `dataset` (batches of inputs and
  labels the teacher has not been trained on); returns (calibrated teacher, report).

  Each class gets a one-feature logistic regression on the logit of the teacher's score
  (scikit-learn, default L2); a class without both positives and negatives keeps its
  scores. The report gives per class the slope, intercept and the mean score of positives
  and negatives before and after.
  """
  from sklearn import linear_model  # pylint: disable=g-import-not-at-top
  labels, scores = metrics_lib.predict_dataset(teacher, dataset)
  scores = np.clip(scores, 1e-7, 1 - 1e-7)
  logits = np.log(scores) - np.log1p(-scores)
  num_classes = scores.shape[1]
  slope, intercept = np.ones(num_classes), np.zeros(num_classes)
  for c in range(num_classes):
    y = labels[:, c] > 0
    if 0 < y.sum() < len(y):
      fit = linear_model.LogisticRegression().fit(logits[:, c:c + 1], y)
      slope[c], intercept[c] = fit.coef_[0, 0], fit.intercept_[0]
  platt = PlattScaling(slope, intercept, name="platt_scaling")
  after = np.asarray(platt(scores.astype(np.float32)))
  pos, neg = labels > 0, labels <= 0
  mean = lambda x, m: float(x[m].mean()) if m.any() else float("nan")  # pylint: disable=unnecessary-lambda-assignment
  report = {"num_examples": int(len(labels)), "slope": slope.tolist(),
            "intercept": intercept.tolist(),
            "mean_positive_before": mean(scores, pos), "mean_negative_before": mean(scores, neg),
            "mean_positive_after": mean(after, pos), "mean_negative_after": mean(after, neg)}
  return keras.Model(teacher.inputs, platt(teacher.output),
                     name=f"calibrated_{teacher.name}"), report


def _best_so_far(history_path):
  """The best val_mAP recorded by an earlier (interrupted) run, or None."""
  if not tf.io.gfile.exists(history_path):
    return None
  with tf.io.gfile.GFile(history_path) as f:
    values = [float(r["val_mAP"]) for r in csv.DictReader(f) if r.get("val_mAP")]
  return max(values) if values else None


@keras.saving.register_keras_serializable(package="av_sound_tf")
class ReplicaMeanAdam(keras.optimizers.Adam):
  """Adam on the mean of the replicas' gradients.

  Keras 3.6's TensorFlow backend all-reduces gradients with a SUM (keras-team/keras#19308)
  while each replica's loss is the mean over its own part of the batch, so N replicas take
  N times the single-device gradient of the same global batch (measured: 2x with 2
  replicas, plain SGD). Dividing by num_replicas_in_sync makes a run on N replicas or N
  workers follow the single-device run with the same global batch.
  """

  def apply(self, grads, trainable_variables=None):
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    if replicas > 1:
      grads = [None if g is None else g / replicas for g in grads]
    return super().apply(grads, trainable_variables)


def learning_rate(config, steps_per_epoch):
  """Adam's learning rate: constant (the paper), or cosine decay to 0 over the whole run.

  The schedule is a function of the optimizer's step counter, which backups restore, so a
  resumed run continues the same curve.
  """
  if config.lr_schedule == "constant":
    return config.learning_rate
  if config.lr_schedule == "cosine":
    return keras.optimizers.schedules.CosineDecay(config.learning_rate,
                                                  decay_steps=steps_per_epoch * config.epochs)
  raise ValueError(f"Unknown lr_schedule {config.lr_schedule!r}; use constant or cosine.")


def _patch_keras_multi_worker_reduce():
  """Keras 3.6 reduces each step's scalar logs under MultiWorkerMirroredStrategy with
  strategy.reduce("MEAN", v, axis=0), which fails for scalars (tensorflow/tensorflow#72388).
  Reduce those with axis=None (the mean over all replicas) and leave everything else to
  Keras. Applied only for multi-worker runs; idempotent."""
  from keras.src.backend.tensorflow import trainer as tf_trainer  # pylint: disable=g-import-not-at-top
  original = tf_trainer.reduce_per_replica
  if getattr(original, "_av_sound_tf_patched", False):
    return

  def reduce_per_replica(values, strategy, reduction):
    if (reduction in ("auto", "mean") and
        isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)):
      return keras.tree.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None),
                                      values)
    return original(values, strategy, reduction)

  reduce_per_replica._av_sound_tf_patched = True  # pylint: disable=protected-access
  tf_trainer.reduce_per_replica = reduce_per_replica


def _num_workers(strategy):
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    return 1
  spec = resolver.cluster_spec().as_dict()
  return max(1, len(spec.get("worker", [])) + len(spec.get("chief", [])))


def _worker_index(strategy):
  """0 for the chief (or worker 0 without a chief), then the workers in order."""
  resolver = strategy.cluster_resolver
  has_chief = "chief" in resolver.cluster_spec().as_dict()
  if resolver.task_type == "chief":
    return 0
  return resolver.task_id + (1 if has_chief else 0)


def _worker_model_dir(config, strategy):
  """The chief (task chief/0, or worker/0 without a chief) writes config.model_dir; other
  workers write their backups and copies under model_dir/.workers/ (the TF guidance for
  multi-worker checkpoints: never two writers on one path)."""
  if _num_workers(strategy) <= 1 or _worker_index(strategy) == 0:
    return config.model_dir
  resolver = strategy.cluster_resolver
  return tf.io.gfile.join(config.model_dir, ".workers",
                          f"{resolver.task_type}{resolver.task_id}")


# CPU flags of native bfloat16 arithmetic: x86 AVX512-BF16 and AMX (/proc/cpuinfo "flags"),
# Arm BF16 (/proc/cpuinfo "Features").
BFLOAT16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
BFLOAT16_SLOW_WARNING = (
    "--precision=mixed_bfloat16 on a CPU without native bfloat16 (no avx512_bf16, amx_bf16 "
    "or bf16 flag in /proc/cpuinfo) and no GPU: bfloat16 is emulated here and trains about "
    "10x slower than float32 (measured: 0.15 against 1.75 clips/s on 2 such cores). Use "
    "--precision=float32 on this machine.")


def cpu_flags(cpuinfo: str) -> set:
  """The CPU feature flags in /proc/cpuinfo text (x86 ``flags``, Arm ``Features`` lines)."""
  found = set()
  for line in cpuinfo.splitlines():
    key, _, value = line.partition(":")
    if key.strip() in ("flags", "Features"):
      found.update(value.split())
  return found


def _read_cpuinfo():
  try:
    with open("/proc/cpuinfo") as f:  # a local system file, not data: no gfile
      return f.read()
  except OSError:
    return ""


def _gpu_capabilities():
  """Compute capabilities (major, minor) of the local GPUs; None where unknown."""
  return [tf.config.experimental.get_device_details(gpu).get("compute_capability")
          for gpu in tf.config.list_physical_devices("GPU")]


def bfloat16_warning(precision: str, cpuinfo: Optional[str] = None,
                     gpu_capabilities: Optional[list] = None) -> Optional[str]:
  """The warning for a bfloat16 run on hardware that only emulates it, else None.

  Native: a GPU of compute capability 8.0 or later (or of unknown capability), or a CPU with
  a flag in `BFLOAT16_CPU_FLAGS`. Without any GPU and with none of those flags (and a
  readable /proc/cpuinfo: elsewhere nothing is known and nothing is said) bfloat16 is
  emulated, about 10x slower than float32. GPUs older than 8.0 get the warning too.
  """
  if precision != "mixed_bfloat16":
    return None
  gpus = _gpu_capabilities() if gpu_capabilities is None else gpu_capabilities
  if gpus:
    old = [c for c in gpus if c is not None and tuple(c) < (8, 0)]
    if len(old) < len(gpus):
      return None
    return (f"--precision=mixed_bfloat16 on GPUs of compute capability "
            f"{'.'.join(map(str, old[0]))} (bfloat16 is native from 8.0, Ampere): it is "
            "emulated and slower than float32. Use --precision=float32 on this machine.")
  flags = cpu_flags(_read_cpuinfo() if cpuinfo is None else cpuinfo)
  if not flags or flags & set(BFLOAT16_CPU_FLAGS):
    return None
  return BFLOAT16_SLOW_WARNING


def _initial_epoch(backup_dir):
  path = tf.io.gfile.join(backup_dir, "training_metadata.json")
  if not tf.io.gfile.exists(path):
    return 0
  with tf.io.gfile.GFile(path) as f:
    return int(json.load(f)["epoch"])


def _fit_stage(config, data, strategy, stage_dir, stage=0, teacher_path=None,
               extra_callbacks=()):
  """Trains one stage in stage_dir; returns (selected model, best val mAP)."""
  tf.io.gfile.makedirs(stage_dir)
  keras.utils.set_random_seed(config.seed + 1000 * stage)  # fresh init for each student
  in_cfg = input_config(config, data)
  train_cfg = in_cfg
  if config.teacher_fusion_model:  # the audiovisual teacher needs both models' inputs
    train_cfg = dataclasses.replace(in_cfg, kind="audiovisual", require_audio=True)
  steps = config.steps_per_epoch or max(1, data.num_examples // config.batch_size)
  if not data.num_examples and not config.steps_per_epoch:
    raise ValueError("--steps_per_epoch is required when the number of training examples "
                     "is unknown (AudioSet feature files).")
  backup_dir = tf.io.gfile.join(stage_dir, "backup")
  initial_epoch = _initial_epoch(backup_dir)
  if initial_epoch:
    logging.info("Resuming %s from its backup at epoch %d.", stage_dir, initial_epoch)
  num_workers = _num_workers(strategy)
  if num_workers > 1:
    # Each worker reads its own share of the files (or, with fewer files than workers, of
    # the records), batched at the global size. Keras hands the dataset to
    # experimental_distribute_dataset, which (auto-sharding off) rebatches it so that each
    # step takes global_batch / num_workers examples from every worker.
    context = tf.distribute.InputContext(num_input_pipelines=num_workers,
                                         input_pipeline_id=_worker_index(strategy),
                                         num_replicas_in_sync=strategy.num_replicas_in_sync)
    logging.info("Input pipeline %d of %d.", context.input_pipeline_id, num_workers)
    # This pipeline's share of the records is not counted, so a resume starts at the
    # epoch's pass: exact when an epoch is one pass (the default steps_per_epoch).
    train_ds = pipeline.train_dataset(data.train_files, train_cfg, initial_epoch=initial_epoch,
                                      steps_per_epoch=steps, class_counts=data.class_counts,
                                      input_context=context,
                                      balance_examples=data.num_examples)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.OFF)
    train_ds = train_ds.with_options(options)
  else:
    train_ds = pipeline.train_dataset(data.train_files, train_cfg,
                                      num_examples=data.num_examples,
                                      initial_epoch=initial_epoch, steps_per_epoch=steps,
                                      class_counts=data.class_counts)
  val_ds = pipeline.eval_dataset(data.validation_files, in_cfg)
  with strategy.scope():
    student = build_model(config, data)
    distill_teacher = distillation_teacher(config, data)
    model = student
    if teacher_path:  # a SeCoST stage: the previous stage teaches
      teacher = model_files.load_keras_model(teacher_path)
      model = Distiller(student, teacher, config.secost_alpha)
    elif distill_teacher is not None:
      if config.distill_calibrate:
        # The teacher's inputs (train_cfg's kind); eval_dataset never mixes or masks.
        distill_teacher, report = calibrate_teacher(
            distill_teacher, pipeline.eval_dataset(data.validation_files, train_cfg))
        files.write_json(tf.io.gfile.join(stage_dir, "teacher_calibration.json"), report)
        logging.info("Teacher calibrated on %d validation clips: mean score of positives "
                     "%.3f -> %.3f, of negatives %.3f -> %.3f.", report["num_examples"],
                     report["mean_positive_before"], report["mean_positive_after"],
                     report["mean_negative_before"], report["mean_negative_after"])
      model = Distiller(student, distill_teacher, config.distill_alpha,
                        config.distill_temperature)
    if model is not student:  # build it (BackupAndRestore wants a built model)
      spec = train_ds.element_spec[0]
      model(tf.nest.map_structure(lambda s: tf.zeros([1, *s.shape[1:]], s.dtype), spec))
    model.compile(optimizer=ReplicaMeanAdam(learning_rate(config, steps)),
                  loss=keras.losses.BinaryCrossentropy(),
                  metrics=[metrics_lib.streaming_map_metric(data.num_classes)])
    # The optimizer's slots are created here, in the strategy's scope: left to the first
    # traced step (see below), a MirroredStrategy with two or more local replicas fails
    # with "You must feed a value for placeholder tensor ... cond/Placeholder" while
    # creating them inside the replicated step.
    model.optimizer.build(model.trainable_variables)
  history_path = tf.io.gfile.join(stage_dir, "history.csv")
  best_path = tf.io.gfile.join(stage_dir, "best.weights.h5")
  callbacks = [
      BackupAndRestore(backup_dir),
      metrics_lib.ValidationMAP(val_ds),
      keras.callbacks.ModelCheckpoint(best_path, monitor="val_mAP", mode="max",
                                      save_best_only=True, save_weights_only=True,
                                      initial_value_threshold=_best_so_far(history_path)),
      StopOnNonFiniteLoss(),
      keras.callbacks.CSVLogger(history_path, append=True),
      keras.callbacks.TensorBoard(tf.io.gfile.join(stage_dir, "logs")),
      *extra_callbacks,
  ]
  # Keras 3.6's fit() under a model-level strategy first takes one batch from the training
  # iterator to build the model symbolically: that batch is never trained on (the stream
  # shifts by one batch), and under MultiWorkerMirroredStrategy its all-reduce fails
  # ("Attempt to convert a value (PerReplica...)"). The models here are built already;
  # without a model-level strategy Keras defers the rest (optimizer, metrics) to the first
  # traced step and takes the strategy from the enclosing scope, as Keras 2 did.
  model._distribute_strategy = None  # pylint: disable=protected-access
  if num_workers > 1:
    _patch_keras_multi_worker_reduce()  # the per-step logs reduction, see there
  with strategy.scope():
    model.fit(train_ds, epochs=config.epochs, steps_per_epoch=steps, callbacks=callbacks,
              verbose=config.verbose)
  if config.model_selection == "best" and tf.io.gfile.exists(best_path):
    model.load_weights(best_path)
  best = _best_so_far(history_path)
  return student, best


def train(config: TrainConfig, extra_callbacks=(), overwrite=False) -> dict:
  """Trains, selects, saves and exports a model; returns a summary dict.

  A model_dir holding an interrupted run is resumed (finished SeCoST stages are kept); one
  holding a finished run is refused unless `overwrite` deletes it first.
  """
  if overwrite and tf.io.gfile.exists(config.model_dir):
    tf.io.gfile.rmtree(config.model_dir)
  if tf.io.gfile.exists(tf.io.gfile.join(config.model_dir, "validation_metrics.json")):
    raise ValueError(f"{config.model_dir} holds a finished run; use another --model_dir or "
                     "--overwrite.")
  previous_policy = keras.mixed_precision.dtype_policy()
  keras.mixed_precision.set_dtype_policy(config.precision)
  try:
    return _train(config, extra_callbacks)
  finally:
    keras.mixed_precision.set_dtype_policy(previous_policy)


def _train(config, extra_callbacks):
  if config.model_selection not in ("best", "last"):
    raise ValueError("model_selection must be best or last. "
                     f"Received: {config.model_selection!r}")
  if config.secost_stages and config.teacher_audio_model:
    raise ValueError("SeCoST stages and a distillation teacher cannot be combined.")
  # First: MultiWorkerMirroredStrategy must configure collectives before any TF op runs.
  strategy = get_strategy(config.strategy)
  warning = bfloat16_warning(config.precision)
  if warning:
    logging.warning(warning)
  if config.deterministic:
    tf.config.experimental.enable_op_determinism()
  keras.utils.set_random_seed(config.seed)
  data = load_data(config)
  config = dataclasses.replace(config, model_dir=_worker_model_dir(config, strategy))
  logging.info("Training %s model on %d replica(s), %d training files, %d validation files.",
               config.kind, strategy.num_replicas_in_sync, len(data.train_files),
               len(data.validation_files))
  tf.io.gfile.makedirs(config.model_dir)
  stages = []
  teacher_path = None
  for stage in range(config.secost_stages + 1):
    stage_dir = config.model_dir if stage == 0 and not config.secost_stages else \
        tf.io.gfile.join(config.model_dir, f"stage{stage}")
    stage_model_path = tf.io.gfile.join(stage_dir, "model.keras")
    if config.secost_stages and tf.io.gfile.exists(stage_model_path):
      best = _best_so_far(tf.io.gfile.join(stage_dir, "history.csv"))  # finished earlier
      logging.info("Stage %d is complete in %s; keeping it.", stage, stage_dir)
    else:
      model, best = _fit_stage(config, data, strategy, stage_dir, stage, teacher_path,
                               extra_callbacks)
      model.save(stage_model_path)
    stages.append({"stage": stage, "val_mAP": best, "model": stage_model_path})
    teacher_path = stage_model_path
  final_path = tf.io.gfile.join(config.model_dir, "model.keras")
  if final_path != teacher_path:
    tf.io.gfile.copy(teacher_path, final_path, overwrite=True)
  model = model_files.load_keras_model(final_path)
  model.export(tf.io.gfile.join(config.model_dir, "saved_model"), verbose=False)
  val_cfg = input_config(config, data)
  labels, scores = metrics_lib.predict_dataset(
      model, pipeline.eval_dataset(data.validation_files, val_cfg))
  _, summary = metrics_lib.summarize(labels, scores)
  summary.update(stages=stages, model=final_path, num_parameters=int(model.count_params()),
                 skipped_shards=[{"file": f, "reason": r} for f, r in data.skipped_shards])
  files.write_json(tf.io.gfile.join(config.model_dir, "config.json"), dict(
      config.to_dict(), num_classes=data.num_classes, embedding_dim=data.embedding_dim,
      num_replicas=strategy.num_replicas_in_sync))
  files.write_json(tf.io.gfile.join(config.model_dir, "validation_metrics.json"), summary)
  return summary
