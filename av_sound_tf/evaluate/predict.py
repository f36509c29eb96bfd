"""Model outputs as the fusion input: run the audio and visual models over prepared shards
and stream per-clip scores to TFRecords (`schema.PREDICTION_SPEC`), one file per split.

Nothing is held in memory beyond a batch, so AudioSet-scale splits stream through. The
fusion models' standardization statistics come from `training_statistics` over the
training split's file only.
"""

import json

import numpy as np
import tensorflow as tf

from av_sound_tf.core import files
from av_sound_tf.core import model_files
from av_sound_tf.train import pipeline
from av_sound_tf.core import schema


def write_predictions(audio_model_path, visual_model_path, data_dir, splits, output_dir,
                      batch_size=64, eval_crop="start", log=print) -> dict:
  """Writes ``<output_dir>/<split>.tfrecord`` for each split and ``predictions_info.json``.

  Clips without audio (or video) get zeros for that model's scores and has_audio = 0 (or
  has_video = 0); the fusion models treat them as missing.
  """
  for path in (audio_model_path, visual_model_path):
    if not tf.io.gfile.exists(path):
      raise FileNotFoundError(f"Model not found: {path}")
  audio = model_files.load_keras_model(audio_model_path)
  visual = model_files.load_keras_model(visual_model_path)
  info = schema.read_dataset_info(data_dir)
  num_classes = info["num_classes"]
  for name, model in (("audio", audio), ("visual", visual)):
    if model.output.shape[-1] != num_classes:
      raise ValueError(f"The {name} model predicts {model.output.shape[-1]} classes; "
                       f"{data_dir} has {num_classes}.")
  config = pipeline.InputConfig(
      kind="audiovisual", num_classes=num_classes, batch_size=batch_size,
      num_frames=getattr(audio, "num_frames", None) or 1024,
      embedding_dim=int(info.get("embedding_dim") or 0), eval_crop=eval_crop)
  audio_fn = tf.function(lambda x: audio(x, training=False))
  visual_fn = tf.function(lambda x: visual(x, training=False))
  tf.io.gfile.makedirs(output_dir)
  written = {}
  for split in splits:
    shards = schema.list_shards(data_dir, split)
    path = tf.io.gfile.join(output_dir, f"{split}.tfrecord")
    n = 0
    with tf.io.TFRecordWriter(path + ".incomplete") as writer:
      for x, labels, ids in pipeline.eval_dataset(shards, config, with_ids=True):
        h_a = audio_fn(x["log_mel"]).numpy()
        h_v = visual_fn(x["embedding_mean"]).numpy()
        has_a, has_v = x["has_audio"].numpy(), x["has_video"].numpy()
        for i in range(h_a.shape[0]):
          writer.write(schema.make_prediction_example(
              ids[i].numpy(), np.flatnonzero(labels[i].numpy() > 0.5),
              h_a[i] * has_a[i], h_v[i] * has_v[i], has_a[i], has_v[i]).SerializeToString())
        n += h_a.shape[0]
    tf.io.gfile.rename(path + ".incomplete", path, overwrite=True)
    written[split] = {"file": f"{split}.tfrecord", "num_examples": n}
    log(f"[predict] {split}: {n} clips -> {path}")
  tf.io.gfile.copy(tf.io.gfile.join(data_dir, info["labels_file"]),
                   tf.io.gfile.join(output_dir, schema.LABELS_FILE), overwrite=True)
  result = {"num_classes": num_classes, "labels_file": schema.LABELS_FILE, "splits": written,
            "audio_model": audio_model_path, "visual_model": visual_model_path,
            "data_dir": data_dir}
  files.write_json(tf.io.gfile.join(output_dir, schema.PREDICTIONS_INFO), result)
  return result


def read_predictions_info(predictions_dir) -> dict:
  path = tf.io.gfile.join(predictions_dir, schema.PREDICTIONS_INFO)
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(f"{path} not found: is {predictions_dir} an output of bin/predict?")
  with tf.io.gfile.GFile(path) as f:
    return json.load(f)


def prediction_file(predictions_dir, split) -> str:
  info = read_predictions_info(predictions_dir)
  if split not in info["splits"]:
    raise ValueError(f"No predictions for split {split!r} in {predictions_dir} "
                     f"(splits: {sorted(info['splits'])})")
  return tf.io.gfile.join(predictions_dir, info["splits"][split]["file"])


def prediction_dataset(path, num_classes, batch_size, shuffle_seed=None, buffer=10000,
                       with_ids=False, num_examples=None) -> tf.data.Dataset:
  """Batches of (inputs dict for `fusion.FusionModel`, labels[, clip_ids]).

  `num_examples` (from predictions_info.json) declares the cardinality so that Keras knows
  the epoch length.
  """
  ds = tf.data.TFRecordDataset(path)
  if num_examples:
    ds = ds.apply(tf.data.experimental.assert_cardinality(num_examples))
  if shuffle_seed is not None:
    ds = ds.shuffle(buffer, seed=shuffle_seed, reshuffle_each_iteration=True)

  def split(ex):
    inputs = {k: ex[k] for k in ("h_audio", "h_visual", "audio_present", "visual_present")}
    return (inputs, ex["labels"], ex["clip_id"]) if with_ids else (inputs, ex["labels"])

  ds = ds.map(lambda s: split(schema.parse_prediction_example(s, num_classes)),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def training_statistics(path, num_classes):
  """Per-class mean and variance of h_audio and h_visual over the clips where the modality is
  present, streamed over one prediction file (the training split's)."""
  sums = {k: np.zeros(num_classes) for k in ("audio", "visual")}
  squares = {k: np.zeros(num_classes) for k in ("audio", "visual")}
  counts = {"audio": 0.0, "visual": 0.0}
  for inputs, _ in prediction_dataset(path, num_classes, 1024):
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
