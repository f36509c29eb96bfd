"""TFLite Model Metadata of the on-device tagger (serving/metadata.py): MediaPipe's
AudioClassifier runs an exported tagger as it is and agrees with bin/tag --tflite on a real
ESC-10 recording; bin/tag reads the class map from the metadata (the sidecar is only the
fallback for models written before metadata); damaged packed files are refused.

The metadata on every variant (float32, float16, int8) of both architectures (the paper's
model and the on-device student) is checked in tests/tflite_test.py, on its conversions.
"""

import csv
import io
import json
import logging
import os
import shutil
import zipfile

import keras
import numpy as np
import pytest

from av_sound_tf.core import labels
from av_sound_tf.core import media
from av_sound_tf.modeling import models
from av_sound_tf.serving import metadata
from av_sound_tf.serving import tflite
from tests.conftest import REPO, run_binary, shared_path

ESC10 = ["Dog bark", "Rain", "Sea waves", "Baby cry", "Clock tick", "Person sneeze",
         "Helicopter", "Chainsaw", "Rooster", "Fire crackling"]
LEGACY = os.path.join(REPO, "tests", "data", "legacy_df56a22", "tflite",
                      "audio_tagger_float32.tflite")


@pytest.fixture(scope="module")
def tagger(tmp_path_factory):
  """A float32 tagger over the ESC-10 class names, its class map and a real recording.

  Random weights, with the score layer scaled up so that the classes' scores lie apart
  (at init they all sit within 1e-3 of 0.5): the top labels are then well defined."""
  tmp = tmp_path_factory.mktemp("metadata")
  keras.utils.set_random_seed(3)
  model = models.MILConvNet(num_classes=len(ESC10), num_frames=128, width=0.0625)
  kernel = next(w for w in model.weights if w.path == "segment_scores/kernel")
  kernel.assign(kernel * 40.0)
  model_path = str(tmp / "audio.keras")
  model.save(model_path)
  labels_path = str(tmp / "labels.csv")
  labels.LabelMap([f"/esc10/{i:02d}" for i in range(len(ESC10))], ESC10).to_csv(labels_path)
  lite = tflite.convert(model_path, labels_path, str(tmp / "lite"), variants=("float32",))
  clip = shared_path("esc10", "001 - Dog bark", "1-100032-A.ogg")
  return {"model": model_path, "labels": labels_path, "tflite": lite["float32"], "clip": clip,
          "tmp": tmp}


def _without_sidecar(lite, folder):
  """A copy of the .tflite alone in `folder` (no <name>.labels.csv beside it)."""
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, os.path.basename(lite))
  shutil.copy(lite, path)
  assert not os.path.exists(tflite.labels_path_for(path))
  return path


def _tag_json(model, clip, out, *extra):
  res = run_binary("tag", f"--model={model}", "--tflite", f"--output={out}", *extra, clip,
                   timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  (result,) = json.load(open(out))
  assert result["status"] == "ok", result
  return result


def test_mediapipe_audio_classifier_agrees_with_bin_tag(tagger, tmp_path):
  """MediaPipe's AudioClassifier (mediapipe==0.10.21, the pinned environment) loads the
  exported file with nothing but its metadata (sample rate, label files) and, on the windows
  bin/tag --tflite slid over a 5 s ESC-10 recording (its --timeline times), gives per window
  the clip scores of the head named clip_scores; their mean ranks the classes as bin/tag
  does: the same top-5 names and MIDs, scores equal to 1e-5 (bin/tag rounds to 6 places)."""
  from mediapipe.tasks.python.audio import audio_classifier  # pylint: disable=g-import-not-at-top
  from mediapipe.tasks.python.components.containers import audio_data  # pylint: disable=g-import-not-at-top
  from mediapipe.tasks.python.core import base_options  # pylint: disable=g-import-not-at-top
  model = _without_sidecar(tagger["tflite"], str(tmp_path / "alone"))
  tagged = _tag_json(model, tagger["clip"], str(tmp_path / "tags.json"), "--top_k=5",
                     "--timeline")
  starts = np.round(np.asarray(tagged["timeline"]["times"]) * 16000).astype(int)
  assert len(starts) == 9  # 5 s: windows of 1 s every 0.5 s

  waveform = media.decode_audio(tagger["clip"])
  waveform = np.pad(waveform, (0, max(0, starts[-1] + 16000 - len(waveform))))
  options = audio_classifier.AudioClassifierOptions(
      base_options=base_options.BaseOptions(model_asset_path=model), max_results=-1)
  per_window = []
  with audio_classifier.AudioClassifier.create_from_options(options) as classifier:
    for s in starts:
      (result,) = classifier.classify(audio_data.AudioData.create_from_array(
          waveform[s:s + 16000], 16000))
      heads = {c.head_name: c for c in result.classifications}
      assert sorted(heads) == ["clip_scores", "segment_scores"]
      scores = np.zeros(len(ESC10))
      for category in heads["clip_scores"].categories:
        scores[category.index] = category.score
        assert category.category_name == f"/esc10/{category.index:02d}"  # labels.txt
        assert category.display_name == ESC10[category.index]  # labels_en.txt (locale en)
      per_window.append(scores)
  mean = np.mean(per_window, axis=0)
  top = np.argsort(-mean)[:5]
  assert [ESC10[c] for c in top] == [l["name"] for l in tagged["labels"]]
  assert [f"/esc10/{c:02d}" for c in top] == [l["mid"] for l in tagged["labels"]]
  np.testing.assert_allclose(mean[top], [l["score"] for l in tagged["labels"]], atol=1e-5)
  assert np.min(-np.diff(mean[top])) > 1e-4  # the ranking is not decided by rounding


def test_bin_tag_reads_the_class_map_from_the_metadata(tagger, tmp_path):
  """The class map comes from the metadata first: with the sidecar deleted bin/tag tags as
  before, and a wrong sidecar beside the model (names changed) is not used."""
  reference = _tag_json(tagger["tflite"], tagger["clip"], str(tmp_path / "ref.json"))
  alone = _without_sidecar(tagger["tflite"], str(tmp_path / "alone"))
  assert _tag_json(alone, tagger["clip"], str(tmp_path / "alone.json"))["labels"] == \
      reference["labels"]
  wrong = labels.LabelMap([f"/wrong/{i}" for i in range(len(ESC10))],
                          [f"wrong {i}" for i in range(len(ESC10))])
  wrong.to_csv(tflite.labels_path_for(alone))
  label_map, source = tflite.read_label_map(alone)
  assert source == "metadata" and label_map.names == ESC10
  assert tflite.read_label_map(tagger["tflite"])[1] == "metadata"


def test_models_without_metadata_use_the_sidecar(tagger, tmp_path):
  """The tagger of commit df56a22 (no metadata) still gets its class map from
  <name>.labels.csv; without either, the error names both."""
  content = open(LEGACY, "rb").read()
  assert not metadata.has_metadata(content) and metadata.read(content) is None
  label_map, source = tflite.read_label_map(LEGACY)
  assert source == tflite.labels_path_for(LEGACY)
  with open(source, newline="") as f:
    assert label_map.names == [r["display_name"] for r in csv.DictReader(f)]
  alone = _without_sidecar(LEGACY, str(tmp_path / "legacy"))
  with pytest.raises(FileNotFoundError, match=r"no class map: the model has no TFLite "
                     r"metadata and .*audio_tagger_float32.labels.csv"):
    tflite.read_label_map(alone)


def test_without_the_library_nothing_is_written_and_reading_falls_back(tagger, tmp_path,
                                                                        monkeypatch, caplog):
  """Without mediapipe, convert refuses before any work (one line with the install command:
  no tagger without metadata), and a tagger with metadata is read from its sidecar with a
  warning, or refused naming both when there is none."""
  def missing():
    raise metadata.MissingLibraryError(f"TFLite metadata needs {metadata.REQUIREMENT} "
                                       f"(No module named 'mediapipe'); install it with "
                                       f"{metadata.INSTALL_HINT}")
  monkeypatch.setattr(metadata, "_library", missing)
  out = tmp_path / "lite"
  with pytest.raises(ValueError, match=r"TFLite metadata needs mediapipe==0\.10\.21 .*"
                     r"pip install 'av-sound-tf\[tflite\]'"):
    tflite.convert(tagger["model"], tagger["labels"], str(out), variants=("float32",))
  assert not out.exists()
  with caplog.at_level(logging.WARNING):
    label_map, source = tflite.read_label_map(tagger["tflite"])
  assert source == tflite.labels_path_for(tagger["tflite"]) and label_map.names == ESC10
  assert "class map from" in caplog.text
  alone = _without_sidecar(tagger["tflite"], str(tmp_path / "alone"))
  with pytest.raises(FileNotFoundError, match="its class map is in its TFLite metadata, which "
                     "cannot be read here"):
    tflite.read_label_map(alone)


def test_damaged_packed_label_files_are_refused(tagger):
  """The label files are a zip archive after the flatbuffer: a file cut anywhere in it, or
  a changed byte in a label file, still parses as a model but is refused (one line)."""
  good = open(tagger["tflite"], "rb").read()
  tflite.check_model_bytes(good, "good.tflite")
  with zipfile.ZipFile(io.BytesIO(good)) as archive:
    infos = {i.filename: i for i in archive.infolist()}
  assert sorted(infos) == [metadata.MIDS_FILE, metadata.NAMES_FILE]
  first = min(i.header_offset for i in infos.values())
  for cut in (len(good) - 1, len(good) - 30, first + 40, first + 2, first):
    with pytest.raises(ValueError, match=r"cut.tflite: truncated or damaged TFLite model: "
                       r"the associated files \[.*labels.*\] that its metadata records are "
                       r"not packed"):
      tflite.check_model_bytes(good[:cut], "cut.tflite")
  info = infos[metadata.NAMES_FILE]
  data_at = info.header_offset + 30 + len(info.filename) + len(info.extra)
  changed = bytearray(good)
  changed[data_at] ^= 0x20  # "Dog bark" -> "dog bark" (stored, not deflated)
  with pytest.raises(ValueError, match=r"bad.tflite: damaged TFLite model: its packed "
                     r"associated files do not read back \(bad: labels_en.txt\)"):
    tflite.check_model_bytes(bytes(changed), "bad.tflite")


def test_write_refuses_a_class_map_that_does_not_fit(tagger):
  content = open(LEGACY, "rb").read()  # 3 classes, no metadata
  with pytest.raises(ValueError, match="x.tflite: the model scores 3 classes, the class map "
                     "has 2"):
    metadata.write(content, labels.LabelMap(["/m/a", "/m/b"], ["a", "b"]), 16000,
                   path="x.tflite")
  with pytest.raises(ValueError, match=r"x.tflite: class 1: display name 'b\\nc' cannot go "
                     "into a one-label-per-line"):
    metadata.write(content, labels.LabelMap(["/m/a", "/m/b", "/m/c"], ["a", "b\nc", "d"]),
                   16000, path="x.tflite")
  written = metadata.write(content, labels.LabelMap(["/m/a", "/m/b", "/m/c"], ["a", "b", "c"]),
                           16000, path="x.tflite")
  assert metadata.read_label_map(written, "x.tflite").names == ["a", "b", "c"]
  assert metadata.read(written)["subgraph_metadata"][0]["input_tensor_metadata"][0][
      "content"]["content_properties"] == {"sample_rate": 16000, "channels": 1}
