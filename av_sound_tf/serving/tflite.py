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

Every variant carries TFLite Model Metadata (`metadata.write`, MediaPipe's metadata
writers): the input described as 16 kHz mono audio with its window length, the outputs as
scores, the class map packed as label files of ``clip_scores``; MediaPipe's
``AudioClassifier`` runs the file as it is. The class map also ships beside each model as
``<name>.labels.csv``: `labels_path_for` is the one rule for that sidecar, for writing and
reading (a model whose name does not end in ``.tflite`` is refused rather than guessed at).
`read_label_map` (bin/tag --tflite) takes the metadata's class map first and the sidecar
for a model written before metadata existed.

`convert` verifies every variant it writes: each converted model runs through the
interpreter on real windows (the int8 representative windows, decoded from the training
audio, when ``data_dir`` is given; else deterministic test signals, `export.test_signals`)
and its clip scores are compared with the Keras model's (`export.keras_reference`, the same
reference the SavedModel export is checked against). The max |diff| per variant is returned
and written to ``<name>.json``; a variant beyond its tolerance (`TOLERANCES`: float32 1e-4,
float16 2e-2, int8 0.15, chosen from measurements) fails the conversion and is not written.

Reading a .tflite file: the interpreter does not verify the flatbuffer and crashes the
process (segmentation fault) on a truncated file. `read_model` checks the bytes first: the
``TFL3`` file identifier, then a full parse with the schema's Python reader, which is
bounds-checked (about 10-15 ms for a 4 MB model); a file that fails either is refused with
one line naming it.
"""

import os
import tempfile
from typing import Iterable, Optional

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from av_sound_tf.serving import export
from av_sound_tf.serving import metadata
from av_sound_tf.core import dataset_info
from av_sound_tf.core import features
from av_sound_tf.core import files
from av_sound_tf.core import labels as labels_lib
from av_sound_tf.core import media
from av_sound_tf.core import model_files
from av_sound_tf.core import progress as progress_lib
from av_sound_tf.core import schema

VARIANTS = ("float32", "float16", "int8")
FRONT_END = "front_end"  # layer name; its ops stay float32 in the int8 model
# Max |clip score difference| to the Keras model that `convert` accepts per variant.
# Measured: the ESC-10 model of docs/benchmarks.md on 40 real windows: float32 1.5e-6,
# float16 0.0057, int8 0.069; a 12-epoch ESC-10 model (width 0.125) on 100 windows: float32
# 2.1e-7, float16 4.6e-4, int8 0.0093, and 0.295 (top-1 agreement 26 %) when the front end
# is quantized too, the known way to ruin it. The int8 bound sits between the two.
TOLERANCES = {"float32": 1e-4, "float16": 2e-2, "int8": 0.15}
TEST_SIGNAL_WINDOWS = 16
TFLITE_SUFFIX = ".tflite"


def labels_path_for(model_path: str) -> str:
  """The class map shipped beside a .tflite tagger: ``<name>.labels.csv`` for
  ``<name>.tflite``. Raises ValueError for a name that does not end in .tflite."""
  if not model_path.endswith(TFLITE_SUFFIX) or len(os.path.basename(model_path)) <= len(
      TFLITE_SUFFIX):
    raise ValueError(f"{model_path}: a TFLite tagger's name must end in {TFLITE_SUFFIX} (its "
                     "class map is <name>.labels.csv beside <name>.tflite, as bin/export "
                     "writes them)")
  return model_path[:-len(TFLITE_SUFFIX)] + ".labels.csv"


def check_model_bytes(content: bytes, path: str = "<bytes>"):
  """Raises ValueError naming `path` unless `content` is a whole TFLite flatbuffer
  (`model_files.check_tflite_flatbuffer`: the interpreter builds its model without verifying
  it, so a truncated file crashes the process, exit 139) and, for a model with TFLite
  metadata, its associated files packed after the flatbuffer are whole
  (`metadata.check_packed_files`)."""
  model_files.check_tflite_flatbuffer(content, path)
  metadata.check_packed_files(content, path)  # the label files packed after the flatbuffer


def read_model(path: str) -> bytes:
  """The bytes of a .tflite tagger, checked (`check_model_bytes`) before any interpreter
  sees them; FileNotFoundError / ValueError naming the file otherwise."""
  return model_files.read_tflite_file(path, "TFLite model", check_model_bytes)


def read_label_map(model_path: str, content: Optional[bytes] = None):
  """The class map of a .tflite tagger and where it came from: (LabelMap, source).

  From the model's TFLite metadata (`metadata.read_label_map`; source "metadata") when it
  has any, else from the ``<name>.labels.csv`` sidecar (a model converted before metadata
  existed; source: the sidecar's path). `content`: the model's bytes when already read.
  A model whose metadata cannot be read here (the metadata library is not installed) falls
  back to the sidecar with a warning; FileNotFoundError when there is neither.
  """
  sidecar = labels_path_for(model_path)  # refuses a name without .tflite
  if content is None:
    content = read_model(model_path)
  missing_library = None
  if metadata.has_metadata(content):
    try:
      return metadata.read_label_map(content, model_path), "metadata"
    except metadata.MissingLibraryError as e:
      missing_library = e
  if not tf.io.gfile.exists(sidecar):
    if missing_library:
      raise FileNotFoundError(f"{model_path}: its class map is in its TFLite metadata, which "
                              f"cannot be read here ({missing_library}), and {sidecar} (the "
                              "class map beside the .tflite) is not there") from None
    raise FileNotFoundError(f"{model_path}: no class map: the model has no TFLite metadata "
                            f"and {sidecar} (the class map beside the .tflite) is not there")
  if missing_library:
    logging.warning("%s: class map from %s (%s)", model_path, sidecar, missing_library)
  return labels_lib.LabelMap.from_csv(sidecar), sidecar


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
                           seed: int = 0, progress_every: float = 5.0) -> Iterable[np.ndarray]:
  """Waveform windows decoded from the source files of a prepared split (for int8).

  Logs "[calibrate] i of N windows" lines (`core.progress`) at most every `progress_every`
  seconds, and the last one.
  """
  rng = np.random.default_rng(seed)
  info = dataset_info.DatasetInfo.read(data_dir)
  produced = 0
  progress = progress_lib.Progress(count, "calibrate", "windows", every=progress_every)
  for ex in schema.read_examples(info.shards(split), info.num_classes):
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
    progress.update()
    if produced >= count:
      return
  progress.finish()
  if produced == 0:
    raise ValueError(f"No decodable source audio for split {split!r} of {data_dir}: int8 "
                     "calibration needs the original files (source_path in the shards).")


class Converted(dict):
  """{variant: path} of the written models, with `verification` {variant: {max_abs_diff,
  mean_abs_diff, top1_agreement, tolerance, windows}} and `info_path` (<name>.json)."""

  def __init__(self, paths, verification, info_path):
    super().__init__(paths)
    self.verification = verification
    self.info_path = info_path


def verify_variant(content: bytes, windows: np.ndarray, reference: np.ndarray,
                   tolerance: float, what: str) -> dict:
  """Runs a converted model on `windows` [N, samples] and compares its clip scores with
  `reference` [N, C] (the Keras model's); raises ValueError beyond `tolerance`."""
  runner = Runner(content=content, path=what)
  got = np.stack([runner(w)["clip_scores"][0] for w in windows])
  diff = export.max_abs_diff(got, reference)
  export.check_parity(what, diff, tolerance)
  return {"max_abs_diff": diff,
          "mean_abs_diff": float(np.mean(np.abs(got.astype(np.float64) - reference))),
          "top1_agreement": float(np.mean(got.argmax(-1) == reference.argmax(-1))),
          "tolerance": tolerance, "windows": int(len(windows))}


def convert(audio_model_path: str, labels_path: str, output_dir: str,
            variants=VARIANTS, window_seconds: float = 1.0, data_dir: Optional[str] = None,
            split: str = "train", calibration_windows: int = 100, name: str = "audio_tagger",
            tolerances: Optional[dict] = None, progress_every: float = 5.0) -> Converted:
  """Converts the audio model to TFLite variants, verifying each (see the module
  docstring); returns {variant: path} with `.verification` (also in <name>.json)."""
  if not tf.io.gfile.exists(labels_path):  # the model: checked as it loads
    raise FileNotFoundError(f"Not found: {labels_path}")
  bad = [v for v in variants if v not in VARIANTS]
  if bad:
    raise ValueError(f"Unknown TFLite variants {bad}; expected {VARIANTS}")
  if "int8" in variants and not data_dir:
    raise ValueError("The int8 variant needs --data_dir for its representative dataset.")
  metadata.check_available()  # before any work: no tagger is written without metadata
  label_map = labels_lib.LabelMap.from_csv(labels_path)
  tolerances = {**TOLERANCES, **(tolerances or {})}
  audio = model_files.load_keras_model(audio_model_path, "Audio model")
  samples = int(round(window_seconds * features.DEFAULT_PARAMS.sample_rate))
  if data_dir:  # real audio: calibrates int8 and checks every variant
    windows = list(representative_windows(data_dir, split, samples, calibration_windows,
                                          progress_every=progress_every))
    source = f"{len(windows)} windows of {data_dir} ({split}) source audio"
  else:
    windows = list(export.test_signals(TEST_SIGNAL_WINDOWS, samples)[:, None, :])
    source = f"{len(windows)} test signals (export.test_signals)"
  batch = np.concatenate(windows)
  reference = export.keras_reference(audio, batch)["clip_scores"]
  tf.io.gfile.makedirs(output_dir)
  out, verification = {}, {}
  with tempfile.TemporaryDirectory() as tmp:
    saved = os.path.join(tmp, "window")
    _window_archive(audio, samples).write_out(saved, verbose=False)
    for variant in variants:
      converter = tf.lite.TFLiteConverter.from_saved_model(saved)
      if variant == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
      elif variant == "int8":
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
      model = metadata.write(model, label_map, features.DEFAULT_PARAMS.sample_rate,
                             name=f"{name}_{variant}", path=path)
      # Checked before it is written: a model beyond its tolerance never reaches the folder.
      verification[variant] = verify_variant(model, batch, reference, tolerances[variant],
                                             f"TFLite {variant} model {path}")
      with tf.io.gfile.GFile(path, "wb") as f:
        f.write(model)
      tf.io.gfile.copy(labels_path, labels_path_for(path), overwrite=True)
      out[variant] = path
  info_path = tf.io.gfile.join(output_dir, f"{name}.json")
  files.write_json(info_path, {
      "window_seconds": window_seconds, "window_samples": samples,
      "sample_rate": features.DEFAULT_PARAMS.sample_rate,
      "variants": out, "audio_model": audio_model_path,
      "metadata": f"TFLite Model Metadata in every variant ({metadata.REQUIREMENT} writers)",
      "verified_against": f"the Keras model's clip scores on {source}",
      "verification": verification})
  return Converted(out, verification, info_path)


class Runner:
  """Runs a .tflite tagger on waveform windows: `runner(window)` -> {clip_scores, ...}.

  The file's bytes are checked (`check_model_bytes`) before the interpreter sees them.
  """

  def __init__(self, path: Optional[str] = None, num_threads: int = 1,
               content: Optional[bytes] = None):
    if content is None:
      content = read_model(path)
    else:
      check_model_bytes(content, path or "<bytes>")
    where = path or "<bytes>"
    try:
      self.interpreter = tf.lite.Interpreter(model_content=content, num_threads=num_threads)
      self.runner = self.interpreter.get_signature_runner()
      self.samples = int(self.runner.get_input_details()["waveform"]["shape"][1])
    except (ValueError, RuntimeError, KeyError, IndexError) as e:
      raise ValueError(f"{where}: not a TFLite tagger from bin/export (one signature with a "
                       f"waveform [1, samples] input): {str(e).splitlines()[0][:200]}"
                       ) from None

  def __call__(self, window: np.ndarray) -> dict:
    window = np.asarray(window, np.float32).reshape(1, -1)
    if window.shape[1] != self.samples:
      raise ValueError(f"The TFLite tagger takes windows of {self.samples} samples. "
                       f"Received: {window.shape[1]}")
    if not np.isfinite(window).all():
      raise ValueError("The window has NaN or Inf samples: refused (finite input only).")
    return self.runner(waveform=window)
