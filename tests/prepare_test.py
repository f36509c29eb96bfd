"""bin/prepare_data and data_prep: shards, manifest accounting, resume, bad inputs."""

import csv
import glob
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from av_sound_tf import labels
from av_sound_tf import schema
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
  info = schema.read_dataset_info(str(out))
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
  summary = prepare.prepare(found, prepare.PrepareConfig(output_dir=str(out)), num_workers=0)
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
  video = shared_path("video")
  names = ["moviepy_chaplin.mp4", "openl3_bento.mp4", "moviepy_crunching.mp3",
           "moviepy_video_with_failing_audio.mp4"]
  file_list = write_list(tmp_path / "videos.csv",
                         [(os.path.join(video, n), "Speech") for n in names])
  common = dict(modalities=("audio", "visual"), embedder="tiny", image_size=64,
                num_video_frames=8)
  summary = run_prepare(file_list, tmp_path / "strict", **common)
  manifest = {os.path.basename(r["path"]): r for r in read_manifest(tmp_path / "strict")}
  assert manifest["moviepy_crunching.mp3"]["reason"] == "no video track"
  assert manifest["moviepy_chaplin.mp4"]["status"] == "written"
  broken = manifest["moviepy_video_with_failing_audio.mp4"]
  assert broken["status"] == "written" and "digital silence" in broken["warnings"]
  assert summary.written == 3

  summary = run_prepare(file_list, tmp_path / "lenient", allow_missing_modality=True,
                        store_frame_embeddings=True, **common)
  assert summary.written == 4
  info = schema.read_dataset_info(str(tmp_path / "lenient"))
  assert info["embedding_dim"] == 32
  ds = schema.read_examples(schema.list_shards(str(tmp_path / "lenient"), "data"), 1,
                            embedding_dim=32)
  by_id = {os.path.basename(ex["clip_id"].numpy().decode()): ex for ex in ds}
  mp3 = by_id["moviepy_crunching"]
  assert mp3["has_video"].numpy() == 0 and mp3["has_audio"].numpy() == 1
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
  summary = prepare.prepare(found, prepare.PrepareConfig(output_dir=str(out)), num_workers=0)
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
  summary = prepare.prepare(found, prepare.PrepareConfig(output_dir="ram://prep_out"),
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
  assert res.returncode != 0 and "exactly one of --file_list or --segments_csv" in res.stderr
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
  esc_labels = shared_path("esc10", "labels.csv")
  out = tmp_path / "esc10"
  res = _bin("--file_list", esc_labels, "--label_column", "class", "--split_column", "fold",
             "--output_dir", str(out))
  assert res.returncode == 0, res.stderr[-3000:]
  info = schema.read_dataset_info(str(out))
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
