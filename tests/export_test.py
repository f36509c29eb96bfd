"""SavedModel export: signatures, the class-map asset, in-graph checks, saved_model_cli."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from av_sound_tf.serving import export
from av_sound_tf.core import features
from av_sound_tf.modeling import fusion
from av_sound_tf.core import labels
from av_sound_tf.core import media
from av_sound_tf.modeling import models
from tests.conftest import run_binary, shared_path

C = 3


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("export")
  keras.utils.set_random_seed(0)
  audio = models.MILConvNet(num_classes=C, num_frames=256, width=0.0625)
  visual = models.VisualDNN(num_classes=C, embedding_dim=8, width=0.01)
  stats = dict(audio_mean=np.full(C, 0.5), audio_variance=np.full(C, 0.01),
               visual_mean=np.full(C, 0.5), visual_variance=np.full(C, 0.01))
  attention = fusion.FusionModel(C, "attention", **stats)
  paths = {}
  for name, model in (("audio", audio), ("visual", visual), ("fusion", attention)):
    paths[name] = str(tmp / f"{name}.keras")
    model.save(paths[name])
  paths["labels"] = str(tmp / "labels.csv")
  labels.LabelMap(["/m/09x0r", "/m/05zppz", "/m/0bt9lr"],
                  ["Speech", "Male speech, man speaking", 'Dog "woof"']).to_csv(paths["labels"])
  base = str(tmp / "serving")
  result = export.export_saved_model(paths["audio"], paths["labels"], base,
                                     visual_model_path=paths["visual"],
                                     fusion_model_path=paths["fusion"], max_seconds=30)
  return result, audio, paths, base


def test_layout_signatures_and_verification(exported):
  result, _, _, base = exported
  assert result["path"] == os.path.join(base, "av_sound", "1")
  assert os.path.exists(os.path.join(result["path"], "saved_model.pb"))
  assert result["signatures"] == ["class_map", "serving_default", "tag_audiovisual",
                                  "tag_log_mel", "tag_waveform"]
  assert result["max_abs_diff"] < export.VERIFY_ATOL
  loaded = tf.saved_model.load(result["path"])
  spec = loaded.signatures["serving_default"].structured_input_signature[1]
  assert spec["waveform"].dtype == tf.float32 and spec["waveform"].shape.rank == 2


def test_class_map_asset(exported):
  result = exported[0]
  assert os.path.exists(os.path.join(result["path"], "assets", "labels.csv"))
  out = tf.saved_model.load(result["path"]).signatures["class_map"]()
  assert out["display_name"].numpy().tolist() == [
      b"Speech", b"Male speech, man speaking", b'Dog "woof"']
  assert out["mid"].numpy().tolist() == [b"/m/09x0r", b"/m/05zppz", b"/m/0bt9lr"]
  np.testing.assert_array_equal(out["index"].numpy(), [0, 1, 2])


def test_waveform_signature_matches_keras_on_a_real_clip(exported):
  result, audio = exported[0], exported[1]
  y = media.decode_audio(shared_path("esc10", "002 - Rain", "1-17367-A.ogg"))[None, :]
  got = tf.saved_model.load(result["path"]).signatures["tag_waveform"](waveform=tf.constant(y))
  reference = export.variable_length(audio)(features.log_mel_spectrogram(y))
  np.testing.assert_allclose(got["clip_scores"], reference["clip_scores"], atol=1e-5)
  assert got["segment_scores"].shape == (1, models.num_segments(499), C)


def test_in_graph_checks(exported):
  sig = tf.saved_model.load(exported[0]["path"]).signatures
  with pytest.raises(tf.errors.InvalidArgumentError, match="empty waveform"):
    sig["tag_waveform"](waveform=tf.zeros([1, 0]))
  with pytest.raises(tf.errors.InvalidArgumentError, match="longer than the maximum"):
    sig["tag_waveform"](waveform=tf.zeros([1, 16000 * 31]))
  with pytest.raises((TypeError, ValueError, tf.errors.InvalidArgumentError)):
    sig["tag_waveform"](waveform=tf.zeros([1, 16000], tf.float64))
  with pytest.raises(tf.errors.InvalidArgumentError, match=r"waveform must be float32 "
                     r"\[batch, samples\]"):
    sig["tag_waveform"](waveform=tf.zeros([16000]))
  with pytest.raises(tf.errors.InvalidArgumentError, match="at least 96 frames"):
    sig["tag_log_mel"](log_mel=tf.zeros([1, 50, 64]))
  short = sig["tag_waveform"](waveform=tf.zeros([2, 800]))  # 50 ms: padded to 96 frames
  assert short["clip_scores"].shape == (2, C) and np.isfinite(short["clip_scores"]).all()


# Bad requests to every signature: (signature, inputs, expected error type, message part).
# Loaded signatures reject a wrong dtype before running ("expected to be a float tensor");
# a wrong rank fails in the graph with a message giving the expected layout (before the
# fix, a rank-1 waveform failed with "slice index 1 of dimension 0 out of bounds"); NaN or
# Inf values are refused (before, the front end turned them into finite scores).
_DTYPE = ((TypeError, ValueError, tf.errors.InvalidArgumentError), "float tensor|cast")
_W_RANK = (tf.errors.InvalidArgumentError, r"waveform must be float32 \[batch, samples\]")
_W_NAN = (tf.errors.InvalidArgumentError, "waveform has NaN or Inf values")
_W = tf.zeros([1, 16000])
_E = tf.zeros([1, 8])
_NAN_W = tf.tensor_scatter_nd_update(_W, [[0, 123]], [np.nan])
_BAD_REQUESTS = {
    "waveform_float64": ("tag_waveform", dict(waveform=tf.zeros([1, 16000], tf.float64)),
                         *_DTYPE),
    "waveform_rank1": ("tag_waveform", dict(waveform=tf.zeros([16000])), *_W_RANK),
    "waveform_rank3": ("tag_waveform", dict(waveform=tf.zeros([1, 16000, 1])), *_W_RANK),
    "waveform_all_nan": ("tag_waveform", dict(waveform=tf.fill([1, 16000], np.nan)), *_W_NAN),
    "waveform_one_nan": ("tag_waveform", dict(waveform=_NAN_W), *_W_NAN),
    "waveform_inf": ("tag_waveform", dict(waveform=tf.fill([2, 16000], np.inf)), *_W_NAN),
    "waveform_empty": ("tag_waveform", dict(waveform=tf.zeros([1, 0])),
                       tf.errors.InvalidArgumentError, "empty waveform"),
    "waveform_oversize": ("tag_waveform", dict(waveform=tf.zeros([1, 16000 * 31])),
                          tf.errors.InvalidArgumentError, "longer than the maximum"),
    "log_mel_int": ("tag_log_mel", dict(log_mel=tf.zeros([1, 100, 64], tf.int32)),
                    *_DTYPE),
    "log_mel_rank2": ("tag_log_mel", dict(log_mel=tf.zeros([100, 64])),
                      tf.errors.InvalidArgumentError,
                      r"log_mel must be float32 \[batch, frames, 64\]"),
    "log_mel_nan": ("tag_log_mel", dict(log_mel=tf.fill([1, 100, 64], np.nan)),
                    tf.errors.InvalidArgumentError, "log_mel has NaN or Inf values"),
    "log_mel_bins": ("tag_log_mel", dict(log_mel=tf.zeros([1, 100, 40])),
                     (ValueError, tf.errors.InvalidArgumentError), "shape|64 mel bins"),
    "log_mel_empty": ("tag_log_mel", dict(log_mel=tf.zeros([1, 0, 64])),
                      tf.errors.InvalidArgumentError, "at least 96 frames"),
    "log_mel_oversize": ("tag_log_mel", dict(log_mel=tf.zeros([1, 3100, 64])),
                         tf.errors.InvalidArgumentError, "longer than the maximum"),
    "av_float64": ("tag_audiovisual", dict(waveform=tf.zeros([1, 16000], tf.float64),
                                           embedding_mean=_E), *_DTYPE),
    "av_rank1": ("tag_audiovisual", dict(waveform=tf.zeros([16000]), embedding_mean=_E),
                 *_W_RANK),
    "av_embedding_rank1": ("tag_audiovisual", dict(waveform=_W, embedding_mean=tf.zeros([8])),
                           tf.errors.InvalidArgumentError,
                           r"embedding_mean must be float32 \[batch, 8\]"),
    "av_nan_waveform": ("tag_audiovisual", dict(waveform=_NAN_W, embedding_mean=_E), *_W_NAN),
    "av_nan_embedding": ("tag_audiovisual", dict(waveform=_W,
                                                 embedding_mean=tf.fill([1, 8], np.nan)),
                         tf.errors.InvalidArgumentError, "embedding_mean has NaN or Inf"),
    "av_embedding_dim": ("tag_audiovisual", dict(waveform=_W, embedding_mean=tf.zeros([1, 5])),
                         (ValueError, tf.errors.InvalidArgumentError), "shape|8 values"),
    "av_empty": ("tag_audiovisual", dict(waveform=tf.zeros([1, 0]), embedding_mean=_E),
                 tf.errors.InvalidArgumentError, "empty waveform"),
    "av_oversize": ("tag_audiovisual", dict(waveform=tf.zeros([1, 16000 * 31]),
                                            embedding_mean=_E),
                    tf.errors.InvalidArgumentError, "longer than the maximum"),
    "av_batch_mismatch": ("tag_audiovisual", dict(waveform=_W, embedding_mean=tf.zeros([2, 8])),
                          tf.errors.InvalidArgumentError, "same number of clips"),
}


@pytest.mark.parametrize("case", sorted(_BAD_REQUESTS))
def test_every_signature_rejects_bad_requests(exported, case):
  """Wrong dtype, wrong rank, empty and oversize inputs fail with a clear error, never a
  crash or a silently wrong answer (docs/reliability.md)."""
  name, request, error, message = _BAD_REQUESTS[case]
  sig = tf.saved_model.load(exported[0]["path"]).signatures[name]
  with pytest.raises(error, match=message):
    sig(**request)


def test_audiovisual_signature(exported):
  sig = tf.saved_model.load(exported[0]["path"]).signatures["tag_audiovisual"]
  out = sig(waveform=tf.random.uniform([2, 32000], -0.1, 0.1),
            embedding_mean=tf.random.normal([2, 8]))
  assert out["fused_scores"].shape == (2, C)
  alpha = out["attention_weights"].numpy()
  assert np.all((alpha >= 0) & (alpha <= 1))


def test_next_version_and_errors(exported, tmp_path):
  _, _, paths, base = exported
  again = export.export_saved_model(paths["audio"], paths["labels"], base)
  assert again["path"].endswith(os.path.join("av_sound", "2"))
  assert "tag_audiovisual" not in again["signatures"]
  with pytest.raises(ValueError, match="exists"):
    export.export_saved_model(paths["audio"], paths["labels"], base, version=1)
  with pytest.raises(ValueError, match="both a visual model and a fusion model"):
    export.export_saved_model(paths["audio"], paths["labels"], base,
                              visual_model_path=paths["visual"])
  with pytest.raises(ValueError, match="not an audio MIL model"):
    export.export_saved_model(paths["visual"], paths["labels"], base)
  with pytest.raises(FileNotFoundError):
    export.export_saved_model(str(tmp_path / "none.keras"), paths["labels"], base)


def test_saved_model_cli(exported, tmp_path):
  path = exported[0]["path"]
  npy = str(tmp_path / "waveform.npy")
  np.save(npy, np.zeros([1, 16000], np.float32))
  cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
  show = subprocess.run([cli, "show", "--all", "--dir", path], capture_output=True, text=True,
                        timeout=300)
  assert show.returncode == 0, show.stderr[-2000:]
  for name in ("tag_waveform", "tag_log_mel", "tag_audiovisual", "class_map",
               "serving_default", "clip_scores", "segment_scores"):
    assert name in show.stdout, name
  run = subprocess.run([cli, "run", "--dir", path, "--tag_set", "serve", "--signature_def",
                        "tag_waveform", "--inputs", f"waveform={npy}"],
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-2000:]
  assert "clip_scores" in run.stdout


def test_binary(exported, tmp_path):
  _, _, paths, _ = exported
  res = run_binary("export", f"--audio_model={paths['audio']}", f"--labels={paths['labels']}",
                   f"--export_base={tmp_path}", f"--tflite_dir={tmp_path / 'tflite'}",
                   "--tflite_variants=float32", timeout=600)
  assert res.returncode == 0, res.stderr[-2000:]
  assert "verified against Keras" in res.stdout
  # The TFLite model is checked too, on test signals (no --data_dir), and says so.
  line = next(l for l in res.stdout.splitlines() if l.startswith("tflite float32:"))
  assert "verified against Keras on 16 windows: max abs diff " in line and "<= 0.0001" in line
  info = json.load(open(tmp_path / "tflite" / "audio_tagger.json"))
  assert info["verification"]["float32"]["max_abs_diff"] <= 1e-4
  res = run_binary("export", f"--audio_model={tmp_path}/missing.keras",
                   f"--labels={paths['labels']}", f"--export_base={tmp_path}", timeout=600)
  assert res.returncode == 2 and "Traceback" not in res.stderr
  assert "Audio model not found" in res.stderr
