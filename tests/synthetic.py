"""Small prepared data sets written in the tests: real schema, learnable signal."""

import os

import numpy as np
import tensorflow as tf

from av_sound_tf.core import dataset_info
from av_sound_tf.core import labels
from av_sound_tf.core import schema


def write_prepared(out_dir, splits=(("train", 48), ("validation", 24)), num_classes=4,
                   num_frames=(200, 320), embedding_dim=16, shards=2, seed=0,
                   multi_label=False, unlabeled_splits=()):
  """Writes shards, the dataset info and the label map like bin/prepare_data does.

  Class c lights up mel bins [8c, 8c + 8) in the log-mel and adds a direction to the
  embedding, so models can learn it. Splits in `unlabeled_splits` are written without labels
  (labeled=0), as bin/prepare_data --allow_unlabeled does. Returns {split: [(labels,
  log_mel, embedding)]}.
  """
  rng = np.random.default_rng(seed)
  tf.io.gfile.makedirs(out_dir)
  directions = rng.normal(size=[num_classes, embedding_dim])
  info_splits, written = {}, {}
  for split, n in splits:
    examples, counts = [], np.zeros(num_classes, np.int64)
    for i in range(n):
      if multi_label:
        y = sorted(set(rng.choice(num_classes, size=rng.integers(1, 3)).tolist()))
      else:
        y = [i % num_classes]
      frames = int(rng.integers(num_frames[0], num_frames[1] + 1))
      log_mel = rng.normal(-8.0, 1.0, [frames, 64]).astype(np.float32)
      emb = rng.normal(size=embedding_dim).astype(np.float32)
      for c in y:
        log_mel[:, 8 * c:8 * c + 8] += 4.0
        emb += 2 * directions[c]
        counts[c] += 1
      examples.append((y, log_mel, emb))
    names = []
    for k in range(shards):
      name = schema.shard_name(split, k, shards)
      names.append(name)
      with tf.io.TFRecordWriter(os.path.join(out_dir, name)) as w:
        for j in range(k, n, shards):
          y, log_mel, emb = examples[j]
          labeled = split not in unlabeled_splits
          w.write(schema.make_example(
              f"{split}/{j}", f"{split}_{j}.wav", y if labeled else [],
              [f"/m/c{c}" for c in y] if labeled else [],
              duration_seconds=log_mel.shape[0] / 100, log_mel=log_mel, embedding_mean=emb,
              num_video_frames=8, labeled=labeled).SerializeToString())
    unlabeled = split in unlabeled_splits
    info_splits[split] = {"num_shards": shards, "num_examples": n, "files": names,
                          "class_counts": (0 * counts if unlabeled else counts).tolist(),
                          "num_unlabeled": n if unlabeled else 0}
    written[split] = examples
  labels.LabelMap([f"/m/c{c}" for c in range(num_classes)],
                  [f"Class {c}" for c in range(num_classes)]).to_csv(
                      os.path.join(out_dir, schema.LABELS_FILE))
  dataset_info.DatasetInfo.write(out_dir, {
      "num_classes": num_classes, "labels_file": schema.LABELS_FILE,
      "modalities": ["audio", "visual"], "embedding_dim": embedding_dim,
      "splits": info_splits})
  return written
