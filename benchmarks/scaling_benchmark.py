#!/usr/bin/env python3
"""Figures for docs/scaling.md measured on this machine: bytes per example, video frame
sampling per clip, ResNet-152 frame embeddings per second on the CPU.

  .venv/bin/python benchmarks/scaling_benchmark.py [--video_dir=../shared/data/video]

Not a test. Random ResNet-152 weights (speed does not depend on them).
"""

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from av_sound_tf.core import embedders  # pylint: disable=g-import-not-at-top
from av_sound_tf.core import features  # pylint: disable=g-import-not-at-top
from av_sound_tf.core import media  # pylint: disable=g-import-not-at-top
from av_sound_tf.core import schema  # pylint: disable=g-import-not-at-top

flags.DEFINE_string("video_dir", os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "..", "shared", "data", "video"), "Real videos.")
flags.DEFINE_integer("resnet_batches", 3, "Timed ResNet-152 batches of 16 frames.")
FLAGS = flags.FLAGS


def example_sizes():
  frames = features.DEFAULT_PARAMS.num_frames(160000)  # a 10 s clip
  rng = np.random.default_rng(0)
  log_mel = rng.normal(-8, 2, [frames, 64]).astype(np.float32)
  mean = rng.normal(size=2048).astype(np.float32)
  per_frame = rng.normal(size=[64, 2048]).astype(np.float32)
  common = dict(clip_id="-0RWZT-miFs_420", source_path="videos/-0RWZT-miFs.mp4",
                label_indices=[0, 137, 300], label_mids=["/m/09x0r", "/m/04rlf", "/m/0jbk"],
                start_seconds=420.0, end_seconds=430.0, duration_seconds=10.0)
  sizes = {
      "audio only": schema.make_example(log_mel=log_mel, **common),
      "audio + mean embedding": schema.make_example(log_mel=log_mel, embedding_mean=mean,
                                                    num_video_frames=64, **common),
      "audio + mean + 64 frame embeddings": schema.make_example(
          log_mel=log_mel, embedding_mean=mean, frame_embeddings=per_frame, **common),
  }
  print(f"10 s clip = {frames} log-mel frames x 64 bins")
  for name, ex in sizes.items():
    print(f"  serialized example, {name}: {len(ex.SerializeToString()) / 1024:.1f} KiB")


def video_sampling():
  for name in ("moviepy_chaplin.mp4", "moviepy_big_buck_bunny_0_30.webm"):
    path = os.path.join(FLAGS.video_dir, name)
    if not os.path.exists(path):
      print(f"  {name}: not found, skipped")
      continue
    info = media.probe(path)
    times = []
    for _ in range(3):
      start = time.time()
      frames = media.sample_video_frames(path, 64, 224, 0.0, min(10.0, info.duration_seconds))
      times.append(time.time() - start)
    print(f"  64 frames of 10 s of {name} ({info.video_codec}): "
          f"{1000 * min(times):.0f}-{1000 * max(times):.0f} ms, {frames.shape}")


def resnet_cpu():
  embedder = embedders.build_embedder("resnet152", weights="none")
  frames = np.random.default_rng(0).integers(0, 255, [16, 224, 224, 3], np.uint8)
  embedder(frames)  # warm-up / tracing
  start = time.time()
  for _ in range(FLAGS.resnet_batches):
    embedder(frames)
  per_s = 16 * FLAGS.resnet_batches / (time.time() - start)
  print(f"  ResNet-152 on this CPU ({os.cpu_count()} cores): {per_s:.1f} frames/s = "
        f"{per_s / 64:.3f} clips/s at 64 frames")


def main(_):
  example_sizes()
  print("Video frame sampling (decode + resize + centre crop), per clip:")
  video_sampling()
  print("Frame embeddings:")
  resnet_cpu()


if __name__ == "__main__":
  app.run(main)
