"""Shared checks for layers and models (keras-hub's TestCase pattern, as functions)."""

import keras
import numpy as np
import tensorflow as tf


def run_serialization_test(obj):
  """get_config -> from_config -> get_config is a fixed point, and the clone has the same
  public attributes."""
  config = obj.get_config()
  clone = obj.__class__.from_config(config)
  assert clone.get_config() == config
  assert set(a for a in dir(clone) if not a.startswith("_")) == set(
      a for a in dir(obj) if not a.startswith("_"))
  return clone


def run_model_saving_test(model, inputs, tmp_path, atol=1e-6):
  """`.keras` save and load; outputs equal to `atol`."""
  expected = model(inputs, training=False)
  path = str(tmp_path / f"{model.name}.keras")
  model.save(path)
  restored = keras.models.load_model(path, safe_mode=True)
  assert type(restored) is type(model)
  got = restored(inputs, training=False)
  np.testing.assert_allclose(keras.ops.convert_to_numpy(got),
                             keras.ops.convert_to_numpy(expected), atol=atol)
  return restored


def run_fit_test(model, inputs, labels, steps=5, learning_rate=1e-3):
  """A few training steps on one batch lower the loss; predict works on a tf.data.Dataset.

  The loss is the one each step computes (training mode: batch statistics, as the update
  sees them); an inference-mode loss right after a few steps would mostly measure batch
  norm's barely moved moving averages.
  """
  model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                loss=keras.losses.BinaryCrossentropy())
  losses = [float(model.train_on_batch(inputs, labels)) for _ in range(steps + 1)]
  assert losses[-1] < losses[0], losses
  ds = tf.data.Dataset.from_tensor_slices(inputs).batch(2)
  predictions = model.predict(ds, verbose=0)
  assert predictions.shape == (len(inputs), labels.shape[-1])
  # The batched predictions are the model's inference-mode scores, row for row (a range
  # check would hold for any sigmoid output).
  np.testing.assert_allclose(predictions, keras.ops.convert_to_numpy(
      model(inputs, training=False)), atol=1e-5)
