"""bin/prepare_data and data_prep: shards, manifest accounting, resume, bad inputs."""

import csv
import glob
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from av_sound_tf.core import dataset_info
from av_sound_tf.core import files
from av_sound_tf.core import labels
from av_sound_tf.core import schema
from data_prep import featurize
from data_prep import inputs
from data_prep import prepare
from tests.conftest import run_binary, shared_path
from tests.prep_helpers import ESC_CLIPS, read_manifest, run_prepare, shard_bytes, write_list


@pytest.fixture
def esc_list(tmp_path):
  esc = shared_path("esc10")
  rows = [(os.path.join(esc, c), c.split("/")[0][6:]) for c in ESC_CLIPS]
  return write_list(tmp_path / "list.csv", rows)


def test_audio_shards_and_manifest(esc_list, tmp_path):
  out = tmp_path / "out"
  summary = run_prepare(esc_list, out, num_shards=2)
  assert (summary.total, summary.written, summary.failed) == (5, 5, 0)
  assert sorted(shard_bytes(out)) == ["data-00000-of-00002.tfrecord",
                                      "data-00001-of-00002.tfrecord"]
  info = dataset_info.DatasetInfo.read(str(out)).info
  assert info["num_classes"] == 3 and info["splits"]["data"]["num_examples"] == 5
  label_map = labels.LabelMap.from_csv(str(out / schema.LABELS_FILE))
  assert label_map.names == ["Clock tick", "Dog bark", "Rain"]
  ds = schema.read_examples(schema.list_shards(str(out), "data"), info["num_classes"])
  examples = list(ds)
  assert len(examples) == 5
  for ex in examples:
    # ~5 s ESC-10 clips: 1 + (samples - 256) // 160 frames (499 for exactly 5 s).
    samples = int(round(ex["duration_seconds"].numpy() * 16000))
    assert abs(ex["log_mel"].shape[0] - (1 + (samples - 256) // 160)) <= 1
    assert 490 <= ex["log_mel"].shape[0] <= 505 and ex["log_mel"].shape[1] == 64
    assert np.isfinite(ex["log_mel"].numpy()).all()
  assert examples[0]["labels"].numpy().tolist() == [0, 1, 0]  # Dog bark
  manifest = read_manifest(out)
  assert [r["status"] for r in manifest] == ["written"] * 5
  assert {(r["shard"], r["index_in_shard"]) for r in manifest} == {
      ("data-00000-of-00002.tfrecord", "0"), ("data-00000-of-00002.tfrecord", "1"),
      ("data-00000-of-00002.tfrecord", "2"), ("data-00001-of-00002.tfrecord", "0"),
      ("data-00001-of-00002.tfrecord", "1")}


def test_workers_give_the_same_shards(esc_list, tmp_path):
  run_prepare(esc_list, tmp_path / "a", num_workers=0)
  run_prepare(esc_list, tmp_path / "b", num_workers=2)
  assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")


def test_bad_inputs_are_accounted_for(tmp_path):
  esc = shared_path("esc10")
  good = os.path.join(esc, ESC_CLIPS[0])
  text = tmp_path / "notes.wav"
  text.write_text("not audio\n" * 100)
  short = tmp_path / "short.wav"
  import wave
  with wave.open(str(short), "wb") as w:
    w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
    w.writeframes(np.zeros(100, "<i2").tobytes())
  classes = labels.LabelMap(["/m/0bt9lr", "/m/06mb1"], ["Dog", "Rain"])
  file_list = write_list(tmp_path / "list.csv", [
      (good, "Dog"), (str(tmp_path / "missing.ogg"), "Dog"), (str(text), "Rain"),
      (str(short), "Rain"), (good.replace("100032", "110389"), "Unicorn"), ("", "Dog"),
      (os.path.join(esc, ESC_CLIPS[2]), "")])
  found = inputs.from_file_list(file_list, label_map=classes)
  out = tmp_path / "out"
  summary = prepare.prepare(found, featurize.PrepareConfig(output_dir=str(out)), num_workers=0)
  manifest = read_manifest(out)
  assert summary.total == len(manifest) == 7  # every row of the list is accounted for
  by_path = {os.path.basename(r["path"]): r for r in manifest}
  assert by_path["1-100032-A.ogg"]["status"] == "written"
  assert by_path["missing.ogg"]["reason"] == "file not found"
  assert by_path["notes.wav"]["reason"].startswith("not a readable media file")
  assert by_path["short.wav"]["reason"].startswith("audio too short")
  assert by_path["1-110389-A.ogg"]["reason"] == "unknown label(s) 'Unicorn' (list.csv line 6)"
  assert by_path["list.csv:7"]["reason"] == "empty path"
  assert by_path["list.csv:8"]["reason"] == "empty label list"
  assert summary.written == 1 and summary.failed == 6
  assert summary.reasons["file not found"] == 1


def test_resume_after_interruption(esc_list, tmp_path):
  out = tmp_path / "out"
  run_prepare(esc_list, out, num_shards=3)
  reference = shard_bytes(out)
  # Simulate a kill during shard 1: its manifest part never got written, its file is
  # half-written, shard 2 was never started, and a temp file lies around.
  os.remove(out / ".manifest" / "data-00001-of-00003.tfrecord.csv")
  os.remove(out / ".manifest" / "data-00002-of-00003.tfrecord.csv")
  os.remove(out / "data-00002-of-00003.tfrecord")
  with open(out / "data-00001-of-00003.tfrecord", "r+b") as f:
    f.truncate(100)
  (out / "data-00002-of-00003.tfrecord.incomplete").write_bytes(b"junk")
  os.remove(out / "manifest.csv")
  summary = run_prepare(esc_list, out, num_shards=3)
  assert summary.skipped_shards == 1
  assert shard_bytes(out) == reference  # the same examples, no duplicates, no gaps
  manifest = read_manifest(out)
  assert len(manifest) == 5 and len({r["clip_id"] for r in manifest}) == 5
  assert not glob.glob(str(out / "*.incomplete"))


def test_resume_refuses_other_flags(esc_list, tmp_path):
  out = tmp_path / "out"
  run_prepare(esc_list, out, num_shards=1)
  with pytest.raises(ValueError, match="other inputs or flags"):
    run_prepare(esc_list, out, num_shards=2)


def test_audio_visual_videos(tmp_path):
  # The audio-only input is an ESC-10 clip (Ogg): the vendored subset has no audio-only mp3.
  paths = [shared_path("video", "moviepy_chaplin.mp4"), shared_path("video", "openl3_bento.mp4"),
           shared_path("esc10", ESC_CLIPS[0]),
           shared_path("video", "moviepy_video_with_failing_audio.mp4")]
  file_list = write_list(tmp_path / "videos.csv", [(p, "Speech") for p in paths])
  common = dict(modalities=("audio", "visual"), embedder="tiny", image_size=64,
                num_video_frames=8)
  summary = run_prepare(file_list, tmp_path / "strict", **common)
  manifest = {os.path.basename(r["path"]): r for r in read_manifest(tmp_path / "strict")}
  assert manifest["1-100032-A.ogg"]["reason"] == "no video track"
  assert manifest["moviepy_chaplin.mp4"]["status"] == "written"
  broken = manifest["moviepy_video_with_failing_audio.mp4"]
  assert broken["status"] == "written" and "digital silence" in broken["warnings"]
  assert summary.written == 3

  summary = run_prepare(file_list, tmp_path / "lenient", allow_missing_modality=True,
                        store_frame_embeddings=True, **common)
  assert summary.written == 4
  info = dataset_info.DatasetInfo.read(str(tmp_path / "lenient")).info
  assert info["embedding_dim"] == 32
  # The manifest carries each clip's embedding size, so a rerun that keeps every shard
  # writes the same dataset info without reading a shard back.
  assert {(r["has_video"], r["embedding_dim"]) for r in read_manifest(tmp_path / "lenient")
          } == {("1", "32"), ("0", "0")}
  resumed = run_prepare(file_list, tmp_path / "lenient", allow_missing_modality=True,
                        store_frame_embeddings=True, **common)
  assert resumed.skipped_shards == 1
  assert dataset_info.DatasetInfo.read(str(tmp_path / "lenient")).info == info
  ds = schema.read_examples(schema.list_shards(str(tmp_path / "lenient"), "data"), 1,
                            embedding_dim=32)
  by_id = {os.path.basename(ex["clip_id"].numpy().decode()): ex for ex in ds}
  audio_only = by_id["1-100032-A"]
  assert audio_only["has_video"].numpy() == 0 and audio_only["has_audio"].numpy() == 1
  chaplin = by_id["moviepy_chaplin"]
  assert chaplin["frame_embeddings"].shape == (8, 32)
  np.testing.assert_allclose(chaplin["embedding_mean"].numpy(),
                             chaplin["frame_embeddings"].numpy().mean(axis=0), atol=2e-2)
  assert chaplin["log_mel"].shape[0] == 1 + (int(9.614 * 16000) - 256) // 160


def test_segment_list_matching(tmp_path):
  """AudioSet mode: files named by YouTube id are matched to rows; the rest is listed."""
  esc = shared_path("esc10")
  media_dir = tmp_path / "media"
  media_dir.mkdir()
  shutil.copy(os.path.join(esc, ESC_CLIPS[0]), media_dir / "aaaaaaaaaaa_30_40.ogg")
  shutil.copy(os.path.join(esc, ESC_CLIPS[2]), media_dir / "Ybbbbbbbbbbb.ogg")
  shutil.copy(os.path.join(esc, ESC_CLIPS[3]), media_dir / "zzzzzzzzzzz.ogg")  # no row
  (media_dir / "README.txt").write_text("ignored")
  segs = tmp_path / "segments.csv"
  segs.write_text("# Segments csv\n# YTID, start_seconds, end_seconds, positive_labels\n"
                  'aaaaaaaaaaa, 30.000, 40.000, "/m/0bt9lr,/m/05tny_"\n'
                  'bbbbbbbbbbb, 0.000, 10.000, "/m/06mb1"\n'
                  'ccccccccccc, 0.000, 10.000, "/m/06mb1"\n'
                  "broken row\n")
  classes = labels.LabelMap(["/m/0bt9lr", "/m/05tny_", "/m/06mb1"], ["Dog", "Bark", "Rain"])
  found = inputs.from_segments(str(segs), str(media_dir), classes, split="eval")
  assert [j.clip_id for j in found.jobs] == ["aaaaaaaaaaa_30", "bbbbbbbbbbb_0"]
  assert found.jobs[0].trim == "never" and found.jobs[1].trim == "auto"
  out = tmp_path / "out"
  summary = prepare.prepare(found, featurize.PrepareConfig(output_dir=str(out)), num_workers=0)
  assert summary.written == 2 and summary.missing_media == 1 and summary.unmatched_files == 1
  manifest = read_manifest(out)
  assert len(manifest) == 4  # 2 written, the file without a row, the broken row
  reasons = sorted(r["reason"] for r in manifest if r["status"] == "failed")
  assert reasons == ["expected 4 fields, found 1", "no row for this file in the list"]
  with open(out / "missing_media.csv") as f:
    assert [r["ytid"] for r in csv.DictReader(f)] == ["ccccccccccc"]
  ex = next(iter(schema.read_examples(schema.list_shards(str(out), "eval"), 3)))
  assert ex["labels"].numpy().tolist() == [1, 1, 0]
  # A 5 s file for a 10 s row is taken whole: it is shorter than the segment.
  ex2 = list(schema.read_examples(schema.list_shards(str(out), "eval"), 3))[1]
  assert ex2["log_mel"].shape[0] == 499


def test_non_local_file_system():
  """Inputs and outputs through tf.io.gfile's in-memory file system (ram://), the same code
  path as gs://: reading the list and media, writing, renaming and listing shards."""
  src = shared_path("esc10", ESC_CLIPS[0])
  tf.io.gfile.makedirs("ram://prep_in/sub")
  tf.io.gfile.copy(src, "ram://prep_in/sub/a.ogg", overwrite=True)
  with tf.io.gfile.GFile("ram://prep_in/list.csv", "w") as f:
    f.write("path,labels\nsub/a.ogg,Dog\n")
  found = inputs.from_file_list("ram://prep_in/list.csv")
  assert found.jobs[0].clip_id == "sub/a" and found.jobs[0].path == "ram://prep_in/sub/a.ogg"
  summary = prepare.prepare(found, featurize.PrepareConfig(output_dir="ram://prep_out"),
                            num_workers=0, overwrite=True)
  assert summary.written == 1
  (ex,) = list(schema.read_examples(schema.list_shards("ram://prep_out", "data"), 1))
  assert ex["log_mel"].shape == (499, 64)
  with tf.io.gfile.GFile("ram://prep_out/manifest.csv") as f:
    assert "ram://prep_in/sub/a.ogg,written" in f.read()


def _bin(*args):
  return run_binary("prepare_data", *args, timeout=600)


def test_binary_helpfull_and_errors(tmp_path):
  res = _bin("--helpfull")
  assert "Traceback" not in res.stderr  # absl exits with status 1 after printing help
  assert "Prepares media files for training" in res.stdout  # the usage text comes first
  for flag in ("--file_list", "--segments_csv", "--media_dir", "--output_dir", "--modalities",
               "--class_labels", "--max_failure_fraction", "--embedder", "--num_shards"):
    assert flag in res.stdout, flag
  res = _bin("--output_dir", str(tmp_path / "o"))
  assert res.returncode != 0 and "exactly one of" in res.stderr.lower()
  assert "file_list" in res.stderr and "segments_csv" in res.stderr
  assert "Traceback" not in res.stderr
  res = _bin("--file_list", str(tmp_path / "nope.csv"), "--output_dir", str(tmp_path / "o"))
  assert res.returncode == 2 and "Traceback" not in res.stderr
  assert "nope.csv" in res.stderr
  res = _bin("--file_list", "x.csv", "--output_dir", "o", "--modalities", "smell")
  assert res.returncode == 2 and "modalities" in res.stderr and "Traceback" not in res.stderr


def test_binary_failure_fraction(esc_list, tmp_path):
  rows = list(csv.reader(open(esc_list)))[1:]
  rows.append((str(tmp_path / "gone.ogg"), "Rain"))
  file_list = write_list(tmp_path / "list2.csv", rows)
  out = tmp_path / "out"
  res = _bin("--file_list", file_list, "--output_dir", str(out), "--num_workers", "0",
             "--max_failure_fraction", "0.1")
  assert res.returncode == 1, res.stderr[-2000:]
  assert "1 of 6 inputs failed" in res.stderr
  assert "written 5, failed 1" in res.stdout
  res = _bin("--file_list", file_list, "--output_dir", str(out), "--num_workers", "0",
             "--max_failure_fraction", "0.2")
  assert res.returncode == 0, res.stderr[-2000:]
  assert "resumed: 1 complete shard(s)" in res.stdout


def test_all_esc10_clips(tmp_path):
  """All 400 ESC-10 clips through the binary: five fold splits; log-mel lengths follow the
  clip lengths (most clips are 5.0 s: 499 frames; a few are 3.6 to 7.2 s)."""
  esc_labels = shared_path("esc10", "labels.csv", whole_set=True)
  out = tmp_path / "esc10"
  res = _bin("--file_list", esc_labels, "--label_column", "class", "--split_column", "fold",
             "--output_dir", str(out))
  assert res.returncode == 0, res.stderr[-3000:]
  info = dataset_info.DatasetInfo.read(str(out)).info
  assert sorted(info["splits"]) == ["1", "2", "3", "4", "5"]
  assert sum(s["num_examples"] for s in info["splits"].values()) == 400
  manifest = read_manifest(out)
  assert len(manifest) == 400
  for r in manifest:
    samples = int(round(float(r["duration_seconds"]) * 16000))
    assert abs(int(r["num_frames"]) - (1 + (samples - 256) // 160)) <= 1
  assert sum(int(r["num_frames"]) == 499 for r in manifest) >= 350


def test_display_names_with_commas(tmp_path, audioset_dir):
  classes = labels.LabelMap.from_csv(os.path.join(audioset_dir, "class_labels_indices.csv"))
  esc = shared_path("esc10")
  clip = os.path.join(esc, ESC_CLIPS[0])
  file_list = write_list(tmp_path / "l.csv", [
      (clip, "Male speech, man speaking"),
      (clip.replace("100032", "110389"), "Male speech, man speaking;Dog"),
      (os.path.join(esc, ESC_CLIPS[2]), "Speech, Dog, Bark")])
  found = inputs.from_file_list(file_list, label_map=classes)
  assert [j.label_indices for j in found.jobs] == [[1], [1, classes.lookup("Dog")],
                                                   [0, classes.lookup("Dog"),
                                                    classes.lookup("Bark")]]
  assert all(not j.error for j in found.jobs)


# ---- Duplicates, split leaks, non-regular files, damaged shards on resume ----------------

@pytest.fixture
def spellings(tmp_path):
  """One recording under five spellings and names, another recording, in one folder."""
  esc = shared_path("esc10")
  d = tmp_path / "media"
  (d / "sub").mkdir(parents=True)
  shutil.copy(os.path.join(esc, ESC_CLIPS[0]), d / "x.ogg")
  shutil.copy(os.path.join(esc, ESC_CLIPS[0]), d / "copy.ogg")  # the same bytes, other name
  os.symlink(d / "x.ogg", d / "link.ogg")
  shutil.copy(os.path.join(esc, ESC_CLIPS[2]), d / "rain.ogg")
  return d


def test_duplicates_under_other_spellings_and_names_fail(spellings):
  """`x.ogg`, `./x.ogg`, `sub/../x.ogg`, a symlink and a byte-identical copy are one
  recording: the first row is written, every later one fails naming the first and its line."""
  d = spellings
  file_list = write_list(d / "list.csv", [
      ("x.ogg", "Dog"), ("./x.ogg", "Dog"), ("sub/../x.ogg", "Dog"), ("link.ogg", "Dog"),
      ("copy.ogg", "Dog"), ("rain.ogg", "Rain")])
  out = d.parent / "out"
  summary = run_prepare(file_list, out, num_shards=2)
  manifest = read_manifest(out)
  assert (summary.total, summary.written, summary.failed) == (6, 2, 4)
  assert len(manifest) == 6
  first = str(d / "x.ogg")
  rows = {r["path"]: r for r in manifest if r["status"] == "written" or r["path"] != first}
  assert rows[first]["status"] == "written" and rows[first]["clip_id"] == "x"
  assert rows[str(d / "rain.ogg")]["status"] == "written"
  for later in ("link.ogg", "copy.ogg"):
    assert rows[str(d / later)]["status"] == "failed"
    assert rows[str(d / later)]["reason"] == f"duplicate of {first} (line 2)"
  # ./x.ogg and sub/../x.ogg are normalized to x.ogg: two more rows for that path.
  same = [r for r in manifest if r["path"] == first and r["status"] == "failed"]
  assert [r["reason"] for r in same] == [f"duplicate of {first} (line 2)"] * 2
  assert summary.reasons["duplicate"] == 4
  ids = [ex["clip_id"].numpy().decode() for ex in
         schema.read_examples(schema.list_shards(str(out), "data"), 2)]
  assert ids == ["x", "rain"]


def test_segments_of_one_file_are_not_duplicates(spellings):
  """Several segments cut out of one file are distinct clips; the same segment of the same
  recording twice (under another name) is a duplicate."""
  d = spellings
  file_list = write_list(d / "segs.csv", [
      ("x.ogg", "Dog", 0, 2), ("x.ogg", "Dog", 2, 4), ("copy.ogg", "Dog", 0, 2),
      ("copy.ogg", "Dog", 3, 5), ("x.ogg", "Dog", 2, 4)],
      header=("path", "labels", "start_seconds", "end_seconds"))
  out = d.parent / "out"
  summary = run_prepare(file_list, out)
  rows = read_manifest(out)
  assert summary.total == len(rows) == 5
  got = sorted((r["clip_id"], r["status"], r["reason"]) for r in rows)
  first = str(d / "x.ogg")
  assert got == [("copy_0", "failed", f"duplicate of {first} (line 2)"),
                 ("copy_3", "written", ""),
                 ("x_0", "written", ""), ("x_2", "failed", f"duplicate of {first} (line 3)"),
                 ("x_2", "written", "")]


def test_same_recording_in_two_splits_stops_the_run(spellings):
  """A recording (any spelling, copy or segment of it) in two splits would leak test data
  into training: nothing is written, the error names both rows, a report lists every pair."""
  d = spellings
  file_list = write_list(d / "folds.csv", [
      ("x.ogg", "Dog", "1"), ("rain.ogg", "Rain", "1"), ("copy.ogg", "Dog", "2"),
      ("./rain.ogg", "Rain", "3"), ("x.ogg", "Dog", "1")],
      header=("path", "labels", "fold"))
  out = d.parent / "out"
  found = inputs.from_file_list(file_list, split_column="fold")
  with pytest.raises(ValueError) as e:
    prepare.prepare(found, featurize.PrepareConfig(output_dir=str(out)), num_workers=0)
  message = str(e.value)
  assert "2 input(s) would put a recording in two splits" in message
  assert f"{d / 'copy.ogg'} (line 4, split 2) is the same recording as {d / 'x.ogg'} " \
         "(line 2, split 1)" in message
  assert not glob.glob(str(out / "*.tfrecord")) and not os.path.exists(out / "manifest.csv")
  with open(out / "split_leaks.csv") as f:
    report = list(csv.DictReader(f))
  assert [(r["path"], r["line"], r["split"], r["same_as"], r["same_as_line"],
           r["same_as_split"]) for r in report] == [
               (str(d / "copy.ogg"), "4", "2", str(d / "x.ogg"), "2", "1"),
               (str(d / "rain.ogg"), "5", "3", str(d / "rain.ogg"), "3", "1")]
  # Segments of one file in two splits leak as well.
  seg_list = write_list(d / "segfolds.csv", [("x.ogg", "Dog", 0, 2, "1"),
                                             ("x.ogg", "Dog", 2, 4, "2")],
                        header=("path", "labels", "start_seconds", "end_seconds", "fold"))
  with pytest.raises(ValueError, match="1 input\\(s\\) would put a recording in two splits"):
    prepare.prepare(inputs.from_file_list(seg_list, split_column="fold"),
                    featurize.PrepareConfig(output_dir=str(d.parent / "out2")), num_workers=0)


def test_binary_refuses_a_split_leak_in_one_line(spellings):
  d = spellings
  file_list = write_list(d / "folds.csv", [("x.ogg", "Dog", "train"),
                                           ("link.ogg", "Dog", "test")],
                         header=("path", "labels", "fold"))
  res = _bin("--file_list", file_list, "--split_column", "fold", "--output_dir",
             str(d.parent / "out"), "--num_workers", "0")
  assert res.returncode == 2, res.stderr[-2000:]
  assert "Traceback" not in res.stderr
  (line,) = [l for l in res.stderr.splitlines() if "two splits" in l]
  assert f"{d / 'link.ogg'} (line 3, split test) is the same recording as {d / 'x.ogg'}" in line


def test_segment_list_same_media_under_two_names(tmp_path):
  """AudioSet mode: two downloads with the same bytes under two YouTube ids are one clip."""
  esc = shared_path("esc10")
  media_dir = tmp_path / "media"
  media_dir.mkdir()
  shutil.copy(os.path.join(esc, ESC_CLIPS[0]), media_dir / "aaaaaaaaaaa_30_40.ogg")
  shutil.copy(os.path.join(esc, ESC_CLIPS[0]), media_dir / "bbbbbbbbbbb.ogg")
  shutil.copy(os.path.join(esc, ESC_CLIPS[2]), media_dir / "ccccccccccc.ogg")
  segs = tmp_path / "segments.csv"
  segs.write_text("# YTID, start_seconds, end_seconds, positive_labels\n"
                  'aaaaaaaaaaa, 30.000, 40.000, "/m/0bt9lr"\n'
                  'bbbbbbbbbbb, 0.000, 10.000, "/m/0bt9lr"\n'
                  'ccccccccccc, 0.000, 10.000, "/m/06mb1"\n')
  classes = labels.LabelMap(["/m/0bt9lr", "/m/06mb1"], ["Dog", "Rain"])
  found = inputs.from_segments(str(segs), str(media_dir), classes, split="eval")
  out = tmp_path / "out"
  summary = prepare.prepare(found, featurize.PrepareConfig(output_dir=str(out)), num_workers=0)
  rows = {r["clip_id"]: (r["status"], r["reason"]) for r in read_manifest(out)}
  assert rows == {
      "aaaaaaaaaaa_30": ("written", ""),
      "bbbbbbbbbbb_0": ("failed",
                        f"duplicate of {media_dir / 'aaaaaaaaaaa_30_40.ogg'} (line 2)"),
      "ccccccccccc_0": ("written", "")}
  assert summary.written == 2


def test_fifo_in_the_list_fails_up_front(tmp_path, esc_list):
  """A FIFO is never opened (opening one blocks until a writer appears): its row fails with
  the reason, the run ends. The timeout turns a hang into a failure."""
  fifo = tmp_path / "pipe.ogg"
  os.mkfifo(fifo)
  empty = tmp_path / "empty.ogg"  # the FIFO's size too: the duplicate check compares them
  empty.write_bytes(b"")
  rows = list(csv.reader(open(esc_list)))[1:3] + [(str(fifo), "Rain"), (str(empty), "Rain")]
  file_list = write_list(tmp_path / "fifo.csv", rows)
  out = tmp_path / "out"
  res = run_binary("prepare_data", "--file_list", file_list, "--output_dir", str(out),
                   "--num_workers", "0", "--max_failure_fraction", "0.5", timeout=120)
  assert res.returncode == 0, res.stderr[-2000:]
  rows = {r["path"]: r for r in read_manifest(out)}
  assert rows[str(fifo)]["status"] == "failed"
  assert rows[str(fifo)]["reason"] == "not a regular file: a FIFO (named pipe)"
  assert rows[str(empty)]["reason"].startswith("not a readable media file")
  assert sum(r["status"] == "written" for r in rows.values()) == 2


def _record_boundary(path):
  """Byte offset just after the first TFRecord record (8-byte length, 4-byte CRC, data,
  4-byte CRC)."""
  with open(path, "rb") as f:
    length = int(np.frombuffer(f.read(8), "<u8")[0])
  return 8 + 4 + length + 4


def test_rerun_redoes_damaged_shards(esc_list, tmp_path, caplog):
  """A rerun verifies every kept shard against its manifest part: a flipped byte, a cut
  mid-record, a cut at a record boundary and a short manifest part are each redone; the
  final shards equal an uninterrupted run's."""
  out = tmp_path / "out"
  run_prepare(esc_list, out, num_shards=4)  # 5 clips: 2, 1, 1, 1 per shard
  reference = shard_bytes(out)
  names = sorted(reference)
  with open(out / names[0], "r+b") as f:  # the first record only: a valid, shorter file
    f.truncate(_record_boundary(out / names[0]))
  with open(out / names[1], "r+b") as f:  # one byte flipped in the middle of the record
    f.seek(len(reference[names[1]]) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0xFF]))
  with open(out / names[2], "r+b") as f:  # cut mid-record
    f.truncate(len(reference[names[2]]) // 2)
  caplog.set_level("WARNING")
  summary = run_prepare(esc_list, out, num_shards=4)
  assert summary.skipped_shards == 1
  assert shard_bytes(out) == reference
  manifest = read_manifest(out)
  assert len(manifest) == 5 and len({r["clip_id"] for r in manifest}) == 5
  assert all(r["status"] == "written" for r in manifest)
  redone = [r.getMessage() for r in caplog.records if "redoing shard" in r.getMessage()]
  assert len(redone) == 3
  assert any(names[0] in m and "1 record(s) but its manifest part lists 2 written" in m
             for m in redone)
  assert any(names[1] in m and "corrupted or truncated TFRecord" in m for m in redone)
  assert any(names[2] in m and "corrupted or truncated TFRecord" in m for m in redone)
  # A manifest part that lost rows (it must list every input of its shard) is redone too.
  part = out / ".manifest" / (names[3] + ".csv")
  part.write_text(part.read_text().splitlines()[0] + "\n")
  caplog.clear()
  summary = run_prepare(esc_list, out, num_shards=4)
  assert summary.skipped_shards == 3 and shard_bytes(out) == reference
  assert len(read_manifest(out)) == 5
  assert any(names[3] in r.getMessage() and "lists 0 of 1 input(s)" in r.getMessage()
             for r in caplog.records)
  # A manifest part written before the embedding_dim column existed is redone as well.
  part = out / ".manifest" / (names[0] + ".csv")
  rows = list(csv.DictReader(part.read_text().splitlines()))
  columns = [c for c in rows[0] if c != "embedding_dim"]
  part.write_text(files.csv_text(rows, columns))
  caplog.clear()
  summary = run_prepare(esc_list, out, num_shards=4)
  assert summary.skipped_shards == 3 and shard_bytes(out) == reference
  assert any(names[0] in r.getMessage() and "lacks the column(s) embedding_dim" in
             r.getMessage() for r in caplog.records)


def test_duplicates_on_a_non_local_file_system():
  """ram:// (the code path of gs://): paths are normalized textually, copies found by their
  bytes through tf.io.gfile."""
  assert inputs.normalize_path("gs://b/a/./x/../y.ogg") == "gs://b/a/y.ogg"
  assert inputs.resolved_path("gs://b//a/y.ogg") == "gs://b/a/y.ogg"
  src = shared_path("esc10", ESC_CLIPS[0])
  tf.io.gfile.makedirs("ram://dup_in/sub")
  for name in ("a.ogg", "b.ogg"):
    tf.io.gfile.copy(src, f"ram://dup_in/{name}", overwrite=True)
  tf.io.gfile.copy(shared_path("esc10", ESC_CLIPS[1]), "ram://dup_in/c.ogg", overwrite=True)
  with tf.io.gfile.GFile("ram://dup_in/list.csv", "w") as f:
    f.write("path,labels\na.ogg,Dog\nsub/../a.ogg,Dog\nb.ogg,Dog\nc.ogg,Dog\n")
  found = inputs.from_file_list("ram://dup_in/list.csv")
  assert not inputs.mark_duplicates(found)
  assert [(j.path, j.error) for j in found.jobs] == [
      ("ram://dup_in/a.ogg", ""),
      ("ram://dup_in/a.ogg", "duplicate of ram://dup_in/a.ogg (line 2)"),
      ("ram://dup_in/b.ogg", "duplicate of ram://dup_in/a.ogg (line 2)"),
      ("ram://dup_in/c.ogg", "")]


def _video_only_mp4(path):
  """One second of H.264 (16 frames, 64 px) and no audio track."""
  import av  # pylint: disable=g-import-not-at-top
  with av.open(str(path), "w") as out:
    stream = out.add_stream("libx264", rate=16)
    stream.width = stream.height = 64
    stream.pix_fmt = "yuv420p"
    for i in range(16):
      frame = av.VideoFrame.from_ndarray(np.full([64, 64, 3], 15 * i, np.uint8), "rgb24")
      for packet in stream.encode(frame):
        out.mux(packet)
    for packet in stream.encode(None):
      out.mux(packet)
  return str(path)


def test_audio_and_frames_decoded_together(tmp_path):
  """With both modalities featurize decodes the audio in a second thread while the frames
  decode: each Example holds exactly what the two decoders give one after the other, and
  failures keep their order (the audio's reason first)."""
  from av_sound_tf.core import media  # pylint: disable=g-import-not-at-top
  clips = sorted(glob.glob(os.path.join(shared_path("real_av", "clips", whole_set=True),
                                        "*.mp4")))[::10]
  config = featurize.PrepareConfig(output_dir=str(tmp_path), modalities=("audio", "visual"),
                                   embedder="tiny", image_size=32, num_video_frames=8,
                                   store_frame_embeddings=True)
  processor = featurize.ClipProcessor(config)
  jobs = [inputs.ClipJob(i, f"c{i}", p, "train", [0], ["/m/x"]) for i, p in enumerate(clips)]
  jobs.append(inputs.ClipJob(9, "cut", clips[0], "train", [0], ["/m/x"], 1.5, 4.0, "always"))
  for job in jobs:
    result = processor(job)
    assert result.status == "written", result.reason
    waveform = media.read_audio(job.path, job.start_seconds, job.end_seconds).waveform
    frames = media.sample_video_frames(job.path, 8, 32, job.start_seconds, job.end_seconds)
    mean, per_frame = processor.embedder.embed_clip(frames)
    expected = featurize._make_example(  # pylint: disable=protected-access
        job, job.start_seconds, job.end_seconds, waveform.shape[0] / 16000,
        processor.log_mel(waveform), mean, per_frame, 8)
    assert result.example == expected.SerializeToString(), job.path

  silent_video = _video_only_mp4(tmp_path / "silent.mp4")
  subtitles = tmp_path / "subtitles.mp4"  # FFmpeg reads it as SubRip: neither stream
  subtitles.write_text("1\n00:00:00,000 --> 00:00:01,000\nhello\n")
  for lenient, path, want in [(False, silent_video, "no audio track"),
                              (False, str(subtitles), "no audio track"),
                              (True, str(subtitles), "no video track")]:
    config = featurize.PrepareConfig(
        output_dir=str(tmp_path), modalities=("audio", "visual"), embedder="tiny",
        image_size=32, num_video_frames=8, allow_missing_modality=lenient)
    result = featurize.ClipProcessor(config)(inputs.ClipJob(0, "x", path, "train", [0],
                                                            ["/m/x"]))
    assert (result.status, result.reason) == ("failed", want), path
  config = featurize.PrepareConfig(output_dir=str(tmp_path), modalities=("audio", "visual"),
                                   embedder="tiny", image_size=32, num_video_frames=8,
                                   allow_missing_modality=True)
  result = featurize.ClipProcessor(config)(inputs.ClipJob(0, "x", silent_video, "train", [0],
                                                          ["/m/x"]))
  assert result.status == "written" and result.warnings == "audio missing: no audio track"
  assert result.duration_seconds == pytest.approx(1.0, abs=0.07)


def test_clip_threads_follow_the_idle_cores(tmp_path, monkeypatch):
  """Workers that fill every core prepare each clip on their one thread (least CPU):
  audio, video decoding and frame conversion all on it. Fewer workers, or preparation in
  this process, decode the audio and convert the frames on helper threads and let FFmpeg
  thread the video decoder over the idle cores."""
  import threading  # pylint: disable=g-import-not-at-top
  from av_sound_tf.core import media  # pylint: disable=g-import-not-at-top
  from av_sound_tf.core import video_frames  # pylint: disable=g-import-not-at-top
  assert prepare.clip_threads(2, 2) == 1
  assert prepare.clip_threads(8, 4) == 1
  assert prepare.clip_threads(1, 2) == 0
  assert prepare.clip_threads(0, 1) == 0
  seen = []  # (step, decoder threads or None, whether it ran on the main thread)
  sample, read, fit = (media.sample_video_frames, media.read_audio,
                       video_frames.FrameFitter.__call__)
  on_main = lambda: threading.current_thread() is threading.main_thread()

  def sampling(*args):
    seen.append(("video", args[-1], on_main()))
    return sample(*args)

  def reading(*args):
    seen.append(("audio", None, on_main()))
    return read(*args)

  def fitting(self, frame):
    seen.append(("convert", None, on_main()))
    return fit(self, frame)

  monkeypatch.setattr(media, "sample_video_frames", sampling)
  monkeypatch.setattr(media, "read_audio", reading)
  monkeypatch.setattr(video_frames.FrameFitter, "__call__", fitting)
  file_list = write_list(tmp_path / "v.csv", [(shared_path("video", "moviepy_chaplin.mp4"),
                                               "Speech")])
  found = inputs.from_file_list(file_list,
                                label_map=labels.LabelMap(["/m/09x0r"], ["Speech"]))
  config = featurize.PrepareConfig(output_dir=str(tmp_path / "out"),
                                   modalities=("audio", "visual"), embedder="tiny",
                                   image_size=32, num_video_frames=8)
  assert prepare.prepare(found, config, num_workers=0).written == 1
  assert sorted(set(seen)) == [("audio", None, False), ("convert", None, False),
                               ("video", 0, True)]
  seen.clear()
  result = featurize.ClipProcessor(config, threads=1)(found.jobs[0])
  assert result.status == "written"
  assert sorted(set(seen)) == [("audio", None, True), ("convert", None, True),
                               ("video", 1, True)]
