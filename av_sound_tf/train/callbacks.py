"""Keras callbacks of every training run (used by `fit.fit_and_select`).

* `BackupAndRestore`: Keras' backup of weights and optimizer state, plus the random-seed
  generators' states, so that a killed run resumes exactly.
* `StopOnNonFiniteLoss`: a diverged loss stops the run with a one-line error.
"""

import json

import keras
import numpy as np
import tensorflow as tf

from av_sound_tf.core import files


class BackupAndRestore(keras.callbacks.BackupAndRestore):
  """Keras' BackupAndRestore plus the random-seed generator states (dropout masks).

  Keras 3.6 saves weights and optimizer state but not the ``SeedGenerator`` states that
  drive dropout, so a resumed run would draw other masks than the uninterrupted one. They
  are saved next to the backup as ``seed_generators.json`` and restored with it.
  """

  def _seed_variables(self):
    return [v for v in self.model.variables if "seed_generator_state" in v.path]

  def _seed_path(self):
    return tf.io.gfile.join(self.backup_dir, "seed_generators.json")

  def on_train_begin(self, logs=None):
    super().on_train_begin(logs)
    if tf.io.gfile.exists(self._seed_path()) and tf.io.gfile.exists(self._weights_path):
      with tf.io.gfile.GFile(self._seed_path()) as f:
        states = json.load(f)
      variables = self._seed_variables()
      if len(states) == len(variables):  # in model order: names get uniquified per process
        for v, state in zip(variables, states):
          v.assign(np.asarray(state, dtype=v.dtype))

  def _save_model(self):
    super()._save_model()
    states = [np.asarray(v.numpy()).tolist() for v in self._seed_variables()]
    files.write_json(self._seed_path(), states)


def initial_epoch(backup_dir: str) -> int:
  """The epoch a run resumes at: the number of epochs its backup holds (0 without one)."""
  path = tf.io.gfile.join(backup_dir, "training_metadata.json")
  if not tf.io.gfile.exists(path):
    return 0
  with tf.io.gfile.GFile(path) as f:
    return int(json.load(f)["epoch"])


class StopOnNonFiniteLoss(keras.callbacks.Callback):
  """Stops with a clear error when the loss turns NaN/Inf (inputs are checked upstream, so
  this is divergence). The backup still holds the last finished epoch."""

  def on_train_batch_end(self, batch, logs=None):
    loss = (logs or {}).get("loss")
    if loss is not None and not np.isfinite(float(loss)):
      raise FloatingPointError(
          f"The training loss became {float(loss)} at batch {batch}: the model diverged. "
          "Lower --learning_rate (or use --lr_schedule=cosine) and rerun; the run resumes "
          "from its last finished epoch.")
