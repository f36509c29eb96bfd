"""Shared plumbing for the absl binaries in bin/: quiet logs and clear errors.

A binary's ``main`` raises `UsageError` (bad flags) or lets library errors such as
``ValueError``/``FileNotFoundError`` escape; `run` turns them into one line on stderr and
exit status 2 instead of a stack trace. ``--verbosity=1`` (or ``AV_SOUND_TF_DEBUG=1``)
shows the trace for debugging.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import logging  # pylint: disable=g-import-not-at-top

UsageError = app.UsageError

# Errors that carry a message meant for the user.
_USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError,
                KeyError, FloatingPointError)


def _is_user_error(error):
  if isinstance(error, _USER_ERRORS):
    return True
  tf = sys.modules.get("tensorflow")  # tf.io.gfile raises tf.errors.NotFoundError etc.
  return tf is not None and isinstance(error, tf.errors.OpError)


def run(main):
  """`absl.app.run(main)` with clear one-line errors."""

  def wrapped(argv):
    try:
      return main(argv)
    except app.UsageError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      if not _is_user_error(e) or os.environ.get("AV_SOUND_TF_DEBUG") or (
          logging.get_verbosity() >= logging.DEBUG):
        raise
      name = os.path.basename(sys.argv[0])
      message = getattr(e, "message", None) or str(e)
      print(f"{name}: error: {message}", file=sys.stderr)
      return 2

  logging.set_verbosity(logging.INFO)
  # TensorFlow's (SavedModel internals) and Beam's (worker harness) INFO lines are noise
  # for a user.
  import logging as py_logging  # pylint: disable=g-import-not-at-top
  for logger in ("tensorflow", "apache_beam"):
    py_logging.getLogger(logger).setLevel(py_logging.WARNING)
  app.run(wrapped)


def define_train_flags(flags, kind, batch_size, epochs, architecture="mil_convnet"):
  """Flags shared by bin/train_audio, bin/train_visual and bin/distill (defaults differ)."""
  flags.DEFINE_string("data_dir", None, "Output of bin/prepare_data (shards, "
                      "dataset_info.json).")
  flags.DEFINE_list("train_splits", ["train"], "Splits (shard prefixes) to train on, "
                    "e.g. 1,2,3,4 for ESC-10 folds.")
  flags.DEFINE_list("validation_splits", ["validation"], "Splits for model selection "
                    "(validation mAP after every epoch).")
  flags.DEFINE_string("model_dir", None, "Where checkpoints, logs and the model go.")
  flags.DEFINE_float("width", 1.0, "Multiplier on layer widths (1.0 = the paper's model).",
                     lower_bound=0.01)
  flags.DEFINE_integer("batch_size", batch_size, "Global batch size (split over replicas).",
                       lower_bound=1)
  flags.DEFINE_integer("epochs", epochs, "Epochs.", lower_bound=1)
  flags.DEFINE_integer("steps_per_epoch", 0, "Batches per epoch (0: one pass over the "
                       "training data). Backups happen every epoch.", lower_bound=0)
  flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate.", lower_bound=0.0)
  flags.DEFINE_enum("lr_schedule", "constant", ["constant", "cosine"], "constant: the "
                    "paper's; cosine: decays to 0 over all epochs (steadier final weights "
                    "when --model_selection=last).")
  flags.DEFINE_integer("seed", 0, "Random seed (weights, data order, crops).")
  flags.DEFINE_bool("deterministic", False, "Deterministic ops (slower; exact resumes).")
  flags.DEFINE_enum("precision", "float32", ["float32", "mixed_bfloat16"],
                    "mixed_bfloat16 computes in bfloat16 with float32 weights and scores: "
                    "1.2x faster training, 2x faster inference on CPUs with AVX512-BF16/AMX "
                    "and on recent GPUs (docs/benchmarks.md), but about 10x SLOWER on a CPU "
                    "without them (no avx512_bf16/amx_bf16 in /proc/cpuinfo) and no GPU, "
                    "where bfloat16 is emulated: training then warns at the start.")
  flags.DEFINE_enum("strategy", "mirrored", ["mirrored", "multi_worker_mirrored",
                                             "one_device", "default"],
                    "mirrored: all local GPUs (or the CPU); multi_worker_mirrored: the "
                    "workers in TF_CONFIG; one_device; default: none.")
  flags.DEFINE_integer("cpu_replicas", 0, "Split the CPU into this many logical devices "
                       "(multi-replica training without GPUs, for testing).", lower_bound=0)
  flags.DEFINE_bool("balance", False, "Class-balanced per-example loss weights "
                    "sum_c y_c / count_c (see av_sound_tf/train/pipeline.py).")
  flags.DEFINE_enum("model_selection", "best", ["best", "last"], "best: keep the epoch with "
                    "the highest validation mAP; last: keep the final weights (use it when "
                    "the validation split is also the test split).")
  flags.DEFINE_bool("verify_shards", True, "Read every shard once before training, so a "
                    "damaged file is named up front (turn off only for very large sets "
                    "already checked).")
  flags.DEFINE_bool("skip_corrupt_shards", False, "Train without damaged shards (each is "
                    "logged and listed in validation_metrics.json) instead of stopping.")
  flags.DEFINE_bool("overwrite", False, "Delete a finished run in --model_dir first "
                    "(an interrupted run is always resumed).")
  flags.DEFINE_bool("verbose", True, "Keras progress bars (one line per epoch when off).")
  if kind == "visual":
    flags.DEFINE_float("dropout", 0.3, "Dropout after the first two hidden layers.",
                       lower_bound=0.0, upper_bound=1.0)
    flags.DEFINE_float("mixup_alpha", 0.0, "Mixup Beta(a, a); 0 disables it.",
                       lower_bound=0.0)
  else:
    flags.DEFINE_enum("input", "log_mel", ["log_mel", "audioset_embeddings"],
                      "log_mel: prepared shards; audioset_embeddings: AudioSet's released "
                      "VGGish feature TFRecords (--train_pattern, --validation_pattern).")
    flags.DEFINE_string("train_pattern", "", "Glob of AudioSet feature TFRecords (train).")
    flags.DEFINE_string("validation_pattern", "", "Glob of AudioSet feature TFRecords "
                        "(validation).")
    flags.DEFINE_enum("architecture", architecture, ["mil_convnet", "mobile_mil"],
                      "mil_convnet: Table 1 (14.7 M parameters, 10.7 GFLOP per 10 s); "
                      "mobile_mil: the compact on-device student (1.35 M, 0.27 GFLOP).")
    flags.DEFINE_enum("aggregation", "average", ["average", "max", "linear_softmax",
                                                 "attention"],
                      "MIL aggregation g() of segment scores (paper: average).")
    flags.DEFINE_integer("num_frames", 1024, "Log-mel frames per training example "
                         "(1024 = 10.24 s, Table 1).", lower_bound=96)
    flags.DEFINE_enum("eval_crop", "start", ["start", "center"], "Validation crop.")
    flags.DEFINE_float("mixup_alpha", 0.0, "Mixup Beta(a, a); 0 disables it.",
                       lower_bound=0.0)
    flags.DEFINE_integer("time_mask", 0, "SpecAugment: max masked frames (0: off).",
                         lower_bound=0)
    flags.DEFINE_integer("freq_mask", 0, "SpecAugment: max masked mel bins (0: off).",
                         lower_bound=0)
    flags.DEFINE_integer("secost_stages", 0, "SeCoST stages after the first (0: plain "
                         "training).", lower_bound=0)
    flags.DEFINE_float("secost_alpha", 0.5, "SeCoST weight of the labels against the "
                       "previous stage's scores.", lower_bound=0.0, upper_bound=1.0)


def train_config_from_flags(flags_values, kind):
  """TrainConfig from parsed flag values (the binaries pass FLAGS in)."""
  from av_sound_tf.train import training  # pylint: disable=g-import-not-at-top
  f = flags_values
  if not f.model_dir:
    raise UsageError("--model_dir is required.")
  common = dict(
      model_dir=f.model_dir, data_dir=f.data_dir or "", train_splits=tuple(f.train_splits),
      validation_splits=tuple(f.validation_splits), width=f.width, batch_size=f.batch_size,
      epochs=f.epochs, steps_per_epoch=f.steps_per_epoch, learning_rate=f.learning_rate,
      lr_schedule=f.lr_schedule, verify_shards=f.verify_shards,
      skip_corrupt_shards=f.skip_corrupt_shards,
      seed=f.seed, deterministic=f.deterministic, precision=f.precision,
      strategy=f.strategy, balance=f.balance, model_selection=f.model_selection,
      mixup_alpha=f.mixup_alpha, verbose=1 if f.verbose else 2)
  if kind == "visual":
    if not f.data_dir:
      raise UsageError("--data_dir is required.")
    return training.TrainConfig(kind="visual", dropout=f.dropout, **common)
  if f.input == "audioset_embeddings":
    if not (f.train_pattern and f.validation_pattern):
      raise UsageError("--input=audioset_embeddings needs --train_pattern and "
                       "--validation_pattern.")
    return training.TrainConfig(kind="embedding", train_pattern=f.train_pattern,
                                validation_pattern=f.validation_pattern,
                                aggregation=f.aggregation, **common)
  if not f.data_dir:
    raise UsageError("--data_dir is required.")
  return training.TrainConfig(
      kind="audio", architecture=f.architecture, aggregation=f.aggregation,
      num_frames=f.num_frames, eval_crop=f.eval_crop,
      time_mask=f.time_mask, freq_mask=f.freq_mask, secost_stages=f.secost_stages,
      secost_alpha=f.secost_alpha, **common)


def print_summary(summary):
  keys = ("mAP", "mAUC", "d_prime", "accuracy")
  print("  ".join(f"{k}={summary[k]:.4f}" for k in keys if summary.get(k) is not None))
  print(f"evaluated {summary['evaluated_classes']} classes, excluded "
        f"{summary['excluded_classes']} (no positives or no negatives), "
        f"{summary['num_examples']} examples")
