"""Fusion models, the attention layer, training statistics, missing modalities, the
synthetic truth test and the report."""

import csv
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from av_sound_tf.core import dataset_info
from av_sound_tf.core import schema
from av_sound_tf.evaluate import report
from av_sound_tf.modeling import fusion
from av_sound_tf.train import fusion_training
from data_prep import synthetic_predictions
from tests import test_case
from tests.conftest import run_binary

C = synthetic_predictions.NUM_CLASSES
AUDIO_ONLY, VISUAL_ONLY, BOTH = (synthetic_predictions.AUDIO_ONLY,
                                 synthetic_predictions.VISUAL_ONLY, synthetic_predictions.BOTH)
write_synthetic_predictions = synthetic_predictions.write_synthetic_predictions


@pytest.fixture(scope="module")
def predictions(tmp_path_factory):
  return write_synthetic_predictions(str(tmp_path_factory.mktemp("predictions")), missing=0.05)


def _inputs(n=6, seed=0, present_a=None, present_v=None):
  rng = np.random.default_rng(seed)
  return {
      "h_audio": rng.random([n, C]).astype(np.float32),
      "h_visual": rng.random([n, C]).astype(np.float32),
      "audio_present": np.ones([n, 1], np.float32) if present_a is None else present_a,
      "visual_present": np.ones([n, 1], np.float32) if present_v is None else present_v,
  }


STATS = dict(audio_mean=np.full(C, 0.3), audio_variance=np.full(C, 0.04),
             visual_mean=np.full(C, 0.4), visual_variance=np.full(C, 0.05))
ALL = [("average", "multimodal")] + [(f, "multimodal") for f in ("regression", "mlp")] + [
    ("attention", v) for v in fusion.VARIANTS]


@pytest.mark.parametrize("kind,variant", ALL)
def test_config_round_trip_and_saving(kind, variant, tmp_path):
  model = fusion.FusionModel(C, kind, **STATS, variant=variant, name=f"f_{kind}_{variant}")
  test_case.run_serialization_test(model)
  x = _inputs()
  restored = test_case.run_model_saving_test(model, x, tmp_path)
  if kind == "average":  # nothing learned: the mean of the two modalities' scores
    np.testing.assert_allclose(restored(x), (x["h_audio"] + x["h_visual"]) / 2, rtol=1e-6)
  else:  # the training statistics travel inside the saved model
    for modality, mean, variance in (("audio", 0.3, 0.04), ("visual", 0.4, 0.05)):
      layer = restored.get_layer(f"standardize_{modality}")
      np.testing.assert_allclose(layer.mean, np.full((1, C), mean), rtol=1e-6)
      np.testing.assert_allclose(layer.variance, np.full((1, C), variance), rtol=1e-6)


def test_attention_layer_serialization():
  for transform in fusion.TRANSFORMS:
    test_case.run_serialization_test(
        fusion.AttentionFusion(C, "cross_unimodal", 64, 0.5, transform, 32))
  with pytest.raises(ValueError, match="Unknown transform"):
    fusion.AttentionFusion(C, transform="conv")
  with pytest.raises(ValueError, match="Unknown attention variant"):
    fusion.AttentionFusion(C, "bimodal")
  with pytest.raises(ValueError, match="training statistics"):
    fusion.FusionModel(C, "mlp")
  with pytest.raises(ValueError, match="Unknown fusion"):
    fusion.FusionModel(C, "concat", **STATS)


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


def _numpy_attention_fusion(w, x, variant, transform):
  """Eqs. 3-6 in NumPy from the layer's weights `w` (by path): standardize and mask the
  scores, alpha_a = n_attn(...), h_av = alpha_a n_a(z_a) + (1 - alpha_a) n_v(z_v),
  o_av = n_av(h_av); a missing modality gets alpha 0 (audio) or 1 (video)."""
  p_a, p_v = x["audio_present"], x["visual_present"]
  z_a = np.where(p_a > 0, (x["h_audio"] - STATS["audio_mean"]) / np.sqrt(
      STATS["audio_variance"]), 0.0)
  z_v = np.where(p_v > 0, (x["h_visual"] - STATS["visual_mean"]) / np.sqrt(
      STATS["visual_variance"]), 0.0)

  def n_attn(name, inp):  # dense (no bias), batch norm (inference), ReLU, dense, sigmoid
    h = inp @ w[f"{name}/{name}_hidden/kernel"]
    bn = f"{name}/{name}_bn/"
    h = (h - w[bn + "moving_mean"]) / np.sqrt(w[bn + "moving_variance"] + 1e-3) * w[
        bn + "gamma"] + w[bn + "beta"]
    h = np.maximum(h, 0.0)
    return _sigmoid(h @ w[f"{name}/{name}_out/kernel"] + w[f"{name}/{name}_out/bias"])

  def n(name, inp):  # n_a, n_v, n_av
    if transform == "per_class":
      return _sigmoid(inp * w[f"{name}/{name}_per_class/w"] + w[f"{name}/{name}_per_class/b"])
    if transform == "hidden":
      inp = _sigmoid(inp @ w[f"{name}/{name}_hidden/kernel"] + w[f"{name}/{name}_hidden/bias"])
    return _sigmoid(inp @ w[f"{name}/{name}_out/kernel"] + w[f"{name}/{name}_out/bias"])

  if variant in ("self_unimodal", "cross_unimodal"):
    src_a, src_v = (z_a, z_v) if variant == "self_unimodal" else (z_v, z_a)
    a_a, a_v = n_attn("n_attn_audio", src_a), n_attn("n_attn_visual", src_v)
    alpha = a_a / (a_a + a_v + 1e-7)
  else:
    alpha = n_attn("n_attn", np.concatenate([z_a, z_v], axis=-1))
  both = p_a * p_v
  alpha = both * alpha + (1 - both) * p_a
  t_a, t_v = (z_a, z_v) if variant == "no_transform" else (n("n_audio", z_a),
                                                          n("n_visual", z_v))
  h_av = alpha * t_a + (1 - alpha) * t_v
  return alpha, (h_av if variant == "no_output_net" else n("n_av", h_av))


@pytest.mark.parametrize("variant,transform", [(v, "per_class") for v in fusion.VARIANTS] +
                         [("multimodal", "dense"), ("multimodal", "hidden")])
def test_attention_fusion_equals_the_paper_formula(variant, transform):
  """Random weights everywhere (batch-norm statistics included), then the layer's alpha_a and
  fused scores against an independent NumPy computation of Eqs. 3-6."""
  model = fusion.FusionModel(C, "attention", **STATS, variant=variant, transform=transform,
                             attention_hidden=16, transform_hidden=8)
  layer = model.get_layer("attention_fusion")
  rng = np.random.default_rng(5)
  weights = {}
  for v in layer.weights:
    value = (rng.uniform(0.5, 2.0, v.shape) if "moving_variance" in v.path else
             rng.normal(0, 0.7, v.shape)).astype(np.float32)
    v.assign(value)
    weights[v.path.split("attention_fusion/", 1)[1]] = value.astype(np.float64)
  present_a = np.array([[1], [1], [1], [1], [0], [1]], np.float32)
  present_v = np.array([[1], [1], [1], [1], [1], [0]], np.float32)
  x = _inputs(seed=1, present_a=present_a, present_v=present_v)
  out = fusion.with_attention_weights(model)(x)
  alpha, fused = _numpy_attention_fusion(weights, x, variant, transform)
  assert 0.05 < alpha[:4].std()  # sample- and class-specific, not a constant
  np.testing.assert_allclose(out["attention_weights"], alpha, atol=1e-5)
  np.testing.assert_allclose(out["fused_scores"], fused, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(out["attention_weights"])[4:], [[0] * C, [1] * C])


@pytest.mark.parametrize("kind,variant", ALL)
def test_missing_modality_gives_finite_defined_outputs(kind, variant):
  present_a = np.array([[1], [0], [1], [0]], np.float32)
  present_v = np.array([[1], [1], [0], [0]], np.float32)
  x = _inputs(n=4, seed=2, present_a=present_a, present_v=present_v)
  x["h_audio"][1] = np.inf  # garbage where the audio is missing is never read
  x["h_audio"][3] = np.nan
  x["h_visual"][2:] = 0.0
  model = fusion.FusionModel(C, kind, **STATS, variant=variant)
  out = np.asarray(model(x))
  assert np.all(np.isfinite(out)) and np.all((out >= 0) & (out <= 1))
  if kind in ("average", "regression", "mlp"):  # fall back to the present modality
    np.testing.assert_allclose(out[1], x["h_visual"][1], rtol=1e-6)
    np.testing.assert_allclose(out[2], x["h_audio"][2], rtol=1e-6)
    np.testing.assert_allclose(out[3], 0.5)
  else:
    alpha = np.asarray(fusion.with_attention_weights(model)(x)["attention_weights"])
    assert np.all(alpha[1] == 0) and np.all(alpha[2] == 1)


def test_statistics_come_from_the_training_split_only(predictions):
  info = dataset_info.PredictionsInfo.read(predictions)
  train = info.file("train")
  stats = fusion_training.training_statistics(train, C)
  h_a, present = [], []
  for record in tf.data.TFRecordDataset(train):
    ex = schema.parse_prediction_example(record, C)
    h_a.append(ex["h_audio"].numpy())
    present.append(ex["audio_present"].numpy()[0])
  h_a, present = np.array(h_a), np.array(present) > 0
  np.testing.assert_allclose(stats["audio_mean"], h_a[present].mean(axis=0), atol=1e-6)
  np.testing.assert_allclose(stats["audio_variance"], h_a[present].var(axis=0), atol=1e-6)
  evaluation = fusion_training.training_statistics(info.file("eval"), C)
  assert not np.allclose(evaluation["audio_mean"], stats["audio_mean"])


def test_attention_beats_average_and_alpha_follows_the_truth(predictions, tmp_path):
  """The synthetic truth test: attention fusion beats average fusion, and per-class mean
  alpha_a is high for audible-only classes and low for visible-only ones."""
  results = {}
  for kind in ("average", "attention"):
    config = fusion_training.FusionConfig(predictions, str(tmp_path / kind), fusion=kind,
                                          epochs=12, batch_size=32, learning_rate=3e-3,
                                          verbose=0)
    results[kind] = fusion_training.train_fusion(config)
  eval_path = dataset_info.PredictionsInfo.read(predictions).file("eval")
  from av_sound_tf.core import metrics
  maps = {}
  for kind in results:
    model = keras.models.load_model(results[kind]["model"])
    y, scores, alpha, present = fusion_training.predict_fusion(model, eval_path, C)
    maps[kind] = metrics.evaluate(y, scores).mean_average_precision
    if kind == "attention":
      both = present.min(axis=1) > 0
      mean_alpha = np.array([alpha[(y[:, c] > 0) & both, c].mean() for c in range(C)])
  assert maps["attention"] > maps["average"] + 0.02, maps
  assert mean_alpha[list(AUDIO_ONLY)].min() > mean_alpha[list(VISUAL_ONLY)].max(), mean_alpha
  assert mean_alpha[list(AUDIO_ONLY)].mean() > 0.6 > 0.4 > mean_alpha[list(VISUAL_ONLY)].mean()

  out = str(tmp_path / "report")
  result = report.write_report(predictions, [results["average"]["model"],
                                             results["attention"]["model"]], out)
  text = open(result["report"]).read()
  for needle in ("Table 2", "| Audio |", "| Visual |", "Average fusion",
                 "Attention fusion (multimodal)", "Largest gains", "more than 10 points",
                 "fig2_ap_bubbles.png", "fig4_attention_histogram.png"):
    assert needle in text, needle
  for png in ("fig2_ap_bubbles.png", "fig3_ap_change_histogram.png",
              "fig4_attention_histogram.png"):
    data = open(os.path.join(out, png), "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10000
  with open(os.path.join(out, "per_class.csv")) as f:
    header = f.readline()
  assert "AP Audio" in header and "mean alpha_audio" in header


class _Killed(Exception):
  pass


class _KillAfterAWorseEpoch(keras.callbacks.Callback):
  """Stops training like a kill at the end of the first epoch whose val_mAP is below the best
  so far (after the checkpoint, the history and the backup have seen that epoch)."""

  def __init__(self):
    super().__init__()
    self.val_maps = []

  def on_epoch_end(self, epoch, logs=None):
    self.val_maps.append(logs["val_mAP"])
    if logs["val_mAP"] < max(self.val_maps):
      raise _Killed(f"killed after epoch {epoch}")


def _write_misleading_predictions(out):
  """Synthetic predictions whose validation labels are the complement of the truth: the
  better a fusion model fits the training split, the lower its validation mAP, so the
  validation mAP keeps falling after the first epoch."""
  write_synthetic_predictions(out, sizes=(("train", 600), ("validation", 200)))
  path = os.path.join(out, "validation.tfrecord")
  clips = [schema.parse_prediction_example(r, C) for r in tf.data.TFRecordDataset(path)]
  with tf.io.TFRecordWriter(path) as w:
    for ex in clips:
      w.write(schema.make_prediction_example(
          ex["clip_id"].numpy(), np.flatnonzero(ex["labels"].numpy() < 0.5),
          ex["h_audio"].numpy(), ex["h_visual"].numpy(), int(ex["audio_present"][0]),
          int(ex["visual_present"][0])).SerializeToString())
  return out


def test_resumed_fusion_run_keeps_the_best_epoch(tmp_path):
  """A fusion run killed after an epoch worse than its best, then resumed: best.weights.h5
  (and so model.keras) must still hold the best epoch of the whole run, not the best epoch
  since the restart (the checkpoint's threshold comes back from history.csv)."""
  from av_sound_tf.core import metrics  # pylint: disable=g-import-not-at-top
  predictions = _write_misleading_predictions(str(tmp_path / "predictions"))
  config = fusion_training.FusionConfig(predictions, str(tmp_path / "mlp"), fusion="mlp",
                                        epochs=6, batch_size=32, learning_rate=1e-4,
                                        verbose=0)
  kill = _KillAfterAWorseEpoch()
  with pytest.raises(_Killed):
    fusion_training.train_fusion(config, extra_callbacks=[kill])
  summary = fusion_training.train_fusion(config)  # resumes from the backup
  with open(tmp_path / "mlp" / "history.csv") as f:
    history = [float(row["val_mAP"]) for row in csv.DictReader(f)]
  before, after = history[:len(kill.val_maps)], history[len(kill.val_maps):]
  assert len(history) == 6 and before == pytest.approx(kill.val_maps)
  # Every epoch after the restart is worse than the best before it (what the test needs).
  assert 2 <= len(before) and max(after) < max(before), history
  model = keras.models.load_model(summary["model"])
  model.load_weights(str(tmp_path / "mlp" / "best.weights.h5"))
  y, scores, _, _ = fusion_training.predict_fusion(
      model, os.path.join(predictions, "validation.tfrecord"), C)
  assert metrics.evaluate(y, scores).mean_average_precision == pytest.approx(
      max(history), abs=1e-6)
  assert summary["mAP"] == pytest.approx(max(history), abs=1e-6)


def test_binaries(tmp_path):
  """bin/predict -> bin/train_fusion -> bin/report on tiny trained models."""
  from av_sound_tf.train import training
  from tests import synthetic
  data = str(tmp_path / "data")
  synthetic.write_prepared(data, splits=(("train", 24), ("validation", 12), ("eval", 12)),
                           num_frames=(120, 140))
  common = dict(data_dir=data, train_splits=("train",), validation_splits=("validation",),
                batch_size=8, epochs=1, strategy="default", verbose=0, width=0.0625,
                num_frames=128)
  audio = training.train(training.TrainConfig(kind="audio", model_dir=str(tmp_path / "a"),
                                              **common))
  visual = training.train(training.TrainConfig(kind="visual", model_dir=str(tmp_path / "v"),
                                               **common))
  run = lambda name, *args: run_binary(name, *args, timeout=600)  # pylint: disable=unnecessary-lambda-assignment
  preds = str(tmp_path / "preds")
  res = run("predict", f"--audio_model={audio['model']}", f"--visual_model={visual['model']}",
            f"--data_dir={data}", f"--output_dir={preds}")
  assert res.returncode == 0, res.stderr[-3000:]
  info = dataset_info.PredictionsInfo.read(preds)
  assert {s: info.num_examples(s) for s in info.splits} == {
      "train": 24, "validation": 12, "eval": 12}
  models = []
  for kind in ("average", "mlp"):
    res = run("train_fusion", f"--predictions_dir={preds}", f"--fusion={kind}",
              f"--model_dir={tmp_path / kind}", "--epochs=2", "--batch_size=8")
    assert res.returncode == 0, res.stderr[-3000:]
    models.append(str(tmp_path / kind / "model.keras"))
  res = run("report", f"--predictions_dir={preds}", f"--models={','.join(models)}",
            f"--output_dir={tmp_path / 'report'}")
  assert res.returncode == 0, res.stderr[-3000:]
  assert os.path.exists(tmp_path / "report" / "report.md")
  res = run("report", f"--predictions_dir={tmp_path}", f"--models={models[0]}",
            f"--output_dir={tmp_path / 'r2'}")
  assert res.returncode == 2 and "bin/predict" in res.stderr and "Traceback" not in res.stderr


def test_fusion_training_writes_tensorboard_logs(tmp_path):
  """Like the other trainers, fusion training writes TensorBoard event files under
  <model_dir>/logs (train and validation)."""
  predictions = write_synthetic_predictions(str(tmp_path / "predictions"),
                                            sizes=(("train", 64), ("validation", 32)))
  config = fusion_training.FusionConfig(predictions, str(tmp_path / "mlp"), fusion="mlp",
                                        epochs=1, batch_size=32, verbose=0)
  fusion_training.train_fusion(config)
  events = {os.path.relpath(root, tmp_path / "mlp" / "logs")
            for root, _, names in os.walk(tmp_path / "mlp" / "logs")
            for n in names if n.startswith("events.out.tfevents.")}
  assert events == {"train", "validation"}, events
