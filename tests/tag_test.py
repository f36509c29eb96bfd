"""bin/tag on real files, sound-event timelines, and a TF Serving gRPC request."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from av_sound_tf.serving import export
from av_sound_tf.core import labels
from av_sound_tf.modeling import models
from av_sound_tf.serving import tagging
from av_sound_tf.serving import tflite
from tests.conftest import REPO, run_binary, shared_path


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
  video = shared_path("video")
  # The folder's media files (9 in ../shared/data, 8 in the vendored subset).
  in_folder = sorted(n for _, _, names in os.walk(video) for n in names
                     if os.path.splitext(n)[1] in (".mp4", ".mp3", ".webm", ".ogg", ".wav"))
  assert "moviepy_chaplin.mp4" in in_folder and len(in_folder) >= 8
  out = str(tmp_path / "tags.json")
  res = _tag(f"--model={saved}", f"--output={out}", "--top_k=2", clip, video,
             str(bad), str(tmp_path / "missing.ogg"))
  assert res.returncode == 1, res.stderr[-2000:]
  total = len(in_folder) + 3  # + the clip, the broken file and the missing one
  assert "Traceback" not in res.stderr and f"2 of {total} inputs failed" in res.stderr
  results = json.load(open(out))
  by_name = {os.path.basename(r["path"]): r for r in results}
  assert len(results) == total
  assert by_name["broken.wav"]["status"] == "failed" and by_name["broken.wav"]["reason"]
  assert by_name["missing.ogg"]["reason"] == "no such file or folder"
  for name in ["1-100032-A.ogg"] + in_folder:  # every one tagged
    r = by_name[name]
    assert r["status"] == "ok" and r["reason"] == ""
    scores = [l["score"] for l in r["labels"]]
    assert len(scores) == 2 and scores == sorted(scores, reverse=True)
    assert set(r["labels"][0]) == {"name", "mid", "score"}
    assert r["labels"][0]["name"] in ("Alpha", "Beta, b", "Gamma")
  assert "FAILED: no such file or folder" in res.stdout


def test_timeline_and_csv(exported, tmp_path):
  saved, _, _ = exported
  video = shared_path("video", "moviepy_big_buck_bunny_0_30.webm")  # 30 s
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
  assert len(as_json["timeline"]["times"]) == 91
  assert list(as_json["timeline"]["scores"]) == [l["name"] for l in result.labels]
  assert as_json["events"] and {"name", "mid", "start", "end", "peak"} == set(
      as_json["events"][0])
  times = result.timeline["times"]
  # 30.02 s of audio (3,001 frames): the whole-file pass's segments, one every 0.32 s
  # (tests/streaming_test.py proves the scores equal one call on the whole waveform).
  assert len(times) == models.num_segments(3001) == 91
  np.testing.assert_allclose(times, np.arange(91) * 0.32)
  # File score = mean of every segment score (average pooling over the recording).
  np.testing.assert_allclose([l["score"] for l in result.labels],
                             [x.mean() for x in result.timeline["scores"].values()], atol=1e-5)
  # With a threshold of 0 every class is one event over the whole recording.
  assert sorted((e["name"], e["start"], e["end"]) for e in result.events) == sorted(
      (name, 0.0, round(90 * 0.32 + 0.96, 2)) for name in tagger.names)


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
  from av_sound_tf.core import embedders
  from av_sound_tf.modeling import fusion
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
  audio_only = tagger.tag_file(shared_path("esc10", "001 - Dog bark", "1-100032-A.ogg"))
  assert audio_only.status == "ok" and "modality" not in audio_only.labels[0]


# ---- Bad model files, non-regular inputs, output written as it goes (issue 14) ------------

def _tflite_cases(lite, tmp_path):
  """name -> (model path, message part); each model has its class map beside it."""
  good = open(lite, "rb").read()
  class_map = open(lite[:-len(".tflite")] + ".labels.csv", "rb").read()
  rng = np.random.default_rng(0)
  cases = {
      "truncated_half": (good[:len(good) // 2], "truncated or damaged TFLite model"),
      "truncated_tail": (good[:-8], "truncated or damaged TFLite model"),
      "empty": (b"", "empty file (0 bytes), not a TFLite model"),
      "random_bytes": (rng.integers(0, 256, 5000, np.uint8).tobytes(),
                       "not a TFLite model (no TFL3 file identifier"),
  }
  out = {}
  for name, (content, message) in cases.items():
    path = tmp_path / f"{name}.tflite"
    path.write_bytes(content)
    (tmp_path / f"{name}.labels.csv").write_bytes(class_map)
    out[name] = (str(path), message)
  # A good model under a name without .tflite (its labels beside it, as "<name>.labels.csv"
  # would be if the suffix were cut blindly): refused by the naming rule, not guessed at.
  wrong = tmp_path / "tagger.bin"
  wrong.write_bytes(good)
  (tmp_path / "tagger.labels.csv").write_bytes(class_map)
  (tmp_path / "tag.labels.csv").write_bytes(class_map)
  out["wrong_name"] = (str(wrong), "a TFLite tagger's name must end in .tflite")
  return out


@pytest.mark.parametrize("case", ["truncated_half", "truncated_tail", "empty", "random_bytes",
                                  "wrong_name"])
def test_bad_tflite_models_are_refused_with_one_line(exported, tmp_path, case):
  """Before: a truncated .tflite crashed bin/tag (segmentation fault, exit 139), an empty one
  said "`model_path` or `model_content` must be specified", random bytes a UTF-8 decode
  error, and "tagger.bin" looked for "tag.labels.csv" (the name cut by 7 characters)."""
  _, lite, _ = exported
  path, message = _tflite_cases(lite, tmp_path)[case]
  res = _tag(f"--model={path}", "--tflite", shared_path("esc10", "001 - Dog bark",
                                                        "1-100032-A.ogg"))
  assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
  assert "Traceback" not in res.stderr
  error = [l for l in res.stderr.splitlines() if l.startswith("tag: error:")]
  assert len(error) == 1 and f"tag: error: {path}: {message}" in error[0], res.stderr[-2000:]


def test_tflite_model_checks_cover_every_truncation(exported):
  """The byte check (what stands between a file and the interpreter's crash) refuses the
  model cut at any point: every one of the last 300 bytes and 200 random cuts."""
  _, lite, _ = exported
  good = open(lite, "rb").read()
  tflite.check_model_bytes(good, lite)  # the whole file passes
  cuts = list(range(len(good) - 300, len(good))) + list(
      np.random.default_rng(0).integers(0, len(good), 200))
  for cut in cuts:
    with pytest.raises(ValueError, match="not a TFLite model|truncated|empty"):
      tflite.check_model_bytes(good[:cut], "cut.tflite")


def test_fifo_and_other_non_regular_inputs_are_refused_up_front(exported, tmp_path):
  """A FIFO among the inputs (named, or inside a folder) used to hang bin/tag forever (and
  nothing was written). expand_inputs refuses it with the reason before any decoding."""
  saved, _, _ = exported
  folder = tmp_path / "inputs"
  folder.mkdir()
  clip = shared_path("esc10", "001 - Dog bark", "1-100032-A.ogg")
  os.mkfifo(folder / "pipe.wav")
  fifo = str(tmp_path / "named_pipe.ogg")
  os.mkfifo(fifo)
  found, refused = tagging.expand_inputs([clip, fifo, str(folder), str(tmp_path / "none.ogg")])
  assert found == [clip]
  assert refused == [(fifo, "not a regular file: a FIFO (named pipe)"),
                     (str(folder / "pipe.wav"), "not a regular file: a FIFO (named pipe)"),
                     (str(tmp_path / "none.ogg"), "no such file or folder")]
  out = str(tmp_path / "tags.json")
  res = run_binary("tag", f"--model={saved}", f"--output={out}", clip, fifo, str(folder),
                   timeout=120)  # the old code never returned
  assert res.returncode == 1, res.stderr[-2000:]
  by_path = {r["path"]: r for r in json.load(open(out))}
  assert by_path[clip]["status"] == "ok"
  assert by_path[fifo] == {"path": fifo, "status": "failed", "labels": [],
                           "reason": "not a regular file: a FIFO (named pipe)",
                           "duration_seconds": 0.0}
  assert by_path[str(folder / "pipe.wav")]["status"] == "failed"
  assert f"{fifo}: FAILED: not a regular file: a FIFO (named pipe)" in res.stdout


def test_output_that_cannot_be_written_fails_before_the_model_is_loaded(tmp_path):
  """--output in a missing folder, under a file, or in an unwritable folder: one clear line
  and exit 2 before any work (the model path here does not even exist: it is never read).
  Before: the model was loaded and every file tagged, then writing failed."""
  clip = shared_path("esc10", "001 - Dog bark", "1-100032-A.ogg")
  (tmp_path / "a_file").write_text("x")
  cases = {str(tmp_path / "missing" / "tags.json"): "does not exist",
           str(tmp_path / "a_file" / "tags.csv"): "is not a folder"}
  for output, message in cases.items():
    with pytest.raises((FileNotFoundError, PermissionError), match=message):
      tagging.ResultWriter(output)
  readonly = tmp_path / "readonly"
  readonly.mkdir()
  readonly.chmod(0o555)
  unwritable = str(readonly)
  if not _cannot_create(unwritable):  # root ignores the mode: try sysfs
    unwritable = "/sys"
    if not os.path.isdir(unwritable) or not _cannot_create(unwritable):
      pytest.skip("no unwritable folder available to this user")
  with pytest.raises(PermissionError, match="cannot write results to .*tags.json"):
    tagging.ResultWriter(os.path.join(unwritable, "tags.json"))
  assert not os.path.exists(os.path.join(unwritable, "tags.json.incomplete"))
  missing_output = str(tmp_path / "missing" / "tags.json")
  res = _tag(f"--model={tmp_path}/no_such_model", f"--output={missing_output}", clip)
  assert res.returncode == 2 and "Traceback" not in res.stderr
  assert f"tag: error: cannot write results to {missing_output}: " \
         f"{tmp_path / 'missing'} does not exist" in res.stderr, res.stderr[-2000:]


def _cannot_create(folder):
  try:
    open(os.path.join(folder, ".probe"), "w").close()
  except OSError:
    return True
  os.remove(os.path.join(folder, ".probe"))
  return False


def _many_recordings(folder, count=300):
  """`count` distinct 2 s noise recordings (16-bit WAV): enough files that bin/tag is still
  running when a test kills it (the tests need no data set for that)."""
  import soundfile  # pylint: disable=g-import-not-at-top
  folder.mkdir()
  rng = np.random.default_rng(0)
  for i in range(count):
    soundfile.write(str(folder / f"rec{i:03d}.wav"),
                    (0.1 * rng.standard_normal(32000)).astype(np.float32), 16000,
                    subtype="PCM_16")
  return str(folder)


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_killed_run_keeps_every_finished_result(exported, tmp_path, suffix):
  """kill -9 of bin/tag after some files are done: --output is a valid JSON list (or CSV)
  holding those files' results. Before: it was written only at the end, so nothing."""
  saved, _, _ = exported
  esc = _many_recordings(tmp_path / "recordings")
  out = tmp_path / f"tags{suffix}"
  proc = subprocess.Popen([sys.executable, os.path.join(REPO, "bin", "tag"),
                           f"--model={saved}", f"--output={out}", "--top_k=2", esc],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  done = []
  deadline = time.time() + 300
  try:
    while len(done) < 3:
      assert proc.poll() is None, "bin/tag finished before it could be killed"
      assert time.time() < deadline, "timed out waiting for results"
      time.sleep(0.05)
      try:
        done = _read_results(out, suffix)
      except (OSError, ValueError):  # not there yet (or caught mid-write: read it again)
        done = []
  finally:
    proc.send_signal(signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL
  results = _read_results(out, suffix)  # parses: the file is complete after every result
  expected = tagging.expand_inputs([esc])[0]
  # Killed mid-run (the old code wrote all 300 results at the end or nothing).
  assert 3 <= len(results) < len(expected) == 300
  assert [r["path"] for r in results] == expected[:len(results)]
  assert all(r["status"] == "ok" for r in results)


def _read_results(path, suffix):
  if suffix == ".json":
    return json.load(open(path))
  rows = list(csv.DictReader(open(path)))
  assert all(r["rank"] in ("1", "2") for r in rows)
  return [r for r in rows if r["rank"] == "1"]  # one per file


def test_result_writer_keeps_the_output_valid_after_every_result(tmp_path):
  """Local: after each add the file is a valid JSON list / CSV holding exactly the results
  so far (the same JSON as one json.dumps at the end). Other file systems (ram:// here, like
  gs://) are rewritten whole, at most every remote_interval seconds, and by close()."""
  results = [tagging.TagResult("a.wav", "ok", "", [{"name": "A", "mid": "/m/a", "score": 0.9}],
                               1.0),
             tagging.TagResult("b, \"quoted\".wav", "failed", "not a readable media file"),
             tagging.TagResult("c.wav", "ok", "", [{"name": "B", "mid": "/m/b", "score": 0.4},
                                                   {"name": "A", "mid": "/m/a", "score": 0.1}],
                               2.5)]
  for suffix in (".json", ".csv"):
    path = tmp_path / f"tags{suffix}"
    path.write_text("an earlier run's output")
    writer = tagging.ResultWriter(str(path))
    assert path.read_text() == "an earlier run's output"  # untouched until the first result
    for n in range(1, len(results) + 1):
      writer.add(results[n - 1])
      if suffix == ".json":
        assert json.load(open(path)) == [r.to_dict() for r in results[:n]]
      else:
        assert list(csv.DictReader(open(path))) == [
            {k: str(v) for k, v in row.items()} | {f: "" for f in tagging.CSV_FIELDS
                                                    if f not in row}
            for row in tagging.csv_rows(results[:n])]
    writer.close()
  empty = tagging.ResultWriter(str(tmp_path / "none.json"))
  empty.close()
  assert json.load(open(tmp_path / "none.json")) == []
  remote = "ram://tag_test/tags.json"
  writer = tagging.ResultWriter(remote, remote_interval=3600)
  writer.add(results[0])  # the first result is written at once
  writer.add(results[1])  # within the interval: kept for the next rewrite
  assert json.loads(tf.io.gfile.GFile(remote).read()) == [results[0].to_dict()]
  writer.close()
  assert json.loads(tf.io.gfile.GFile(remote).read()) == [r.to_dict() for r in results[:2]]


def test_sigterm_closes_the_output(exported, tmp_path):
  """SIGTERM (preemption) unwinds bin/tag like Ctrl-C: the output holds every result."""
  saved, _, _ = exported
  out = tmp_path / "tags.json"
  proc = subprocess.Popen([sys.executable, os.path.join(REPO, "bin", "tag"),
                           f"--model={saved}", f"--output={out}",
                           _many_recordings(tmp_path / "recordings")],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not (out.exists() and out.stat().st_size > 100):
    assert proc.poll() is None and time.time() < deadline
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=60) == 128 + signal.SIGTERM
  results = json.load(open(out))
  assert 1 <= len(results) < 300 and all(r["status"] == "ok" for r in results)
