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


def _batch_norm_step(layer, x, upstream):
  """One training-mode call: outputs, gradients (input, gamma, beta), moving statistics."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  with tf.GradientTape() as tape:
    tape.watch(x)
    y = layer(x, training=True)
    loss = tf.reduce_sum(y * upstream)
  grads = tape.gradient(loss, [x, layer.gamma.value, layer.beta.value])
  return [y.numpy()] + [g.numpy() for g in grads] + [layer.moving_mean.numpy(),
                                                     layer.moving_variance.numpy()]


@pytest.mark.parametrize("shape", [[4, 37, 11, 16], [3, 30, 8]])
def test_fused_batch_norm_trains_like_keras(shape):
  """models.BatchNormalization (fused kernel for 4-D float32 training batches) against
  keras.layers.BatchNormalization: outputs, gradients and moving statistics after a step,
  then the inference outputs. Moving statistics use the biased batch variance, as Keras'."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(7)
  x = tf.constant(rng.normal(3.0, 2.0, shape).astype(np.float32))
  upstream = tf.constant(rng.normal(size=shape).astype(np.float32))
  gamma = rng.normal(1.0, 0.3, shape[-1]).astype(np.float32)
  beta = rng.normal(0.0, 0.3, shape[-1]).astype(np.float32)
  ours = models.BatchNormalization(momentum=0.9)
  theirs = keras.layers.BatchNormalization(momentum=0.9)
  for layer in (ours, theirs):
    layer.build(x.shape)
    layer.gamma.assign(gamma)
    layer.beta.assign(beta)
  got, want = _batch_norm_step(ours, x, upstream), _batch_norm_step(theirs, x, upstream)
  for name, g, w in zip(("y", "d/dx", "d/dgamma", "d/dbeta", "moving mean",
                         "moving variance"), got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6 * np.abs(w).max(), err_msg=name)
  np.testing.assert_allclose(ours(x, training=False), theirs(x, training=False), atol=1e-5)
  assert ours.__class__.__name__ == theirs.__class__.__name__  # saved weights keyed by it


def test_table1_training_step_uses_the_fused_batch_norm_kernel():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  model = models.MILConvNet(num_classes=3, num_frames=128, width=0.0625)
  step = tf.function(lambda x: model(x, training=True)).get_concrete_function(
      tf.TensorSpec([2, 128, 64], tf.float32))
  ops = [op.type for op in step.graph.get_operations()]
  assert ops.count("FusedBatchNormV3") == 9  # B1-B4 twice and B5; B6 and B7 are 3-D
  inference = tf.function(lambda x: model(x, training=False)).get_concrete_function(
      tf.TensorSpec([2, 128, 64], tf.float32))
  assert "FusedBatchNormV3" not in [op.type for op in inference.graph.get_operations()]
