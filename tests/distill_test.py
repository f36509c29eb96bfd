"""The on-device student (MobileMIL), FLOP counting, the distillation loss, bin/distill."""

import dataclasses
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from av_sound_tf.modeling import fusion
from av_sound_tf.modeling import models
from av_sound_tf.train import distillation
from av_sound_tf.train import training
from tests import synthetic
from tests.conftest import run_binary, shared_path
from tests.test_case import run_fit_test, run_model_saving_test, run_serialization_test


def _table1_flops(frames=1001, classes=527):
  """Table 1's multiply-adds counted by hand (x 2 for FLOPs): convolutions and dense
  layers only (batch norm, ReLU and pooling are under 1 % of the total)."""
  macs, t, f, c_in = 0, frames, 64, 1
  for _, filters, pool in models.CONV_BLOCKS:
    macs += t * f * 9 * (c_in * filters + filters * filters)
    t, f, c_in = t // pool, f // pool, filters
  segments = t - 2
  macs += segments * 3 * 2 * c_in * models.B5_FILTERS
  macs += segments * (models.B5_FILTERS * models.B6_FILTERS + models.B6_FILTERS *
                      models.B7_FILTERS + models.B7_FILTERS * classes)
  return 2 * macs


def test_flop_counter_agrees_with_a_hand_count():
  counted = models.count_flops(models.MILConvNet(num_classes=527))
  assert counted["parameters"] == 14_683_727
  assert counted["flops"] == pytest.approx(_table1_flops(), rel=0.01)  # 10.7 GFLOP


def test_student_is_under_one_gflop_per_10_s():
  student = models.count_flops(models.MobileMIL(num_classes=527))
  paper = models.count_flops(models.MILConvNet(num_classes=527))
  assert student["flops"] <= 1e9, student
  assert student["flops"] < paper["flops"] / 30 and student["parameters"] < paper[
      "parameters"] / 10
  assert student["parameters"] == 1_352_911
  half = models.count_flops(models.MobileMIL(num_classes=527, width=0.5))
  assert half["flops"] < 0.4 * student["flops"]


def test_student_geometry_serialization_saving_and_fit(tmp_path):
  model = models.MobileMIL(num_classes=5, num_frames=None, width=0.25)
  for frames in (96, 200, 1001):
    seg = models.with_segment_scores(model)(np.zeros([1, frames, 64], "float32"))
    assert seg["segment_scores"].shape == (1, models.num_segments(frames), 5)
  clone = run_serialization_test(model)
  assert isinstance(clone, models.MobileMIL)
  x = np.random.default_rng(0).normal(-8, 2, [8, 128, 64]).astype("float32")
  y = np.eye(5, dtype="float32")[np.arange(8) % 5]
  run_model_saving_test(models.MobileMIL(num_classes=5, num_frames=128, width=0.25), x,
                        tmp_path)
  run_fit_test(models.MobileMIL(num_classes=5, num_frames=128, width=0.25), x, y)
  with pytest.raises(ValueError, match="num_frames must be >= 96"):
    models.MobileMIL(num_frames=50)


class _Fixed(keras.Model):
  """A 'teacher' with fixed scores for a fixed input batch."""

  def __init__(self, scores):
    super().__init__()
    self.scores = tf.constant(scores)

  def call(self, x, training=False):
    return self.scores


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_distillation_loss_is_the_stated_formula(temperature):
  rng = np.random.default_rng(0)
  y = (rng.random([4, 3]) > 0.5).astype("float32")
  q = rng.uniform(0.05, 0.95, [4, 3]).astype("float32")
  p = rng.uniform(0.05, 0.95, [4, 3]).astype("float32")
  student = keras.Sequential([keras.Input([3])])
  distiller = distillation.Distiller(student, _Fixed(q), alpha=0.3, temperature=temperature)
  distiller.compile(loss=keras.losses.BinaryCrossentropy())
  got = float(distiller.compute_loss(tf.zeros([4, 3]), tf.constant(y), tf.constant(p)))

  def bce(t, s):
    s = np.clip(s, 1e-7, 1 - 1e-7)
    return float(np.mean(-(t * np.log(s) + (1 - t) * np.log(1 - s))))

  def soften(s):
    return 1 / (1 + np.exp(-np.log(s / (1 - s)) / temperature))

  expected = 0.3 * bce(y, p) + 0.7 * temperature ** 2 * bce(soften(q), soften(p))
  assert got == pytest.approx(expected, rel=1e-4)
  with pytest.raises(ValueError, match="alpha"):
    distillation.Distiller(student, _Fixed(q), alpha=1.5)


def test_teacher_calibration_is_per_class_platt_scaling():
  """A teacher whose scores squash calibrated probabilities: calibration keeps each class's
  ranking, matches the mean score to the positive rate (the logistic regression's intercept
  condition) and matches an independent Newton fit of the same regularized likelihood."""
  rng = np.random.default_rng(0)
  n = 400
  true_logit = rng.normal(0, 3, [n, 3])
  y = (rng.random([n, 3]) < 1 / (1 + np.exp(-true_logit))).astype("float32")
  y[:, 2] = 0  # a class without positives keeps its scores
  squashed = 1 / (1 + np.exp(-(0.3 * true_logit - 1.0)))
  x = squashed.astype("float32")
  scores = keras.Input([3])
  teacher = keras.Model(scores, keras.layers.Identity()(scores))
  calibrated, report = distillation.calibrate_teacher(
      teacher, tf.data.Dataset.from_tensor_slices((x, y)).batch(64))
  after = np.asarray(calibrated(x))
  from sklearn import metrics  # pylint: disable=g-import-not-at-top
  for c in (0, 1):
    assert metrics.average_precision_score(y[:, c], after[:, c]) == pytest.approx(
        metrics.average_precision_score(y[:, c], x[:, c]))
    assert after[:, c].mean() == pytest.approx(y[:, c].mean(), abs=2e-3)
    # Newton's method on sum(log-loss) + 0.5 * slope^2 (scikit-learn's C = 1 penalty).
    z = np.log(x[:, c]) - np.log1p(-x[:, c])
    w = np.zeros(2)
    for _ in range(50):
      p = 1 / (1 + np.exp(-(w[0] * z + w[1])))
      grad = np.array([np.sum((p - y[:, c]) * z) + w[0], np.sum(p - y[:, c])])
      h = p * (1 - p)
      hess = np.array([[np.sum(h * z * z) + 1, np.sum(h * z)], [np.sum(h * z), np.sum(h)]])
      w -= np.linalg.solve(hess, grad)
    assert report["slope"][c] == pytest.approx(w[0], rel=1e-3)
    assert report["intercept"][c] == pytest.approx(w[1], rel=1e-3, abs=1e-3)
  assert report["slope"][0] == pytest.approx(1 / 0.3, rel=0.15)  # undoes the squashing
  np.testing.assert_allclose(after[:, 2], x[:, 2], rtol=1e-4)
  assert after[:, 0].std() > 1.5 * x[:, 0].std()  # the squashed scores are spread again


@pytest.fixture(scope="module")
def av_system(tmp_path_factory):
  """Synthetic prepared data and a small audiovisual teacher (audio, visual, fusion)."""
  tmp = tmp_path_factory.mktemp("distill")
  data = str(tmp / "data")
  synthetic.write_prepared(data, splits=(("train", 32), ("validation", 16)),
                           num_frames=(120, 160))
  paths = {"data": data}
  keras.utils.set_random_seed(0)
  for name, model in (("audio", models.MILConvNet(4, num_frames=96, width=0.0625)),
                      ("visual", models.VisualDNN(4, embedding_dim=16, width=0.01)),
                      ("fusion", fusion.FusionModel(4, "attention", **{
                          k: np.full(4, v) for k, v in (("audio_mean", 0.5),
                                                        ("audio_variance", 0.01),
                                                        ("visual_mean", 0.5),
                                                        ("visual_variance", 0.01))}))):
    paths[name] = str(tmp / f"{name}.keras")
    model.save(paths[name])
  return paths


def test_audiovisual_teacher_scores_follow_the_fusion_model(av_system):
  config = training.TrainConfig(kind="audio", model_dir="unused", data_dir=av_system["data"],
                                teacher_audio_model=av_system["audio"],
                                teacher_visual_model=av_system["visual"],
                                teacher_fusion_model=av_system["fusion"])
  teacher = distillation.distillation_teacher(config, training.load_data(config))
  audio = keras.models.load_model(av_system["audio"])
  visual = keras.models.load_model(av_system["visual"])
  fused = keras.models.load_model(av_system["fusion"])
  rng = np.random.default_rng(1)
  x = {"log_mel": rng.normal(-8, 2, [3, 96, 64]).astype("float32"),
       "embedding_mean": rng.normal(size=[3, 16]).astype("float32"),
       "has_audio": np.array([1, 1, 1]), "has_video": np.array([1, 0, 1])}
  ones = tf.ones([3, 1])
  expected = fused({"h_audio": audio(x["log_mel"]), "h_visual": visual(x["embedding_mean"]),
                    "audio_present": ones,
                    "visual_present": tf.constant(x["has_video"][:, None], tf.float32)})
  np.testing.assert_allclose(teacher(x), expected, atol=1e-5)
  # Gated: alpha_a * fused + (1 - alpha_a) * audio, alpha_a from the attention fusion.
  gated = distillation.distillation_teacher(dataclasses.replace(config, distill_gate=True),
                                        training.load_data(config))
  inputs = {"h_audio": audio(x["log_mel"]), "h_visual": visual(x["embedding_mean"]),
            "audio_present": ones,
            "visual_present": tf.constant(x["has_video"][:, None], tf.float32)}
  out = fusion.with_attention_weights(fused)(inputs)
  alpha = out["attention_weights"]
  np.testing.assert_allclose(
      gated(x), alpha * out["fused_scores"] + (1 - alpha) * inputs["h_audio"], atol=1e-5)


@pytest.mark.parametrize("teacher", ["audio", "audiovisual"])
def test_binary_trains_a_student(av_system, tmp_path, teacher):
  args = [f"--data_dir={av_system['data']}", f"--model_dir={tmp_path / 'student'}",
          "--width=0.25", "--num_frames=96", "--epochs=2", "--batch_size=8",
          f"--teacher_audio_model={av_system['audio']}", "--temperature=2", "--alpha=0.5"]
  if teacher == "audiovisual":
    args += [f"--teacher_visual_model={av_system['visual']}",
             f"--teacher_fusion_model={av_system['fusion']}"]
  res = run_binary("distill", *args)
  assert res.returncode == 0, res.stderr[-3000:]
  student = keras.models.load_model(str(tmp_path / "student" / "model.keras"))
  assert isinstance(student, models.MobileMIL) and student.width == 0.25
  with open(tmp_path / "student" / "config.json") as f:
    config = json.load(f)
  assert config["architecture"] == "mobile_mil" and config["distill_temperature"] == 2.0
  with open(tmp_path / "student" / "history.csv") as f:
    assert len(f.read().strip().splitlines()) == 3  # header + 2 epochs
  with open(tmp_path / "student" / "teacher_calibration.json") as f:
    calibration = json.load(f)
  assert calibration["num_examples"] == 16 and len(calibration["slope"]) == 4


def test_binary_errors(av_system, tmp_path):
  res = run_binary("distill", f"--data_dir={av_system['data']}", f"--model_dir={tmp_path}",
                   f"--teacher_audio_model={av_system['audio']}",
                   f"--teacher_visual_model={av_system['visual']}")
  assert res.returncode != 0 and "Traceback" not in res.stderr
  assert "both --teacher_visual_model and --teacher_fusion_model" in res.stderr
  res = run_binary("distill", f"--data_dir={av_system['data']}", f"--model_dir={tmp_path}",
                   f"--teacher_audio_model={tmp_path / 'none.keras'}")
  assert res.returncode == 2 and "Teacher audio model not found" in res.stderr
  assert os.path.exists(av_system["audio"])


def test_unlabeled_clips_are_prepared_and_masked(tmp_path):
  from data_prep import featurize, inputs, prepare  # pylint: disable=g-import-not-at-top
  from av_sound_tf.core import dataset_info  # pylint: disable=g-import-not-at-top
  from av_sound_tf.core import schema  # pylint: disable=g-import-not-at-top
  from av_sound_tf.train import pipeline  # pylint: disable=g-import-not-at-top
  clip = shared_path("esc10", "001 - Dog bark", "1-100032-A.ogg")
  rain = shared_path("esc10", "002 - Rain", "1-17367-A.ogg")
  (tmp_path / "list.csv").write_text(f"path,labels\n{clip},Dog\n{rain},\n")
  with pytest.raises(AssertionError):  # without the flag an empty label list fails
    assert not inputs.from_file_list(str(tmp_path / "list.csv")).problems
  found = inputs.from_file_list(str(tmp_path / "list.csv"), allow_unlabeled=True)
  assert [j.labeled for j in found.jobs] == [True, False] and not found.problems
  out = str(tmp_path / "out")
  prepare.prepare(found, featurize.PrepareConfig(output_dir=out), num_workers=0)
  info = dataset_info.DatasetInfo.read(out)
  assert info.splits["data"]["num_unlabeled"] == 1
  files = schema.list_shards(out, "data")
  assert [int(e["labeled"]) for e in schema.read_examples(files, 1)] == [1, 0]
  cfg = pipeline.InputConfig(kind="audio", num_classes=1, batch_size=2, num_frames=128,
                             shuffle_buffer=1)
  _, y = next(iter(pipeline.train_dataset(files, cfg, num_examples=2)))
  assert sorted(y.numpy()[:, 0].tolist()) == [-1.0, 1.0]  # the unlabeled clip's target
  # The label term ignores it: the loss equals one computed without that row's labels.
  q = np.array([[0.9], [0.2]], "float32")
  p = np.array([[0.6], [0.7]], "float32")
  distiller = distillation.Distiller(keras.Sequential([keras.Input([1])]), _Fixed(q), alpha=0.5)
  distiller.compile(loss=keras.losses.BinaryCrossentropy())
  got = float(distiller.compute_loss(tf.zeros([2, 1]), tf.constant([[1.0], [-1.0]]),
                                     tf.constant(p)))
  hard = -np.log(0.6) / 2  # the labeled row only, averaged over the batch of 2
  soft = np.mean(-(q * np.log(p) + (1 - q) * np.log(1 - p)))
  assert got == pytest.approx(0.5 * hard + 0.5 * soft, rel=1e-4)


def test_unlabeled_splits_need_a_teacher(tmp_path):
  data = str(tmp_path / "data")
  synthetic.write_prepared(data, splits=(("train", 8), ("pool", 8), ("validation", 8)),
                           num_frames=(100, 120), unlabeled_splits=("pool",))
  base = dict(kind="audio", model_dir=str(tmp_path / "m"), data_dir=data, width=0.0625,
              num_frames=96, epochs=1, batch_size=4)
  with pytest.raises(ValueError, match="needs a distillation teacher"):
    training.load_data(training.TrainConfig(unlabeled_splits=("pool",), **base))
  with pytest.raises(ValueError, match="holds 8 unlabeled clips"):
    training.load_data(training.TrainConfig(train_splits=("train", "pool"), **base))
  keras.utils.set_random_seed(0)
  teacher = str(tmp_path / "teacher.keras")
  models.MILConvNet(4, num_frames=96, width=0.0625).save(teacher)
  summary = training.train(training.TrainConfig(
      unlabeled_splits=("pool",), teacher_audio_model=teacher, architecture="mobile_mil",
      **base))
  assert summary["evaluated_classes"] == 4
