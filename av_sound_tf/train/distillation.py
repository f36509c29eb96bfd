"""Knowledge distillation (bin/distill) and SeCoST's teacher term: a student learns from the
labels and a frozen teacher's scores.

* `Distiller`: the student's loss alpha * L(y, p) + (1 - alpha) * T^2 * L(q_T, p_T).
* `distillation_teacher`: an audio teacher, or the audiovisual teacher built from an audio,
  a visual and a fusion model (optionally gated by the fusion's attention on audio).
* `calibrate_teacher` (`PlattScaling`): per-class Platt scaling of the teacher's scores on
  the validation split before it teaches.
"""

from typing import Optional

import keras
from keras import ops
import numpy as np
import tensorflow as tf

from av_sound_tf.core import metrics as metrics_lib
from av_sound_tf.core import model_files
from av_sound_tf.modeling import fusion as fusion_lib
from av_sound_tf.modeling import models


class Distiller(keras.Model):
  """Trains `student` on alpha * L(y, p) + (1 - alpha) * T^2 * L(q_T, p_T).

  L is the compiled loss (binary cross-entropy), p the student's and q the teacher's clip
  scores, and x_T = sigmoid(logit(x) / T) softens both (Hinton et al. 2015, per class for
  sigmoid outputs; T^2 keeps the gradient scale). With T = 1 this is L against
  alpha * y + (1 - alpha) * q, SeCoST's target (the loss is linear in the target).

  The student sees only the log-mel: when the input is a dict (an audiovisual teacher's
  inputs), its "log_mel" entry. Unlabeled clips (targets of -1 from the pipeline) get only
  the teacher term; the label term averages over the whole batch, so it weighs in
  proportion to the labeled share of the batch.
  """

  def __init__(self, student, teacher, alpha, temperature=1.0, **kwargs):
    super().__init__(**kwargs)
    if not 0.0 <= alpha <= 1.0 or temperature <= 0:
      raise ValueError(f"Need 0 <= alpha <= 1 and temperature > 0. Received: alpha={alpha}, "
                       f"temperature={temperature}")
    self.student = student
    self.teacher = teacher
    self.teacher.trainable = False
    self.alpha = alpha
    self.temperature = temperature

  def call(self, x, training=False):
    return self.student(x["log_mel"] if isinstance(x, dict) else x, training=training)

  def _soften(self, p):
    if self.temperature == 1.0:
      return p
    p = ops.clip(p, 1e-7, 1.0 - 1e-7)
    return ops.sigmoid((ops.log(p) - ops.log1p(-p)) / self.temperature)

  def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
    soft = ops.stop_gradient(self.teacher(x, training=False))
    labeled = ops.cast(y[:, 0] >= 0, y_pred.dtype)  # unlabeled clips carry -1
    hard_weight = labeled if sample_weight is None else labeled * sample_weight
    hard = super().compute_loss(x, ops.maximum(y, 0.0), y_pred, hard_weight, training)
    distill = super().compute_loss(x, self._soften(soft), self._soften(y_pred), sample_weight,
                                   training)
    return self.alpha * hard + (1.0 - self.alpha) * self.temperature ** 2 * distill


def distillation_teacher(config, data) -> Optional[keras.Model]:
  """The teacher of bin/distill, or None.

  Audio teacher: its clip scores for the student's log-mel crop. Audiovisual teacher: the
  fusion model over the audio model's scores for that crop and the visual model's scores
  for the clip's mean frame embedding, with the presence flags (a clip without video gets
  the fusion model's audio-only fallback).

  Args:
    config: the run's `training.TrainConfig` (its ``teacher_*`` and ``distill_gate``).
    data: the run's `training.TrainingData` (classes and embedding size of the data).
  """
  if not config.teacher_audio_model:
    if config.teacher_visual_model or config.teacher_fusion_model:
      raise ValueError("A distillation teacher needs --teacher_audio_model.")
    return None
  audio = models.any_length(
      model_files.load_keras_model(config.teacher_audio_model, "Teacher audio model"))
  if not (config.teacher_visual_model or config.teacher_fusion_model):
    return audio
  if not (config.teacher_visual_model and config.teacher_fusion_model):
    raise ValueError("An audiovisual teacher needs --teacher_visual_model and "
                     "--teacher_fusion_model (and --teacher_audio_model).")
  visual = model_files.load_keras_model(config.teacher_visual_model, "Teacher visual model")
  fusion_model = model_files.load_keras_model(config.teacher_fusion_model,
                                              "Teacher fusion model")
  for model, what in ((audio, "audio"), (visual, "visual"), (fusion_model, "fusion")):
    if model.output.shape[-1] != data.num_classes:
      raise ValueError(f"The teacher {what} model predicts {model.output.shape[-1]} classes; "
                       f"the data has {data.num_classes}.")
  inputs = {
      "log_mel": keras.Input((None, audio.input.shape[-1]), name="log_mel"),
      "embedding_mean": keras.Input((data.embedding_dim,), name="embedding_mean"),
      "has_audio": keras.Input((), dtype="int64", name="has_audio"),
      "has_video": keras.Input((), dtype="int64", name="has_video"),
  }
  present = lambda flag: ops.expand_dims(ops.cast(flag, "float32"), -1)  # pylint: disable=unnecessary-lambda-assignment
  h_audio = audio(inputs["log_mel"])
  fusion_inputs = {
      "h_audio": h_audio, "h_visual": visual(inputs["embedding_mean"]),
      "audio_present": present(inputs["has_audio"]),
      "visual_present": present(inputs["has_video"])}
  if not config.distill_gate:
    return keras.Model(inputs, fusion_model(fusion_inputs), name="audiovisual_teacher")
  out = fusion_lib.with_attention_weights(fusion_model)(fusion_inputs)
  alpha = out["attention_weights"]
  gated = alpha * out["fused_scores"] + (1.0 - alpha) * h_audio
  return keras.Model(inputs, gated, name="gated_audiovisual_teacher")


class PlattScaling(keras.layers.Layer):
  """p -> sigmoid(slope * logit(p) + intercept), per class (fixed, not trained)."""

  def __init__(self, slope, intercept, **kwargs):
    super().__init__(trainable=False, **kwargs)
    self.slope = np.asarray(slope, np.float32)
    self.intercept = np.asarray(intercept, np.float32)

  def call(self, p):
    p = ops.clip(p, 1e-7, 1.0 - 1e-7)
    return ops.sigmoid(self.slope * (ops.log(p) - ops.log1p(-p)) + self.intercept)


def calibrate_teacher(teacher: keras.Model, dataset: tf.data.Dataset):
  """Fits per-class Platt scaling of `teacher`'s scores on `dataset` (batches of inputs and
  labels the teacher has not been trained on); returns (calibrated teacher, report).

  Each class gets a one-feature logistic regression on the logit of the teacher's score
  (scikit-learn, default L2); a class without both positives and negatives keeps its
  scores. The report gives per class the slope, intercept and the mean score of positives
  and negatives before and after.
  """
  from sklearn import linear_model  # pylint: disable=g-import-not-at-top
  labels, scores = metrics_lib.predict_dataset(teacher, dataset)
  scores = np.clip(scores, 1e-7, 1 - 1e-7)
  logits = np.log(scores) - np.log1p(-scores)
  num_classes = scores.shape[1]
  slope, intercept = np.ones(num_classes), np.zeros(num_classes)
  for c in range(num_classes):
    y = labels[:, c] > 0
    if 0 < y.sum() < len(y):
      fit = linear_model.LogisticRegression().fit(logits[:, c:c + 1], y)
      slope[c], intercept[c] = fit.coef_[0, 0], fit.intercept_[0]
  platt = PlattScaling(slope, intercept, name="platt_scaling")
  after = np.asarray(platt(scores.astype(np.float32)))
  pos, neg = labels > 0, labels <= 0
  mean = lambda x, m: float(x[m].mean()) if m.any() else float("nan")  # pylint: disable=unnecessary-lambda-assignment
  report = {"num_examples": int(len(labels)), "slope": slope.tolist(),
            "intercept": intercept.tolist(),
            "mean_positive_before": mean(scores, pos), "mean_negative_before": mean(scores, neg),
            "mean_positive_after": mean(after, pos), "mean_negative_after": mean(after, neg)}
  return keras.Model(teacher.inputs, platt(teacher.output),
                     name=f"calibrated_{teacher.name}"), report
