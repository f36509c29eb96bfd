"""The one fit-and-select loop of every trained model: audio, visual and embedding models,
SeCoST stages, distilled students and fusion models.

`fit_and_select` fits a compiled model in ``run_dir`` with:

* `callbacks.BackupAndRestore` (``<run_dir>/backup``): a killed run restarts at its last
  finished epoch with the same weights, optimizer and seed-generator states.
* `metrics.ValidationMAP`: the exact scikit-learn mAP on the validation set after every
  epoch, logged as ``val_mAP``.
* ModelCheckpoint on ``val_mAP`` (``best.weights.h5``). Its threshold is the best value
  so far, read back from ``history.csv``: a resumed run's checkpoint would otherwise start
  from -inf and overwrite the best epoch's weights with the first epoch after the restart,
  however much worse.
* `callbacks.StopOnNonFiniteLoss`, ``history.csv`` (appended across restarts) and
  TensorBoard logs (``<run_dir>/logs``).

and then keeps the selected weights: the best epoch's (``best``) or the last (``last``).
"""

import contextlib
import csv
from typing import Optional, Sequence

import keras
import tensorflow as tf

from av_sound_tf.core import metrics as metrics_lib
from av_sound_tf.train import callbacks as callbacks_lib
from av_sound_tf.train import distribution

MODEL_SELECTIONS = ("best", "last")
HISTORY = "history.csv"
BEST_WEIGHTS = "best.weights.h5"
BACKUP = "backup"
LOGS = "logs"
VALIDATION_METRICS = "validation_metrics.json"  # written last: the mark of a finished run


def start_model_dir(model_dir: str, overwrite: bool = False):
  """Deletes `model_dir` first with `overwrite`; refuses a finished run (one holding
  ``validation_metrics.json``) otherwise. An interrupted run is left to be resumed."""
  if overwrite and tf.io.gfile.exists(model_dir):
    tf.io.gfile.rmtree(model_dir)
  if tf.io.gfile.exists(tf.io.gfile.join(model_dir, VALIDATION_METRICS)):
    raise ValueError(f"{model_dir} holds a finished run; use another --model_dir or "
                     "--overwrite.")


def best_so_far(history_path: str) -> Optional[float]:
  """The best val_mAP in a run's ``history.csv`` (earlier, interrupted runs included), or None."""
  if not tf.io.gfile.exists(history_path):
    return None
  with tf.io.gfile.GFile(history_path) as f:
    values = [float(r["val_mAP"]) for r in csv.DictReader(f) if r.get("val_mAP")]
  return max(values) if values else None


def fit_and_select(model: keras.Model, train_ds: tf.data.Dataset, val_ds: tf.data.Dataset,
                   run_dir: str, epochs: int, steps_per_epoch: Optional[int] = None,
                   model_selection: str = "best",
                   strategy: Optional[tf.distribute.Strategy] = None,
                   extra_callbacks: Sequence[keras.callbacks.Callback] = (),
                   verbose: int = 1) -> Optional[float]:
  """Fits `model` (compiled, built) with backups and per-epoch validation mAP; selects.

  Args:
    model: a compiled Keras model, built (BackupAndRestore restores into its variables).
    train_ds: batches of (inputs, targets[, weights]).
    val_ds: finite batches of (inputs, labels) for the validation mAP.
    run_dir: where ``backup/``, ``best.weights.h5`` and ``history.csv`` go; a folder
      holding an interrupted run's files resumes it.
    epochs: the total number of epochs (a resumed run trains the rest).
    steps_per_epoch: batches per epoch (None: one pass over a finite `train_ds`).
    model_selection: ``best`` (the highest val_mAP epoch of the whole run) or ``last``.
    strategy: the tf.distribute strategy the model was built in (None: none).
    extra_callbacks: called after the loop's own (tests' probes).
    verbose: Keras' progress output (0, 1 or 2).

  Returns:
    The best validation mAP of the run (None if no epoch produced one).
  """
  if model_selection not in MODEL_SELECTIONS:
    raise ValueError(f"model_selection must be one of {MODEL_SELECTIONS}. "
                     f"Received: {model_selection!r}")
  tf.io.gfile.makedirs(run_dir)
  history_path = tf.io.gfile.join(run_dir, HISTORY)
  best_path = tf.io.gfile.join(run_dir, BEST_WEIGHTS)
  callbacks = [
      callbacks_lib.BackupAndRestore(tf.io.gfile.join(run_dir, BACKUP)),
      metrics_lib.ValidationMAP(val_ds),
      keras.callbacks.ModelCheckpoint(best_path, monitor="val_mAP", mode="max",
                                      save_best_only=True, save_weights_only=True,
                                      initial_value_threshold=best_so_far(history_path)),
      callbacks_lib.StopOnNonFiniteLoss(),
      keras.callbacks.CSVLogger(history_path, append=True),
      keras.callbacks.TensorBoard(tf.io.gfile.join(run_dir, LOGS)),
      *extra_callbacks,
  ]
  # Keras 3.6's fit() under a model-level strategy first takes one batch from the training
  # iterator to build the model symbolically: that batch is never trained on (the stream
  # shifts by one batch), and under MultiWorkerMirroredStrategy its all-reduce fails
  # ("Attempt to convert a value (PerReplica...)"). The models here are built already;
  # without a model-level strategy Keras defers the rest (optimizer, metrics) to the first
  # traced step and takes the strategy from the enclosing scope, as Keras 2 did.
  model._distribute_strategy = None  # pylint: disable=protected-access
  if strategy is not None and distribution.num_workers(strategy) > 1:
    distribution.patch_keras_multi_worker_reduce()  # the per-step logs reduction, see there
  with strategy.scope() if strategy is not None else contextlib.nullcontext():
    model.fit(train_ds, epochs=epochs, steps_per_epoch=steps_per_epoch, callbacks=callbacks,
              verbose=verbose)
  if model_selection == "best" and tf.io.gfile.exists(best_path):
    model.load_weights(best_path)
  return best_so_far(history_path)
