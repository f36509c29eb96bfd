#!/usr/bin/env python3
"""Benchmark: preparing real video clips (audio + 64 frames) against a plain full decode.

Measured side by side in one run, on every clip of ../shared/data/real_av/clips (30 real
H.264/AAC clips, 6-15 s, 224-720 px high), clip by clip: each clip is decoded by (a) and
prepared by (b) back to back, the order rotating from clip to clip and from repeat to
repeat, so that every side sees the same load on a shared machine:

  (a) baseline, a plain full decode: per clip ``av.open``, then
      ``container.decode(video=0, audio=0)`` run to the end: every packet of the first
      video and the first audio stream demuxed once and decoded to a frame, nothing else
      (no pixel conversion, no resampling, no features). Video decoder threads:
      ``thread_type = "AUTO"`` (frame + slice threads, FFmpeg's automatic thread count), the
      setting core/media.py uses and the fastest full decode on this machine; audio: PyAV's
      defaults. ``--baseline_threads=default`` keeps PyAV's video default (slice threads).
  (b) preparation, the way bin/prepare_data's worker does it (data_prep/prepare.py
      ``_init_worker``): TensorFlow intra- and inter-op threads 1, one
      ``featurize.ClipProcessor`` with audio + visual, 64 frames of 224 px, the embedder
      ``--embedder`` (``tiny``: the cheapest, a small random ConvNet, about 20-30 ms per
      64 frames here), one worker (this process), for each ``--threads`` setting of the
      processor: ``1``, each clip on one thread (decoding, conversion and audio: the
      setting of workers that fill every core, the least CPU per clip), and ``0``, helper
      threads (the audio and the frame conversion in their own threads, FFmpeg's
      automatic decoder threads: bin/prepare_data's setting when it has fewer workers than
      cores, e.g. ``--num_workers=1`` here); then the processor on each clip, up to its
      serialized Example. Its total is the worker's start-up (building the processor: the
      compiled log-mel function, the embedder, their first tracing and compiles) plus
      every clip. The interpreter, the imports (TensorFlow, PyAV) and TensorFlow's one-time
      process set-up (one clip through every side, untimed, first) are not counted on
      either side; ``--fresh_process`` also
      times both sides as fresh processes (interpreter, imports and all), each side on all
      clips in one process (preparation with the first ``--threads`` setting).

Prints both totals per repeat in wall seconds and in CPU seconds (the process's user +
system time, all threads: steadier than wall time on a shared machine), the ratios
(b) / (a), per-clip wall seconds (best of the repeats); with ``--parts``, the CPU of each
part of a ``threads=1`` preparation timed on its own against the plain decode (PyAV's
default threads), and with ``--profile`` where preparation's time goes (cProfile with a
CPU-time clock, cumulative seconds per step of one more pass).

  .venv/bin/python benchmarks/frame_benchmark.py [--repeats=3] [--profile] [--parts]
      [--fresh_process] [--threads=1,0] [--baseline_threads=auto|default]

Not a test. The machine may be shared: compare the ratios within a run.
"""

import cProfile
import functools
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
flags.DEFINE_list("threads", ["1", "0"], "featurize.ClipProcessor threads settings to "
                  "measure: 1, each clip on one thread (workers that fill every core); 0, "
                  "helper threads (fewer workers than cores).")
flags.DEFINE_bool("profile", False, "Profile one more preparation pass.")
flags.DEFINE_bool("parts", False, "Also time preparation's parts (threads=1) against the "
                  "plain decode, clip by clip in rotating order, CPU seconds.")
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


def _set_tf_threads():
  """One TensorFlow thread, as prepare._init_worker (only possible before TF starts)."""
  global _THREADS_SET
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if not _THREADS_SET:
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    _THREADS_SET = True


def _settings():
  return [int(t) for t in FLAGS.threads]


def _start_worker(threads):
  """A worker's ClipProcessor with `threads`, its embedder built, and its start-up
  (wall seconds, CPU seconds)."""
  from data_prep import featurize  # pylint: disable=g-import-not-at-top
  _set_tf_threads()
  c0, t0 = cpu_seconds(), time.perf_counter()
  processor = featurize.ClipProcessor(_config(), threads)
  _ = processor.embedder  # built on the first visual clip anyway
  return processor, (time.perf_counter() - t0, cpu_seconds() - c0)


def _prepare_clip(processor, job):
  result = processor(job)
  if result.status != "written":
    raise RuntimeError(f"{job.path}: {result.reason}")


def preparation(paths, threads):
  """bin/prepare_data's worker with ClipProcessor `threads`: start-up, then each clip.

  Returns (wall seconds, CPU seconds, start-up wall seconds, wall seconds per clip).
  """
  c0, t0 = cpu_seconds(), time.perf_counter()
  processor, (startup, _) = _start_worker(threads)
  times = []
  for job in _jobs(paths):
    t = time.perf_counter()
    _prepare_clip(processor, job)
    times.append(time.perf_counter() - t)
  return time.perf_counter() - t0, cpu_seconds() - c0, startup, times


def interleaved(paths, repeat, settings):
  """Every side clip by clip, the order rotating, so that all see the same load.

  Each preparation setting's worker start-up (processor and embedder) is timed first and
  counted in its total. Returns {side: [(wall, CPU) per clip]} and {setting: (start-up
  wall, CPU)}; side "decode" is the baseline, an int a ClipProcessor threads setting.
  """

  def timed(fn):
    c, t = cpu_seconds(), time.perf_counter()
    fn()
    return time.perf_counter() - t, cpu_seconds() - c

  processors, startup = {}, {}
  for threads in settings:
    processors[threads], startup[threads] = _start_worker(threads)
  sides = ["decode"] + list(settings)
  rows = {side: [] for side in sides}
  for i, (path, job) in enumerate(zip(paths, _jobs(paths))):
    shift = (i + repeat) % len(sides)
    for side in sides[shift:] + sides[:shift]:
      if side == "decode":
        rows[side].append(timed(functools.partial(full_decode, path, FLAGS.baseline_threads)))
      else:
        rows[side].append(timed(functools.partial(_prepare_clip, processors[side], job)))
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
                  f"--threads={FLAGS.threads[0]}"],
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


def profile(paths):
  profiler = cProfile.Profile(time.process_time)
  profiler.enable()
  _, total, _, _ = preparation(paths, threads=1)  # every step on this thread: cProfile sees it
  profiler.disable()
  stats = pstats.Stats(profiler).stats
  from av_sound_tf.core import video_frames  # pylint: disable=g-import-not-at-top
  fitter_line = video_frames.FrameFitter.__call__.__code__.co_firstlineno
  print(f"\nProfile of one more preparation pass with threads=1 (every step on the main "
        f"thread, which cProfile sees), in CPU seconds of the process: {total:.2f} s "
        f"(cProfile adds overhead)")
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
  for label, needle in (("  (PyAV decode calls, all streams)", "'decode' of 'av."),
                        ("  (container opens, av.open)", "av.container.core.open")):
    rows = [v for k, v in stats.items() if k[0] == "~" and needle in k[2]]
    print(f"{label:54s} {sum(r[1] for r in rows):6d} {sum(r[3] for r in rows):7.2f} "
          f"{sum(r[3] for r in rows) / total:6.1%}")
  print("\nTop 15 by own time:")
  pstats.Stats(profiler).sort_stats("tottime").print_stats(15)


def parts(paths, repeats=4):
  """CPU seconds over all clips of each part of a threads=1 preparation, each part timed
  on its own clip by clip with the plain decode in rotating order (medians of `repeats`),
  and its share of the plain decode's CPU."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from av_sound_tf.core import containers  # pylint: disable=g-import-not-at-top
  from av_sound_tf.core import media  # pylint: disable=g-import-not-at-top
  from av_sound_tf.core import video_frames  # pylint: disable=g-import-not-at-top
  processor, _ = _start_worker(1)
  jobs = dict(zip(paths, _jobs(paths)))
  for path in paths:  # tracing and log-mel compiles, untimed
    _prepare_clip(processor, jobs[path])
  frames = {p: media.sample_video_frames(p, FLAGS.num_frames, FLAGS.image_size,
                                         decoder_threads=1) for p in paths}
  waves = {p: media.read_audio(p, None, None, processor.config.log_mel.sample_rate).waveform
           for p in paths}

  def picks_only(path):  # the exact picks decoded as sample_video does, nothing converted
    with containers.open_container(path) as container:
      stream, targets = media._video_segment(  # pylint: disable=protected-access
          path, container, FLAGS.num_frames, None, None, 1)
      video_frames.sample_frames(container, stream, targets, lambda frame: None)

  sides = {
      "plain full decode (the baseline)": lambda p: full_decode(p, "default"),
      "whole preparation (ClipProcessor, threads=1)": lambda p: _prepare_clip(processor,
                                                                                jobs[p]),
      "video: media.sample_video (one thread)": lambda p: media.sample_video(
          p, FLAGS.num_frames, FLAGS.image_size, decoder_threads=1),
      "  of it: the picks decoded, no conversion": picks_only,
      "audio: media.read_audio (open, decode, resample)": lambda p: media.read_audio(
          p, None, None, processor.config.log_mel.sample_rate),
      f"embedder ({FLAGS.embedder})": lambda p: processor.embedder.embed_clip(frames[p]),
      "log-mel": lambda p: processor.log_mel(waves[p]),
      "probe (media.probe)": media.probe,
      "container open (containers.open_container)": lambda p: containers.open_container(
          p).close(),
  }
  names = list(sides)
  totals = {name: [] for name in names}
  for r in range(repeats):
    spent = dict.fromkeys(names, 0.0)
    for i, path in enumerate(paths):
      shift = (i + r) % len(names)
      for name in names[shift:] + names[:shift]:
        c = cpu_seconds()
        sides[name](path)
        spent[name] += cpu_seconds() - c
    for name in names:
      totals[name].append(spent[name])
  base = float(np.median(totals[names[0]]))
  print(f"\nParts of preparation, CPU seconds over {len(paths)} clips (median of {repeats}), "
        f"and as a share of the plain decode:")
  for name in names:
    value = float(np.median(totals[name]))
    print(f"  {name:52s} {value:7.2f} s {value / base:6.3f}x  "
          f"(ms per clip {1000 * value / len(paths):.1f})")


def _side_name(side):
  return "(a) full decode" if side == "decode" else f"(b) prep, threads={side}"


def main(argv):
  del argv
  paths = sorted(glob.glob(os.path.join(FLAGS.clips_dir, "*.mp4")))
  if not paths:
    raise SystemExit(f"no *.mp4 clips in {FLAGS.clips_dir}")
  settings = _settings()
  if FLAGS.mode == "baseline":
    baseline(paths)
    return
  if FLAGS.mode == "prep":
    preparation(paths, settings[0])
    return
  for path in paths:  # every side reads from the page cache
    with open(path, "rb") as f:
      f.read()
  print(f"{len(paths)} clips in {FLAGS.clips_dir}; embedder {FLAGS.embedder}, "
        f"{FLAGS.num_frames} frames of {FLAGS.image_size} px; baseline video threads: "
        f"{FLAGS.baseline_threads}; preparation's ClipProcessor threads: "
        f"{', '.join(map(str, settings))}; PyAV {av.__version__}, FFmpeg "
        f"{av.ffmpeg_version_info}; {os.cpu_count()} CPUs")
  # TensorFlow's and XLA's one-time process set-up (the runtime, oneDNN's kernels) is
  # paid here, untimed, like the imports; every repeat below builds new processors, whose
  # start-up (tracing, the log-mel compiles) is timed.
  interleaved(paths[:1], 0, settings)
  sides = ["decode"] + settings
  best = {side: [float("inf")] * len(paths) for side in sides}
  ratios = {threads: ([], []) for threads in settings}
  print(f"\n{'repeat':>6s} {'side':26s} {'wall s':>8s} {'start-up':>8s} {'CPU s':>8s} "
        f"{'wall b/a':>8s} {'CPU b/a':>8s}")
  for r in range(FLAGS.repeats):
    rows, startup = interleaved(paths, r, settings)
    a_wall = sum(row[0] for row in rows["decode"])
    a_cpu = sum(row[1] for row in rows["decode"])
    print(f"{r + 1:6d} {_side_name('decode'):26s} {a_wall:8.2f} {'':8s} {a_cpu:8.2f}")
    for side in sides:
      best[side] = [min(x, row[0]) for x, row in zip(best[side], rows[side])]
    for threads in settings:
      wall = startup[threads][0] + sum(row[0] for row in rows[threads])
      cpu = startup[threads][1] + sum(row[1] for row in rows[threads])
      ratios[threads][0].append(wall / a_wall)
      ratios[threads][1].append(cpu / a_cpu)
      print(f"{'':6s} {_side_name(threads):26s} {wall:8.2f} {startup[threads][0]:8.2f} "
            f"{cpu:8.2f} {wall / a_wall:8.2f} {cpu / a_cpu:8.2f}", flush=True)
  for threads in settings:
    for name, values in zip(("wall", "CPU"), ratios[threads]):
      values = sorted(values)
      print(f"threads={threads}: ratio (b)/(a), {name}: median {values[len(values) // 2]:.2f}, "
            f"range {values[0]:.2f}-{values[-1]:.2f} over {len(values)} repeats")

  print(f"\nPer clip, wall seconds, best of {FLAGS.repeats}:")
  header = "".join(f" {'t=' + str(t):>6s} {'b/a':>5s}" for t in settings)
  print(f"{'clip':48s} {'size':>9s} {'frames':>6s} {'(a)':>6s}{header}")
  for i, path in enumerate(paths):
    with av.open(path) as container:
      v = container.streams.video[0]
      size = f"{v.width}x{v.height}"
      frames = v.frames
    a = best["decode"][i]
    cells = "".join(f" {best[t][i]:6.2f} {best[t][i] / a:5.2f}" for t in settings)
    print(f"{os.path.basename(path)[:48]:48s} {size:>9s} {frames:6d} {a:6.2f}{cells}")
  a = sum(best["decode"])
  cells = "".join(f" {sum(best[t]):6.2f} {sum(best[t]) / a:5.2f}" for t in settings)
  print(f"{'sum of per-clip bests':48s} {'':9s} {'':6s} {a:6.2f}{cells}")

  if FLAGS.fresh_process:
    print(f"\nFresh processes (interpreter, imports and start-up included; preparation "
          f"with threads={settings[0]}), seconds:")
    for r in range(FLAGS.repeats):
      a, a_cpu = _fresh("baseline", paths)
      b, b_cpu = _fresh("prep", paths)
      print(f"  repeat {r + 1}: wall (a) {a:.2f} (b) {b:.2f} ratio {b / a:.2f}; "
            f"CPU (a) {a_cpu:.2f} (b) {b_cpu:.2f} ratio {b_cpu / a_cpu:.2f}", flush=True)

  if FLAGS.parts:
    parts(paths)
  if FLAGS.profile:
    profile(paths)


if __name__ == "__main__":
  app.run(main)
