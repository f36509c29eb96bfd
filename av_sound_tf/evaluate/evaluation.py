"""Offline evaluation of a saved model on prepared shards: per-class CSV + summary JSON."""

import tensorflow as tf

from av_sound_tf.core import dataset_info
from av_sound_tf.core import files
from av_sound_tf.core import metrics as metrics_lib
from av_sound_tf.core import model_files
from av_sound_tf.core import progress as progress_lib
from av_sound_tf.core import schema
from av_sound_tf.train import pipeline


def model_kind(model) -> str:
  """'audio', 'visual' or 'embedding' from the model's input name."""
  name = model.input.name if hasattr(model.input, "name") else ""
  for kind, key in (("audio", "log_mel"), ("visual", "embedding_mean"),
                    ("embedding", "audio_embedding")):
    if key in name:
      return kind
  raise ValueError(f"Cannot tell the model's input kind from its input {name!r}")


def counted(dataset, progress):
  """Yields `dataset`'s batches, counting each (its labels' rows) once it is processed."""
  for batch in dataset:
    yield batch
    progress.update(int(batch[1].shape[0]))
  progress.finish()


def evaluate_model(model_path, data_dir, splits, output_dir, batch_size=32,
                   eval_crop="start", progress_every=5.0) -> dict:
  """Evaluates a `.keras` model on `splits` of a prepared data set.

  Writes ``per_class.csv`` (index, mid, name, num_positives, average_precision, roc_auc,
  d_prime) and ``summary.json`` (mAP, mAUC, d', counts, excluded classes, accuracy for
  single-label data) to `output_dir`; returns the summary. Logs "[evaluate] i of N clips"
  lines (`core.progress`) at most every `progress_every` seconds, and the last one.
  """
  model = model_files.load_keras_model(model_path)
  info = dataset_info.DatasetInfo.read(data_dir)
  label_map = info.label_map()
  if getattr(model, "num_classes", info.num_classes) != info.num_classes:
    raise ValueError(f"The model predicts {model.num_classes} classes but {data_dir} has "
                     f"{info.num_classes}.")
  kind = model_kind(model)
  shards = []
  for split in splits:
    shards.extend(info.shards(split))
  # An evaluation on part of a split would be a silently different number: damaged or
  # truncated shards stop it, naming the file.
  schema.check_shards(shards, expected_records=info.num_examples(splits))
  config = pipeline.input_config(info, kind, batch_size,
                                 num_frames=getattr(model, "num_frames", None) or 1024,
                                 eval_crop=eval_crop)
  progress = progress_lib.Progress(info.num_examples(splits), "evaluate", every=progress_every)
  labels, scores = metrics_lib.predict_dataset(
      model, counted(pipeline.eval_dataset(shards, config), progress))
  ev, summary = metrics_lib.summarize(labels, scores)
  summary.update(model=model_path, data_dir=data_dir, splits=list(splits))
  tf.io.gfile.makedirs(output_dir)
  files.write_csv(tf.io.gfile.join(output_dir, "per_class.csv"),
                  ev.per_class_rows(label_map.names, label_map.mids))
  files.write_json(tf.io.gfile.join(output_dir, "summary.json"), summary)
  return summary
