"""core.progress: the lines themselves (fake clock), and "N of N" at the end of every long
stage: prediction, evaluation, int8 calibration's windows and tagging."""

import os
import wave

import keras
import numpy as np
import pytest

from av_sound_tf.core import progress
from av_sound_tf.evaluate import evaluation
from av_sound_tf.evaluate import predict
from av_sound_tf.modeling import models
from av_sound_tf.serving import tflite
from tests import synthetic
from tests.conftest import REPO, run_binary


class FakeClock:

  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def _progress(total, **kwargs):
  clock, lines = FakeClock(), []
  return progress.Progress(total, log=lines.append, clock=clock, **kwargs), clock, lines


def test_lines_at_most_every_interval_and_always_the_last():
  p, clock, lines = _progress(10, stage="predict", unit="clips", every=5.0)
  clock.now += 2.0
  p.update(2)  # 2 s since the start: too soon
  assert lines == []
  clock.now += 3.0
  p.update(2)  # 5 s: a line
  clock.now += 1.0
  p.update(1, failed=True)  # 1 s since the last line
  clock.now += 4.0
  p.update(5)  # the last item: always logged
  p.finish()  # already logged: nothing more
  assert lines == [
      "[predict] 4 of 10 clips (40.0%), 0.8 clips/s, ETA 00:00:08",
      "[predict] 10 of 10 clips (100.0%), 1.0 clips/s, ETA 00:00:00, 1 failed",
  ]


def test_resumed_runs_unknown_totals_and_finish():
  p, clock, lines = _progress(100, stage="prepare", already_done=40, every=0)
  clock.now += 10.0
  p.update(20)
  assert lines == ["[prepare] 60 of 100 clips (60.0%), 2.0 clips/s, ETA 00:00:20"]
  p, clock, lines = _progress(None, stage="prepare", every=30.0)
  clock.now += 4.0
  p.update(2, failed=1)
  p.finish()  # not reached by an update: finish logs it
  assert lines == ["[prepare] 2 clips, 0.5 clips/s, 1 failed"]
  # Fewer items than announced (a short split): finish still logs the last count.
  p, clock, lines = _progress(8, stage="calibrate", unit="windows", every=60.0)
  clock.now += 2.0
  p.update(3)
  p.finish()
  assert lines == ["[calibrate] 3 of 8 windows (37.5%), 1.5 windows/s, ETA 00:00:03"]


def test_eta_format():
  assert progress.format_eta(3 * 3600 + 61.4) == "03:01:01"
  assert progress.format_eta(100 * 3600) == "100:00:00"
  assert progress.format_eta(float("inf")) == "?"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A prepared data set and untrained audio and visual models (outputs do not matter)."""
  tmp = tmp_path_factory.mktemp("progress")
  data = str(tmp / "data")
  synthetic.write_prepared(data, splits=(("train", 7), ("eval", 5)), num_frames=(120, 140))
  keras.utils.set_random_seed(0)
  audio = str(tmp / "audio.keras")
  models.MILConvNet(num_classes=4, num_frames=128, width=0.0625).save(audio)
  visual = str(tmp / "visual.keras")
  models.VisualDNN(num_classes=4, embedding_dim=16, width=0.0625).save(visual)
  return data, audio, visual, tmp


def _messages(caplog, stage):
  return [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"[{stage}")]


def test_predict_and_evaluate_end_with_n_of_n(tiny, caplog):
  data, audio, visual, tmp = tiny
  caplog.set_level("INFO")
  caplog.set_level("INFO", logger="absl")  # earlier tests in the process may lower absl's
  predict.write_predictions(audio, visual, data, ["train", "eval"], str(tmp / "preds"),
                            batch_size=3, log=lambda _: None, progress_every=3600)
  lines = _messages(caplog, "predict")
  assert [l.split(" clips")[0] for l in lines] == ["[predict train] 7 of 7",
                                                  "[predict eval] 5 of 5"], lines
  caplog.clear()
  evaluation.evaluate_model(audio, data, ["train", "eval"], str(tmp / "eval"), batch_size=4,
                            progress_every=3600)
  lines = _messages(caplog, "evaluate")
  assert len(lines) == 1 and lines[0].startswith("[evaluate] 12 of 12 clips (100.0%), "), lines


def test_calibration_windows_end_with_n_of_n(tiny, caplog, monkeypatch):
  data, _, _, _ = tiny
  monkeypatch.setattr(tflite.media, "decode_audio",
                      lambda path: np.zeros(24000, np.float32))
  caplog.set_level("INFO")
  caplog.set_level("INFO", logger="absl")  # earlier tests in the process may lower absl's
  windows = list(tflite.representative_windows(data, "train", 16000, count=5,
                                               progress_every=3600))
  assert len(windows) == 5
  lines = _messages(caplog, "calibrate")
  assert len(lines) == 1 and lines[0].startswith("[calibrate] 5 of 5 windows (100.0%), "), lines


def _write_wav(path, seconds=1.5, rate=16000):
  t = np.arange(int(seconds * rate)) / rate
  pcm = (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2")
  with wave.open(str(path), "wb") as w:
    w.setnchannels(1)
    w.setsampwidth(2)
    w.setframerate(rate)
    w.writeframes(pcm.tobytes())


def test_tag_reports_files_done(tmp_path):
  for i in range(3):
    _write_wav(tmp_path / f"clip{i}.wav")
  lite = os.path.join(REPO, "tests", "data", "legacy_df56a22", "tflite",
                      "audio_tagger_float32.tflite")
  res = run_binary("tag", f"--model={lite}", "--tflite", "--progress_every=3600",
                   str(tmp_path), timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  lines = [l for l in res.stderr.splitlines() if "[tag] " in l]
  assert len(lines) == 1 and "[tag] 3 of 3 files (100.0%), " in lines[0], res.stderr[-3000:]


def test_export_reports_int8_calibration_windows(tmp_path):
  """bin/export --progress_every reaches the int8 calibration: with a long interval only the
  last "N of N windows" line; with 0 one line per window."""
  from tests import prep_helpers  # pylint: disable=g-import-not-at-top
  for i in range(3):
    _write_wav(tmp_path / f"clip{i}.wav", seconds=2.0 + i)  # distinct files, not duplicates
  prep_helpers.write_list(tmp_path / "list.csv",
                          [(str(tmp_path / f"clip{i}.wav"), "a" if i % 2 else "b")
                           for i in range(3)])
  data = tmp_path / "data"
  prep_helpers.run_prepare(str(tmp_path / "list.csv"), data, num_shards=1)
  keras.utils.set_random_seed(0)
  audio = str(tmp_path / "audio.keras")
  models.MILConvNet(num_classes=2, num_frames=128, width=0.0625).save(audio)
  counts = {}
  for every in ("3600", "0"):
    res = run_binary("export", f"--audio_model={audio}",
                     f"--labels={data / 'class_labels_indices.csv'}",
                     f"--export_base={tmp_path / ('serving' + every)}",
                     f"--tflite_dir={tmp_path / ('tflite' + every)}", "--tflite_variants=int8",
                     f"--data_dir={data}", "--calibration_split=data",
                     "--tflite_int8_tolerance=1.0", f"--progress_every={every}", timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    counts[every] = [l for l in res.stderr.splitlines() if "[calibrate] " in l]
  # One window per decodable clip (3 here, of the 100 asked for).
  assert len(counts["3600"]) == 1 and "[calibrate] 3 of 100 windows" in counts["3600"][0], counts
  assert [l.split("[calibrate] ")[1].split(" windows")[0] for l in counts["0"]] == [
      "1 of 100", "2 of 100", "3 of 100"], counts
