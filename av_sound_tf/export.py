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

Input checks inside the graph: the signatures fix dtype and rank (a client sending float64
or a 1-D waveform gets TensorFlow's "expects ... float / shape" error); an empty waveform,
or one longer than `max_seconds` (default 600 s), fails with an InvalidArgumentError that
says so. A non-empty waveform shorter than the model's receptive field (96 frames, about
0.97 s) is zero-padded to it.

The audio model is rebuilt for inputs of any length (the same weights) so one export
serves 1 s clips and hour-long recordings. The export verifies itself as YAMNet's does: it
is reloaded and its outputs on a fixed input are compared with the Keras models'.
"""

from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from av_sound_tf import features
from av_sound_tf import files
from av_sound_tf import models

DEFAULT_MAX_SECONDS = 600.0
VERIFY_ATOL = 1e-4


def variable_length(audio_model: keras.Model) -> keras.Model:
  """The same audio model for any number of frames, with clip and segment outputs."""
  return models.with_segment_scores(models.any_length(audio_model))


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
    samples = tf.shape(waveform)[1]
    checks = [
        tf.debugging.assert_greater(samples, 0, message="empty waveform: give at least one "
                                    "sample of 16 kHz audio"),
        tf.debugging.assert_less_equal(
            samples, self.max_samples,
            message=f"waveform longer than the maximum of {self.max_samples} samples "
                    f"({self.max_samples / 16000:.0f} s at 16 kHz): split it into windows"),
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
      from av_sound_tf import fusion as fusion_lib  # pylint: disable=g-import-not-at-top
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
  for path in (audio_model_path, labels_path, visual_model_path, fusion_model_path):
    if path and not tf.io.gfile.exists(path):
      raise FileNotFoundError(f"Not found: {path}")
  if bool(visual_model_path) != bool(fusion_model_path):
    raise ValueError("tag_audiovisual needs both a visual model and a fusion model.")
  audio = keras.models.load_model(audio_model_path, safe_mode=True)
  if not isinstance(audio, models.AUDIO_MODELS):
    raise ValueError(f"{audio_model_path} is not an audio MIL model (bin/train_audio, "
                     "bin/distill).")
  visual = keras.models.load_model(visual_model_path, safe_mode=True) if visual_model_path \
      else None
  fusion_model = keras.models.load_model(fusion_model_path, safe_mode=True) if \
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


def verify(path, audio, visual=None, fusion_model=None, atol=VERIFY_ATOL) -> float:
  """Reloads the export and compares it with the Keras models on a fixed 3 s input."""
  loaded = tf.saved_model.load(path)
  waveform = np.random.default_rng(0).uniform(-0.3, 0.3, [2, 48000]).astype(np.float32)
  log_mel = features.log_mel_spectrogram(waveform).numpy()
  reference = variable_length(audio)(log_mel, training=False)
  got = loaded.signatures["tag_waveform"](waveform=tf.constant(waveform))
  diffs = [float(np.max(np.abs(got[k].numpy() - reference[k].numpy())))
           for k in ("clip_scores", "segment_scores")]
  got = loaded.signatures["tag_log_mel"](log_mel=tf.constant(log_mel))
  diffs.append(float(np.max(np.abs(got["clip_scores"].numpy() -
                                   reference["clip_scores"].numpy()))))
  if visual is not None and "tag_audiovisual" in loaded.signatures:
    emb = np.random.default_rng(1).normal(size=[2, visual.input.shape[-1]]).astype(np.float32)
    got = loaded.signatures["tag_audiovisual"](waveform=tf.constant(waveform),
                                               embedding_mean=tf.constant(emb))
    v = visual(emb, training=False)
    ones = tf.ones([2, 1])
    fused = fusion_model({"h_audio": reference["clip_scores"], "h_visual": v,
                          "audio_present": ones, "visual_present": ones}, training=False)
    diffs.append(float(np.max(np.abs(got["fused_scores"].numpy() - np.asarray(fused)))))
  worst = max(diffs)
  if worst > atol:
    raise ValueError(f"Exported model {path} differs from the Keras model by {worst:.2e} "
                     f"(> {atol}); the export is not trustworthy.")
  return worst
