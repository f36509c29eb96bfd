"""Metrics equal scikit-learn's; excluded classes; d'; the streaming metric's difference."""

import math

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from av_sound_tf.core import metrics


def _data(n=300, c=6, seed=0):
  rng = np.random.default_rng(seed)
  labels = (rng.random([n, c]) < 0.2).astype(np.float32)
  scores = np.clip(labels * 0.35 + rng.random([n, c]) * 0.7, 0, 1)
  return labels, scores


def test_equals_sklearn_per_class():
  labels, scores = _data()
  ev = metrics.evaluate(labels, scores)
  for c in range(labels.shape[1]):
    assert ev.average_precision[c] == pytest.approx(
        skm.average_precision_score(labels[:, c], scores[:, c]), abs=1e-12)
    assert ev.roc_auc[c] == pytest.approx(skm.roc_auc_score(labels[:, c], scores[:, c]),
                                          abs=1e-12)
  assert ev.mean_average_precision == pytest.approx(
      skm.average_precision_score(labels, scores, average="macro"), abs=1e-12)
  assert ev.mean_auc == pytest.approx(skm.roc_auc_score(labels, scores, average="macro"),
                                      abs=1e-12)


def test_excluded_classes_are_counted_not_averaged():
  labels, scores = _data(c=4)
  labels[:, 1] = 0  # no positives
  labels[:, 3] = 1  # no negatives
  ev = metrics.evaluate(labels, scores)
  assert ev.excluded_classes == 2
  assert np.isnan(ev.average_precision[[1, 3]]).all()
  assert ev.mean_average_precision == pytest.approx(np.mean(ev.average_precision[[0, 2]]))
  s = ev.summary()
  assert s["evaluated_classes"] == 2 and s["excluded_classes"] == 2
  rows = ev.per_class_rows(["a", "b", "c", "d"])
  assert rows[1]["average_precision"] == "" and rows[0]["name"] == "a"


def test_d_prime():
  assert metrics.d_prime(0.5) == pytest.approx(0.0)
  assert metrics.d_prime(0.9) == pytest.approx(math.sqrt(2) * stats.norm.ppf(0.9))
  # The paper's audio model: mAUC 97.12 -> d' 2.685.
  assert metrics.d_prime(0.9712) == pytest.approx(2.685, abs=1e-3)


def test_bad_input():
  with pytest.raises(ValueError, match="examples, classes"):
    metrics.evaluate(np.zeros([3, 2]), np.zeros([3, 3]))
  with pytest.raises(ValueError, match="NaN"):
    metrics.evaluate(np.ones([2, 1]), np.array([[np.nan], [0.1]]))


def test_accuracy():
  labels = np.eye(3)[[0, 1, 2, 1]]
  scores = np.array([[.9, .1, 0], [.2, .7, .1], [.5, .4, .1], [0, 1, 0]])
  assert metrics.accuracy(labels, scores) == 0.75


def test_streaming_metric_close_to_sklearn():
  """Measured difference between Keras' PR-AUC (200 thresholds, interpolated) and
  scikit-learn's AP on this synthetic set: stated bound 0.02 absolute mAP."""
  labels, scores = _data(n=2000, c=8, seed=3)
  m = metrics.streaming_map_metric(8)
  m.update_state(labels, scores)
  exact = metrics.evaluate(labels, scores).mean_average_precision
  assert abs(float(m.result()) - exact) < 0.02


def test_perfect_scores_give_valid_json():
  import json
  labels = np.eye(3)[[0, 1, 2, 0]]
  ev = metrics.evaluate(labels, labels * 0.9 + 0.05)
  assert ev.mean_auc == 1.0 and math.isinf(ev.d_prime)
  text = json.dumps(ev.summary(), allow_nan=False)
  assert json.loads(text)["d_prime"] is None
