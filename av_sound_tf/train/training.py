"""Training the audio, visual and embedding models (bin/train_audio, bin/train_visual,
bin/distill): the run's configuration, its data, its model, SeCoST stages.

`train(config)` reads the prepared data (`load_data`), builds the input pipelines, creates
the model, optimizer and metrics in the strategy's scope (`distribution`), and fits each
stage with `fit.fit_and_select`:

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
of every stage is reported. Knowledge distillation from a fixed teacher (bin/distill) is
`distillation`'s.
"""

import dataclasses
from typing import List, Optional, Tuple

from absl import logging
import keras
import tensorflow as tf

from av_sound_tf.core import dataset_info as dataset_info_lib
from av_sound_tf.core import files
from av_sound_tf.core import labels as labels_lib
from av_sound_tf.core import metrics as metrics_lib
from av_sound_tf.core import model_files
from av_sound_tf.core import schema
from av_sound_tf.modeling import models
from av_sound_tf.train import callbacks as callbacks_lib
from av_sound_tf.train import distillation
from av_sound_tf.train import distribution
from av_sound_tf.train import fit
from av_sound_tf.train import pipeline

KINDS = ("audio", "visual", "embedding")
LR_SCHEDULES = ("constant", "cosine")
AUDIOSET_CLASSES = 527  # AudioSet's released features (kind=embedding) without num_classes


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
  num_classes: int = 0  # 0: from the prepared data's info (527 for AudioSet features)
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




@dataclasses.dataclass
class TrainingData:
  """What a run reads: shard lists and the statistics of the prepared data."""

  train_files: List[str]
  validation_files: List[str]
  num_examples: int  # training records (0: unknown, AudioSet's released features)
  class_counts: Optional[List[int]]
  num_classes: int
  info: Optional[dataset_info_lib.DatasetInfo]  # None for AudioSet's released features
  label_map: Optional[labels_lib.LabelMap]
  skipped_shards: list = dataclasses.field(default_factory=list)

  @property
  def embedding_dim(self) -> int:
    return self.info.embedding_dim if self.info is not None else 0


def _split_files(info, splits):
  found = []
  for split in splits:
    found.extend(info.shards(split))
  return found


def load_data(config: TrainConfig) -> TrainingData:
  """Finds the shards and dataset statistics a run needs."""
  if config.kind == "embedding":
    train_files = sorted(tf.io.gfile.glob(config.train_pattern))
    val_files = sorted(tf.io.gfile.glob(config.validation_pattern))
    if not train_files or not val_files:
      raise FileNotFoundError(f"No files match --train_pattern={config.train_pattern!r} or "
                              f"--validation_pattern={config.validation_pattern!r}")
    return TrainingData(train_files, val_files, 0, None,
                        config.num_classes or AUDIOSET_CLASSES, None, None)
  info = dataset_info_lib.DatasetInfo.read(config.data_dir)
  train_splits = tuple(config.train_splits) + tuple(config.unlabeled_splits)
  for split in tuple(config.train_splits) + tuple(config.validation_splits) + tuple(
      config.unlabeled_splits):
    if not info.has_split(split):
      raise ValueError(f"Split {split!r} is not in {config.data_dir} "
                       f"(splits: {sorted(info.splits)})")
  teacher = bool(config.teacher_audio_model)  # SeCoST stage 0 has none: no unlabeled clips
  for split in tuple(config.train_splits) + tuple(config.validation_splits):
    unlabeled = info.splits[split].get("num_unlabeled")
    if unlabeled and not (teacher and split in config.train_splits):
      raise ValueError(f"Split {split!r} holds {unlabeled} unlabeled "
                       "clips: train on them only with a teacher (bin/distill "
                       "--unlabeled_splits), never validate on them.")
  if config.unlabeled_splits and not teacher:
    raise ValueError("--unlabeled_splits needs a distillation teacher (bin/distill).")
  if config.unlabeled_splits and config.mixup_alpha:
    raise ValueError("Mixup cannot mix unlabeled clips' missing labels: drop --mixup_alpha.")
  num_examples = info.num_examples(train_splits)
  counts = info.class_counts(config.train_splits)
  label_map = info.label_map()
  train_files = _split_files(info, train_splits)
  val_files = _split_files(info, config.validation_splits)
  skipped = []
  if config.verify_shards:
    train_files, bad, records = schema.check_shards(
        train_files, config.skip_corrupt_shards, expected_records=num_examples)
    skipped += bad
    if bad:  # steps per epoch follow what is left; class counts are then approximate
      logging.warning("Training on %d of %d records: %d damaged shard(s) skipped.",
                      records, num_examples, len(bad))
      num_examples = records
    val_files, bad, _ = schema.check_shards(
        val_files, config.skip_corrupt_shards,
        expected_records=info.num_examples(config.validation_splits))
    skipped += bad
    if not train_files or not val_files:
      raise ValueError("Every training or validation shard is damaged: re-run "
                       "bin/prepare_data.")
  return TrainingData(train_files, val_files, num_examples, counts, info.num_classes, info,
                      label_map, skipped)


def input_config(config: TrainConfig, data: TrainingData) -> pipeline.InputConfig:
  """The run's input pipeline: the data's classes and embedding size, the run's crops,
  augmentation and seed."""
  run = dict(num_frames=config.num_frames, shuffle_buffer=config.shuffle_buffer,
             seed=config.seed, eval_crop=config.eval_crop, balance=config.balance,
             mixup_alpha=config.mixup_alpha, time_mask=config.time_mask,
             freq_mask=config.freq_mask)
  if data.info is None:  # AudioSet's released features
    run["num_classes"] = data.num_classes
  return pipeline.input_config(data.info, config.kind, config.batch_size, **run)


def build_model(config: TrainConfig, data: TrainingData) -> keras.Model:
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


def _train_dataset(data, train_cfg, strategy, initial_epoch, steps):
  context = distribution.input_context(strategy)
  if context is None:
    return pipeline.train_dataset(data.train_files, train_cfg, num_examples=data.num_examples,
                                  initial_epoch=initial_epoch, steps_per_epoch=steps,
                                  class_counts=data.class_counts)
  # Each worker reads its own share of the files (or, with fewer files than workers, of
  # the records), batched at the global size. Keras hands the dataset to
  # experimental_distribute_dataset, which (auto-sharding off) rebatches it so that each
  # step takes global_batch / num_workers examples from every worker.
  logging.info("Input pipeline %d of %d.", context.input_pipeline_id,
               context.num_input_pipelines)
  # This pipeline's share of the records is not counted, so a resume starts at the
  # epoch's pass: exact when an epoch is one pass (the default steps_per_epoch).
  train_ds = pipeline.train_dataset(data.train_files, train_cfg, initial_epoch=initial_epoch,
                                    steps_per_epoch=steps, class_counts=data.class_counts,
                                    input_context=context, balance_examples=data.num_examples)
  options = tf.data.Options()
  options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
  return train_ds.with_options(options)


def _teacher(config, data, stage_dir, teacher_path, train_cfg):
  """(teacher, alpha, temperature) of a SeCoST stage or a distillation run, else None."""
  if teacher_path:  # a SeCoST stage: the previous stage teaches
    return model_files.load_keras_model(teacher_path), config.secost_alpha, 1.0
  teacher = distillation.distillation_teacher(config, data)
  if teacher is None:
    return None
  if config.distill_calibrate:
    # The teacher's inputs (train_cfg's kind); eval_dataset never mixes or masks.
    teacher, report = distillation.calibrate_teacher(
        teacher, pipeline.eval_dataset(data.validation_files, train_cfg))
    files.write_json(tf.io.gfile.join(stage_dir, "teacher_calibration.json"), report)
    logging.info("Teacher calibrated on %d validation clips: mean score of positives "
                 "%.3f -> %.3f, of negatives %.3f -> %.3f.", report["num_examples"],
                 report["mean_positive_before"], report["mean_positive_after"],
                 report["mean_negative_before"], report["mean_negative_after"])
  return teacher, config.distill_alpha, config.distill_temperature


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
  initial_epoch = callbacks_lib.initial_epoch(tf.io.gfile.join(stage_dir, fit.BACKUP))
  if initial_epoch:
    logging.info("Resuming %s from its backup at epoch %d.", stage_dir, initial_epoch)
  train_ds = _train_dataset(data, train_cfg, strategy, initial_epoch, steps)
  val_ds = pipeline.eval_dataset(data.validation_files, in_cfg)
  with strategy.scope():
    student = build_model(config, data)
    teacher = _teacher(config, data, stage_dir, teacher_path, train_cfg)
    model = student
    if teacher is not None:
      model = distillation.Distiller(student, *teacher)
      # Build it (BackupAndRestore wants a built model).
      spec = train_ds.element_spec[0]
      model(tf.nest.map_structure(lambda s: tf.zeros([1, *s.shape[1:]], s.dtype), spec))
    model.compile(optimizer=distribution.ReplicaMeanAdam(learning_rate(config, steps)),
                  loss=keras.losses.BinaryCrossentropy(),
                  metrics=[metrics_lib.streaming_map_metric(data.num_classes)])
    # The optimizer's slots are created here, in the strategy's scope: left to the first
    # traced step, a MirroredStrategy with two or more local replicas fails with "You must
    # feed a value for placeholder tensor ... cond/Placeholder" while creating them inside
    # the replicated step.
    model.optimizer.build(model.trainable_variables)
  best = fit.fit_and_select(
      model, train_ds, val_ds, stage_dir, epochs=config.epochs, steps_per_epoch=steps,
      model_selection=config.model_selection, strategy=strategy, verbose=config.verbose,
      extra_callbacks=extra_callbacks)
  return student, best


def train(config: TrainConfig, extra_callbacks=(), overwrite=False) -> dict:
  """Trains, selects, saves and exports a model; returns a summary dict.

  A model_dir holding an interrupted run is resumed (finished SeCoST stages are kept); one
  holding a finished run is refused unless `overwrite` deletes it first.
  """
  fit.start_model_dir(config.model_dir, overwrite)
  previous_policy = keras.mixed_precision.dtype_policy()
  keras.mixed_precision.set_dtype_policy(config.precision)
  try:
    return _train(config, extra_callbacks)
  finally:
    keras.mixed_precision.set_dtype_policy(previous_policy)


def _train(config, extra_callbacks):
  if config.model_selection not in fit.MODEL_SELECTIONS:
    raise ValueError("model_selection must be best or last. "
                     f"Received: {config.model_selection!r}")
  if config.secost_stages and config.teacher_audio_model:
    raise ValueError("SeCoST stages and a distillation teacher cannot be combined.")
  # First: MultiWorkerMirroredStrategy must configure collectives before any TF op runs.
  strategy = distribution.get_strategy(config.strategy)
  warning = distribution.bfloat16_warning(config.precision)
  if warning:
    logging.warning(warning)
  if config.deterministic:
    tf.config.experimental.enable_op_determinism()
  keras.utils.set_random_seed(config.seed)
  data = load_data(config)
  config = dataclasses.replace(
      config, model_dir=distribution.worker_model_dir(config.model_dir, strategy))
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
      best = fit.best_so_far(tf.io.gfile.join(stage_dir, fit.HISTORY))  # finished earlier
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
  labels, scores = metrics_lib.predict_dataset(
      model, pipeline.eval_dataset(data.validation_files, input_config(config, data)))
  _, summary = metrics_lib.summarize(labels, scores)
  summary.update(stages=stages, model=final_path, num_parameters=int(model.count_params()),
                 skipped_shards=[{"file": f, "reason": r} for f, r in data.skipped_shards])
  files.write_json(tf.io.gfile.join(config.model_dir, "config.json"), dict(
      config.to_dict(), num_classes=data.num_classes, embedding_dim=data.embedding_dim,
      num_replicas=strategy.num_replicas_in_sync))
  files.write_json(tf.io.gfile.join(config.model_dir, fit.VALIDATION_METRICS), summary)
  return summary
