"""Model outputs as the fusion input: run the audio and visual models over prepared shards
and stream per-clip scores to TFRecords (`schema.PREDICTION_SPEC`), one file per split,
described by a `dataset_info.PredictionsInfo`.

Nothing is held in memory beyond a batch, so AudioSet-scale splits stream through. Fusion
training reads the files back with `pipeline.prediction_dataset`; its standardization
statistics come from `fusion_training.training_statistics` over the training split's file
only.
"""

import numpy as np
import tensorflow as tf

from av_sound_tf.core import dataset_info
from av_sound_tf.core import model_files
from av_sound_tf.core import progress as progress_lib
from av_sound_tf.core import schema
from av_sound_tf.train import pipeline


def write_predictions(audio_model_path, visual_model_path, data_dir, splits, output_dir,
                      batch_size=64, eval_crop="start", log=print,
                      progress_every=5.0) -> dict:
  """Writes ``<output_dir>/<split>.tfrecord`` for each split and the predictions' info
  (`dataset_info.PredictionsInfo`); returns the info's dict.

  Clips without audio (or video) get zeros for that model's scores and has_audio = 0 (or
  has_video = 0); the fusion models treat them as missing. Logs "[predict <split>] i of N
  clips" lines (`core.progress`) at most every `progress_every` seconds, and the last one.
  """
  audio = model_files.load_keras_model(audio_model_path)
  visual = model_files.load_keras_model(visual_model_path)
  info = dataset_info.DatasetInfo.read(data_dir)
  num_classes = info.num_classes
  for name, model in (("audio", audio), ("visual", visual)):
    if model.output.shape[-1] != num_classes:
      raise ValueError(f"The {name} model predicts {model.output.shape[-1]} classes; "
                       f"{data_dir} has {num_classes}.")
  config = pipeline.input_config(info, "audiovisual", batch_size,
                                 num_frames=getattr(audio, "num_frames", None) or 1024,
                                 eval_crop=eval_crop)
  audio_fn = tf.function(lambda x: audio(x, training=False))
  visual_fn = tf.function(lambda x: visual(x, training=False))
  tf.io.gfile.makedirs(output_dir)
  written = {}
  for split in splits:
    shards = info.shards(split)
    path = tf.io.gfile.join(output_dir, f"{split}.tfrecord")
    n = 0
    progress = progress_lib.Progress(info.num_examples([split]), f"predict {split}",
                                     every=progress_every)
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
        progress.update(h_a.shape[0])
    progress.finish()
    tf.io.gfile.rename(path + ".incomplete", path, overwrite=True)
    written[split] = {"file": f"{split}.tfrecord", "num_examples": n}
    log(f"[predict] {split}: {n} clips -> {path}")
  tf.io.gfile.copy(info.labels_path, tf.io.gfile.join(output_dir, schema.LABELS_FILE),
                   overwrite=True)
  result = {"num_classes": num_classes, "labels_file": schema.LABELS_FILE, "splits": written,
            "audio_model": audio_model_path, "visual_model": visual_model_path,
            "data_dir": data_dir}
  dataset_info.PredictionsInfo.write(output_dir, result)
  return result
