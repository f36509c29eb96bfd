"""Evaluation metrics: per-class AP and ROC AUC, mAP, mAUC and d' (one module).

Offline evaluation calls scikit-learn's ``average_precision_score`` and ``roc_auc_score``
per class rather than re-implementing them. Classes with no positive (or no negative)
example in the evaluation set have undefined AP/AUC: they are **excluded** from the means
and counted (``excluded_classes``); this is the usual AudioSet convention and keeps a small
evaluation set from reporting 0 AP for classes it cannot measure.

d' (d-prime) = sqrt(2) * Phi^-1(AUC), the AudioSet paper's summary of AUC.

For validation during training, `ValidationMAP` runs the model over a validation dataset at
the end of each epoch and logs the exact scikit-learn mAP as ``val_mAP`` (model selection
monitors it). `streaming_map_metric` is the cheap in-graph alternative
(``keras.metrics.AUC(curve="PR", multi_label=True)``); it interpolates the PR curve over
fixed thresholds, so it differs from scikit-learn's AP: tests/metrics_test.py measures the
difference on synthetic scores.
"""

import dataclasses
import math
from typing import List, Optional, Sequence

import keras
import numpy as np
from sklearn import metrics as skm


@dataclasses.dataclass
class Evaluation:
  """Per-class and summary metrics over an evaluation set."""

  average_precision: np.ndarray  # [C], NaN for excluded classes
  roc_auc: np.ndarray  # [C], NaN for excluded classes
  num_positives: np.ndarray  # [C]
  num_examples: int

  @property
  def valid(self):
    return ~np.isnan(self.average_precision)

  @property
  def excluded_classes(self) -> int:
    return int(np.sum(~self.valid))

  @property
  def mean_average_precision(self) -> float:
    return float(np.mean(self.average_precision[self.valid])) if self.valid.any() else math.nan

  @property
  def mean_auc(self) -> float:
    return float(np.mean(self.roc_auc[self.valid])) if self.valid.any() else math.nan

  @property
  def d_prime(self) -> float:
    return d_prime(self.mean_auc)

  def summary(self) -> dict:
    """Summary numbers; a non-finite value (d' of a perfect AUC) is None (valid JSON)."""
    finite = lambda x: x if np.isfinite(x) else None
    return {
        "mAP": finite(self.mean_average_precision),
        "mAUC": finite(self.mean_auc),
        "d_prime": finite(self.d_prime),
        "num_examples": self.num_examples,
        "num_classes": int(self.average_precision.shape[0]),
        "evaluated_classes": int(self.valid.sum()),
        "excluded_classes": self.excluded_classes,
    }

  def per_class_rows(self, class_names: Optional[Sequence[str]] = None,
                     mids: Optional[Sequence[str]] = None) -> List[dict]:
    rows = []
    for c in range(self.average_precision.shape[0]):
      rows.append({
          "index": c,
          "mid": mids[c] if mids else "",
          "name": class_names[c] if class_names else str(c),
          "num_positives": int(self.num_positives[c]),
          "average_precision": _fmt(self.average_precision[c]),
          "roc_auc": _fmt(self.roc_auc[c]),
          "d_prime": _fmt(d_prime(self.roc_auc[c])),
      })
    return rows


def _fmt(x):
  return "" if np.isnan(x) else f"{x:.6f}"


def d_prime(auc: float) -> float:
  """d' = sqrt(2) * Phi^-1(AUC) (the AudioSet convention)."""
  from scipy import stats  # scikit-learn's own dependency
  if auc is None or np.isnan(auc):
    return math.nan
  return float(math.sqrt(2.0) * stats.norm.ppf(auc))


def evaluate(labels: np.ndarray, scores: np.ndarray) -> Evaluation:
  """Per-class AP and AUC with scikit-learn.

  Args:
    labels: {0, 1} array [examples, classes].
    scores: float array [examples, classes].

  Raises:
    ValueError: on shape mismatch or non-finite scores.
  """
  labels = np.asarray(labels)
  scores = np.asarray(scores, dtype=np.float64)
  if labels.shape != scores.shape or labels.ndim != 2:
    raise ValueError(f"labels and scores must both be [examples, classes]. Received: "
                     f"labels.shape={labels.shape}, scores.shape={scores.shape}")
  if not np.all(np.isfinite(scores)):
    raise ValueError("scores contain NaN or Inf")
  labels = (labels > 0.5).astype(np.int32)
  num_classes = labels.shape[1]
  ap = np.full(num_classes, np.nan)
  auc = np.full(num_classes, np.nan)
  positives = labels.sum(axis=0)
  for c in range(num_classes):
    if 0 < positives[c] < labels.shape[0]:
      ap[c] = skm.average_precision_score(labels[:, c], scores[:, c])
      auc[c] = skm.roc_auc_score(labels[:, c], scores[:, c])
  return Evaluation(ap, auc, positives, labels.shape[0])


def summarize(labels: np.ndarray, scores: np.ndarray):
  """(Evaluation, summary dict); the summary adds top-1 accuracy for single-label data."""
  ev = evaluate(labels, scores)
  summary = ev.summary()
  if np.asarray(labels).sum(axis=1).max() <= 1:
    summary["accuracy"] = accuracy(labels, scores)
  return ev, summary


def accuracy(labels: np.ndarray, scores: np.ndarray) -> float:
  """Top-1 accuracy for single-label data (argmax of scores in the label set)."""
  labels = np.asarray(labels)
  top = np.argmax(scores, axis=1)
  return float(np.mean(labels[np.arange(labels.shape[0]), top] > 0.5))


def streaming_map_metric(num_classes: int, name="streaming_mAP", num_thresholds=200):
  """In-graph PR-AUC averaged over classes: a streaming estimate of mAP."""
  return keras.metrics.AUC(curve="PR", multi_label=True, num_labels=num_classes,
                           num_thresholds=num_thresholds, name=name)


class ValidationMAP(keras.callbacks.Callback):
  """Logs the exact scikit-learn mAP (and mAUC) on a validation set after each epoch.

  Put it before ModelCheckpoint/EarlyStopping in the callback list so that they can
  monitor ``val_mAP``.
  """

  def __init__(self, dataset, every=1, prefix="val_"):
    super().__init__()
    self.dataset = dataset
    self.every = every
    self.prefix = prefix

  def on_epoch_end(self, epoch, logs=None):
    if logs is None or (epoch + 1) % self.every:
      return
    labels, scores = predict_dataset(self.model, self.dataset)
    ev = evaluate(labels, scores)
    logs[self.prefix + "mAP"] = ev.mean_average_precision
    logs[self.prefix + "mAUC"] = ev.mean_auc


def predict_dataset(model, dataset):
  """(labels, scores) as NumPy arrays over a dataset of (features, labels[, weights])."""
  all_labels, all_scores = [], []
  for batch in dataset:
    features, labels = batch[0], batch[1]
    scores = model(features, training=False)
    if isinstance(scores, dict):
      scores = scores["clip_scores"]
    all_labels.append(np.asarray(labels))
    all_scores.append(np.asarray(scores))
  return np.concatenate(all_labels), np.concatenate(all_scores)
