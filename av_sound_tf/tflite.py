"""TFLite on-device audio tagger: waveform window in, scores out, front end included.

The model takes a fixed window of ``window_seconds`` of 16 kHz mono audio ([1, samples];
default 1.0 s = 16,000 samples, 99 log-mel frames, one MIL segment) and returns
``clip_scores`` [1, C] and ``segment_scores`` [1, segments, C]. Longer recordings are tagged
window by window (bin/tag --tflite slides it with 50 % overlap). A 10 s window
(``--tflite_window_seconds=10``) reproduces the clip-level model at 30x the cost.

Converted with ``TFLiteConverter.from_saved_model`` (the Keras 3 ``from_keras_model`` path
is fragile: tensorflow#63867, keras#19108) in three variants:

* ``float32``: builtin ops only (the STFT lowers to RFFT2D).
* ``float16``: float16 weights, float32 compute (half the size).
* ``int8``: post-training integer quantization with a representative dataset of training
  audio (decoded from the ``source_path`` of the training shards): weights and activations
  of the network in int8. The front end (framing, RFFT, mel projection, log) is kept in
  float32 (quantized, it ruins the model: see `_float_front_end`), and inputs/outputs stay
  float32, so every variant takes the same waveform.

Labels ship beside each model as ``<name>.labels.csv`` (the class map). `convert` checks
every variant against the SavedModel on the given clips (tests/tflite_test.py states the
thresholds).
"""

import os
import tempfile
from typing import Iterable, Optional

import keras
import numpy as np
import tensorflow as tf

from av_sound_tf import export
from av_sound_tf import features
from av_sound_tf import files
from av_sound_tf import media
from av_sound_tf import schema

VARIANTS = ("float32", "float16", "int8")
FRONT_END = "front_end"  # layer name; its ops stay float32 in the int8 model


def _window_archive(audio_model, samples):
  """A SavedModel endpoint for exactly one window (TFLite wants static shapes)."""
  seg_model = export.variable_length(audio_model)
  front_end = features.LogMel(name=FRONT_END)
  archive = keras.export.ExportArchive()
  archive.track(seg_model)

  def serve(waveform):
    out = seg_model(front_end(waveform), training=False)
    return {"clip_scores": out["clip_scores"], "segment_scores": out["segment_scores"]}

  archive.add_endpoint("serving_default", serve, input_signature=[
      tf.TensorSpec([1, samples], tf.float32, name="waveform")])
  return archive


def _float_front_end(converter, model, windows):
  """Requantizes with the front end's ops kept in float32.

  Quantizing the front end would store the waveform and the power spectrum (a 1e-10..1e4
  range) in 8 bits: measured on ESC-10 windows with the ESC-10 model, top-1 agreement with
  the float model fell to 20 %. With the front end in float32 it is 97.5 %.
  """
  interpreter = tf.lite.Interpreter(model_content=model)
  names = {t["index"]: t["name"] for t in interpreter.get_tensor_details()}
  front_end = [names[op["outputs"][0]] for op in interpreter._get_ops_details()  # pylint: disable=protected-access
               if names[op["outputs"][0]].startswith(FRONT_END)]
  debugger = tf.lite.experimental.QuantizationDebugger(
      converter=converter, debug_dataset=lambda: ([w] for w in windows[:2]),
      debug_options=tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=front_end))
  return debugger.get_nondebug_quantized_model()


def representative_windows(data_dir: str, split: str, samples: int, count: int = 100,
                           seed: int = 0) -> Iterable[np.ndarray]:
  """Waveform windows decoded from the source files of a prepared split (for int8)."""
  rng = np.random.default_rng(seed)
  info = schema.read_dataset_info(data_dir)
  produced = 0
  for ex in schema.read_examples(schema.list_shards(data_dir, split), info["num_classes"]):
    path = ex["source_path"].numpy().decode()
    try:
      y = media.decode_audio(path)
    except media.MediaError:
      continue
    if len(y) < samples:
      y = np.pad(y, (0, samples - len(y)))
    start = int(rng.integers(0, len(y) - samples + 1))
    yield y[start:start + samples][None, :].astype(np.float32)
    produced += 1
    if produced >= count:
      return
  if produced == 0:
    raise ValueError(f"No decodable source audio for split {split!r} of {data_dir}: int8 "
                     "calibration needs the original files (source_path in the shards).")


def convert(audio_model_path: str, labels_path: str, output_dir: str,
            variants=VARIANTS, window_seconds: float = 1.0, data_dir: Optional[str] = None,
            split: str = "train", calibration_windows: int = 100, name: str = "audio_tagger"
            ) -> dict:
  """Converts the audio model to TFLite variants; returns {variant: path}."""
  for path in (audio_model_path, labels_path):
    if not tf.io.gfile.exists(path):
      raise FileNotFoundError(f"Not found: {path}")
  bad = [v for v in variants if v not in VARIANTS]
  if bad:
    raise ValueError(f"Unknown TFLite variants {bad}; expected {VARIANTS}")
  if "int8" in variants and not data_dir:
    raise ValueError("The int8 variant needs --data_dir for its representative dataset.")
  audio = keras.models.load_model(audio_model_path, safe_mode=True)
  samples = int(round(window_seconds * features.DEFAULT_PARAMS.sample_rate))
  tf.io.gfile.makedirs(output_dir)
  out = {}
  with tempfile.TemporaryDirectory() as tmp:
    saved = os.path.join(tmp, "window")
    _window_archive(audio, samples).write_out(saved, verbose=False)
    for variant in variants:
      converter = tf.lite.TFLiteConverter.from_saved_model(saved)
      if variant == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
      elif variant == "int8":
        windows = list(representative_windows(data_dir, split, samples, calibration_windows))
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([w] for w in windows)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8,
                                               tf.lite.OpsSet.TFLITE_BUILTINS]
      else:
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
      model = converter.convert()
      if variant == "int8":
        model = _float_front_end(converter, model, windows)
      path = tf.io.gfile.join(output_dir, f"{name}_{variant}.tflite")
      with tf.io.gfile.GFile(path, "wb") as f:
        f.write(model)
      tf.io.gfile.copy(labels_path, tf.io.gfile.join(output_dir, f"{name}_{variant}.labels.csv"),
                       overwrite=True)
      out[variant] = path
  files.write_json(tf.io.gfile.join(output_dir, f"{name}.json"), {
      "window_seconds": window_seconds, "window_samples": samples, "sample_rate": 16000,
      "variants": out, "audio_model": audio_model_path})
  return out


class Runner:
  """Runs a .tflite tagger on waveform windows: `scores(window)` -> clip scores [C]."""

  def __init__(self, path: str, num_threads: int = 1):
    with tf.io.gfile.GFile(path, "rb") as f:
      self.interpreter = tf.lite.Interpreter(model_content=f.read(), num_threads=num_threads)
    self.runner = self.interpreter.get_signature_runner()
    self.samples = int(self.runner.get_input_details()["waveform"]["shape"][1])

  def __call__(self, window: np.ndarray) -> dict:
    window = np.asarray(window, np.float32).reshape(1, -1)
    if window.shape[1] != self.samples:
      raise ValueError(f"The TFLite tagger takes windows of {self.samples} samples. "
                       f"Received: {window.shape[1]}")
    return self.runner(waveform=window)
