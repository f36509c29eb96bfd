"""The models of Table 1 and Sec. 3.2: shapes, parameter counts, serialization, training."""

import keras
import numpy as np
import pytest

from av_sound_tf.core import features
from av_sound_tf.modeling import models
from tests import test_case


def test_full_size_audio_model_matches_table1():
  model = models.MILConvNet(num_classes=527, num_frames=1024)
  # Conv/dense weights of Table 1 plus batch norm: ~14.7 M parameters for C = 527.
  assert 14.6e6 < model.count_params() < 14.8e6
  with_segments = models.with_segment_scores(model)
  out = with_segments(np.zeros([1, 1024, 64], np.float32))
  assert out["segment_scores"].shape == (1, 30, 527)
  assert out["clip_scores"].shape == (1, 527)
  assert model.get_layer("b5_conv").kernel.shape == (3, 2, 512, 2048)
  assert model.get_layer("b4_pool").output.shape[1:] == (32, 2, 512)


@pytest.mark.parametrize("frames,segments", [(1024, 30), (512, 14), (96, 1), (1000, 29)])
def test_segments_for_any_length(frames, segments):
  assert models.num_segments(frames) == segments
  model = models.with_segment_scores(models.MILConvNet(num_classes=3, width=0.0625))
  out = model(np.zeros([2, frames, 64], np.float32))
  assert out["segment_scores"].shape == (2, segments, 3)


def test_audio_model_serialization_saving_training(tmp_path):
  model = models.MILConvNet(num_classes=4, num_frames=256, width=0.0625, name="audio")
  test_case.run_serialization_test(model)
  rng = np.random.default_rng(0)
  x = rng.normal(-8, 1, [4, 256, 64]).astype(np.float32)
  y = np.eye(4, dtype=np.float32)
  test_case.run_model_saving_test(model, x, tmp_path)
  test_case.run_fit_test(model, x, y)


@pytest.mark.parametrize("method", models.AGGREGATIONS)
def test_aggregations(method, tmp_path):
  rng = np.random.default_rng(1)
  scores = rng.uniform(0.05, 0.95, [3, 7, 5]).astype(np.float32)
  feats = rng.normal(size=[3, 7, 6]).astype(np.float32)
  layer = models.MILAggregation(method, num_classes=5)
  out = np.asarray(layer([scores, feats]))
  assert out.shape == (3, 5)
  expected = {
      "average": scores.mean(axis=1),
      "max": scores.max(axis=1),
      "linear_softmax": (scores ** 2).sum(axis=1) / scores.sum(axis=1),
  }
  if method == "attention":  # softmax over segments of the per-class attention logits
    kernel, bias = (np.asarray(w) for w in layer.attention.weights)
    logits = feats @ kernel + bias
    weights = np.exp(logits - logits.max(axis=1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)
    expected["attention"] = (weights * scores).sum(axis=1)
    assert not np.allclose(expected["attention"], expected["average"], atol=1e-3)
  np.testing.assert_allclose(out, expected[method], rtol=1e-5)
  test_case.run_serialization_test(layer)
  model = models.MILConvNet(num_classes=3, num_frames=128, width=0.0625, aggregation=method)
  test_case.run_model_saving_test(model, rng.normal(size=[2, 128, 64]).astype(np.float32),
                                  tmp_path)


def test_visual_model(tmp_path):
  model = models.VisualDNN(num_classes=5, embedding_dim=2048)
  assert [model.get_layer(f"hidden{i}").units for i in range(1, 5)] == [2048, 2048, 1024, 1024]
  assert [model.get_layer(f"dropout{i}").rate for i in (1, 2)] == [0.3, 0.3]
  assert model.get_layer("clip_scores").activation.__name__ == "sigmoid"
  small = models.VisualDNN(num_classes=3, embedding_dim=16, width=0.05, name="visual")
  test_case.run_serialization_test(small)
  rng = np.random.default_rng(2)
  x = rng.normal(size=[6, 16]).astype(np.float32)
  y = np.eye(3, dtype=np.float32)[[0, 1, 2, 0, 1, 2]]
  test_case.run_model_saving_test(small, x, tmp_path)
  test_case.run_fit_test(small, x, y, learning_rate=1e-2)


def test_embedding_mil(tmp_path):
  model = models.EmbeddingMIL(num_classes=5, hidden=32, name="embedding_mil")
  test_case.run_serialization_test(model)
  rng = np.random.default_rng(3)
  x = rng.normal(size=[4, 10, 128]).astype(np.float32)
  y = np.eye(5, dtype=np.float32)[:4]
  test_case.run_model_saving_test(model, x, tmp_path)
  test_case.run_fit_test(model, x, y, learning_rate=1e-2)
  seg = models.with_segment_scores(model)(x)
  assert seg["segment_scores"].shape == (4, 10, 5)


def test_log_mel_layer_serialization():
  test_case.run_serialization_test(features.LogMel(fmax=7000.0))


def test_bad_arguments():
  with pytest.raises(ValueError, match="num_frames must be >= 96"):
    models.MILConvNet(num_frames=64)
  with pytest.raises(ValueError, match="num_mel_bins must be 64"):
    models.MILConvNet(num_mel_bins=40)
  with pytest.raises(ValueError, match="Unknown MIL aggregation"):
    models.MILAggregation("median")


def test_mixed_bfloat16_keeps_float32_scores(tmp_path):
  keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
  try:
    model = models.MILConvNet(num_classes=4, num_frames=128, width=0.0625, name="bf16")
    x = np.random.default_rng(4).normal(-8, 1, [4, 128, 64]).astype(np.float32)
    out = model(x)
    assert out.dtype == "float32"
    assert model.get_layer("b1_1_conv").compute_dtype == "bfloat16"
    assert model.get_layer("b1_1_conv").kernel.dtype == "float32"
    test_case.run_fit_test(model, x, np.eye(4, dtype=np.float32))
  finally:
    keras.mixed_precision.set_dtype_policy("float32")
