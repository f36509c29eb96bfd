"""Where training runs: tf.distribute strategies, workers, precision, and Keras 3.6 work-arounds.

* `get_strategy` returns a strategy by name (official ``common/distribute_utils.py`` style);
  `configure_cpu_replicas` splits the CPU into logical devices so that a machine without
  GPUs runs the multi-replica code path (tests do).
* Multi-worker runs (``TF_CONFIG``): `num_workers`, `worker_index`, `input_context` (each
  worker's share of the input) and `worker_model_dir` (one writer per path).
* `ReplicaMeanAdam` and `patch_keras_multi_worker_reduce` make N replicas or N workers
  follow the single-device run (Keras 3.6 sums replicas' gradients and fails to reduce
  scalar logs over workers).
* `bfloat16_warning`: mixed bfloat16 on hardware that only emulates it is ~10x slower.
"""

from typing import Optional

import keras
import tensorflow as tf

from av_sound_tf.core import constants

STRATEGIES = ("mirrored", "multi_worker_mirrored", "one_device", "default")
PRECISIONS = ("float32", "mixed_bfloat16")


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


def num_workers(strategy: tf.distribute.Strategy) -> int:
  """Workers (chief included) of a MultiWorkerMirroredStrategy; 1 for any other strategy."""
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    return 1
  spec = resolver.cluster_spec().as_dict()
  return max(1, len(spec.get("worker", [])) + len(spec.get("chief", [])))


def worker_index(strategy: tf.distribute.Strategy) -> int:
  """0 for the chief (or worker 0 without a chief), then the workers in order."""
  resolver = strategy.cluster_resolver
  has_chief = "chief" in resolver.cluster_spec().as_dict()
  if resolver.task_type == "chief":
    return 0
  return resolver.task_id + (1 if has_chief else 0)


def input_context(strategy: tf.distribute.Strategy) -> Optional[tf.distribute.InputContext]:
  """This worker's input pipeline among several workers' (None with a single worker)."""
  workers = num_workers(strategy)
  if workers <= 1:
    return None
  return tf.distribute.InputContext(num_input_pipelines=workers,
                                    input_pipeline_id=worker_index(strategy),
                                    num_replicas_in_sync=strategy.num_replicas_in_sync)


def worker_model_dir(model_dir: str, strategy: tf.distribute.Strategy) -> str:
  """The chief (task chief/0, or worker/0 without a chief) writes `model_dir`; other
  workers write their backups and copies under model_dir/.workers/ (the TF guidance for
  multi-worker checkpoints: never two writers on one path)."""
  if num_workers(strategy) <= 1 or worker_index(strategy) == 0:
    return model_dir
  resolver = strategy.cluster_resolver
  return tf.io.gfile.join(model_dir, ".workers", f"{resolver.task_type}{resolver.task_id}")


@keras.saving.register_keras_serializable(package=constants.PACKAGE)
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


def patch_keras_multi_worker_reduce():
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
