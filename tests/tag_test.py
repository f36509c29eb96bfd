"""bin/tag on real files, sound-event timelines, and a TF Serving gRPC request."""

import csv
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from av_sound_tf import export
from av_sound_tf import labels
from av_sound_tf import models
from av_sound_tf import tagging
from av_sound_tf import tflite
from tests.conftest import run_binary, shared_path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("tag")
  keras.utils.set_random_seed(1)
  model = models.MILConvNet(num_classes=3, num_frames=128, width=0.0625)
  model_path = str(tmp / "audio.keras")
  model.save(model_path)
  labels_path = str(tmp / "labels.csv")
  labels.LabelMap(["/m/a", "/m/b", "/m/c"], ["Alpha", "Beta, b", "Gamma"]).to_csv(labels_path)
  saved = export.export_saved_model(model_path, labels_path, str(tmp / "serving"))["path"]
  lite = tflite.convert(model_path, labels_path, str(tmp / "tflite"), variants=("float32",))
  return saved, lite["float32"], tmp


def _tag(*args):
  return run_binary("tag", *args, timeout=600)


def test_tag_files_folders_and_bad_inputs(exported, tmp_path):
  saved, _, _ = exported
  bad = tmp_path / "broken.wav"
  bad.write_text("not audio")
  clip = shared_path("esc10", "001 - Dog bark", "1-100032-A.ogg")
  out = str(tmp_path / "tags.json")
  res = _tag(f"--model={saved}", f"--output={out}", "--top_k=2", clip, shared_path("video"),
             str(bad), str(tmp_path / "missing.ogg"))
  assert res.returncode == 1, res.stderr[-2000:]
  assert "Traceback" not in res.stderr and "2 of 12 inputs failed" in res.stderr
  results = json.load(open(out))
  by_name = {os.path.basename(r["path"]): r for r in results}
  assert len(results) == 12  # 1 clip + the folder's 9 files + the broken and missing ones
  assert by_name["broken.wav"]["status"] == "failed" and by_name["broken.wav"]["reason"]
  assert by_name["missing.ogg"]["reason"] == "no such file or folder"
  for name in ("1-100032-A.ogg", "moviepy_chaplin.mp4", "moviepy_crunching.mp3",
               "moviepy_video_with_failing_audio.mp4", "moviepy_big_buck_bunny_0_30.webm"):
    r = by_name[name]
    assert r["status"] == "ok" and r["reason"] == ""
    scores = [l["score"] for l in r["labels"]]
    assert len(scores) == 2 and scores == sorted(scores, reverse=True)
    assert set(r["labels"][0]) == {"name", "mid", "score"}
    assert r["labels"][0]["name"] in ("Alpha", "Beta, b", "Gamma")
  assert "FAILED: no such file or folder" in res.stdout


def test_timeline_and_csv(exported, tmp_path):
  saved, _, _ = exported
  video = shared_path("video", "moviepy_big_buck_bunny_0_30.webm")  # 30 s: three windows
  out = str(tmp_path / "tags.csv")
  res = _tag(f"--model={saved}", f"--output={out}", "--timeline", "--threshold=0.0",
             "--plot", f"--plot_dir={tmp_path}/plots", video)
  assert res.returncode == 0, res.stderr[-2000:]
  assert "events" in res.stdout
  png = tmp_path / "plots" / "moviepy_big_buck_bunny_0_30.webm.png"
  assert png.read_bytes()[:4] == b"\x89PNG"
  rows = list(csv.DictReader(open(out)))
  assert [r["rank"] for r in rows] == ["1", "2", "3"]
  tagger = tagging.Tagger(saved, top_k=3)
  result = tagger.tag_file(video, timeline=True, threshold=0.0)
  as_json = result.to_dict()
  assert len(as_json["timeline"]["times"]) == 87
  assert sorted(as_json["timeline"]["scores"]) == sorted(l["name"] for l in result.labels)
  assert as_json["events"] and {"name", "mid", "start", "end", "peak"} == set(
      as_json["events"][0])
  times = result.timeline["times"]
  # 30.02 s of audio: three 10 s windows of 29 segments; the 0.02 s sliver is dropped.
  assert len(times) == 3 * models.num_segments(999) == 87
  np.testing.assert_allclose(times[29], 10.0)
  assert np.all(np.diff(times) > 0) and times[-1] < 30.0
  # File score = mean of every segment score (average pooling over the recording).
  np.testing.assert_allclose([l["score"] for l in result.labels],
                             np.sort(result.timeline["scores"].mean(axis=0))[::-1], atol=1e-5)


def test_tflite_tagging(exported):
  _, lite, _ = exported
  res = _tag(f"--model={lite}", "--tflite", shared_path("video", "moviepy_chaplin.mp4"))
  assert res.returncode == 0, res.stderr[-2000:]
  assert "moviepy_chaplin.mp4 (9.6 s)" in res.stdout


def test_events_from_scores():
  times = np.arange(6) * 0.32
  scores = np.array([[0.1, 0.9], [0.7, 0.9], [0.8, 0.2], [0.2, 0.1], [0.6, 0.9], [0.1, 0.9]])
  events = tagging.events_from_scores(times, scores, ["a", "b"], ["/m/a", "/m/b"], 0.5, 0.96)
  # Runs whose receptive fields (0.96 s) overlap merge into one event.
  assert events == [
      {"name": "b", "mid": "/m/b", "start": 0.0, "end": 2.56, "peak": 0.9},
      {"name": "a", "mid": "/m/a", "start": 0.32, "end": 2.24, "peak": 0.8},
  ]
  apart = tagging.events_from_scores(np.arange(8) * 0.32, np.array(
      [[0.9], [0.1], [0.1], [0.1], [0.1], [0.9], [0.1], [0.1]]), ["a"], ["/m/a"], 0.5, 0.96)
  assert [(e["start"], e["end"]) for e in apart] == [(0.0, 0.96), (1.6, 2.56)]


def test_grpc_predict_request(exported):
  """The TF Serving gRPC request for the default signature (tensorflow-serving-api protos)."""
  from tensorflow_serving.apis import predict_pb2
  saved, _, _ = exported
  request = predict_pb2.PredictRequest()
  request.model_spec.name = "av_sound"
  request.model_spec.signature_name = "serving_default"
  waveform = np.zeros([1, 16000], np.float32)
  request.inputs["waveform"].CopyFrom(tf.make_tensor_proto(waveform))
  parsed = predict_pb2.PredictRequest.FromString(request.SerializeToString())
  signature = tf.saved_model.load(saved).signatures["serving_default"]
  (spec,) = signature.structured_input_signature[1].values()
  tensor = parsed.inputs["waveform"]
  assert tensor.dtype == spec.dtype.as_datatype_enum
  assert [d.size for d in tensor.tensor_shape.dim] == [1, 16000]
  out = signature(waveform=tf.make_ndarray(tensor))
  assert out["clip_scores"].shape == (1, 3)


def test_audiovisual_tagging_of_videos(exported, tmp_path):
  """With tag_audiovisual and a frame embedder, videos are fused and each top class says
  which modality dominated; audio-only files are tagged from audio."""
  from av_sound_tf import embedders
  from av_sound_tf import fusion
  _, _, tmp = exported
  keras.utils.set_random_seed(2)
  visual = models.VisualDNN(num_classes=3, embedding_dim=32, width=0.01)
  stats = dict(audio_mean=np.full(3, 0.5), audio_variance=np.full(3, 0.01),
               visual_mean=np.full(3, 0.5), visual_variance=np.full(3, 0.01))
  paths = {}
  for name, model in (("visual", visual), ("fusion", fusion.FusionModel(3, "attention",
                                                                         **stats))):
    paths[name] = str(tmp_path / f"{name}.keras")
    model.save(paths[name])
  saved = export.export_saved_model(str(tmp / "audio.keras"), str(tmp / "labels.csv"),
                                    str(tmp_path / "serving"), visual_model_path=paths["visual"],
                                    fusion_model_path=paths["fusion"])["path"]
  tagger = tagging.Tagger(saved, top_k=3, embedder=embedders.build_embedder("tiny", None, 64))
  video = tagger.tag_file(shared_path("video", "openl3_bento.mp4"))
  assert video.status == "ok"
  assert all(l["modality"] in ("audio", "visual") and 0 <= l["alpha_audio"] <= 1
             for l in video.labels)
  audio_only = tagger.tag_file(shared_path("video", "moviepy_crunching.mp3"))
  assert audio_only.status == "ok" and "modality" not in audio_only.labels[0]
