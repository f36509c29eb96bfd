#!/usr/bin/env python3
"""Video cost per clip for docs/scaling.md: sampling 64 frames from 10 s of real H.264 video,
and embedding them with the MobileNet v1 TFLite extractor (--embedder=tflite:...) and with
ResNet-152 (--embedder=resnet152), measured one after the other in one process on one thread
(a preparation worker's setting: one worker process per core). Each figure is given twice:
wall-clock seconds, and CPU seconds of this process (`time.process_time`, all its threads):
on a machine shared with other work the wall clock includes waiting for a core, the CPU
time does not, so the vCPU-hour projection uses CPU seconds. Ratios compare like with like
(one run, one process).

  .venv/bin/python benchmarks/embedder_benchmark.py \
      [--clips_dir=../shared/data/real_av/clips] [--num_clips=30] [--resnet_frames=16]

Not a test. ResNet-152 runs with random weights (its speed does not depend on them); the
MobileNet frames are the real clips' frames. Prints the machine, the commit, and the
projection to AudioSet's 2.08 M clips.
"""

import hashlib
import os
import subprocess
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

from av_sound_tf.core import embedders  # pylint: disable=g-import-not-at-top
from av_sound_tf.core import media  # pylint: disable=g-import-not-at-top

_SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..",
                       "shared")
flags.DEFINE_string("clips_dir", os.path.join(_SHARED, "data", "real_av", "clips"),
                    "Real video clips (H.264/AAC).")
flags.DEFINE_string("mobilenet", os.path.join(
    _SHARED, "models", "coral_mobilenet_v1_embedding",
    "mobilenet_v1_1.0_224_quant_embedding_extractor.tflite"), "TFLite frame embedder.")
flags.DEFINE_integer("num_clips", 30, "Clips whose 64 frames are sampled.", lower_bound=1)
flags.DEFINE_integer("mobilenet_clips", 4, "Clips (64 real frames each) embedded with the "
                     "TFLite model, in batches of 16 and frame by frame.", lower_bound=1)
flags.DEFINE_integer("resnet_frames", 16, "Timed ResNet-152 frames (one batch).",
                     lower_bound=1)
flags.DEFINE_integer("threads", 1, "Threads for TensorFlow and the TFLite interpreter.",
                     lower_bound=1)
FLAGS = flags.FLAGS

AUDIOSET_CLIPS = 2_085_516  # 2,042,985 unbalanced + 22,160 balanced + 20,371 eval
FRAMES = 64


def _machine():
  try:
    model = [l.split(":", 1)[1].strip() for l in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines()
             if l.startswith("Model name")][0]
  except (OSError, IndexError):
    model = "unknown CPU"
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  git = lambda *a: subprocess.run(["git", "-C", repo, *a], capture_output=True,
                                  text=True).stdout.strip()  # empty outside a checkout
  print(f"machine: {model}, {os.cpu_count()} cores (shared with other work); "
        f"{FLAGS.threads} thread(s)")
  with open(media.__file__, "rb") as f:  # ties the figures to the frame sampler measured
    digest = hashlib.sha1(f.read()).hexdigest()[:12]
  status = git("status", "--short", "--", "av_sound_tf/core/media.py")
  print(f"commit: {git('rev-parse', '--short', 'HEAD') or 'not a git checkout'}; "
        f"{media.__file__} sha1 {digest}" + (" (uncommitted changes)" if status else ""))


class _Clock:
  """Wall-clock and CPU seconds of this process since construction."""

  def __init__(self):
    self.wall, self.cpu = time.perf_counter(), time.process_time()

  def read(self):
    return np.array([time.perf_counter() - self.wall, time.process_time() - self.cpu])


def _hours(seconds_per_clip):
  return seconds_per_clip * AUDIOSET_CLIPS / 3600


def sample_frames(paths):
  """Seconds per clip of media.sample_video_frames(path, 64, 224) over 10 s (or the whole
  clip when shorter), on one thread as preparation workers do (decoding and conversion),
  and the frames of every clip."""
  seconds, frames, lengths = [], [], []
  for path in paths:
    duration = media.probe(path).duration_seconds
    end = min(10.0, duration)
    clock = _Clock()
    frames.append(media.sample_video_frames(path, FRAMES, 224, 0.0, end, decoder_threads=1))
    seconds.append(clock.read())
    lengths.append(end)
  per_10s = np.array(seconds) / np.array(lengths)[:, None] * 10.0  # [clips, (wall, cpu)]
  print(f"video: 64 frames sampled from 10 s, centre-cropped and resized to 224 "
        f"(media.sample_video_frames, all on one thread), {len(paths)} real clips, per 10 s "
        f"clip: wall mean "
        f"{per_10s[:, 0].mean():.3f} s (median {np.median(per_10s[:, 0]):.3f}); CPU mean "
        f"{per_10s[:, 1].mean():.3f} s (median {np.median(per_10s[:, 1]):.3f}, range "
        f"{per_10s[:, 1].min():.3f}-{per_10s[:, 1].max():.3f})")
  return per_10s.mean(axis=0), frames


def mobilenet(frames):
  emb = embedders.build_embedder("tflite:" + FLAGS.mobilenet)
  clips = frames[:FLAGS.mobilenet_clips]
  emb(clips[0][:16])  # warm-up: XNNPACK builds its kernels on the first allocation
  results = {}
  for batch in (16, 1):
    emb.batch_size = batch
    clock = _Clock()
    for f in clips:
      out = emb(f)
    results[batch] = clock.read() / (len(clips) * FRAMES)
  b, l = 1000 * results[16], 1000 * results[1]
  print(f"MobileNet v1 TFLite (uint8, {emb.dim}-d), ms per frame: batches of 16 wall "
        f"{b[0]:.1f} / CPU {b[1]:.1f}; frame by frame wall {l[0]:.1f} / CPU {l[1]:.1f} "
        f"(batch/loop CPU {b[1] / l[1]:.2f}x); per clip CPU {FRAMES * b[1] / 1000:.3f} s")
  assert out.shape == (FRAMES, emb.dim)
  return FRAMES * results[16]


def light(frames):
  """CPU ms per 64-frame clip of the weight-free and test embedders (whole clips per call,
  as preparation calls them), over every sampled clip."""
  cells = []
  for spec in ("color_layout", "tiny"):
    emb = embedders.build_embedder(spec)
    emb(frames[0])  # tracing
    clock = _Clock()
    for f in frames:
      out = emb(f)
    assert out.shape == (FRAMES, emb.dim)
    cells.append(f"{spec} {1000 * clock.read()[1] / len(frames):.1f}")
  print(f"Light embedders, CPU ms per 64-frame clip ({len(frames)} clips): {'; '.join(cells)}")


def resnet(frames):
  emb = embedders.build_embedder("resnet152", weights="none")
  batch = np.concatenate(frames)[:FLAGS.resnet_frames]
  emb.batch_size = FLAGS.resnet_frames
  emb(batch[:2])  # tracing
  clock = _Clock()
  emb(batch)
  per_frame = clock.read() / len(batch)
  print(f"ResNet-152 Keras (float32, 2048-d, random weights), ms per frame ({len(batch)} "
        f"frames in one batch): wall {1000 * per_frame[0]:.0f} / CPU {1000 * per_frame[1]:.0f}"
        f"; per clip CPU {FRAMES * per_frame[1]:.1f} s")
  return FRAMES * per_frame


def main(argv):
  del argv
  tf.config.threading.set_intra_op_parallelism_threads(FLAGS.threads)
  tf.config.threading.set_inter_op_parallelism_threads(FLAGS.threads)
  _machine()
  names = sorted(n for n in os.listdir(FLAGS.clips_dir) if n.endswith(".mp4"))
  paths = [os.path.join(FLAGS.clips_dir, n) for n in names[:FLAGS.num_clips]]
  decode, frames = sample_frames(paths)
  light(frames)
  mobile = mobilenet(frames)
  heavy = resnet(frames)
  print(f"ratios (same run, CPU time): MobileNet embedding / frame sampling "
        f"{mobile[1] / decode[1]:.2f}x; ResNet-152 / MobileNet {heavy[1] / mobile[1]:.1f}x")
  print(f"AudioSet, {AUDIOSET_CLIPS:,} clips, vCPU-hours (CPU time) on this CPU: frame "
        f"sampling {_hours(decode[1]):,.0f}; MobileNet TFLite {_hours(mobile[1]):,.0f} (video "
        f"total {_hours(decode[1] + mobile[1]):,.0f}); ResNet-152 on CPU "
        f"{_hours(heavy[1]):,.0f} (video total {_hours(decode[1] + heavy[1]):,.0f})")


if __name__ == "__main__":
  app.run(main)
