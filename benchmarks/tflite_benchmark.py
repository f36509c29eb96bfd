#!/usr/bin/env python3
"""Benchmark: TFLite tagger size, latency per window on 1 and 2 threads, real-time factor.

  .venv/bin/python benchmarks/tflite_benchmark.py --data_dir=out/esc10 --split=1 \
      [--audio_model=out/esc10_audio/model.keras] [--window_seconds=1.0]

Without --audio_model it converts the full-size model of --architecture (527 classes, random
weights: latency and size do not depend on the weights). --data_dir provides the int8
calibration audio (prepared shards whose source files exist). Not a test.
"""

import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import keras
import numpy as np

from av_sound_tf.core import constants
from av_sound_tf.core import labels
from av_sound_tf.core import model_files
from av_sound_tf.modeling import models
from av_sound_tf.serving import tflite

FLAGS = flags.FLAGS
flags.DEFINE_string("audio_model", None, "A .keras audio model; default: full-size, random.")
flags.DEFINE_enum("architecture", "mil_convnet", list(models.AUDIO_ARCHITECTURES),
                  "Without --audio_model: the random full-size (width 1, 527 classes) model "
                  "of this architecture (mobile_mil: the on-device student).")
flags.DEFINE_float("width", 1.0, "Without --audio_model: width multiplier of the random model.")
flags.DEFINE_string("data_dir", None, "Prepared data for int8 calibration.")
flags.DEFINE_string("split", "train", "Calibration split.")
flags.DEFINE_float("window_seconds", 1.0, "TFLite window.")
flags.DEFINE_integer("runs", 30, "Timed runs per setting.")


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as tmp:
    model_path = FLAGS.audio_model
    if not model_path:
      keras.utils.set_random_seed(0)
      model_path = os.path.join(tmp, "full.keras")
      models.AUDIO_ARCHITECTURES[FLAGS.architecture](
          num_classes=527, num_frames=1024, width=FLAGS.width).save(model_path)
    model = model_files.load_keras_model(model_path)
    labels_path = os.path.join(tmp, "labels.csv")
    labels.LabelMap([f"/m/{i}" for i in range(model.num_classes)],
                    [str(i) for i in range(model.num_classes)]).to_csv(labels_path)
    # int8 needs calibration audio.
    variants = [v for v in tflite.VARIANTS if FLAGS.data_dir or v != "int8"]
    paths = tflite.convert(model_path, labels_path, os.path.join(tmp, "out"), variants,
                           FLAGS.window_seconds, FLAGS.data_dir, FLAGS.split,
                           calibration_windows=32)
    cost = models.count_flops(model)
    name = model_path if FLAGS.audio_model else (
        f"{FLAGS.architecture}, width {FLAGS.width:g}, 527 classes, random weights")
    print(f"model: {name} ({cost['parameters'] / 1e6:.2f} M parameters, "
          f"{cost['flops'] / 1e9:.3f} GFLOP per 10 s by models.count_flops); window "
          f"{FLAGS.window_seconds} s; {os.cpu_count()} CPUs")
    print("Parity with the Keras model (tflite.convert's own check, on "
          f"{next(iter(paths.verification.values()))['windows']} windows):")
    for variant, v in paths.verification.items():
      print(f"  {variant:<8} max |diff| {v['max_abs_diff']:.2e}  mean |diff| "
            f"{v['mean_abs_diff']:.2e}  top-1 agreement {100 * v['top1_agreement']:.1f} %")
    print("variant   size MB   ms/window (1 thread)   ms/window (2 threads)   real-time factor")
    samples = int(FLAGS.window_seconds * constants.SAMPLE_RATE)
    window = np.random.default_rng(0).uniform(-0.3, 0.3, [1, samples])
    for variant, path in paths.items():
      ms = {}
      for threads in (1, 2):
        runner = tflite.Runner(path, threads)
        runner(window)
        t = time.perf_counter()
        for _ in range(FLAGS.runs):
          runner(window)
        ms[threads] = (time.perf_counter() - t) / FLAGS.runs * 1000
      rtf = min(ms.values()) / (FLAGS.window_seconds * 1000)
      print(f"{variant:<9} {os.path.getsize(path) / 1e6:7.2f}   {ms[1]:20.2f}   {ms[2]:21.2f}"
            f"   {rtf:16.4f}")


if __name__ == "__main__":
  app.run(main)
