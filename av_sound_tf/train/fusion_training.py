"""Training and evaluating fusion models on model outputs written by bin/predict.

Paper 4.2: Adam, 100 epochs, batch 256, model selection on validation mAP (through
`fit.fit_and_select`, like every other model); inputs standardized with statistics of the
training split only (`training_statistics`, stored in the model). Average fusion has no
parameters: it is built, saved and evaluated without training.
"""

import dataclasses

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from av_sound_tf.core import dataset_info
from av_sound_tf.core import files
from av_sound_tf.core import metrics as metrics_lib
from av_sound_tf.modeling import fusion
from av_sound_tf.train import fit
from av_sound_tf.train import pipeline


@dataclasses.dataclass
class FusionConfig:
  predictions_dir: str
  model_dir: str
  fusion: str = "attention"
  variant: str = "multimodal"
  transform: str = "per_class"
  transform_hidden: int = 512
  attention_hidden: int = 512
  mlp_hidden: int = 512
  dropout: float = 0.5
  l2: float = 1e-5
  train_split: str = "train"
  validation_split: str = "validation"
  epochs: int = 100
  batch_size: int = 256
  learning_rate: float = 1e-3
  seed: int = 0
  verbose: int = 2


def build(config: FusionConfig, num_classes: int, stats=None) -> fusion.FusionModel:
  stats = stats or {}
  return fusion.FusionModel(
      num_classes, config.fusion, stats.get("audio_mean"), stats.get("audio_variance"),
      stats.get("visual_mean"), stats.get("visual_variance"), variant=config.variant,
      attention_hidden=config.attention_hidden, transform=config.transform,
      transform_hidden=config.transform_hidden,
      mlp_hidden=config.mlp_hidden, dropout=config.dropout, l2=config.l2,
      name=f"{config.fusion}_fusion" + ("" if config.fusion != "attention" else
                                        f"_{config.variant}"))


def training_statistics(path, num_classes):
  """Per-class mean and variance of h_audio and h_visual over the clips where the modality is
  present, streamed over one prediction file (the training split's)."""
  sums = {k: np.zeros(num_classes) for k in ("audio", "visual")}
  squares = {k: np.zeros(num_classes) for k in ("audio", "visual")}
  counts = {"audio": 0.0, "visual": 0.0}
  for inputs, _ in pipeline.prediction_dataset(path, num_classes, 1024):
    for k, h, p in (("audio", "h_audio", "audio_present"), ("visual", "h_visual",
                                                            "visual_present")):
      x = inputs[h].numpy().astype(np.float64)
      m = inputs[p].numpy().astype(np.float64)
      sums[k] += (x * m).sum(axis=0)
      squares[k] += (x * x * m).sum(axis=0)
      counts[k] += m.sum()
  stats = {}
  for k in ("audio", "visual"):
    if counts[k] == 0:
      raise ValueError(f"{path}: no clip has the {k} modality; cannot standardize it.")
    mean = sums[k] / counts[k]
    stats[f"{k}_mean"] = mean
    stats[f"{k}_variance"] = np.maximum(squares[k] / counts[k] - mean ** 2, 0.0)
  return stats


def train_fusion(config: FusionConfig, overwrite=False, extra_callbacks=()) -> dict:
  """Trains (or, for average fusion, builds) a fusion model; returns its validation summary.

  Training goes through `fit.fit_and_select`, as every model's: a model_dir holding an
  interrupted run is resumed, keeping the best epoch of the whole run. TensorBoard logs go
  to ``<model_dir>/logs``, as the other trainers'; `extra_callbacks` are added to the fit
  after it (tests' probes).
  """
  fit.start_model_dir(config.model_dir, overwrite)
  keras.utils.set_random_seed(config.seed)
  info = dataset_info.PredictionsInfo.read(config.predictions_dir)
  num_classes = info.num_classes
  train_path = info.file(config.train_split)
  val_path = info.file(config.validation_split)
  tf.io.gfile.makedirs(config.model_dir)
  val_ds = pipeline.prediction_dataset(val_path, num_classes, config.batch_size)
  stats = None if config.fusion == "average" else training_statistics(train_path, num_classes)
  model = build(config, num_classes, stats)
  if config.fusion != "average":
    train_ds = pipeline.prediction_dataset(
        train_path, num_classes, config.batch_size, shuffle_seed=config.seed,
        num_examples=info.num_examples(config.train_split))
    model.compile(keras.optimizers.Adam(config.learning_rate),
                  keras.losses.BinaryCrossentropy())
    fit.fit_and_select(model, train_ds, val_ds, config.model_dir, epochs=config.epochs,
                       extra_callbacks=extra_callbacks,
                       verbose=config.verbose)
  path = tf.io.gfile.join(config.model_dir, "model.keras")
  model.save(path)
  labels, scores = metrics_lib.predict_dataset(model, val_ds)
  summary = dict(metrics_lib.evaluate(labels, scores).summary(), model=path,
                 fusion=config.fusion, variant=config.variant,
                 num_parameters=int(model.count_params()))
  files.write_json(tf.io.gfile.join(config.model_dir, "config.json"),
                   dict(dataclasses.asdict(config), num_classes=num_classes))
  files.write_json(tf.io.gfile.join(config.model_dir, fit.VALIDATION_METRICS), summary)
  logging.info("%s: validation mAP %.4f", model.display_name, summary["mAP"] or float("nan"))
  return summary


def predict_fusion(model, path, num_classes, batch_size=1024):
  """(labels, fused scores, attention weights or None, presence [N, 2]) over a file."""
  attention = model.fusion == "attention"
  view = fusion.with_attention_weights(model) if attention else model
  all_labels, all_scores, all_alpha, presence = [], [], [], []
  for inputs, labels in pipeline.prediction_dataset(path, num_classes, batch_size):
    out = view(inputs, training=False)
    if attention:
      all_scores.append(np.asarray(out["fused_scores"]))
      all_alpha.append(np.asarray(out["attention_weights"]))
    else:
      all_scores.append(np.asarray(out))
    all_labels.append(labels.numpy())
    presence.append(np.concatenate([inputs["audio_present"], inputs["visual_present"]], 1))
  return (np.concatenate(all_labels), np.concatenate(all_scores),
          np.concatenate(all_alpha) if attention else None, np.concatenate(presence))
