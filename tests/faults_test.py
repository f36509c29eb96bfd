"""Fault injection: bad media, bad labels, damaged shards, NaN, kill -9, unsafe models.

Each test pins one row of docs/reliability.md: the input or fault, and what the system
must do with it (a clear answer naming the file, nothing silently lost).
"""

import glob
import os
import shutil
import signal
import subprocess
import sys
import time

import av
import keras
import numpy as np
import pytest
import soundfile
import tensorflow as tf

from av_sound_tf.core import features
from av_sound_tf.core import labels
from av_sound_tf.core import schema
from av_sound_tf.train import callbacks
from av_sound_tf.train import distillation
from av_sound_tf.train import training
from data_prep import featurize
from data_prep import inputs
from data_prep import prepare
from tests import synthetic
from tests.conftest import REPO, run_binary, shared_path
from tests.prep_helpers import read_manifest, shard_bytes, write_list

DOG = "001 - Dog bark/1-100032-A.ogg"


def _wav(path, data, rate, subtype="PCM_16"):
  soundfile.write(str(path), data, rate, subtype=subtype)
  return str(path)


def _cut(path, size):
  with open(path, "r+b") as f:
    f.truncate(size)
  return path


def _video_without_audio(path):
  with av.open(str(path), "w") as c:
    s = c.add_stream("libx264", rate=10)
    s.width, s.height, s.pix_fmt = 64, 64, "yuv420p"
    for i in range(20):
      frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), 10 * i, np.uint8), "rgb24")
      for packet in s.encode(frame):
        c.mux(packet)
    for packet in s.encode():
      c.mux(packet)
  return str(path)


@pytest.fixture(scope="module")
def bad_media(tmp_path_factory):
  """Every media case of the issue, as files, with the behaviour each must get."""
  d = tmp_path_factory.mktemp("media")
  dog = open(shared_path("esc10", DOG), "rb").read()
  mp4 = open(shared_path("video", "moviepy_chaplin.mp4"), "rb").read()
  rng = np.random.default_rng(0)
  (d / "empty.mp4").write_bytes(b"")
  (d / "truncated.mp4").write_bytes(mp4[:len(mp4) // 2])
  (d / "truncated.ogg").write_bytes(dog[:len(dog) // 2])
  webm = open(shared_path("video", "moviepy_big_buck_bunny_0_30.webm"), "rb").read()
  (d / "truncated.webm").write_bytes(webm[:len(webm) // 2])
  fire = open(shared_path("video", "moviepy_fire2.mp4"), "rb").read()  # index first
  (d / "truncated_indexed.mp4").write_bytes(fire[:len(fire) // 2])
  (d / "dog_really_ogg.mp3").write_bytes(dog)
  (d / "notes.wav").write_text("this is a text file\n" * 50)
  nan = np.full(32000, 0.1, np.float32)
  nan[100:200] = np.nan
  spaced = d / "dir with space"
  spaced.mkdir()
  # Another clip: a byte-identical copy of `dog` would be a duplicate (issue 14).
  shutil.copy(shared_path("esc10", "001 - Dog bark", "1-110389-A.ogg"),
              spaced / "ünïcødé 声音 clip.ogg")
  sine = lambda rate, n: 0.3 * np.sin(2 * np.pi * 440 * np.arange(n) / rate)  # pylint: disable=unnecessary-lambda-assignment
  cases = {
      # name: (path, status, reason or warning part, expected log-mel frames or None)
      "empty": (str(d / "empty.mp4"), "failed", "not a readable media file", None),
      "truncated_mp4": (str(d / "truncated.mp4"), "failed", "not a readable media file", None),
      # What decodes is kept (its real length is in duration_seconds) and the row says
      # that the file looks cut: Ogg declares no length, but its last page lacks the
      # end-of-stream mark; WebM and an mp4 with its index first declare the full length.
      "truncated_ogg": (str(d / "truncated.ogg"), "written", "decoded 2.0 s; the Ogg stream "
                        "ends without its end-of-stream page (truncated?)", 202),
      "truncated_webm": (str(d / "truncated.webm"), "written", "decoded 14.5 s of the 30.0 s "
                         "the container declares (truncated?)", 1444),
      "truncated_indexed_mp4": (str(d / "truncated_indexed.mp4"), "written", "decoded 1.0 s "
                                "of the 2.3 s the container declares (truncated?)", 103),
      "wrong_extension": (str(d / "dog_really_ogg.mp3"), "written", "", 499),
      "text_as_wav": (str(d / "notes.wav"), "failed", "not a readable media file", None),
      "no_audio_track": (_video_without_audio(d / "silent_film.mp4"), "failed",
                         "no audio track", None),
      "broken_audio_track": (shared_path("video", "moviepy_video_with_failing_audio.mp4"),
                             "written", "digital silence", None),
      "shorter_than_window": (_wav(d / "tiny.wav", np.zeros(100), 16000), "failed",
                              "audio too short", None),
      "all_zero": (_wav(d / "zeros.wav", np.zeros(32000), 16000), "written",
                   "digital silence for 100%", 199),
      "nan_samples": (_wav(d / "nan.wav", nan, 16000, "FLOAT"), "failed", "NaN or Inf", None),
      "8khz": (_wav(d / "8k.wav", sine(8000, 16000), 8000), "written", "", 199),
      "48khz": (_wav(d / "48k.wav", sine(48000, 96000), 48000), "written", "", 199),
      "6_channels": (_wav(d / "6ch.wav", 0.1 * rng.normal(size=(32000, 6)), 16000), "written",
                     "", 199),
      "75_seconds": (_wav(d / "long.wav", 0.1 * rng.normal(size=16000 * 75), 16000), "written",
                     "75 s long: kept the first 60 s", features.DEFAULT_PARAMS.num_frames(
                         16000 * 60)),
      # Cut at 30 s of the 75 s its header declares (FFmpeg itself reports 30 s for it).
      "truncated_wav": (_cut(_wav(d / "long_cut.wav", 0.1 * rng.normal(size=16000 * 75),
                                  16000), 44 + 2 * 16000 * 30), "written",
                        "decoded 30.0 s of the 75.0 s the container declares (truncated?)",
                        features.DEFAULT_PARAMS.num_frames(16000 * 30)),
      "spaces_non_ascii": (str(spaced / "ünïcødé 声音 clip.ogg"), "written", "", 499),
  }
  return cases


def test_every_bad_media_case_is_accounted_for(bad_media, tmp_path):
  rows = [(path, "Dog") for path, _, _, _ in bad_media.values()]
  file_list = write_list(tmp_path / "list.csv", rows)
  out = tmp_path / "out"
  summary = prepare.prepare(inputs.from_file_list(file_list),
                            featurize.PrepareConfig(output_dir=str(out)), num_workers=0,
                            progress_every=0)
  manifest = {r["path"]: r for r in read_manifest(out)}
  assert summary.total == len(manifest) == len(bad_media)  # 100 % accounted for
  frames = {ex["source_path"].numpy().decode(): int(ex["num_frames"]) for ex in
            schema.read_examples(schema.list_shards(str(out), "data"), 1)}
  for name, (path, status, message, num_frames) in bad_media.items():
    row = manifest[path]
    assert row["status"] == status, (name, row)
    text = row["reason"] if status == "failed" else row.get("warnings", "")
    assert message in text, (name, row)
    if status == "written":  # no truncation warning where none is due
      assert ("(truncated?)" in text) == ("(truncated?)" in message), (name, row)
    if status == "failed":
      assert path not in frames
    elif num_frames is not None:
      assert frames[path] == num_frames, name
  assert summary.written == sum(s == "written" for _, s, _, _ in bad_media.values())


@pytest.mark.parametrize("max_seconds,warnings", [
    (10, "30 s long: kept the first 10 s"),
    (20, "30 s long: kept the first 20 s; decoded 14.5 s of the 20.0 s the container "
         "declares for 0-20 s (truncated?)"),
    (0, "decoded 14.5 s of the 30.0 s the container declares (truncated?)")])
def test_truncation_is_judged_against_the_part_kept(tmp_path, max_seconds, warnings):
  """--max_seconds cuts are not truncations: a cut WebM (30 s declared, 14.5 s decode) is
  complete for its first 10 s, and short of the first 20 s."""
  webm = open(shared_path("video", "moviepy_big_buck_bunny_0_30.webm"), "rb").read()
  path = tmp_path / "cut.webm"
  path.write_bytes(webm[:len(webm) // 2])
  out = tmp_path / "out"
  prepare.prepare(inputs.from_file_list(write_list(tmp_path / "list.csv", [(path, "Dog")])),
                  featurize.PrepareConfig(output_dir=str(out), max_seconds=max_seconds),
                  num_workers=0, progress_every=0)
  [row] = read_manifest(out)
  assert (row["status"], row["warnings"]) == ("written", warnings)


def test_label_faults_in_a_segment_list(tmp_path):
  """Unknown MIDs, duplicate rows, malformed rows and empty label lists: each row gets a
  manifest line with the file and line number; good rows are still written."""
  media_dir = tmp_path / "media"
  media_dir.mkdir()
  for ytid in ("aaaaaaaaaaa", "bbbbbbbbbbb", "ccccccccccc"):
    shutil.copy(shared_path("esc10", DOG), media_dir / f"{ytid}.ogg")
  segs = tmp_path / "segs.csv"
  segs.write_text("# YTID, start_seconds, end_seconds, positive_labels\n"
                  'aaaaaaaaaaa, 0.000, 10.000, "/m/0bt9lr"\n'
                  'bbbbbbbbbbb, 0.000, 10.000, "/m/0bt9lr,/m/zzzzzz"\n'
                  'aaaaaaaaaaa, 0.000, 10.000, "/m/0bt9lr"\n'
                  "ccccccccccc, 0.000\n"
                  'ddddddddddd, 0.000, 10.000, ""\n')
  classes = labels.LabelMap(["/m/0bt9lr"], ["Dog"])
  found = inputs.from_segments(str(segs), str(media_dir), classes)
  out = tmp_path / "out"
  summary = prepare.prepare(found, featurize.PrepareConfig(output_dir=str(out)), num_workers=0,
                            progress_every=0)
  reasons = {r["path"]: (r["status"], r["reason"]) for r in read_manifest(out)}
  assert reasons[str(media_dir / "aaaaaaaaaaa.ogg")] == ("written", "")
  status, reason = reasons[str(media_dir / "bbbbbbbbbbb.ogg")]
  assert status == "failed" and "/m/zzzzzz" in reason and "line 3" in reason
  assert "duplicate" in reasons[f"{segs}:4"][1]
  assert "expected 4 fields" in reasons[f"{segs}:5"][1]
  assert "empty label list" in reasons[f"{segs}:6"][1]
  # ccccccccccc's file has no valid row: it is listed too, not dropped.
  assert reasons[str(media_dir / "ccccccccccc.ogg")][1] == "no row for this file in the list"
  assert summary.written == 1 and summary.total == len(reasons) == 6


def test_unbalanced_quote_in_a_file_list_swallows_no_row(tmp_path):
  """bin/prepare_data on a list whose line 3 opens a quote it never closes: line 3 is a
  failed manifest row naming the lines a CSV reader would have joined, lines 4 and 5 are
  written (before, they vanished into line 3's record and line 5 was blamed)."""
  esc = shared_path("esc10")
  clips = [os.path.join(esc, c) for c in ("001 - Dog bark/1-100032-A.ogg",
                                          "001 - Dog bark/1-110389-A.ogg",
                                          "002 - Rain/1-17367-A.ogg",
                                          "002 - Rain/1-21189-A.ogg")]
  file_list = tmp_path / "list.csv"
  file_list.write_text(f"path,labels\n{clips[0]},Dog\n\"{clips[1]},Dog\n{clips[2]},Rain\n"
                       f"\"{clips[3]}\",\"Rain\"\n")
  out = tmp_path / "out"
  res = run_binary("prepare_data", f"--file_list={file_list}", f"--output_dir={out}",
                   "--num_workers=0", "--progress_every=0", "--max_failure_fraction=0.5")
  assert res.returncode == 0, res.stderr[-2000:]
  reason = ("unbalanced quote: a '\"' opens a field that does not close on this line (a CSV "
            "reader would join lines 3-5 into one row)")
  assert f"{file_list}:3: {reason}" in res.stderr
  rows = {r["path"]: (r["status"], r["reason"]) for r in read_manifest(out)}
  assert rows == {clips[0]: ("written", ""), f"{file_list}:3": ("failed", reason),
                  clips[2]: ("written", ""), clips[3]: ("written", "")}
  # An open quote in the header stops the run with one line naming it.
  file_list.write_text(f"\"path,labels\n{clips[0]},Dog\n")
  res = run_binary("prepare_data", f"--file_list={file_list}", f"--output_dir={out}_2")
  assert res.returncode == 2 and "Traceback" not in res.stderr
  assert f"{file_list}:1: bad header line: unbalanced quote" in res.stderr


# ---- Damaged shards and non-finite features --------------------------------------------

@pytest.fixture
def prepared(tmp_path):
  out = str(tmp_path / "prepared")
  synthetic.write_prepared(out, splits=(("train", 24), ("validation", 8)), shards=3,
                           num_frames=(100, 120))
  return out


def _corrupt(path, how):
  data = bytearray(open(path, "rb").read())
  if how == "flip":  # one byte inside a record's payload: its CRC no longer matches
    data[len(data) // 2] ^= 0xFF
  elif how == "truncate":  # cut mid-record, as a crashed writer or a partial copy leaves it
    data = data[:len(data) // 2]
  open(path, "wb").write(bytes(data))


def _config(prepared, model_dir, **kw):
  return training.TrainConfig(
      kind="audio", model_dir=model_dir, data_dir=prepared, width=0.0625, num_frames=96,
      batch_size=4, epochs=1, verbose=0, **kw)


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_damaged_shard_is_named_and_can_be_skipped(prepared, tmp_path, how):
  bad = os.path.join(prepared, "train-00001-of-00003.tfrecord")
  _corrupt(bad, how)
  with pytest.raises(schema.CorruptShardError, match="train-00001-of-00003.tfrecord"):
    training.train(_config(prepared, str(tmp_path / "strict")))
  summary = training.train(_config(prepared, str(tmp_path / "skip"), skip_corrupt_shards=True))
  assert [s["file"] for s in summary["skipped_shards"]] == [bad]
  assert "corrupted or truncated" in summary["skipped_shards"][0]["reason"]
  # Evaluation never runs on part of a split.
  from av_sound_tf.evaluate import evaluation  # pylint: disable=g-import-not-at-top
  with pytest.raises(schema.CorruptShardError, match="train-00001"):
    evaluation.evaluate_model(summary["model"], prepared, ["train"], str(tmp_path / "eval"))


def test_shard_cut_at_a_record_boundary_is_caught_by_the_count(prepared):
  path = os.path.join(prepared, "train-00000-of-00003.tfrecord")
  records = list(tf.data.TFRecordDataset(path).as_numpy_iterator())
  with tf.io.TFRecordWriter(path) as w:  # a valid file that lost its last record
    for r in records[:-1]:
      w.write(r)
  files = schema.list_shards(prepared, "train")
  with pytest.raises(schema.CorruptShardError, match="hold 23 records but bin/prepare_data "
                     "wrote 24"):
    schema.check_shards(files, expected_records=24)


def test_binary_names_the_damaged_shard(prepared, tmp_path):
  _corrupt(os.path.join(prepared, "validation-00002-of-00003.tfrecord"), "flip")
  res = run_binary("train_audio", f"--data_dir={prepared}", f"--model_dir={tmp_path / 'm'}",
                   "--width=0.0625", "--num_frames=96", "--epochs=1", "--batch_size=4")
  assert res.returncode == 2 and "Traceback" not in res.stderr
  assert "validation-00002-of-00003.tfrecord: corrupted or truncated" in res.stderr
  assert "--skip_corrupt_shards" in res.stderr


def test_non_finite_features_never_reach_the_loss(prepared, tmp_path):
  with pytest.raises(ValueError, match="log_mel has 1 non-finite"):
    schema.make_example("x", "x.wav", [0], ["/m/c0"], log_mel=np.array([[np.nan, 0.0]]))
  with pytest.raises(ValueError, match="beyond float16"):
    schema.make_example("x", "x.wav", [0], ["/m/c0"], log_mel=np.full([2, 2], 1e6))
  # A shard written by other code with a NaN in one clip: training stops and names it.
  good = schema.make_example("ok", "ok.wav", [0], ["/m/c0"],
                             log_mel=np.zeros([100, 64], np.float32))
  bad = tf.train.Example()
  bad.CopyFrom(good)
  values = np.zeros([100, 64], np.float16)
  values[5, 5] = np.nan
  bad.features.feature["log_mel"].bytes_list.value[0] = values.tobytes()
  bad.features.feature["clip_id"].bytes_list.value[0] = b"poisoned-clip"
  path = os.path.join(prepared, "train-00002-of-00003.tfrecord")
  records = list(tf.data.TFRecordDataset(path).as_numpy_iterator())
  with tf.io.TFRecordWriter(path) as w:
    for r in records[:-1]:
      w.write(r)
    w.write(bad.SerializeToString())
  with pytest.raises(tf.errors.InvalidArgumentError, match="Non-finite.*poisoned-clip"):
    training.train(_config(prepared, str(tmp_path / "nan")))


def test_diverging_loss_stops_with_a_clear_error():
  callback = callbacks.StopOnNonFiniteLoss()
  callback.on_train_batch_end(0, {"loss": 0.5})
  with pytest.raises(FloatingPointError, match="loss became nan at batch 3"):
    callback.on_train_batch_end(3, {"loss": float("nan")})


# ---- kill -9 -----------------------------------------------------------------------------

def _kill_when(cmd, ready, timeout=300, after=0.0):
  """Starts cmd, SIGKILLs it once ready() is true (plus `after` seconds); returns its rc."""
  proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + timeout
  while not ready():
    if proc.poll() is not None:
      raise AssertionError(f"{cmd[1]} finished before it could be killed")
    if time.time() > deadline:
      proc.kill()
      raise AssertionError("timed out waiting to kill")
    time.sleep(0.05)
  time.sleep(after)
  proc.send_signal(signal.SIGKILL)
  return proc.wait()


def test_kill_9_during_preparation_then_rerun(tmp_path):
  """SIGKILL mid-run, rerun: every input exactly once, manifest 100 %, and the same bytes
  as a run that was never interrupted."""
  esc = shared_path("esc10")
  rows = []
  for cls in sorted(os.listdir(esc)):
    if os.path.isdir(os.path.join(esc, cls)):
      clips = sorted(os.listdir(os.path.join(esc, cls)))[:4]
      rows += [(os.path.join(esc, cls, c), cls[6:]) for c in clips]
  file_list = write_list(tmp_path / "list.csv", rows)
  args = [f"--file_list={file_list}", "--num_shards=8", "--num_workers=0",
          "--progress_every=0"]
  ref = tmp_path / "reference"
  assert run_binary("prepare_data", *args, f"--output_dir={ref}").returncode == 0
  out = tmp_path / "killed"
  parts = out / ".manifest"
  rc = _kill_when([sys.executable, os.path.join(REPO, "bin", "prepare_data"), *args,
                   f"--output_dir={out}"],
                  lambda: parts.exists() and len(os.listdir(parts)) >= 3)
  assert rc == -signal.SIGKILL
  assert not (out / "manifest.csv").exists()  # it really died before finishing
  res = run_binary("prepare_data", *args, f"--output_dir={out}")
  assert res.returncode == 0, res.stderr[-2000:]
  assert shard_bytes(out) == shard_bytes(ref)
  manifest = read_manifest(out)
  assert sorted(r["path"] for r in manifest) == sorted(p for p, _ in rows)
  ids = [ex["clip_id"].numpy() for ex in
         schema.read_examples(schema.list_shards(str(out), "data"), 10)]
  assert len(ids) == len(set(ids)) == len(rows)


def test_kill_9_during_training_then_rerun(tmp_path):
  """SIGKILL mid-epoch, rerun: resumes from the backup and ends with the weights of an
  uninterrupted run. Stated tolerance: 1e-6 absolute (deterministic ops on CPU)."""
  data = str(tmp_path / "data")
  synthetic.write_prepared(data, splits=(("train", 32), ("validation", 8)),
                           num_frames=(100, 120))
  args = [f"--data_dir={data}", "--width=0.0625", "--num_frames=96", "--epochs=4",
          "--batch_size=4", "--steps_per_epoch=24", "--deterministic", "--noverbose"]
  straight = tmp_path / "straight"
  res = run_binary("train_audio", *args, f"--model_dir={straight}")
  assert res.returncode == 0, res.stderr[-2000:]
  killed = tmp_path / "killed"
  metadata = killed / "backup" / "training_metadata.json"
  rc = _kill_when([sys.executable, os.path.join(REPO, "bin", "train_audio"), *args,
                   f"--model_dir={killed}"], metadata.exists, after=0.3)
  assert rc == -signal.SIGKILL
  assert not (killed / "validation_metrics.json").exists()
  res = run_binary("train_audio", *args, f"--model_dir={killed}")
  assert res.returncode == 0, res.stderr[-2000:]
  assert "Resuming" in res.stderr
  a = keras.models.load_model(str(straight / "model.keras")).get_weights()
  b = keras.models.load_model(str(killed / "model.keras")).get_weights()
  for x, y in zip(a, b):
    np.testing.assert_allclose(x, y, atol=1e-6)


# ---- Untrusted artefacts -----------------------------------------------------------------

def test_models_with_code_are_refused(tmp_path):
  """A .keras file with a Lambda layer (arbitrary Python) is refused by every loader, with
  one line naming the file (before: Keras's raw "The `{arg_name}` of this `Lambda` layer"
  text and no file name). Every loader goes through model_files.load_keras_model."""
  inputs_ = keras.Input([4])
  outputs = keras.layers.Lambda(lambda x: x * 2)(inputs_)
  path = str(tmp_path / "evil.keras")
  keras.Model(inputs_, outputs).save(path)
  refusal = (f"{path}: refused to load: the model contains Python code (a Lambda layer), "
             "which Keras safe mode does not run. Load only models you trust")
  from av_sound_tf.evaluate import evaluation  # pylint: disable=g-import-not-at-top
  from av_sound_tf.serving import export  # pylint: disable=g-import-not-at-top
  from av_sound_tf.core import model_files  # pylint: disable=g-import-not-at-top
  from av_sound_tf.evaluate import predict  # pylint: disable=g-import-not-at-top
  from av_sound_tf.serving import tflite  # pylint: disable=g-import-not-at-top
  labels.LabelMap(["/m/a"], ["A"]).to_csv(str(tmp_path / "l.csv"))
  loaders = {
      "evaluation": lambda: evaluation.evaluate_model(path, str(tmp_path), ["x"],
                                                      str(tmp_path / "out")),
      "predict": lambda: predict.write_predictions(path, path, str(tmp_path), ["x"],
                                                   str(tmp_path / "pred")),
      "export": lambda: export.export_saved_model(path, str(tmp_path / "l.csv"),
                                                  str(tmp_path / "serving")),
      "tflite": lambda: tflite.convert(path, str(tmp_path / "l.csv"), str(tmp_path / "lite"),
                                       variants=("float32",)),
      "training": lambda: distillation.distillation_teacher(
          training.TrainConfig("audio", "", teacher_audio_model=path), None),
  }
  for name, load in loaders.items():
    with pytest.raises(model_files.UnsafeModelError) as refused:
      load()
    assert str(refused.value).startswith(refusal), (name, str(refused.value))
  res = run_binary("export", f"--audio_model={path}", f"--labels={tmp_path / 'l.csv'}",
                   f"--export_base={tmp_path / 'serving'}")
  assert res.returncode == 2 and "Traceback" not in res.stderr
  assert f"export: error: {refusal}" in res.stderr and "{arg_name}" not in res.stderr
  # No loader calls Keras directly (safe mode and the message live in one place).
  sources = glob.glob(os.path.join(REPO, "av_sound_tf", "**", "*.py"), recursive=True)
  assert len(sources) > 20
  direct = [path for path in sorted(sources) if not path.endswith("model_files.py") and
            "keras.models.load_model(" in open(path).read()]
  assert direct == []
