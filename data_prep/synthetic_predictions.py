"""Synthetic model outputs where the truth is known, for fusion tests and benchmarks.

Audio and visual scores [C = 12] per clip, written in bin/predict's layout
(``<split>.tfrecord`` of `schema.make_prediction_example`, the predictions info of
`dataset_info.PredictionsInfo` and the class map), so that fusion training and the report
read them as real predictions. Classes 0-3 are audible only, 4-7 visible only, 8-11 both
(weaker in each); per clip each modality is degraded to near chance 25 % of the time, so
the best weighting is class- and sample-specific; a fraction `missing` of clips lack a
modality.
"""

import os

import numpy as np
import tensorflow as tf

from av_sound_tf.core import dataset_info
from av_sound_tf.core import labels
from av_sound_tf.core import schema

NUM_CLASSES = 12
AUDIO_ONLY, VISUAL_ONLY, BOTH = range(0, 4), range(4, 8), range(8, 12)


def write_synthetic_predictions(out, sizes=(("train", 3000), ("validation", 600),
                                            ("eval", 600)), missing=0.0, seed=0):
  """Writes the predictions of each split in `sizes` ((name, clips), ...) to `out`."""
  c = NUM_CLASSES
  tf.io.gfile.makedirs(out)
  rng = np.random.default_rng(seed)
  strength_a = np.array([3.0] * 4 + [0.0] * 4 + [1.6] * 4)
  strength_v = np.array([0.0] * 4 + [3.0] * 4 + [1.6] * 4)
  splits = {}
  for split, n in sizes:
    path = os.path.join(out, f"{split}.tfrecord")
    with tf.io.TFRecordWriter(path) as w:
      for i in range(n):
        y = np.zeros(c)
        y[rng.choice(c, size=rng.integers(1, 4), replace=False)] = 1
        q_a = 0.15 if rng.random() < 0.25 else 1.0
        q_v = 0.15 if rng.random() < 0.25 else 1.0
        h_a = 1 / (1 + np.exp(-(rng.normal(size=c) + (2 * y - 1) * strength_a * q_a - 1)))
        h_v = 1 / (1 + np.exp(-(rng.normal(size=c) + (2 * y - 1) * strength_v * q_v - 1)))
        has_a = int(rng.random() >= missing)
        has_v = int(rng.random() >= missing) if has_a else 1
        w.write(schema.make_prediction_example(
            f"{split}/{i}", np.flatnonzero(y), h_a * has_a, h_v * has_v, has_a,
            has_v).SerializeToString())
    splits[split] = {"file": f"{split}.tfrecord", "num_examples": n}
  labels.LabelMap([f"/m/c{k}" for k in range(c)],
                  [f"audible {k}" if k < 4 else f"visible {k}" if k < 8 else f"both {k}"
                   for k in range(c)]).to_csv(os.path.join(out, schema.LABELS_FILE))
  dataset_info.PredictionsInfo.write(
      out, {"num_classes": c, "labels_file": schema.LABELS_FILE, "splits": splits})
  return out
