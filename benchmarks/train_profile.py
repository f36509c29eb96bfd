#!/usr/bin/env python3
"""Profile of one Table-1 training step on the CPU: where the time goes, by kind of op.

Builds the Table-1 model (batch 8 of 1024 x 64 log-mel, 527 classes) and compiles it as
train/training.py does (mirrored strategy, ReplicaMeanAdam, BCE, mAP metric), traces
--steps steps of `model.fit` on in-memory batches with TensorFlow's profiler and prints the
summed op time by category: convolution forward, input gradient, filter gradient, batch
norm (forward and backward), ReLU, pooling, dense layers, the optimizer, the rest; and the
step's CPU-seconds. --batch_norm=keras swaps in Keras' own (unfused) batch normalization, the
layer models.py used before, to show what the fused kernel saves.

  .venv/bin/python benchmarks/train_profile.py [--batch_norm=fused|keras] [--steps=2]

Not a test. Op times are wall time of each op on TensorFlow's executor threads (two ops can
run at once), so shares, not sums, are the figure to read on a shared machine.
"""

import collections
import glob
import os
import re
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import keras
import numpy as np
import tensorflow as tf

from av_sound_tf.core import metrics as metrics_lib
from av_sound_tf.modeling import models
from av_sound_tf.train import distribution

FLAGS = flags.FLAGS
flags.DEFINE_enum("batch_norm", "fused", ["fused", "keras"],
                  "fused: models.BatchNormalization; keras: keras.layers.BatchNormalization.")
flags.DEFINE_integer("steps", 2, "Profiled training steps.")

CATEGORIES = (  # (category, regular expression on "<op name>:<op type>"), first match wins
    ("conv filter gradient", r"Conv2DBackpropFilter"),
    ("conv input gradient", r"Conv2DBackpropInput"),
    ("conv forward", r"Conv2D"),
    ("optimizer (Adam)", r"/adam/|Adam"),
    ("batch norm, forward and backward", r"_bn[_/]|FusedBatchNorm"),
    ("ReLU", r"relu|Relu"),
    ("max pooling", r"pool|MaxPool"),
    ("dense layers (B6, B7, scores)", r"MatMul"),
    ("layout conversions", r"Transpose|Reorder|ToTf|MklToTf"),
)


def profile_ops(logdir):
  from tensorflow.tsl.profiler.protobuf import xplane_pb2  # pylint: disable=g-import-not-at-top
  path = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)[0]
  space = xplane_pb2.XSpace()
  with open(path, "rb") as f:
    space.ParseFromString(f.read())
  seconds = collections.Counter()
  for plane in space.planes:
    for line in plane.lines:
      if not line.name.startswith("tf_Compute"):
        continue
      for event in line.events:
        name = plane.event_metadata[event.metadata_id].name
        if ":" not in name or name.startswith("ExecutorState"):
          continue
        category = next((c for c, pattern in CATEGORIES if re.search(pattern, name)),
                        "other ops")
        seconds[category] += event.duration_ps / 1e12
  return seconds


def main(argv):
  del argv
  if FLAGS.batch_norm == "keras":  # the layer models.py used before the fused kernel
    models.BatchNormalization = keras.layers.BatchNormalization
  keras.utils.set_random_seed(0)
  rng = np.random.default_rng(0)
  x = rng.normal(-8, 2, [8, 1024, 64]).astype(np.float32)
  y = (rng.random([8, 527]) < 0.01).astype(np.float32)
  with distribution.get_strategy("mirrored").scope():
    model = models.MILConvNet(num_classes=527, num_frames=1024)
    model.compile(optimizer=distribution.ReplicaMeanAdam(1e-4),
                  loss=keras.losses.BinaryCrossentropy(),
                  metrics=[metrics_lib.streaming_map_metric(527)])
  data = tf.data.Dataset.from_tensors((x, y)).repeat()
  model.fit(data, steps_per_epoch=2, epochs=1, verbose=0)
  with tempfile.TemporaryDirectory() as logdir:
    cpu, wall = time.process_time(), time.perf_counter()
    tf.profiler.experimental.start(logdir)
    model.fit(data, steps_per_epoch=FLAGS.steps, epochs=1, verbose=0)
    tf.profiler.experimental.stop()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    seconds = profile_ops(logdir)
  total = sum(seconds.values())
  fused = sum(op.type == "FusedBatchNormV3" for op in tf.function(
      lambda v: model(v, training=True)).get_concrete_function(
          tf.TensorSpec([1, 1024, 64])).graph.get_operations())
  print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; batch norm: "
        f"{FLAGS.batch_norm} ({fused} FusedBatchNormV3 ops in the training graph); "
        f"{FLAGS.steps} steps profiled: {cpu / FLAGS.steps:.2f} CPU-s and "
        f"{wall / FLAGS.steps:.2f} s wall per step (profiler on)")
  for category, s in seconds.most_common():
    print(f"  {category:<36} {s / FLAGS.steps:7.3f} s per step  {100 * s / total:5.1f} %")


if __name__ == "__main__":
  app.run(main)
