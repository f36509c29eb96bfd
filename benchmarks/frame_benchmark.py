#!/usr/bin/env python3
"""Benchmark: preparing real video clips (audio + 64 frames) against a plain full decode.

Measured side by side in one run, on every clip of ../shared/data/real_av/clips (30 real
H.264/AAC clips, 6-15 s, 224-720 px high), clip by clip: each clip is decoded by (a) and
prepared by (b) back to back, the order alternating from clip to clip and from repeat to
repeat, so that both sides see the same load on a shared machine:

  (a) baseline, a plain full decode: per clip ``av.open``, then
      ``container.decode(video=0, audio=0)`` run to the end: every packet of the first
      video and the first audio stream demuxed once and decoded to a frame, nothing else
      (no pixel conversion, no resampling, no features). Video decoder threads:
      ``thread_type = "AUTO"`` (frame + slice threads, FFmpeg's automatic thread count), the
      setting core/media.py uses and the fastest full decode on this machine; audio: PyAV's
      defaults. ``--baseline_threads=default`` keeps PyAV's video default (slice threads).
  (b) preparation, the way bin/prepare_data's worker does it (data_prep/prepare.py
      ``_init_worker``): TensorFlow intra- and inter-op threads 1, one
      ``featurize.ClipProcessor`` with audio + visual, the video decoded on one thread
      (``--decoder_threads=1``, the workers' setting: bin/prepare_data runs one worker per
      core; ``0`` gives FFmpeg's automatic threads), 64 frames of 224 px, the embedder
      ``--embedder`` (``tiny``: the cheapest, 33 ms per 64 frames here; ``color_layout``
      costs about 0.6 s), one worker (this process; featurize decodes a clip's audio in a
      second thread while its frames decode); then the processor on each clip, up to its
      serialized Example. Its total is the worker's start-up (building the processor: the
      compiled log-mel function, the embedder) plus every clip. The interpreter and the
      imports (TensorFlow, PyAV) are not counted on either side; ``--fresh_process`` also
      times both sides as fresh processes (interpreter, imports and all), each side on all
      clips in one process.

Prints both totals per repeat in wall seconds and in CPU seconds (the process's user +
system time, all threads: steadier than wall time on a shared machine), the ratios
(b) / (a), per-clip wall seconds (best of the repeats), and with ``--profile`` where
preparation's time goes (cProfile with a CPU-time clock, cumulative seconds per step of
one more pass).

  .venv/bin/python benchmarks/frame_benchmark.py [--repeats=3] [--profile] [--fresh_process]

Not a test. The machine may be shared: compare the ratios within a run.
"""

import cProfile
import glob
import os
import pstats
import resource
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import av

FLAGS = flags.FLAGS
flags.DEFINE_string("clips_dir", os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "..", "shared", "data", "real_av", "clips"),
                    "Folder of real video clips (*.mp4).")
flags.DEFINE_integer("repeats", 3, "Timed passes of each side.")
flags.DEFINE_string("embedder", "tiny", "Frame embedder for preparation.")
flags.DEFINE_integer("num_frames", 64, "Frames per clip.")
flags.DEFINE_integer("image_size", 224, "Frame size.")
flags.DEFINE_enum("baseline_threads", "auto", ["auto", "default"],
                  "Baseline video decoder threads: thread_type AUTO, or PyAV's default.")
flags.DEFINE_integer("decoder_threads", 1, "Preparation's video decoder threads "
                     "(media.sample_video): 1, the workers' setting; 0: FFmpeg's automatic.")
flags.DEFINE_bool("profile", False, "Profile one more preparation pass.")
flags.DEFINE_bool("fresh_process", False, "Also time both sides as fresh processes.")
flags.DEFINE_enum("mode", "both", ["both", "baseline", "prep"],
                  "Internal: run one side once (--fresh_process children).")


def full_decode(path, threads="auto"):
  """The baseline: every frame of the first video and audio stream, decoded, nothing else."""
  with av.open(path) as container:
    if threads == "auto":
      container.streams.video[0].thread_type = "AUTO"
    for _ in container.decode(video=0, audio=0):
      pass


def cpu_seconds():
  """CPU seconds of this process so far, all threads (FFmpeg's decoder threads included)."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def baseline(paths):
  """Returns (wall seconds, CPU seconds, wall seconds per clip)."""
  times = []
  c0, t0 = cpu_seconds(), time.perf_counter()
  for path in paths:
    t = time.perf_counter()
    full_decode(path, FLAGS.baseline_threads)
    times.append(time.perf_counter() - t)
  return time.perf_counter() - t0, cpu_seconds() - c0, times


def _config():
  from data_prep import featurize  # pylint: disable=g-import-not-at-top
  return featurize.PrepareConfig(
      output_dir="unused", modalities=("audio", "visual"), embedder=FLAGS.embedder,
      num_video_frames=FLAGS.num_frames, image_size=FLAGS.image_size)


def _jobs(paths):
  from data_prep import inputs  # pylint: disable=g-import-not-at-top
  return [inputs.ClipJob(index=i, clip_id=os.path.basename(p), path=p, split="train",
                         label_indices=[0], label_mids=["/m/x"]) for i, p in enumerate(paths)]


_THREADS_SET = False


class _Inline:
  """Stands in for featurize's audio thread so that cProfile (main thread only) sees it."""

  def submit(self, fn, *args):
    return type("Done", (), {"result": staticmethod(featurize_later(fn, *args))})


def featurize_later(fn, *args):
  from data_prep import featurize  # pylint: disable=g-import-not-at-top
  return featurize._later(fn, *args)  # pylint: disable=protected-access


def preparation(paths, inline_audio=False):
  """bin/prepare_data's worker: start-up, then each clip (inline_audio: the audio decodes
  in the main thread, for the profile).

  Returns (wall seconds, CPU seconds, start-up wall seconds, wall seconds per clip).
  """
  global _THREADS_SET
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from data_prep import featurize  # pylint: disable=g-import-not-at-top
  if not _THREADS_SET:  # as prepare._init_worker (only possible before TF starts)
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    _THREADS_SET = True
  jobs = _jobs(paths)
  c0, t0 = cpu_seconds(), time.perf_counter()
  processor = featurize.ClipProcessor(_config(), FLAGS.decoder_threads)
  _ = processor.embedder  # built on the first visual clip anyway
  if inline_audio:
    processor._audio_thread = _Inline()  # pylint: disable=protected-access
  startup = time.perf_counter() - t0
  times = []
  for job in jobs:
    t = time.perf_counter()
    result = processor(job)
    times.append(time.perf_counter() - t)
    if result.status != "written":
      raise RuntimeError(f"{job.path}: {result.reason}")
  return time.perf_counter() - t0, cpu_seconds() - c0, startup, times


def interleaved(paths, repeat):
  """Both sides clip by clip, alternating which goes first, so that both see the same load.

  Preparation's worker start-up (processor and embedder) is timed first and counted in
  its total. Returns [(wall a, CPU a, wall b, CPU b) per clip] and (start-up wall, CPU).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from data_prep import featurize  # pylint: disable=g-import-not-at-top
  global _THREADS_SET
  if not _THREADS_SET:  # as prepare._init_worker (only possible before TF starts)
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    _THREADS_SET = True
  c0, t0 = cpu_seconds(), time.perf_counter()
  processor = featurize.ClipProcessor(_config(), FLAGS.decoder_threads)
  _ = processor.embedder  # built on the first visual clip anyway
  startup = (time.perf_counter() - t0, cpu_seconds() - c0)

  def timed(fn):
    c, t = cpu_seconds(), time.perf_counter()
    fn()
    return time.perf_counter() - t, cpu_seconds() - c

  def prepare(job):
    result = processor(job)
    if result.status != "written":
      raise RuntimeError(f"{job.path}: {result.reason}")

  rows = []
  for i, (path, job) in enumerate(zip(paths, _jobs(paths))):
    decode = lambda: full_decode(path, FLAGS.baseline_threads)  # pylint: disable=cell-var-from-loop
    prep = lambda: prepare(job)  # pylint: disable=cell-var-from-loop
    if (i + repeat) % 2 == 0:
      a, b = timed(decode), timed(prep)
    else:
      b, a = timed(prep), timed(decode)
    rows.append((a[0], a[1], b[0], b[1]))
  return rows, startup


def _fresh(mode, paths):
  """Wall and CPU seconds of a fresh process running one side once (interpreter and
  imports in)."""
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  t = time.perf_counter()
  subprocess.run([sys.executable, os.path.abspath(__file__), f"--mode={mode}",
                  f"--clips_dir={FLAGS.clips_dir}", f"--embedder={FLAGS.embedder}",
                  f"--num_frames={FLAGS.num_frames}", f"--image_size={FLAGS.image_size}",
                  f"--baseline_threads={FLAGS.baseline_threads}",
                  f"--decoder_threads={FLAGS.decoder_threads}"],
                 check=True, stdout=subprocess.DEVNULL)
  wall = time.perf_counter() - t
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  return wall, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


# Steps of preparation shown by --profile: (label, module file suffix, function name).
_STEPS = [
    ("audio: decode + resample (media.read_audio)", "core/media.py", "read_audio"),
    ("log-mel (ClipProcessor.log_mel)", "data_prep/featurize.py", "log_mel"),
    ("video: all (media.sample_video)", "core/media.py", "sample_video"),
    ("  video: demux packets (video_frames._demux)", "core/video_frames.py", "_demux"),
    ("  video: frame to RGB 224 (FrameFitter.__call__)", "core/video_frames.py",
     "FrameFitter.__call__"),
    ("  video: NAL check (video_frames.is_non_reference)", "core/video_frames.py",
     "is_non_reference"),
    ("  video: sequential fallback", "core/video_frames.py", "sample_frames_sequentially"),
    ("embedder (FrameEmbedder.embed_clip)", "core/embedders.py", "embed_clip"),
    ("container probe (media.probe)", "core/media.py", "probe"),
    ("Example (featurize._make_example)", "data_prep/featurize.py", "_make_example"),
]


def _inline_converter():
  """video_frames.BackgroundConverter converting in the calling thread (for cProfile)."""
  from concurrent import futures  # pylint: disable=g-import-not-at-top
  from av_sound_tf.core import video_frames  # pylint: disable=g-import-not-at-top

  class Inline(video_frames.BackgroundConverter):

    def __call__(self, frame):
      future = futures.Future()
      future.set_result(self._convert(frame))
      return future

  return Inline


def profile(paths):
  from av_sound_tf.core import video_frames  # pylint: disable=g-import-not-at-top
  background = video_frames.BackgroundConverter
  video_frames.BackgroundConverter = _inline_converter()
  profiler = cProfile.Profile(time.process_time)
  try:
    profiler.enable()
    _, total, _, _ = preparation(paths, inline_audio=True)
    profiler.disable()
  finally:
    video_frames.BackgroundConverter = background
  stats = pstats.Stats(profiler).stats
  fitter_line = video_frames.FrameFitter.__call__.__code__.co_firstlineno
  print(f"\nProfile of one more preparation pass, audio decoded and frames converted in the "
        f"main thread (cProfile sees one thread), in CPU seconds of the process (all "
        f"threads): {total:.2f} s (cProfile adds overhead)")
  print(f"{'step':54s} {'calls':>6s} {'cum s':>7s} {'share':>6s}")
  for label, suffix, name in _STEPS:
    if name == "FrameFitter.__call__":
      rows = [v for k, v in stats.items()
              if k[0].endswith(suffix) and k[2] == "__call__" and k[1] == fitter_line]
    else:
      rows = [v for k, v in stats.items() if k[0].endswith(suffix) and k[2] == name]
    calls = sum(r[1] for r in rows)
    cum = sum(r[3] for r in rows)
    print(f"{label:54s} {calls:6d} {cum:7.2f} {cum / total:6.1%}")
  decode = [v for k, v in stats.items() if "decode" in k[2] and k[0] == "~"]
  print(f"{'  (PyAV decode calls, all streams)':54s} {sum(r[1] for r in decode):6d} "
        f"{sum(r[3] for r in decode):7.2f} {sum(r[3] for r in decode) / total:6.1%}")
  print("\nTop 15 by own time:")
  pstats.Stats(profiler).sort_stats("tottime").print_stats(15)


def main(argv):
  del argv
  paths = sorted(glob.glob(os.path.join(FLAGS.clips_dir, "*.mp4")))
  if not paths:
    raise SystemExit(f"no *.mp4 clips in {FLAGS.clips_dir}")
  if FLAGS.mode == "baseline":
    baseline(paths)
    return
  if FLAGS.mode == "prep":
    preparation(paths)
    return
  for path in paths:  # both sides read from the page cache
    with open(path, "rb") as f:
      f.read()
  print(f"{len(paths)} clips in {FLAGS.clips_dir}; embedder {FLAGS.embedder}, "
        f"{FLAGS.num_frames} frames of {FLAGS.image_size} px; baseline video threads: "
        f"{FLAGS.baseline_threads}; preparation's decoder threads: {FLAGS.decoder_threads}; PyAV {av.__version__}, FFmpeg {av.ffmpeg_version_info}; "
        f"{os.cpu_count()} CPUs")
  best_a = [float("inf")] * len(paths)
  best_b = list(best_a)
  walls, cpus = [], []
  print(f"\n{'':6s} {'wall seconds':^34s} {'':9s} {'CPU seconds (all threads)':^27s}")
  print(f"{'repeat':>6s} {'(a) full decode':>15s} {'(b) prep':>9s} {'start-up':>8s} "
        f"{'ratio b/a':>9s} {'(a)':>8s} {'(b)':>8s} {'ratio b/a':>9s}")
  for r in range(FLAGS.repeats):
    rows, (startup, startup_cpu) = interleaved(paths, r)
    a = sum(row[0] for row in rows)
    b = startup + sum(row[2] for row in rows)
    a_cpu = sum(row[1] for row in rows)
    b_cpu = startup_cpu + sum(row[3] for row in rows)
    best_a = [min(x, row[0]) for x, row in zip(best_a, rows)]
    best_b = [min(x, row[2]) for x, row in zip(best_b, rows)]
    walls.append(b / a)
    cpus.append(b_cpu / a_cpu)
    print(f"{r + 1:6d} {a:15.2f} {b:9.2f} {startup:8.2f} {b / a:9.2f} {a_cpu:8.2f} "
          f"{b_cpu:8.2f} {b_cpu / a_cpu:9.2f}", flush=True)
  for name, ratios in (("wall", walls), ("CPU", cpus)):
    ratios.sort()
    print(f"ratio (b)/(a), {name}: median {ratios[len(ratios) // 2]:.2f}, "
          f"range {ratios[0]:.2f}-{ratios[-1]:.2f} over {len(ratios)} repeats")

  print(f"\nPer clip, best of {FLAGS.repeats} (seconds):")
  print(f"{'clip':48s} {'size':>9s} {'frames':>6s} {'(a)':>6s} {'(b)':>6s} {'b/a':>5s}")
  for path, a, b in zip(paths, best_a, best_b):
    with av.open(path) as container:
      v = container.streams.video[0]
      size = f"{v.width}x{v.height}"
      frames = v.frames
    print(f"{os.path.basename(path)[:48]:48s} {size:>9s} {frames:6d} {a:6.2f} {b:6.2f} "
          f"{b / a:5.2f}")
  print(f"{'sum of per-clip bests':48s} {'':9s} {'':6s} {sum(best_a):6.2f} "
        f"{sum(best_b):6.2f} {sum(best_b) / sum(best_a):5.2f}")

  if FLAGS.fresh_process:
    print("\nFresh processes (interpreter, imports and start-up included), seconds:")
    for r in range(FLAGS.repeats):
      a, a_cpu = _fresh("baseline", paths)
      b, b_cpu = _fresh("prep", paths)
      print(f"  repeat {r + 1}: wall (a) {a:.2f} (b) {b:.2f} ratio {b / a:.2f}; "
            f"CPU (a) {a_cpu:.2f} (b) {b_cpu:.2f} ratio {b_cpu / a_cpu:.2f}", flush=True)

  if FLAGS.profile:
    profile(paths)


if __name__ == "__main__":
  app.run(main)
