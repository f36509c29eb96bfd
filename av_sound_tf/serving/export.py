"""SavedModel export for serving: signatures with the front end inside the graph.

`export_saved_model` writes the layout TensorFlow Serving expects,
``<export_base>/<model_name>/<version>/saved_model.pb``, with these signatures:

* ``tag_waveform``: ``waveform`` float32 [batch, samples] at 16 kHz ->
  ``clip_scores`` [batch, C] and ``segment_scores`` [batch, segments, C] (MIL instance
  outputs, one per 0.32 s). Also ``serving_default``: raw audio in is what a client has.
* ``tag_log_mel``: ``log_mel`` float32 [batch, frames, 64] -> the same.
* ``tag_audiovisual`` (when a visual and a fusion model are given): ``waveform`` and
  ``embedding_mean`` float32 [batch, D] -> ``fused_scores``, ``attention_weights`` (alpha on
  audio; attention fusion only, else 0.5), ``audio_scores`` and ``visual_scores``.
* ``class_map``: no input -> ``index``, ``mid``, ``display_name``, parsed in the graph
  from the asset ``assets/class_labels_indices.csv`` shipped with the model.

Input checks inside the graph: a client sending float64 gets TensorFlow's "expected to be a
float tensor" error before the graph runs. Everything else fails with an InvalidArgumentError
that says what was expected: a waveform that is not [batch, samples] (a 1-D waveform: "waveform
must be float32 [batch, samples]"; likewise log_mel [batch, frames, 64] and embedding_mean
[batch, D]), NaN or Inf samples or values (refused, as bin/tag refuses such audio; the front
end would otherwise turn them into finite, meaningless scores), an empty waveform, and one
longer than `max_seconds` (default 600 s). A non-empty waveform shorter than the model's
receptive field (96 frames, about 0.97 s) is zero-padded to it.

The audio model is rebuilt for inputs of any length (the same weights) so one export
serves 1 s clips and hour-long recordings. The export verifies itself as YAMNet's does: it
is reloaded and its outputs on fixed test signals (`test_signals`) are compared with the
Keras models' (`keras_reference`, `check_parity`); tflite.convert checks its models the same
way.
"""

from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from av_sound_tf.core import constants
from av_sound_tf.core import features
from av_sound_tf.core import files
from av_sound_tf.core import model_files
from av_sound_tf.modeling import models

DEFAULT_MAX_SECONDS = 600.0
_WAVEFORM_LAYOUT = (f"[batch, samples] of {constants.SAMPLE_RATE / 1000:g} kHz mono audio; "
                    "one clip is [1, samples]")
VERIFY_ATOL = 1e-4


def variable_length(audio_model: keras.Model) -> keras.Model:
  """The same audio model for any number of frames, with clip and segment outputs."""
  return models.with_segment_scores(models.any_length(audio_model))


def _assert_rank(x, rank, message):
  """A rank check that stays in the graph.

  The signature fixes the static rank, so `tf.rank` and `tf.debugging.assert_rank` fold to
  constants and never fire: a 1-D request then failed deep inside ("slice index 1 of
  dimension 0 out of bounds"). The number of entries of `tf.where` over the shape vector is
  known only at run time, so this check survives tracing and Grappler.
  """
  dims = tf.shape(tf.where(tf.shape(x) >= 0))[0]
  return tf.debugging.assert_equal(dims, rank, message=message)


def _checked_input(x, rank, name, layout):
  """`x` after the rank check and the NaN/Inf check (in that order)."""
  with tf.control_dependencies([_assert_rank(
      x, rank, f"{name} must be float32 {layout} (rank {rank})")]):
    x = tf.identity(x)
  return tf.debugging.assert_all_finite(
      x, f"{name} has NaN or Inf values: refused (finite input only)")


class AudioTagger:
  """The functions behind the signatures (see the module docstring), and the archive that
  exports them. Built on `keras.export.ExportArchive`, which tracks the variables so that
  TF1-style loaders (``saved_model_cli run``, TensorFlow Serving) restore them; a plain
  ``tf.Module`` holding Keras 3 models does not (variables go missing at load)."""

  def __init__(self, audio_model, labels_path, visual_model=None, fusion_model=None,
               max_seconds=DEFAULT_MAX_SECONDS, params=features.DEFAULT_PARAMS):
    self.audio = variable_length(audio_model)
    self.front_end = features.LogMel.from_params(params)
    self.visual = visual_model
    self.fusion = fusion_model
    self.class_map_file = tf.saved_model.Asset(labels_path)
    self.sample_rate = params.sample_rate
    self.max_samples = int(max_seconds * params.sample_rate)
    self.max_frames = params.num_frames(self.max_samples)
    self.min_samples = params.window_length + (models.MIN_FRAMES - 1) * params.hop_length
    self.num_mel_bins = params.num_mel_bins

  def archive(self) -> keras.export.ExportArchive:
    """An ExportArchive with the endpoints; tag_waveform first (= serving_default)."""
    archive = keras.export.ExportArchive()
    archive.track(self.audio)
    # Assets must be attributes of the saved trackable to be copied into assets/; Keras 3.6's
    # ExportArchive.track() keeps non-layer resources out of the object graph.
    archive._tf_trackable.class_map_file = self.class_map_file  # pylint: disable=protected-access
    archive.add_endpoint("tag_waveform", self.tag_waveform, input_signature=[
        tf.TensorSpec([None, None], tf.float32, name="waveform")])
    archive.add_endpoint("tag_log_mel", self.tag_log_mel, input_signature=[
        tf.TensorSpec([None, None, self.num_mel_bins], tf.float32, name="log_mel")])
    archive.add_endpoint("class_map", tf.function(self.class_map, input_signature=[]))
    if self.visual is not None and self.fusion is not None:
      archive.track(self.visual)
      archive.track(self.fusion)
      dim = self.visual.input.shape[-1]
      archive.add_endpoint("tag_audiovisual", self.tag_audiovisual, input_signature=[
          tf.TensorSpec([None, None], tf.float32, name="waveform"),
          tf.TensorSpec([None, dim], tf.float32, name="embedding_mean")])
    return archive

  def _checked_log_mel(self, waveform):
    waveform = _checked_input(waveform, 2, "waveform", _WAVEFORM_LAYOUT)
    samples = tf.shape(waveform)[1]
    checks = [
        tf.debugging.assert_greater(samples, 0, message="empty waveform: give at least one "
                                    f"sample of {self.sample_rate / 1000:g} kHz audio"),
        tf.debugging.assert_less_equal(
            samples, self.max_samples,
            message=f"waveform longer than the maximum of {self.max_samples} samples "
                    f"({self.max_samples / self.sample_rate:.0f} s at "
                    f"{self.sample_rate / 1000:g} kHz): split it into windows"),
    ]
    with tf.control_dependencies(checks):
      pad = tf.maximum(self.min_samples - samples, 0)
      waveform = tf.pad(waveform, [[0, 0], [0, pad]])
    return self.front_end(waveform)

  def _scores(self, log_mel):
    out = self.audio(log_mel, training=False)
    return {"clip_scores": out["clip_scores"], "segment_scores": out["segment_scores"]}

  def tag_waveform(self, waveform):
    return self._scores(self._checked_log_mel(waveform))

  def tag_log_mel(self, log_mel):
    log_mel = _checked_input(log_mel, 3, "log_mel", f"[batch, frames, {self.num_mel_bins}]")
    frames = tf.shape(log_mel)[1]
    checks = [
        tf.debugging.assert_greater_equal(
            frames, models.MIN_FRAMES,
            message=f"log_mel needs at least {models.MIN_FRAMES} frames (0.96 s)"),
        tf.debugging.assert_equal(
            tf.shape(log_mel)[2], self.num_mel_bins,
            message=f"log_mel must have {self.num_mel_bins} mel bins"),
        tf.debugging.assert_less_equal(
            frames, self.max_frames,
            message=f"log_mel longer than the maximum of {self.max_frames} frames: split it "
                    "into windows"),
    ]
    with tf.control_dependencies(checks):
      return self._scores(tf.identity(log_mel))

  def tag_audiovisual(self, waveform, embedding_mean):
    dim = int(self.visual.input_shape[-1])
    waveform = _checked_input(waveform, 2, "waveform", _WAVEFORM_LAYOUT)
    embedding_mean = _checked_input(embedding_mean, 2, "embedding_mean", f"[batch, {dim}]")
    checks = [
        tf.debugging.assert_equal(
            tf.shape(waveform)[0], tf.shape(embedding_mean)[0],
            message="waveform and embedding_mean must hold the same number of clips"),
        tf.debugging.assert_equal(
            tf.shape(embedding_mean)[1], dim,
            message=f"embedding_mean must have {dim} values per clip (the frame embedder's "
                    "size used in training)"),
    ]
    with tf.control_dependencies(checks):
      waveform = tf.identity(waveform)
      embedding_mean = tf.identity(embedding_mean)
    audio = self._scores(self._checked_log_mel(waveform))["clip_scores"]
    visual = self.visual(embedding_mean, training=False)
    ones = tf.ones([tf.shape(audio)[0], 1])
    inputs = {"h_audio": audio, "h_visual": visual, "audio_present": ones,
              "visual_present": ones}
    if self.fusion.fusion == "attention":
      from av_sound_tf.modeling import fusion as fusion_lib  # pylint: disable=g-import-not-at-top
      out = fusion_lib.with_attention_weights(self.fusion)(inputs, training=False)
      fused, alpha = out["fused_scores"], out["attention_weights"]
    else:
      fused = self.fusion(inputs, training=False)
      alpha = 0.5 * tf.ones_like(fused)
    return {"fused_scores": fused, "attention_weights": alpha, "audio_scores": audio,
            "visual_scores": visual}

  def class_map(self):
    lines = tf.strings.split(tf.strings.strip(tf.io.read_file(self.class_map_file)), "\n")[1:]
    index, mid, name = tf.io.decode_csv(lines, record_defaults=[[0], [""], [""]])
    return {"index": index, "mid": mid, "display_name": name}


def next_version(model_base: str) -> int:
  """1 + the largest numeric version folder under <export_base>/<model_name>."""
  if not tf.io.gfile.isdir(model_base):
    return 1
  versions = [int(v.rstrip("/")) for v in tf.io.gfile.listdir(model_base)
              if v.rstrip("/").isdigit()]
  return max(versions, default=0) + 1


def export_saved_model(audio_model_path: str, labels_path: str, export_base: str,
                       model_name: str = "av_sound", version: Optional[int] = None,
                       visual_model_path: Optional[str] = None,
                       fusion_model_path: Optional[str] = None,
                       max_seconds: float = DEFAULT_MAX_SECONDS) -> dict:
  """Exports, reloads and verifies; returns {"path", "signatures", "max_abs_diff"}."""
  # Model files are checked as they load (model_files.load_keras_model).
  if not tf.io.gfile.exists(labels_path):
    raise FileNotFoundError(f"Not found: {labels_path}")
  if bool(visual_model_path) != bool(fusion_model_path):
    raise ValueError("tag_audiovisual needs both a visual model and a fusion model.")
  audio = model_files.load_keras_model(audio_model_path, "Audio model")
  if not isinstance(audio, models.AUDIO_MODELS):
    raise ValueError(f"{audio_model_path} is not an audio MIL model (bin/train_audio, "
                     "bin/distill).")
  visual = model_files.load_keras_model(visual_model_path, "Visual model") if \
      visual_model_path else None
  fusion_model = model_files.load_keras_model(fusion_model_path, "Fusion model") if \
      fusion_model_path else None
  tagger = AudioTagger(audio, labels_path, visual, fusion_model, max_seconds)
  archive = tagger.archive()
  model_base = tf.io.gfile.join(export_base, model_name)
  version = version or next_version(model_base)
  path = tf.io.gfile.join(model_base, str(version))
  if tf.io.gfile.exists(path):
    raise ValueError(f"{path} exists; pick another --version.")
  tmp = path + ".incomplete"
  if tf.io.gfile.exists(tmp):
    tf.io.gfile.rmtree(tmp)
  archive.write_out(tmp, verbose=False)
  tf.io.gfile.rename(tmp, path)
  signatures = ["serving_default"] + list(archive._endpoint_names)  # pylint: disable=protected-access
  diff = verify(path, audio, visual, fusion_model)
  tf.io.gfile.makedirs(tf.io.gfile.join(path, "assets.extra"))
  files.write_json(tf.io.gfile.join(path, "assets.extra", "export_info.json"), {
      "audio_model": audio_model_path, "visual_model": visual_model_path,
      "fusion_model": fusion_model_path, "max_seconds": max_seconds,
      "verified_max_abs_diff": diff, "signatures": sorted(signatures)})
  return {"path": path, "signatures": sorted(signatures), "max_abs_diff": diff}


def test_signals(count: int, samples: int) -> np.ndarray:
  """Deterministic float32 test waveforms [count, samples] at 16 kHz for parity checks.

  Cycles through white noise, a 440 Hz sine, a 100 Hz - 7 kHz chirp, a click train and
  silence, at levels from -30 to -6 dBFS (YAMNet's export tests use the same kinds), so the
  compared scores are not all from one kind of input.
  """
  rng = np.random.default_rng(0)
  t = np.arange(samples) / constants.SAMPLE_RATE
  out = np.zeros([count, samples], np.float32)
  for i in range(count):
    level = 10 ** (-(6 + 6 * (i // 5 % 5)) / 20)
    kind = i % 5
    if kind == 0:
      y = rng.uniform(-1, 1, samples)
    elif kind == 1:
      y = np.sin(2 * np.pi * 440 * t)
    elif kind == 2:
      y = np.sin(2 * np.pi * (100 * t + (7000 - 100) / (2 * t[-1] + 1e-9) * t ** 2))
    elif kind == 3:
      # 1 ms clicks, 10 per second.
      y = (np.arange(samples) % (constants.SAMPLE_RATE // 10) <
           constants.SAMPLE_RATE // 1000).astype(np.float64)
    else:
      y = np.zeros(samples)
    out[i] = level * y
  return out


def keras_reference(audio: keras.Model, waveform: np.ndarray) -> dict:
  """The Keras audio model's scores for waveforms [batch, samples]: the reference every
  exported form (SavedModel, TFLite) is compared with. Also returns the log-mel input."""
  log_mel = features.log_mel_spectrogram(waveform).numpy()
  out = variable_length(audio)(log_mel, training=False)
  return {"log_mel": log_mel, "clip_scores": np.asarray(out["clip_scores"]),
          "segment_scores": np.asarray(out["segment_scores"])}


def max_abs_diff(got, reference) -> float:
  """max |got - reference|; NaN when either holds a NaN (so `check_parity` fails)."""
  got, reference = np.asarray(got, np.float64), np.asarray(reference, np.float64)
  if got.shape != reference.shape:
    raise ValueError(f"shape {got.shape} differs from the reference's {reference.shape}")
  return float(np.max(np.abs(got - reference))) if got.size else 0.0


def check_parity(what: str, diff: float, atol: float):
  """Raises ValueError unless diff <= atol (a NaN difference fails too)."""
  if not diff <= atol:
    raise ValueError(f"{what} differs from the Keras model by {diff:.2e} (> {atol}); the "
                     "export is not trustworthy.")


def verify(path, audio, visual=None, fusion_model=None, atol=VERIFY_ATOL) -> float:
  """Reloads the export and compares it with the Keras models on 3 s test signals."""
  loaded = tf.saved_model.load(path)
  waveform = test_signals(2, 48000)
  reference = keras_reference(audio, waveform)
  got = loaded.signatures["tag_waveform"](waveform=tf.constant(waveform))
  diffs = [max_abs_diff(got[k], reference[k]) for k in ("clip_scores", "segment_scores")]
  got = loaded.signatures["tag_log_mel"](log_mel=tf.constant(reference["log_mel"]))
  diffs.append(max_abs_diff(got["clip_scores"], reference["clip_scores"]))
  if visual is not None and "tag_audiovisual" in loaded.signatures:
    emb = np.random.default_rng(1).normal(size=[2, visual.input.shape[-1]]).astype(np.float32)
    got = loaded.signatures["tag_audiovisual"](waveform=tf.constant(waveform),
                                               embedding_mean=tf.constant(emb))
    v = np.asarray(visual(emb, training=False))
    ones = np.ones([2, 1], np.float32)
    fused = fusion_model({"h_audio": reference["clip_scores"], "h_visual": v,
                          "audio_present": ones, "visual_present": ones}, training=False)
    diffs.append(max_abs_diff(got["fused_scores"], fused))
  worst = max(diffs, key=lambda d: np.inf if np.isnan(d) else d)
  check_parity(f"Exported model {path}", worst, atol)
  return worst
