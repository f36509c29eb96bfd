"""Shared plumbing for the absl binaries in bin/: quiet logs and clear errors.

Binaries import the installed package (``make install`` installs it editable) and never
touch ``sys.path``. Required flags are marked with absl's ``flags.mark_flags_as_required``
and enum flags take their values from the library's own tuples, so a flag accepts exactly
what the code that interprets it knows.

A required flag left out or a bad flag value is reported by `run` as one line on stderr
(``tag: error: --model is required``; other flag errors in absl's words), exit status 1,
before ``main`` starts. A binary's ``main`` raises `UsageError` (bad
flag combinations) or lets library errors such as ``ValueError``/``FileNotFoundError``
escape; `run` turns them into one line on stderr and exit status 2 instead of a stack
trace. ``--verbosity=1`` (or ``AV_SOUND_TF_DEBUG=1``) shows the trace for debugging.

Every binary writes the flags it runs with to ``<its output folder>/<binary>.flags``
(`write_flagfile`), one ``--name=value`` per line, so that ``bin/<binary>
--flagfile=<that file>`` repeats the run (flags given after ``--flagfile`` override it).
"""

import os
import re
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags as absl_flags  # pylint: disable=g-import-not-at-top
from absl import logging  # pylint: disable=g-import-not-at-top

UsageError = app.UsageError

# --input of bin/train_audio: prepared log-mel shards, or AudioSet's released VGGish
# features (train_config_from_flags turns it into TrainConfig.kind).
AUDIO_INPUTS = ("log_mel", "audioset_embeddings")

# Errors that carry a message meant for the user.
_USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError,
                KeyError, FloatingPointError)


def _is_user_error(error):
  if isinstance(error, _USER_ERRORS):
    return True
  tf = sys.modules.get("tensorflow")  # tf.io.gfile raises tf.errors.NotFoundError etc.
  return tf is not None and isinstance(error, tf.errors.OpError)


# absl's message for a flag marked required (flags.mark_flag_as_required) and left out.
_MISSING_REQUIRED = re.compile(r"flag --(\w+)=None: Flag --\1 must have a value other than "
                               r"None\.")


def _flag_error_line(error: Exception) -> str:
  """absl's flag error (one line per failed check) as one line; the flags marked required
  and left out are named together: ``--model and --labels are required``."""
  missing, other = [], []
  for line in str(error).splitlines():
    match = _MISSING_REQUIRED.fullmatch(line.strip())
    if match:
      missing.append(f"--{match.group(1)}")
    elif line.strip():
      other.append(line.strip())
  if missing:
    names = missing[0] if len(missing) == 1 else (f"{', '.join(missing[:-1])} and "
                                                  f"{missing[-1]}")
    other.insert(0, f"{names} {'is' if len(missing) == 1 else 'are'} required")
  return "; ".join(other)


def _parse_flags(argv):
  """absl's flag parsing, with a missing or bad flag reported as one line (exit status 1).

  absl's own parser prints a "FATAL Flags parsing error" block (one line per failed check,
  then a hint). --helpfull and the other help flags still print and exit from inside.
  """
  try:
    return absl_flags.FLAGS(argv)
  except absl_flags.Error as e:
    print(f"{os.path.basename(argv[0])}: error: {_flag_error_line(e)} (--helpfull lists the "
          "flags)", file=sys.stderr)
    sys.exit(1)


FLAGFILE_SUFFIX = ".flags"


def flagfile_lines(flag_values=None, modules=None, args=()):
  """The binary's flags as ``--name=value`` lines, sorted by name (absl's own spelling:
  ``--nooverwrite`` for a false bool, ``--modalities=audio,visual`` for a list); flags
  left at None are left out (absl cannot spell them). `modules`: the modules whose flags
  count (default: the binary, ``sys.argv[0]`` for absl, and this module, which defines the
  trainers' shared flags). `args`: positional arguments, one line each after the flags
  (absl passes them through from a flagfile).
  """
  flag_values = flag_values or absl_flags.FLAGS
  modules = modules or (sys.argv[0], __name__)
  by_module = flag_values.flags_by_module_dict()
  found = {flag.name: flag for module in modules for flag in by_module.get(module, [])}
  lines = [found[name].serialize() for name in sorted(found)
           if found[name].value is not None]
  for line in lines + [str(a) for a in args]:
    if "\n" in line.replace("\n--", "") or "\r" in line:  # multi flags: one line per value
      raise ValueError(f"Cannot write a flag file: a value holds a line break: {line!r}")
  return lines + [str(a) for a in args]


def write_flagfile(output_dir, args=(), keep_existing=False, flag_values=None,
                   modules=None):
  """Writes `flagfile_lines` to ``<output_dir>/<binary>.flags`` (through tf.io.gfile,
  atomically, creating the folder) and returns its path.

  Call it after the flags are validated and before the long work. A binary whose folder
  may hold an earlier run that the library resumes, refuses or deletes (--overwrite)
  calls it before the work with ``keep_existing=True`` (a new folder gets the file at
  once; an existing one keeps the flags its contents came from) and again after the work.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from av_sound_tf.core import files  # pylint: disable=g-import-not-at-top
  path = tf.io.gfile.join(output_dir, os.path.basename(sys.argv[0]) + FLAGFILE_SUFFIX)
  text = "".join(line + "\n" for line in flagfile_lines(flag_values, modules, args))
  if keep_existing and tf.io.gfile.exists(path):
    return path
  tf.io.gfile.makedirs(output_dir)
  files.write_text(path, text)
  return path


def _paths_in(argv):
  """Flag values and arguments that name a path on another file system (``scheme://``)."""
  values = list(argv[1:])
  for name in absl_flags.FLAGS:
    value = absl_flags.FLAGS[name].value
    values.extend(value if isinstance(value, list) else [value])
  return [v for v in values if isinstance(v, str) and "://" in v]


def _prepare_file_systems(argv):
  """Registers the file systems the run's paths need (hdfs://, ... through tensorflow-io)
  and refuses unsupported ones (s3://) before any work: core/files.prepare_file_system."""
  from av_sound_tf.core import files  # pylint: disable=g-import-not-at-top
  for path in _paths_in(argv):
    files.prepare_file_system(path)


def run(main):
  """`absl.app.run(main)` with clear one-line errors."""

  def wrapped(argv):
    try:
      _prepare_file_systems(argv)
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
  app.run(wrapped, flags_parser=_parse_flags)


def define_progress_flag(flags, lines="i of N, rate, ETA"):
  """--progress_every, defined the same way by every binary with a long stage
  (core/progress.py writes the lines); `lines` says what a line shows."""
  flags.DEFINE_float("progress_every", 5.0, f"Seconds between progress lines ({lines}) on "
                     "stderr; 0: a line per item.", lower_bound=0.0)


def define_train_flags(flags, kind, batch_size, epochs, architecture="mil_convnet"):
  """Flags shared by bin/train_audio, bin/train_visual and bin/distill (defaults differ).

  --model_dir is required (and --data_dir for kind="visual"); enum values come from the
  modules that interpret them.
  """
  # pylint: disable=g-import-not-at-top
  from av_sound_tf.modeling import models
  from av_sound_tf.train import distribution
  from av_sound_tf.train import fit
  from av_sound_tf.train import pipeline
  from av_sound_tf.train import training
  # pylint: enable=g-import-not-at-top
  flags.DEFINE_string("data_dir", None, "bin/prepare_data's output (shards, class map and "
                      "data set info).")
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
  flags.DEFINE_enum("lr_schedule", "constant", list(training.LR_SCHEDULES), "constant: the "
                    "paper's; cosine: decays to 0 over all epochs (steadier final weights "
                    "when --model_selection=last).")
  flags.DEFINE_integer("seed", 0, "Random seed (weights, data order, crops).")
  flags.DEFINE_bool("deterministic", False, "Deterministic ops (slower; exact resumes).")
  flags.DEFINE_enum("precision", "float32", list(distribution.PRECISIONS),
                    "mixed_bfloat16 computes in bfloat16 with float32 weights and scores: "
                    "1.2x faster training, 2x faster inference on CPUs with AVX512-BF16/AMX "
                    "and on recent GPUs (docs/benchmarks.md), but about 10x SLOWER on a CPU "
                    "without them (no avx512_bf16/amx_bf16 in /proc/cpuinfo) and no GPU, "
                    "where bfloat16 is emulated: training then warns at the start.")
  flags.DEFINE_enum("strategy", "mirrored", list(distribution.STRATEGIES),
                    "mirrored: all local GPUs (or the CPU); multi_worker_mirrored: the "
                    "workers in TF_CONFIG; one_device; default: none.")
  flags.DEFINE_integer("cpu_replicas", 0, "Split the CPU into this many logical devices "
                       "(multi-replica training without GPUs, for testing).", lower_bound=0)
  flags.DEFINE_bool("balance", False, "Class-balanced per-example loss weights "
                    "sum_c y_c / count_c (see av_sound_tf/train/pipeline.py).")
  flags.DEFINE_enum("model_selection", "best", list(fit.MODEL_SELECTIONS),
                    "best: keep the epoch with the highest validation mAP; last: keep the "
                    "final weights (use it when the validation split is also the test split).")
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
    flags.DEFINE_enum("input", "log_mel", list(AUDIO_INPUTS),
                      "log_mel: prepared shards; audioset_embeddings: AudioSet's released "
                      "VGGish feature TFRecords (--train_pattern, --validation_pattern).")
    flags.DEFINE_string("train_pattern", "", "Glob of AudioSet feature TFRecords (train).")
    flags.DEFINE_string("validation_pattern", "", "Glob of AudioSet feature TFRecords "
                        "(validation).")
    flags.DEFINE_enum("architecture", architecture, list(models.AUDIO_ARCHITECTURES),
                      "mil_convnet: Table 1 (14.7 M parameters, 10.7 GFLOP per 10 s); "
                      "mobile_mil: the compact on-device student (1.35 M, 0.27 GFLOP).")
    flags.DEFINE_enum("aggregation", "average", list(models.AGGREGATIONS),
                      "MIL aggregation g() of segment scores (paper: average).")
    flags.DEFINE_integer("num_frames", 1024, "Log-mel frames per training example "
                         "(1024 = 10.24 s, Table 1).", lower_bound=models.MIN_FRAMES)
    flags.DEFINE_enum("eval_crop", "start", list(pipeline.EVAL_CROPS), "Validation crop.")
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
  flags.mark_flag_as_required("model_dir")
  if kind == "visual":
    flags.mark_flag_as_required("data_dir")


def train_config_from_flags(flags_values, kind):
  """TrainConfig from parsed flag values (the binaries pass FLAGS in).

  --model_dir (and --data_dir for kind="visual") are required flags, checked by absl before
  ``main`` runs; what depends on other flags (--data_dir or the patterns, by --input) is
  checked here.
  """
  from av_sound_tf.train import training  # pylint: disable=g-import-not-at-top
  f = flags_values
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
