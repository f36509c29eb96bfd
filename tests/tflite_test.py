"""TFLite tagger: conversion of every variant and parity with the SavedModel on ESC-10, for
both audio architectures (the paper's model and the on-device student), and the TFLite
Model Metadata on each (MediaPipe's AudioClassifier on it: tests/metadata_test.py)."""

import csv
import glob
import io
import json
import os
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf

from av_sound_tf.serving import export
from av_sound_tf.core import labels
from av_sound_tf.serving import metadata
from av_sound_tf.core import media
from av_sound_tf.modeling import models
from av_sound_tf.serving import tflite
from data_prep import featurize
from data_prep import inputs
from data_prep import prepare
from tests.conftest import shared_path


@pytest.fixture(scope="module", params=sorted(models.AUDIO_ARCHITECTURES))
def converted(tmp_path_factory, request):
  tmp = tmp_path_factory.mktemp("tflite")
  esc = shared_path("esc10")
  rows = ["path,labels"] + [f"{p},{p.split('/')[-2][6:]}" for p in
                            sorted(glob.glob(os.path.join(esc, "*", "1-*.ogg")))[:12]]
  (tmp / "list.csv").write_text("\n".join(rows) + "\n")
  data = str(tmp / "data")
  found = inputs.from_file_list(str(tmp / "list.csv"))
  prepare.prepare(found, featurize.PrepareConfig(output_dir=data, num_shards=1), num_workers=0)
  keras.utils.set_random_seed(0)
  model = models.AUDIO_ARCHITECTURES[request.param](
      num_classes=found.label_map.num_classes, num_frames=128, width=0.125)
  model_path = str(tmp / "audio.keras")
  model.save(model_path)
  labels_path = os.path.join(data, "class_labels_indices.csv")
  paths = tflite.convert(model_path, labels_path, str(tmp / "out"), data_dir=data,
                         split="data", calibration_windows=12)
  saved = export.export_saved_model(model_path, labels_path, str(tmp / "serving"))["path"]
  return saved, paths


def _windows(n=16):
  clips = sorted(glob.glob(os.path.join(shared_path("esc10"), "*", "5-*.ogg")))[::10][:n]
  return [media.decode_audio(c)[:16000][None, :] for c in clips]


def test_variants_exist_with_labels(converted):
  _, paths = converted
  assert sorted(paths) == ["float16", "float32", "int8"]
  sizes = {v: os.path.getsize(p) for v, p in paths.items()}
  # The front end stays float32 in every variant (about 70 KB: the 257 x 64 mel matrix and
  # the window); only the network's weights shrink. Compare what is left besides it. int8
  # adds quantization parameters per tensor, which weigh in a tiny model (the 0.125-width
  # student here: 88 KB of float32 network -> 49 KB); at full size it is 0.25x (14.9 of
  # 58.7 MB, docs/benchmarks.md).
  front_end = 70_000
  net = {v: s - front_end for v, s in sizes.items()}
  assert net["float16"] < 0.6 * net["float32"] and net["int8"] < 0.6 * net["float32"], sizes
  for p in paths.values():
    assert os.path.exists(tflite.labels_path_for(p))


def test_parity_with_the_savedmodel(converted):
  """Thresholds: float32 max |diff| <= 1e-4; float16 <= 2e-2; int8 mean |diff| <= 0.03 and
  max <= 0.15 (a random-weight model: its scores sit near 0.5, so top-k agreement is not a
  meaningful check here; docs/benchmarks.md gives top-1/top-5 for a trained model)."""
  saved, paths = converted
  tag_waveform = tf.saved_model.load(saved).signatures["tag_waveform"]
  windows = _windows()
  reference = np.stack([tag_waveform(waveform=tf.constant(w))["clip_scores"].numpy()[0]
                        for w in windows])
  for variant, limit in (("float32", 1e-4), ("float16", 2e-2)):
    runner = tflite.Runner(paths[variant])
    got = np.stack([runner(w)["clip_scores"][0] for w in windows])
    assert np.max(np.abs(got - reference)) <= limit, variant
  runner = tflite.Runner(paths["int8"])
  got = np.stack([runner(w)["clip_scores"][0] for w in windows])
  diff = np.abs(got - reference)
  assert diff.mean() <= 0.03 and diff.max() <= 0.15, (diff.mean(), diff.max())


def test_int8_keeps_the_front_end_in_float(converted):
  interpreter = tf.lite.Interpreter(converted[1]["int8"])
  details = {t["index"]: t for t in interpreter.get_tensor_details()}
  ops = interpreter._get_ops_details()  # pylint: disable=protected-access
  log = [op for op in ops if op["op_name"] == "LOG"]
  assert log and all(details[op["outputs"][0]]["dtype"] == np.float32 for op in log)
  convs = [op for op in ops if op["op_name"] == "CONV_2D"]
  assert convs and all(details[op["outputs"][0]]["dtype"] == np.int8 for op in convs)


def test_every_variant_carries_metadata(converted):
  """float32, float16 and int8, of the paper's model and of the student (mobile_mil, what
  bin/distill trains and bin/export converts through the same `convert`): the metadata,
  read back with MediaPipe's MetadataDisplayer, describes the input as 16 kHz mono audio
  with its window length, and packs the class map (checked against the CSV, and against
  the zip read with the standard library) as the clip scores' label files."""
  _, paths = converted
  data = os.path.join(os.path.dirname(os.path.dirname(paths["float32"])), "data")
  with open(os.path.join(data, "class_labels_indices.csv"), newline="") as f:
    rows = list(csv.DictReader(f))
  mids, names = [r["mid"] for r in rows], [r["display_name"] for r in rows]
  assert len(rows) >= 2  # the classes of the fixture's 12 clips
  for variant, path in paths.items():
    content = open(path, "rb").read()
    meta = metadata.read(content)
    assert meta["name"] == f"audio_tagger_{variant}"
    (graph,) = meta["subgraph_metadata"]
    (waveform,) = graph["input_tensor_metadata"]
    assert waveform["name"] == "waveform"
    assert waveform["content"] == {"content_properties_type": "AudioProperties",
                                   "content_properties": {"sample_rate": 16000, "channels": 1}}
    assert waveform["description"].startswith(
        "1 s window of 16000 Hz mono audio: float32 waveform [1, 16000] (16000 samples)")
    outputs = {t["name"]: t for t in graph["output_tensor_metadata"]}
    assert sorted(outputs) == ["clip_scores", "segment_scores"]
    clip = outputs["clip_scores"]
    assert clip["stats"] == {"max": [1.0], "min": [0.0]}
    assert [(f["name"], f["type"], f.get("locale")) for f in clip["associated_files"]] == [
        ("labels.txt", "TENSOR_AXIS_LABELS", None), ("labels_en.txt", "TENSOR_AXIS_LABELS", "en")]
    assert metadata.packed_file(content, "labels.txt").decode().split("\n") == mids
    assert metadata.packed_file(content, "labels_en.txt").decode().split("\n") == names
    with zipfile.ZipFile(io.BytesIO(content)) as archive:  # independent of the library
      assert archive.read("labels_en.txt").decode().split("\n") == names
    label_map, source = tflite.read_label_map(path)
    assert source == "metadata" and label_map.mids == mids and label_map.names == names
    details = tf.lite.Interpreter(model_content=content).get_input_details()
    assert [list(d["shape"]) for d in details] == [[1, 16000]]
    # MediaPipe's AudioClassifier takes the file as it is: the clip_scores head, labelled,
    # scores as our interpreter does on a real window.
    window = _windows(1)[0]
    expected = tflite.Runner(path)(window)["clip_scores"][0]
    got = _mediapipe_clip_scores(path, window[0])
    assert [c.display_name for c in got] == [names[c.index] for c in got]
    np.testing.assert_allclose([c.score for c in sorted(got, key=lambda c: c.index)],
                               expected, atol=1e-5, err_msg=variant)


def _mediapipe_clip_scores(path, window):
  """The categories of the clip_scores head that MediaPipe's AudioClassifier gives for one
  16 kHz window."""
  from mediapipe.tasks.python.audio import audio_classifier  # pylint: disable=g-import-not-at-top
  from mediapipe.tasks.python.components.containers import audio_data  # pylint: disable=g-import-not-at-top
  from mediapipe.tasks.python.core import base_options  # pylint: disable=g-import-not-at-top
  options = audio_classifier.AudioClassifierOptions(
      base_options=base_options.BaseOptions(model_asset_path=path), max_results=-1)
  with audio_classifier.AudioClassifier.create_from_options(options) as classifier:
    (result,) = classifier.classify(audio_data.AudioData.create_from_array(window, 16000))
  (head,) = [c for c in result.classifications if c.head_name == "clip_scores"]
  return head.categories


def test_runner_rejects_wrong_window(converted):
  with pytest.raises(ValueError, match="windows of 16000 samples"):
    tflite.Runner(converted[1]["float32"])(np.zeros(8000, np.float32))


def test_errors(tmp_path):
  with pytest.raises(FileNotFoundError):
    tflite.convert(str(tmp_path / "none.keras"), str(tmp_path / "l.csv"), str(tmp_path))


def test_conversion_verifies_every_variant(converted):
  """convert runs each variant through the interpreter on the representative windows and
  reports its max |diff| to the Keras model (before, its docstring said so and nothing
  ran). Thresholds as in test_parity_with_the_savedmodel."""
  _, paths = converted
  checks = paths.verification
  assert sorted(checks) == ["float16", "float32", "int8"]
  for variant, limit in (("float32", 1e-4), ("float16", 2e-2), ("int8", 0.15)):
    check = checks[variant]
    assert check["windows"] == 12 and check["tolerance"] == tflite.TOLERANCES[variant]
    assert 0 <= check["max_abs_diff"] <= limit, (variant, check)
    assert check["mean_abs_diff"] <= check["max_abs_diff"]
  assert checks["float32"]["top1_agreement"] == 1.0
  info = json.load(open(paths.info_path))
  assert info["verification"] == checks
  assert info["verified_against"].startswith("the Keras model's clip scores on 12 windows")


def _tiny_model(tmp_path):
  keras.utils.set_random_seed(0)
  model = models.MILConvNet(num_classes=3, num_frames=128, width=0.0625)
  path = str(tmp_path / "audio.keras")
  model.save(path)
  labels_path = str(tmp_path / "labels.csv")
  labels.LabelMap(["/m/a", "/m/b", "/m/c"], ["A", "B", "C"]).to_csv(labels_path)
  return path, labels_path


def test_a_variant_that_disagrees_fails_the_conversion(tmp_path, monkeypatch):
  """A converted model whose scores differ from the Keras model's (here: the interpreter's
  output shifted by 0.5, or NaN) fails convert, naming the variant, and is not written.
  Without data_dir the check runs on deterministic test signals."""
  model_path, labels_path = _tiny_model(tmp_path)
  good = tflite.convert(model_path, labels_path, str(tmp_path / "good"), variants=("float32",))
  check = good.verification["float32"]
  assert check["windows"] == tflite.TEST_SIGNAL_WINDOWS and check["max_abs_diff"] <= 1e-5
  call = tflite.Runner.__call__
  for name, damage, shown in (("shifted", lambda x: x + 0.5, "5.00e-01"),
                              ("nan", lambda x: x * np.nan, "nan")):
    monkeypatch.setattr(tflite.Runner, "__call__", lambda self, w, damage=damage: {
        k: damage(v) if k == "clip_scores" else v for k, v in call(self, w).items()})
    out = tmp_path / name
    with pytest.raises(ValueError, match=rf"TFLite float32 model .*audio_tagger_float32.tflite "
                       rf"differs from the Keras model by {shown} \(> 0.0001\)"):
      tflite.convert(model_path, labels_path, str(out), variants=("float32",))
    assert not (out / "audio_tagger_float32.tflite").exists()


def test_labels_rule_and_runner_checks(converted, tmp_path):
  assert tflite.labels_path_for("out/a_float32.tflite") == "out/a_float32.labels.csv"
  for name in ("model.bin", "model.tflite.bak", ".tflite", "out/.tflite"):
    with pytest.raises(ValueError, match="must end in .tflite"):
      tflite.labels_path_for(name)
  runner = tflite.Runner(converted[1]["float32"])
  window = np.zeros(16000, np.float32)
  window[5] = np.nan
  with pytest.raises(ValueError, match="NaN or Inf"):
    runner(window)
  fifo = str(tmp_path / "pipe.tflite")
  os.mkfifo(fifo)
  with pytest.raises(ValueError, match="not a regular file: a FIFO"):
    tflite.Runner(fifo)
  with pytest.raises(FileNotFoundError, match="TFLite model not found"):
    tflite.Runner(str(tmp_path / "none.tflite"))
  yamnet = os.path.join(os.path.dirname(shared_path("esc10")), "..", "models", "yamnet_tflite",
                        "yamnet.tflite")
  if os.path.exists(yamnet):  # a real TFLite model, but no signature: not our tagger
    with pytest.raises(ValueError, match="not a TFLite tagger from bin/export"):
      tflite.Runner(yamnet)
