#!/usr/bin/env python3
"""Benchmark: how fast `schema.check_shards` (training's --verify_shards) reads shards.

  .venv/bin/python benchmarks/shard_check_benchmark.py [--gigabytes=1.0] [--dir=/tmp]

Writes one TFRecord of 512 KB records (about the size of a 10 s float16 log-mel example
with its metadata is 128 KB; the record size barely matters), then counts its records
twice with CRC checks. The second pass reads from the page cache. Not a test.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

from av_sound_tf import schema  # pylint: disable=g-import-not-at-top

flags.DEFINE_float("gigabytes", 1.0, "Size of the test shard.")
flags.DEFINE_string("dir", "/tmp", "Where the test shard is written (and removed).")
FLAGS = flags.FLAGS


def main(_):
  path = os.path.join(FLAGS.dir, "shard_check_benchmark.tfrecord")
  record = np.random.default_rng(0).bytes(512 * 1024)
  with tf.io.TFRecordWriter(path) as w:
    for _ in range(int(FLAGS.gigabytes * 2048)):
      w.write(record)
  size = os.path.getsize(path) / 1e9
  try:
    for run in (1, 2):
      start = time.time()
      n = schema.count_records(path)
      seconds = time.time() - start
      print(f"pass {run}: {n} records, {size:.2f} GB in {seconds:.2f} s = "
            f"{size / seconds:.2f} GB/s")
  finally:
    os.remove(path)


if __name__ == "__main__":
  app.run(main)
