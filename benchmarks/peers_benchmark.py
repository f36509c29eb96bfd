#!/usr/bin/env python3
"""Benchmark: av-sound-tf against its peers, side by side in one invocation (issue 18).

Prints one table of ratios, each measured in this run, alternating ours and the peer in
rounds so that the load of a shared machine falls on both:

* training and inference of the Table-1 network (batch 8 of 1024 x 64 log-mel, 527 classes)
  against the same network in PyTorch (benchmarks/torch_table1.py; its scores are checked
  against ours with copied weights first), and our step against the FLOP bound: forward and
  backward FLOPs (3x `models.count_flops`) over the matmul peak measured in the same run;
* the log-mel front end (`features.compiled_log_mel_fn`) against librosa's melspectrogram
  and log, per core (one thread each, CPU time), on real 10 s clips (ESC-10 pairs);
* audio preparation, decode + resample to 16 kHz + log-mel (`media.decode_audio`,
  `features.log_mel_numpy`), against `librosa.load(sr=16000)` + melspectrogram on the same
  real files (ESC-10, 44.1 kHz Ogg; librosa's recordings, 22.05 kHz Ogg), per core;
* the on-device taggers (Table 1 and the student `mobile_mil`, int8 through
  `tflite.convert`, random weights, calibrated on real ESC-10 windows) against YAMNet's TFLite
  on the same interpreter, one thread: latency and FLOPs per second of audio (FLOPs counted
  from each .tflite graph by `tflite_flops`, the same method for all three).

Each framework runs in its own worker process (spawned; torch and TensorFlow never share one)
that waits, idle, while the other measures. Wall-clock ratios on a machine other jobs load
move with that load (OpenMP-based PyTorch loses more to it than TensorFlow's thread pool);
CPU-time ratios move less. Both are printed.

  make bench-peers          (installs requirements-bench.txt into .venv, then runs this)
  .venv/bin/python benchmarks/peers_benchmark.py [--sections=training,frontend,prep,tflite]
      [--rounds=3] [--train_steps=2]

Not a test.
"""

import glob
import multiprocessing
import os
import subprocess
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

FLAGS = flags.FLAGS
SECTIONS = ("training", "frontend", "prep", "tflite")
HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, "..", "..", "shared")
flags.DEFINE_list("sections", list(SECTIONS), f"Which comparisons to run: {SECTIONS}.")
flags.DEFINE_integer("rounds", 3, "Alternating rounds per comparison.")
flags.DEFINE_integer("train_steps", 2, "Timed training steps per framework and round.")
flags.DEFINE_integer("infer_calls", 5, "Timed batch-1 inference calls per framework and round.")
flags.DEFINE_integer("frontend_clips", 20, "Real 10 s clips for the front-end comparison.")
flags.DEFINE_integer("esc10_files", 40, "ESC-10 files for the preparation comparison.")
flags.DEFINE_string("esc10", os.path.join(SHARED, "data", "esc10"), "ESC-10 folder.")
flags.DEFINE_string("librosa_dir", os.path.join(SHARED, "data", "librosa"),
                    "librosa's example recordings.")
flags.DEFINE_string("yamnet", os.path.join(SHARED, "models", "yamnet_tflite", "yamnet.tflite"),
                    "YAMNet TFLite model.")
flags.DEFINE_integer("tflite_runs", 50, "Timed interpreter calls per model and round.")

TRAIN_FLOP_FACTOR = 3  # forward + backward (input and weight gradients) = 3x forward
BATCH, FRAMES, CLASSES = 8, 1024, 527


# ---------------------------------------------------------------------------- workers
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                    "NUMBA_NUM_THREADS")


def _thread_environment(threads):
  """The environment of a worker: with threads=N, N threads for OpenMP (PyTorch), OpenBLAS
  (NumPy, librosa's matrix products) and numba. Set before the worker starts, since a spawned
  worker imports NumPy (this module) before it runs anything."""
  env = {"TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3")}
  if threads:
    env.update({name: str(threads) for name in THREAD_VARIABLES})
  return env


def _set_threads(threads):
  """In a worker: checks that the environment set at its start is in force."""
  for name, value in _thread_environment(threads).items():
    assert os.environ.get(name) == value, (name, os.environ.get(name), value)


def _timed(fn, *args):
  """(wall seconds, CPU seconds of this process, result)."""
  wall, cpu = time.perf_counter(), time.process_time()
  out = fn(*args)
  return time.perf_counter() - wall, time.process_time() - cpu, out


def _serve(conn, handlers):
  while True:
    command, args = conn.recv()
    if command == "stop":
      return
    conn.send(handlers[command](*args))


def _tf_worker(conn, threads):
  _set_threads(threads)
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if threads:
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
  from av_sound_tf.core import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from av_sound_tf.modeling import models  # pylint: disable=g-import-not-at-top
  from av_sound_tf.train import distribution  # pylint: disable=g-import-not-at-top
  keras.utils.set_random_seed(0)
  rng = np.random.default_rng(0)
  x = rng.normal(-8, 2, [BATCH, FRAMES, 64]).astype(np.float32)
  y = (rng.random([BATCH, CLASSES]) < 0.01).astype(np.float32)
  # As train/training.py compiles it: the strategy's scope, ReplicaMeanAdam, BCE, mAP metric.
  with distribution.get_strategy("mirrored").scope():
    model = models.MILConvNet(num_classes=CLASSES, num_frames=FRAMES)
    model.compile(optimizer=distribution.ReplicaMeanAdam(1e-4),
                  loss=keras.losses.BinaryCrossentropy(),
                  metrics=[metrics_lib.streaming_map_metric(CLASSES)])
  data = tf.data.Dataset.from_tensors((x, y)).repeat()
  model.fit(data, steps_per_epoch=2, epochs=1, verbose=0)  # trace and warm up
  infer = tf.function(lambda v: model(v, training=False))
  one = tf.constant(x[:1])
  infer(one).numpy()
  n = 2048
  a, b = tf.random.normal([n, n]), tf.random.normal([n, n])
  matmul = tf.function(lambda p, q: tf.matmul(p, q))
  matmul(a, b).numpy()

  class Clock(keras.callbacks.Callback):
    """Wall and CPU clocks at the end of each batch: the steps inside an epoch, without
    fit()'s start and end (about 0.5-1 s per call here, nothing in a real epoch's
    thousands of steps)."""

    def on_train_batch_end(self, batch, logs=None):
      for value in (logs or {}).values():  # the step's results exist: it has finished
        np.asarray(value)
      self.marks.append((time.perf_counter(), time.process_time()))

  def train(steps):
    clock = Clock()
    clock.marks = []
    model.fit(data, steps_per_epoch=steps + 1, epochs=1, verbose=0, callbacks=[clock])
    (wall0, cpu0), (wall1, cpu1) = clock.marks[0], clock.marks[-1]
    return wall1 - wall0, cpu1 - cpu0, steps * BATCH

  def inference(calls):
    wall, cpu, _ = _timed(lambda: [infer(one).numpy() for _ in range(calls)])
    return wall, cpu, calls

  def peak(calls=10):
    wall, cpu, _ = _timed(lambda: [matmul(a, b).numpy() for _ in range(calls)])
    return wall, cpu, 2 * n ** 3 * calls

  def flops():
    return models.count_flops(model, FRAMES)

  def small_reference():
    small = models.MILConvNet(num_classes=5, num_frames=256, width=0.125)
    for layer in small.layers:  # non-trivial batch-norm statistics
      if isinstance(layer, keras.layers.BatchNormalization):
        layer.set_weights([w + np.random.default_rng(1).uniform(0.1, 0.5, w.shape)
                           for w in layer.get_weights()])
    inputs = np.random.default_rng(2).normal(-8, 2, [2, 256, 64]).astype(np.float32)
    return ({layer.name: layer.get_weights() for layer in small.layers if layer.weights},
            inputs, small.predict(inputs, verbose=0))

  conn.send("ready")
  _serve(conn, {"train": train, "infer": inference, "peak": peak, "flops": flops,
                "small_reference": small_reference})


def _torch_worker(conn, threads):
  _set_threads(threads)
  import torch  # pylint: disable=g-import-not-at-top
  import torch_table1  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  rng = np.random.default_rng(0)
  x = torch.from_numpy(rng.normal(-8, 2, [BATCH, FRAMES, 64]).astype(np.float32))
  y = torch.from_numpy((rng.random([BATCH, CLASSES]) < 0.01).astype(np.float32))
  # channels_last: PyTorch's recommended layout for CNNs on CPU (oneDNN); faster here.
  model = torch_table1.Table1(CLASSES).to(memory_format=torch.channels_last)
  optimizer = torch.optim.Adam(model.parameters(), 1e-4)
  loss_fn = torch.nn.BCELoss()

  def step():
    optimizer.zero_grad()
    loss_fn(model(x), y).backward()
    optimizer.step()

  def train(steps):
    model.train()
    wall, cpu, _ = _timed(lambda: [step() for _ in range(steps)])
    return wall, cpu, steps * BATCH

  def inference(calls):
    model.eval()
    with torch.inference_mode():
      return _timed(lambda: [model(x[:1]) for _ in range(calls)])[:2] + (calls,)

  def check(weights, inputs, expected):
    small = torch_table1.Table1(expected.shape[1], width=0.125)
    torch_table1.copy_keras_weights(small, weights)
    small.eval()
    with torch.inference_mode():
      got = small(torch.from_numpy(inputs)).numpy()
    return float(np.abs(got - expected).max())

  step(), inference(1)  # warm up
  conn.send("ready")
  _serve(conn, {"train": train, "infer": inference, "check": check,
                "parameters": lambda: sum(p.numel() for p in model.parameters())})


class Worker:
  """A spawned process running one of the *_worker functions; call() is synchronous."""

  def __init__(self, target, threads=0, *extra):
    ctx = multiprocessing.get_context("spawn")
    self.conn, child = ctx.Pipe()
    self.process = ctx.Process(target=target, args=(child, threads) + extra, daemon=True)
    saved = dict(os.environ)
    for name in THREAD_VARIABLES:
      os.environ.pop(name, None)
    os.environ.update(_thread_environment(threads))
    try:
      self.process.start()  # the child inherits this environment
    finally:
      os.environ.clear()
      os.environ.update(saved)

  def ready(self):
    assert self.conn.recv() == "ready"
    return self

  def call(self, command, *args):
    self.conn.send((command, args))
    return self.conn.recv()

  def stop(self):
    self.conn.send(("stop", ()))
    self.process.join(60)


def alternate(workers, command, args, rounds):
  """Runs `command` on each worker in turn, `rounds` times (ABBA order); returns, per worker,
  the list of (wall, cpu, units) of each round."""
  out = {name: [] for name in workers}
  names = list(workers)
  for r in range(rounds):
    for name in (names if r % 2 == 0 else names[::-1]):
      out[name].append(workers[name].call(command, *args))
  return out


def rate(results):
  """(median units per wall second, median units per CPU second) over rounds."""
  return (float(np.median([u / w for w, _, u in results])),
          float(np.median([u / c for _, c, u in results])))


# ---------------------------------------------------------------------------- sections
def _compare_training(threads, rounds, steps, infer_calls):
  ours, torch_ = Worker(_tf_worker, threads), Worker(_torch_worker, threads)
  ours.ready(), torch_.ready()
  workers = {"ours": ours, "torch": torch_}
  out = {"train": alternate(workers, "train", (steps,), rounds),
         "peak": [ours.call("peak") for _ in range(rounds)]}
  if infer_calls:
    out["infer"] = alternate(workers, "infer", (infer_calls,), rounds)
  if not threads:
    out["check"] = torch_.call("check", *ours.call("small_reference"))
    out["flops"] = ours.call("flops")
    out["torch_parameters"] = torch_.call("parameters")
  ours.stop(), torch_.stop()
  label = "one thread" if threads == 1 else "default threads"
  for name in ("train", "infer"):
    for who, r in out.get(name, {}).items():
      print(f"  {name:<5} {label:<15} {who:<5} per round: " + ", ".join(
          f"{u / w:.2f}/s wall, {c / u:.2f} CPU-s each" for w, c, u in r))
  return out


def section_training(rows):
  both = _compare_training(0, FLAGS.rounds, FLAGS.train_steps, FLAGS.infer_calls)
  one = _compare_training(1, max(2, FLAGS.rounds - 1), 1, 0)
  cost = both["flops"]
  print(f"PyTorch port: {both['torch_parameters'] / 1e6:.2f} M trainable parameters (ours "
        f"{cost['parameters'] / 1e6:.2f} M with batch-norm statistics); scores with copied "
        f"weights differ from ours by at most {both['check']:.1e}")
  step_flop = TRAIN_FLOP_FACTOR * cost["flops"]
  for label, res in (("default threads", both), ("one thread", one)):
    peak_wall, peak_cpu = rate(res["peak"])
    print(f"FLOPs per clip: forward {cost['flops'] / 1e9:.2f} G (models.count_flops, {FRAMES} "
          f"frames) x {TRAIN_FLOP_FACTOR} = {step_flop / 1e9:.1f} G; matmul peak ({label}, "
          f"tf.matmul 2048^2 float32): {peak_wall / 1e9:.1f} GFLOP/s wall, "
          f"{peak_cpu / 1e9:.1f} GFLOP per CPU-second")
    (tw, tc), (pw, pc) = rate(res["train"]["ours"]), rate(res["train"]["torch"])
    bound = lambda clips_per_cpu_s: 100 * clips_per_cpu_s * step_flop / peak_cpu  # pylint: disable=cell-var-from-loop
    if label == "default threads":
      rows.append(("training, 2 threads, clips/s (wall)", tw, pw, tw / pw, ">= 1.3x"))
      # The machine's bound: every core at the matmul peak per CPU-second.
      cores_bound = (os.cpu_count() or 1) * peak_cpu
      rows.append((f"training, 2 threads, % of the {os.cpu_count()}-core FLOP bound (wall)",
                   100 * tw * step_flop / cores_bound, 100 * pw * step_flop / cores_bound,
                   None, ""))
    rows.append((f"training, {label}, clips per CPU-second", tc, pc, tc / pc,
                 ">= 1.3x" if label == "one thread" else ""))
    rows.append((f"training, {label}, % of the FLOP bound per CPU-second", bound(tc),
                 bound(pc), None, ">= 80 %" if label == "one thread" else ""))
  (iw, ic), (jw, jc) = rate(both["infer"]["ours"]), rate(both["infer"]["torch"])
  rows.append(("inference, batch 1, ms per 10.24 s clip (wall)", 1000 / iw, 1000 / jw,
               iw / jw, ""))
  rows.append(("inference, batch 1, CPU-ms per clip", 1000 / ic, 1000 / jc, ic / jc, ""))


def _real_clips(esc10, count):
  """`count` real 10 s clips at 16 kHz: pairs of ESC-10 recordings (5 s each) joined."""
  from av_sound_tf.core import media  # pylint: disable=g-import-not-at-top
  paths = sorted(glob.glob(os.path.join(esc10, "*", "*.ogg")))[::5][:2 * count]
  clips = []
  for a, b in zip(paths[0::2], paths[1::2]):
    y = np.concatenate([media.decode_audio(a), media.decode_audio(b)])[:160000]
    clips.append(np.pad(y, (0, 160000 - len(y))).astype(np.float32))
  return clips


def _librosa_log_mel(y, sr=16000):
  import librosa  # pylint: disable=g-import-not-at-top
  from av_sound_tf.core import features  # pylint: disable=g-import-not-at-top
  p = features.DEFAULT_PARAMS
  # As tests/features_test.py: librosa centers the 256-sample window in each 512-sample
  # frame; 128 zeros each side make its frame t cover y[160 t : 160 t + 256], as ours does.
  pad = (p.fft_length - p.window_length) // 2
  return np.log(librosa.feature.melspectrogram(
      y=np.pad(y, (pad, pad)), sr=sr, n_fft=p.fft_length, win_length=p.window_length, hop_length=p.hop_length,
      center=False, power=2.0, n_mels=p.num_mel_bins, fmin=p.fmin, fmax=p.fmax) + p.log_offset)


def _frontend_worker(conn, threads, esc10, num_clips, rounds):
  _set_threads(threads)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if threads:
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
  from av_sound_tf.core import features  # pylint: disable=g-import-not-at-top
  clips = _real_clips(esc10, num_clips)
  ours = features.compiled_log_mel_fn(features.DEFAULT_PARAMS)
  err = max(np.abs(ours(c[None])[0].numpy() - _librosa_log_mel(c).T).max() for c in clips[:3])
  runs = {"ours": lambda: [ours(c[None]).numpy() for c in clips],
          "librosa": lambda: [_librosa_log_mel(c) for c in clips]}
  out = {k: [] for k in runs}
  for r in range(rounds):
    for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
      out[name].append(_timed(runs[name])[:2] + (len(clips),))
  conn.send((out, err))


def section_frontend(rows):
  for threads, label in ((1, "one thread"), (0, "default threads")):
    w = Worker(_frontend_worker, threads, FLAGS.esc10, FLAGS.frontend_clips, FLAGS.rounds)
    out, err = w.conn.recv()
    w.process.join(60)
    (ow, oc), (lw, lc) = rate(out["ours"]), rate(out["librosa"])
    print(f"front end ({label}): ours {1000 / ow:.2f} ms wall, {1000 / oc:.2f} CPU-ms per "
          f"10 s clip; librosa {1000 / lw:.2f} ms wall, {1000 / lc:.2f} CPU-ms; max |ours - "
          f"librosa| {err:.1e}")
    if threads == 1:
      rows.append(("front end per core, CPU-ms per 10 s clip", 1000 / oc, 1000 / lc, oc / lc,
                   ">= 3x"))
    else:
      rows.append((f"front end, {label}, ms per 10 s clip (wall)", 1000 / ow, 1000 / lw,
                   ow / lw, ""))


def _prep_worker(conn, threads, paths, rounds):
  _set_threads(threads)
  import librosa  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.threading.set_intra_op_parallelism_threads(1)
  tf.config.threading.set_inter_op_parallelism_threads(1)
  from av_sound_tf.core import media  # pylint: disable=g-import-not-at-top
  from data_prep import featurize  # pylint: disable=g-import-not-at-top
  # bin/prepare_data's own steps: media.decode_audio, then ClipProcessor.log_mel (the
  # compiled front end on whole-second buckets).
  processor = featurize.ClipProcessor(featurize.PrepareConfig(output_dir="unused"))
  stages = {"ours: decode + resample": [], "ours: log-mel": [],
            "librosa: load at 16 kHz": [], "librosa: melspectrogram + log": []}

  def ours():
    for p in paths:
      d = _timed(media.decode_audio, p)
      stages["ours: decode + resample"].append(d[1])
      stages["ours: log-mel"].append(_timed(processor.log_mel, d[2])[1])

  def theirs():
    for p in paths:
      d = _timed(lambda: librosa.load(p, sr=16000))  # pylint: disable=cell-var-from-loop
      stages["librosa: load at 16 kHz"].append(d[1])
      stages["librosa: melspectrogram + log"].append(_timed(_librosa_log_mel, d[2][0])[1])

  seconds = sum(len(media.decode_audio(p)) for p in paths) / 16000
  a, b = media.decode_audio(paths[0]), librosa.load(paths[0], sr=16000)[0]
  same = float(np.abs(a[:len(b)] - b[:len(a)]).max())
  # First pass of each, untimed in the ratios: XLA compiles the front end once per new
  # whole-second length, librosa compiles its numba kernels.
  first = {"ours": _timed(ours)[1], "librosa": _timed(theirs)[1]}
  for v in stages.values():
    v.clear()
  out = {"ours": [], "librosa": []}
  for r in range(rounds):
    for name, fn in ((("ours", ours), ("librosa", theirs)) if r % 2 == 0 else
                     (("librosa", theirs), ("ours", ours))):
      out[name].append(_timed(fn)[:2] + (seconds,))
  stages = {k: sum(v) / rounds for k, v in stages.items()}
  import soundfile  # pylint: disable=g-import-not-at-top
  # For the profile: the decoder librosa.load uses (libsndfile), alone, without resampling.
  stages["libsndfile decode alone (soundfile.read)"] = _timed(
      lambda: [soundfile.read(p, dtype="float32") for p in paths])[1]
  conn.send((out, stages, seconds, same, first))


def section_prep(rows):
  esc10 = sorted(glob.glob(os.path.join(FLAGS.esc10, "*", "*.ogg")))
  paths = esc10[::max(1, len(esc10) // FLAGS.esc10_files)][:FLAGS.esc10_files]
  paths += sorted(glob.glob(os.path.join(FLAGS.librosa_dir, "*.ogg")))
  w = Worker(_prep_worker, 1, paths, FLAGS.rounds)
  out, stages, seconds, same, first = w.conn.recv()
  w.process.join(60)
  (ow, oc), (lw, lc) = rate(out["ours"]), rate(out["librosa"])
  print(f"audio preparation: {len(paths)} real files, {seconds:.0f} s of audio; waveforms "
        f"of ours and librosa.load differ by at most {same:.1e} (first file); first pass "
        f"(compiles) {first['ours']:.2f} and {first['librosa']:.2f} CPU-s; CPU-s per pass by "
        "stage: " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()))
  rows.append(("audio preparation per core, CPU-ms per second of audio", 1000 / oc,
               1000 / lc, oc / lc, ">= 3x"))
  rows.append(("audio preparation, one thread, ms per second of audio (wall)", 1000 / ow,
               1000 / lw, ow / lw, ""))


def tflite_flops(path):
  """(front end, network) multiplies and adds, counted separately, of a .tflite graph's
  CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED and BATCH_MATMUL ops, from its tensor shapes;
  elementwise ops, pooling and FFTs are left out. The front end is every op before the first
  CONV_2D (ours: the mel projection; YAMNet's: its STFT as a matmul and its mel projection)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  interpreter = tf.lite.Interpreter(model_path=path)
  shapes = {t["index"]: t["shape"] for t in interpreter.get_tensor_details()}
  front_end = network = 0
  for op in sorted(interpreter._get_ops_details(), key=lambda o: o["index"]):  # pylint: disable=protected-access
    name, ins, outs = op["op_name"], op["inputs"], op["outputs"]
    out = int(np.prod(shapes[outs[0]]))
    flop = 0
    if name == "CONV_2D":  # filter [out, kh, kw, in]
      flop = 2 * out * int(np.prod(shapes[ins[1]][1:]))
    elif name == "DEPTHWISE_CONV_2D":  # filter [1, kh, kw, out]
      flop = 2 * out * int(np.prod(shapes[ins[1]][1:3]))
    elif name == "FULLY_CONNECTED":  # weights [out, in]
      flop = 2 * out * int(shapes[ins[1]][-1])
    elif name == "BATCH_MATMUL":
      flop = 2 * out * int(shapes[ins[0]][-1])
    if name == "CONV_2D" or network:
      network += flop
    else:
      front_end += flop
  return front_end, network


def _tflite_worker(conn, threads, models_, runs, rounds):
  _set_threads(threads)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  interpreters = {}
  for name, (path, _) in models_.items():
    interpreters[name] = tf.lite.Interpreter(model_path=path, num_threads=1)
    interpreters[name].allocate_tensors()
  rng = np.random.default_rng(0)

  def run(name):
    it = interpreters[name]
    index = it.get_input_details()[0]["index"]
    window = rng.uniform(-0.3, 0.3, it.get_input_details()[0]["shape"]).astype(np.float32)
    it.set_tensor(index, window)
    it.invoke()
    return _timed(lambda: [it.invoke() for _ in range(runs)])[:2] + (runs,)

  out = {name: [] for name in models_}
  names = list(models_)
  for r in range(rounds):
    for name in (names if r % 2 == 0 else names[::-1]):
      out[name].append(run(name))
  conn.send(out)


def section_tflite(rows):
  import keras  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  from av_sound_tf.core import labels  # pylint: disable=g-import-not-at-top
  from av_sound_tf.modeling import models  # pylint: disable=g-import-not-at-top
  from av_sound_tf.serving import tflite  # pylint: disable=g-import-not-at-top
  from data_prep import featurize  # pylint: disable=g-import-not-at-top
  from data_prep import inputs  # pylint: disable=g-import-not-at-top
  from data_prep import prepare  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  tmp = tempfile.mkdtemp(prefix="peers_tflite_")
  esc10 = sorted(glob.glob(os.path.join(FLAGS.esc10, "*", "*.ogg")))[::40]  # one per class
  file_list = os.path.join(tmp, "calibration.csv")
  with open(file_list, "w") as f:
    f.write("path,labels\n" + "".join(f"{p},x\n" for p in esc10))
  data_dir = os.path.join(tmp, "prepared")
  prepare.prepare(inputs.from_file_list(file_list), featurize.PrepareConfig(output_dir=data_dir),
                  num_workers=1)
  labels_path = os.path.join(tmp, "labels.csv")
  labels.LabelMap([f"/m/{i}" for i in range(CLASSES)],
                  [str(i) for i in range(CLASSES)]).to_csv(labels_path)
  taggers = {}
  for name, arch, width in (("Table 1, int8", "mil_convnet", 1.0),
                            ("student mobile_mil w1, int8", "mobile_mil", 1.0),
                            ("student mobile_mil w0.5, int8", "mobile_mil", 0.5)):
    keras.utils.set_random_seed(0)
    path = os.path.join(tmp, f"{arch}_{width}.keras")
    models.AUDIO_ARCHITECTURES[arch](num_classes=CLASSES, num_frames=FRAMES,
                                     width=width).save(path)
    converted = tflite.convert(path, labels_path, os.path.join(tmp, f"{arch}_{width}"),
                               ["int8"], 1.0, data_dir, "data", calibration_windows=8)
    taggers[name] = (converted["int8"], 1.0)
  taggers["YAMNet (TFLite, float32)"] = (FLAGS.yamnet, 15600 / 16000)
  w = Worker(_tflite_worker, 1, taggers, FLAGS.tflite_runs, FLAGS.rounds)
  out = w.conn.recv()
  w.process.join(60)
  yam_name = "YAMNet (TFLite, float32)"
  yam_ms = 1000 / rate(out[yam_name])[0] / taggers[yam_name][1]
  yam_flops = sum(tflite_flops(taggers[yam_name][0])) / taggers[yam_name][1]
  for name, (path, seconds) in taggers.items():
    ms = 1000 / rate(out[name])[0] / seconds
    front_end, network = (f / seconds for f in tflite_flops(path))
    print(f"  {name:<30} {os.path.getsize(path) / 1e6:6.2f} MB  {ms:6.2f} ms and "
          f"{(front_end + network) / 1e6:7.1f} MFLOP per second of audio (network "
          f"{network / 1e6:.1f}, front end {front_end / 1e6:.1f}; window {seconds:.3f} s)")
    if name != yam_name:
      rows.append((f"on-device {name}: ms per second of audio (1 thread)", ms, yam_ms,
                   yam_ms / ms, "vs YAMNet"))
      rows.append((f"on-device {name}: MFLOP per second of audio",
                   (front_end + network) / 1e6, yam_flops / 1e6,
                   yam_flops / (front_end + network), "vs YAMNet"))


def _machine():
  try:
    model = [l.split(":", 1)[1].strip() for l in subprocess.run(
        ["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines()
             if l.startswith("Model name")][0]
  except (OSError, IndexError):
    model = "unknown CPU"
  return f"{model}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"


def main(argv):
  del argv
  unknown = set(FLAGS.sections) - set(SECTIONS)
  if unknown:
    raise app.UsageError(f"Unknown --sections {sorted(unknown)}; use {SECTIONS}")
  print(f"machine: {_machine()}")
  rows = []
  started = time.perf_counter()
  for name in SECTIONS:
    if name in FLAGS.sections:
      t = time.perf_counter()
      globals()[f"section_{name}"](rows)
      print(f"[{name}: {time.perf_counter() - t:.0f} s]")
  print(f"\nmachine at the end: {_machine()}; {time.perf_counter() - started:.0f} s in all; "
        f"medians of {FLAGS.rounds} alternating rounds")
  print("| measure | ours | peer | ours better by | target |")
  print("|---|---|---|---|---|")
  for measure, ours, peer, ratio, target in rows:
    print(f"| {measure} | {ours:.3g} | {peer:.3g} | "
          f"{'' if ratio is None else f'{ratio:.2f}x'} | {target} |")


if __name__ == "__main__":
  app.run(main)
