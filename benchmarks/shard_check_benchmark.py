#!/usr/bin/env python3
"""Benchmark: how fast shards are verified: `schema.check_shards` (training's
--verify_shards) and `shards.verify_shard` (what a rerun of bin/prepare_data does to every
shard it keeps: its manifest part read, the shard read with CRC checks, the counts compared).

  .venv/bin/python benchmarks/shard_check_benchmark.py [--gigabytes=1.0] [--dir=/tmp]

Writes one TFRecord of 512 KB records (about the size of a 10 s float16 log-mel example
with its metadata is 128 KB; the record size barely matters) and a manifest part listing
them, then counts its records twice with CRC checks (the second pass reads from the page
cache), then runs `shards.verify_shard` on it. Not a test.
"""

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

from av_sound_tf.core import files  # pylint: disable=g-import-not-at-top
from av_sound_tf.core import schema  # pylint: disable=g-import-not-at-top
from data_prep import shards  # pylint: disable=g-import-not-at-top

flags.DEFINE_float("gigabytes", 1.0, "Size of the test shard.")
flags.DEFINE_string("dir", "/tmp", "Where the test shard is written (and removed).")
FLAGS = flags.FLAGS


def main(_):
  name = "shard_check_benchmark.tfrecord"
  path = os.path.join(FLAGS.dir, name)
  part = os.path.join(FLAGS.dir, shards.MANIFEST_PARTS, name + ".csv")
  record = np.random.default_rng(0).bytes(512 * 1024)
  num_records = int(FLAGS.gigabytes * 2048)
  with tf.io.TFRecordWriter(path) as w:
    for _ in range(num_records):
      w.write(record)
  os.makedirs(os.path.dirname(part), exist_ok=True)
  files.write_csv(part, [{"path": f"clip{i}.ogg", "status": "written", "clip_id": f"clip{i}",
                          "split": "data", "shard": name, "index_in_shard": i}
                         for i in range(num_records)], shards.MANIFEST_COLUMNS)
  size = os.path.getsize(path) / 1e9
  try:
    for run in (1, 2):
      start = time.time()
      n = schema.count_records(path)
      seconds = time.time() - start
      print(f"pass {run}: {n} records, {size:.2f} GB in {seconds:.2f} s = "
            f"{size / seconds:.2f} GB/s")
    start = time.time()
    problem = shards.verify_shard(FLAGS.dir, name, num_records)
    seconds = time.time() - start
    assert problem is None, problem
    print(f"shards.verify_shard (a rerun's check of a kept shard): {size:.2f} GB in "
          f"{seconds:.2f} s = {size / seconds:.2f} GB/s")
  finally:
    os.remove(path)
    os.remove(part)
    os.rmdir(os.path.dirname(part))


if __name__ == "__main__":
  app.run(main)
