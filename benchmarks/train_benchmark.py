#!/usr/bin/env python3
"""Benchmark: the full-size Table-1 audio model on this machine's CPU.

Prints training clips/s (batch 8, 1024 x 64 log-mel, 527 classes), inference ms per 10 s
clip, and the input pipeline's clips/s on the same shapes (synthetic shards of 10 s
log-mels read, parsed, cropped and batched by av_sound_tf.pipeline). Not a test.

  .venv/bin/python benchmarks/train_benchmark.py [--steps=20] [--jit]
"""

import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import keras
import numpy as np
import tensorflow as tf

from av_sound_tf.modeling import models
from av_sound_tf.train import pipeline
from av_sound_tf.core import schema

FLAGS = flags.FLAGS
flags.DEFINE_integer("steps", 20, "Timed training steps.")
flags.DEFINE_integer("batch_size", 8, "Training batch size.")
flags.DEFINE_integer("num_classes", 527, "Classes.")
flags.DEFINE_bool("jit", False, "XLA-compile the train step (jit_compile=True).")
flags.DEFINE_integer("pipeline_clips", 512, "Clips in the synthetic shards.")
flags.DEFINE_enum("precision", "float32", ["float32", "mixed_bfloat16"],
                  "Keras dtype policy (mixed_bfloat16 uses AVX512-BF16/AMX through oneDNN).")


def bench_training(model):
  x = np.random.default_rng(0).normal(-8, 2, [FLAGS.batch_size, 1024, 64]).astype(np.float32)
  y = (np.random.default_rng(1).random([FLAGS.batch_size, FLAGS.num_classes]) < 0.01).astype(
      np.float32)
  ds = tf.data.Dataset.from_tensors((x, y)).repeat()
  model.compile(keras.optimizers.Adam(1e-4), keras.losses.BinaryCrossentropy(),
                jit_compile=FLAGS.jit)
  model.fit(ds, steps_per_epoch=3, epochs=1, verbose=0)  # trace and warm up
  t = time.perf_counter()
  model.fit(ds, steps_per_epoch=FLAGS.steps, epochs=1, verbose=0)
  return FLAGS.steps * FLAGS.batch_size / (time.perf_counter() - t)


def bench_inference(model):
  fn = tf.function(lambda x: model(x, training=False), jit_compile=FLAGS.jit)
  out = {}
  for batch in (1, 8):
    x = tf.constant(np.random.default_rng(2).normal(-8, 2, [batch, 1024, 64]).astype(np.float32))
    fn(x)
    n = 20 if batch == 1 else 5
    t = time.perf_counter()
    for _ in range(n):
      fn(x).numpy()
    out[batch] = (time.perf_counter() - t) / (n * batch) * 1000
  return out


def bench_pipeline(tmp):
  rng = np.random.default_rng(3)
  files = []
  for k in range(4):
    path = os.path.join(tmp, schema.shard_name("train", k, 4))
    files.append(path)
    with tf.io.TFRecordWriter(path) as w:
      for _ in range(FLAGS.pipeline_clips // 4):
        log_mel = rng.normal(-8, 2, [999, 64]).astype(np.float32)
        labels = rng.choice(FLAGS.num_classes, 3, replace=False)
        w.write(schema.make_example("x", "x.wav", labels, ["m"] * 3, log_mel=log_mel)
                .SerializeToString())
  cfg = pipeline.InputConfig(kind="audio", num_classes=FLAGS.num_classes,
                             batch_size=FLAGS.batch_size, shuffle_buffer=256)
  ds = pipeline.train_dataset(files, cfg, num_examples=FLAGS.pipeline_clips)
  it = iter(ds)
  for _ in range(10):
    next(it)
  n = 2 * FLAGS.pipeline_clips // FLAGS.batch_size
  t = time.perf_counter()
  for _ in range(n):
    next(it)
  return n * FLAGS.batch_size / (time.perf_counter() - t)


def main(argv):
  del argv
  keras.utils.set_random_seed(0)
  keras.mixed_precision.set_dtype_policy(FLAGS.precision)
  model = models.MILConvNet(num_classes=FLAGS.num_classes, num_frames=1024)
  print(f"machine: {os.cpu_count()} CPUs, TensorFlow {tf.__version__}, Keras "
        f"{keras.__version__}; model {model.count_params() / 1e6:.2f} M parameters; "
        f"jit_compile={FLAGS.jit}")
  with tempfile.TemporaryDirectory() as tmp:
    pipe = bench_pipeline(tmp)
  infer = bench_inference(model)
  train = bench_training(model)
  print(f"training   (batch {FLAGS.batch_size}): {train:6.2f} clips/s")
  print(f"inference  (batch 1): {infer[1]:6.1f} ms per 10 s clip; (batch 8): {infer[8]:6.1f} "
        "ms per clip")
  print(f"input pipeline: {pipe:8.1f} clips/s = {pipe / train:.0f}x what training consumes")


if __name__ == "__main__":
  app.run(main)
