#!/usr/bin/env python3
"""Benchmark: bin/tag --timeline on long recordings, peak memory and speed (issue 18).

Writes long recordings made of a real one repeated (librosa's "Vibe Ace", 61.5 s of music,
decoded at its own 22.05 kHz and written as 16-bit mono WAV, so bin/tag decodes and
resamples it) of --durations (default 10 min, 1 h and 10 h; a 10 h file is 1.6 GB, in
--work_dir), exports a small model (MobileMIL, width 1, 527 classes, random weights: the
speed and memory of a trained one) and runs, one child process per file and measured side
by side in this one run:

  * new: bin/tag of this tree (streaming);
  * old: bin/tag of --old_commit (the whole-file path: the waveform decoded whole, then
    scored in 10 s windows), on the files up to --old_max_hours (it needs ~0.7 GB per hour).

Each run is `bin/tag --model=... --timeline --threshold=... --output=<json> <file>`; its
peak resident memory is the child's VmHWM (/proc/self/status, read by the child as it
exits: ru_maxrss would also count the parent's memory the child had before its exec), its
speed is audio seconds per wall second ("x real time"), and per CPU second of the child
(user + system; less sensitive to other processes on a shared machine). Prints one row per run, then the ratio of peak memory of the
longest to the shortest recording (new path) and the speed ratio new / old per file.

  .venv/bin/python benchmarks/stream_benchmark.py
  .venv/bin/python benchmarks/stream_benchmark.py --durations=600,3600 --old_max_hours=1

Not a test. The machine is shared: the x-real-time figures move with its load; the ratios
measured in one run are what to compare.
"""

import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import time
import wave

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import av
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLAGS = flags.FLAGS
flags.DEFINE_list("durations", ["600", "3600", "36000"], "Recording lengths in seconds.")
flags.DEFINE_string("work_dir", "/tmp/stream_benchmark", "Folder for recordings, model and "
                    "outputs (removed at the end unless --keep).")
flags.DEFINE_bool("keep", False, "Keep --work_dir.")
flags.DEFINE_string("source", os.path.join(REPO, "..", "shared", "data", "librosa",
                                           "Kevin_MacLeod_-_Vibe_Ace.ogg"),
                    "The real recording to repeat.")
flags.DEFINE_string("old_commit", "008ed2f", "The commit whose bin/tag is the whole-file "
                    "path (main before streaming); empty: skip it.")
flags.DEFINE_float("old_max_hours", 1.0, "Run the old path on recordings up to this long.")
flags.DEFINE_float("threshold", 0.9, "--threshold for the events.")
flags.DEFINE_float("window_seconds", 30.0, "New path's --window_seconds.")


def native_mono(path):
  """int16 samples of the first audio track at its own rate (channel mean)."""
  with av.open(path) as container:
    stream = container.streams.audio[0]
    rate = stream.sample_rate
    frames = [f.to_ndarray().astype(np.float32) for f in container.decode(stream)]
  x = np.concatenate([f.mean(axis=0) for f in frames])
  return (np.clip(x, -1, 1) * 32767).astype("<i2"), rate


def write_long_wav(path, pcm, rate, seconds):
  """pcm repeated to `seconds`, written in pieces (memory stays small)."""
  total = int(seconds * rate)
  with wave.open(path, "wb") as w:
    w.setnchannels(1)
    w.setsampwidth(2)
    w.setframerate(rate)
    left = total
    while left > 0:
      piece = pcm[:min(left, len(pcm))]
      w.writeframes(piece.tobytes())
      left -= len(piece)


def small_model(work_dir):
  """MobileMIL (width 1, 527 classes) with random weights, exported as a SavedModel."""
  import keras  # pylint: disable=g-import-not-at-top
  from av_sound_tf.core import labels  # pylint: disable=g-import-not-at-top
  from av_sound_tf.modeling import models  # pylint: disable=g-import-not-at-top
  from av_sound_tf.serving import export  # pylint: disable=g-import-not-at-top
  keras.utils.set_random_seed(0)
  model = models.MobileMIL(num_classes=527, num_frames=128, width=1.0)
  models.randomize_weights(model, seed=0)  # fresh MobileMIL scores are all 0.5
  model_path = os.path.join(work_dir, "mobile_mil.keras")
  model.save(model_path)
  labels_path = os.path.join(work_dir, "labels.csv")
  labels.LabelMap([f"/m/{i}" for i in range(527)],
                  [f"class {i}" for i in range(527)]).to_csv(labels_path)
  return export.export_saved_model(model_path, labels_path,
                                   os.path.join(work_dir, "serving"))["path"]


def old_tree(work_dir, commit):
  """`commit`'s av_sound_tf/ and bin/ extracted to <work_dir>/old (PYTHONPATH for it)."""
  folder = os.path.join(work_dir, "old")
  os.makedirs(folder, exist_ok=True)
  archive = os.path.join(work_dir, "old.tar")
  subprocess.run(["git", "-C", REPO, "archive", "-o", archive, commit, "av_sound_tf", "bin"],
                 check=True)
  with tarfile.open(archive) as tar:
    tar.extractall(folder)  # our own repository's archive
  return folder


# Runs a binary as __main__ and, however it exits, prints its peak resident memory.
_WRAPPER = """
import runpy, sys
script = sys.argv[1]
sys.argv = sys.argv[1:]
try:
  runpy.run_path(script, run_name="__main__")
finally:
  hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
  sys.stderr.write("PEAK_KB " + hwm.split()[1] + "\\n")
"""


def run_tag(tree, pythonpath, args):
  """(peak RSS in MB, wall seconds, CPU seconds, exit status) of bin/tag in a child."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  if pythonpath:
    env["PYTHONPATH"] = pythonpath
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  t0 = time.perf_counter()
  proc = subprocess.run([sys.executable, "-c", _WRAPPER, os.path.join(tree, "bin", "tag"),
                         *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                        cwd=tree, check=False)  # cwd: "-c" puts it first on sys.path
  wall = time.perf_counter() - t0
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
  stderr = proc.stderr.decode(errors="replace")
  peaks = [int(l.split()[1]) for l in stderr.splitlines() if l.startswith("PEAK_KB ")]
  if proc.returncode or not peaks:
    print(stderr[-2000:], file=sys.stderr)
  return (peaks[-1] / 1024 if peaks else float("nan")), wall, cpu, proc.returncode


def main(argv):
  del argv
  work = FLAGS.work_dir
  os.makedirs(work, exist_ok=True)
  if shutil.disk_usage(work).free < 4e9:
    raise SystemExit(f"{work}: less than 4 GB free")
  pcm, rate = native_mono(FLAGS.source)
  durations = sorted(float(d) for d in FLAGS.durations)
  recordings = []
  for seconds in durations:
    path = os.path.join(work, f"long_{int(seconds)}s.wav")
    if not os.path.exists(path):
      t0 = time.perf_counter()
      write_long_wav(path, pcm, rate, seconds)
      print(f"wrote {path} ({os.path.getsize(path) / 1e9:.2f} GB, "
            f"{time.perf_counter() - t0:.0f} s)", flush=True)
    recordings.append((seconds, path))
  model = small_model(work)
  old = old_tree(work, FLAGS.old_commit) if FLAGS.old_commit else None
  rows = []
  print(f"model: MobileMIL width 1, 527 classes; recordings: {os.path.basename(FLAGS.source)}"
        f" repeated, {rate} Hz 16-bit mono WAV", flush=True)
  print(f"load average before: {os.getloadavg()[0]:.1f} (2 cores here: the wall-clock "
        "figures shrink with it; CPU seconds much less)", flush=True)
  print(f"{'recording':>10} {'path':>4} {'wall s':>8} {'x real time':>12} {'CPU s':>8} "
        f"{'audio s/CPU s':>13} {'peak MB':>8} {'steps':>7} {'events':>7}", flush=True)
  for seconds, path in recordings:
    runs = [("new", REPO, None, ["--window_seconds", str(FLAGS.window_seconds)])]
    if old and seconds <= FLAGS.old_max_hours * 3600 + 1:
      runs.append(("old", old, old, []))
    for name, tree, pythonpath, extra in runs:
      out = os.path.join(work, f"{name}_{int(seconds)}.json")
      peak, wall, cpu, code = run_tag(tree, pythonpath, [
          f"--model={model}", "--timeline", f"--threshold={FLAGS.threshold}",
          f"--output={out}", "--progress_every=3600", *extra, path])
      if code:
        raise SystemExit(f"bin/tag ({name}) failed on {path} with status {code}")
      (result,) = json.load(open(out))
      steps = len(result["timeline"]["times"])
      rows.append((seconds, name, wall, seconds / wall, peak))
      print(f"{seconds / 3600:>9.2f}h {name:>4} {wall:>8.1f} {seconds / wall:>11.0f}x "
            f"{cpu:>8.1f} {seconds / cpu:>13.0f} {peak:>8.0f} {steps:>7} "
            f"{len(result['events']):>7}", flush=True)
  new = {s: (speed, peak) for s, n, _, speed, peak in rows if n == "new"}
  shortest, longest = durations[0], durations[-1]
  print(f"peak memory, new path: {longest / 3600:.2f} h / {shortest / 3600:.2f} h = "
        f"{new[longest][1] / new[shortest][1]:.3f} ({new[longest][1]:.0f} MB / "
        f"{new[shortest][1]:.0f} MB)")
  for seconds, name, _, speed, peak in rows:
    if name == "old":
      print(f"{seconds / 3600:.2f} h: new / old speed {new[seconds][0] / speed:.2f}x, "
            f"peak memory {new[seconds][1]:.0f} MB against {peak:.0f} MB")
  if not FLAGS.keep:
    shutil.rmtree(work)


if __name__ == "__main__":
  app.run(main)
