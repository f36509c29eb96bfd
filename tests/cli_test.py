"""The binaries' shared plumbing: flag files that repeat a run, and embedders checked before
any clip (issue 17 items 2 and 4)."""

import json
import os
import subprocess
import sys

from absl import flags
import numpy as np
import soundfile

from av_sound_tf import cli
from tests.conftest import REPO, run_binary


def test_flagfile_lines_spell_every_flag_of_the_binary():
  values = flags.FlagValues()
  for define, name, default in ((flags.DEFINE_string, "out", None),
                                (flags.DEFINE_string, "empty", ""),
                                (flags.DEFINE_list, "mods", ["audio", "visual"]),
                                (flags.DEFINE_bool, "overwrite", False),
                                (flags.DEFINE_float, "rate", 0.05)):
    define(name, default, "", flag_values=values, module_name="bin/x")
  flags.DEFINE_integer("elsewhere", 3, "", flag_values=values, module_name="other")
  values(["x", "--out=/tmp/a b", "--overwrite"])
  assert cli.flagfile_lines(values, ["bin/x"], args=["song.wav"]) == [
      "--empty=", "--mods=audio,visual", "--out=/tmp/a b", "--overwrite", "--rate=0.05",
      "song.wav"]
  values(["x", "--out=None"])  # only flags left at None are left out
  assert "--out=None" in cli.flagfile_lines(values, ["bin/x"])


def _tiny_list(folder):
  for i, hz in enumerate((440, 880)):
    tone = 0.3 * np.sin(2 * np.pi * hz * np.arange(16000) / 16000)
    soundfile.write(str(folder / f"a{i}.wav"), tone.astype(np.float32), 16000)
  path = folder / "list.csv"
  path.write_text("path,labels\na0.wav,low\na1.wav,high\n")
  return str(path)


def test_prepare_data_repeats_a_run_from_its_flagfile(tmp_path):
  file_list = _tiny_list(tmp_path)
  out = str(tmp_path / "out")
  res = run_binary("prepare_data", f"--file_list={file_list}", f"--output_dir={out}",
                   "--num_workers=0", "--split=train", timeout=300)
  assert res.returncode == 0, res.stderr[-2000:]
  flagfile = os.path.join(out, "prepare_data.flags")
  with open(flagfile) as f:
    lines = f.read().splitlines()
  assert lines == [
      "--noallow_missing_modality", "--noallow_unlabeled", "--beam_options=",
      "--embedder=resnet152", "--examples_per_shard=1000", f"--file_list={file_list}",
      "--image_size=224", "--label_column=labels", "--max_failure_fraction=0.05",
      "--max_seconds=60.0", "--min_audio_seconds=0.1", "--modalities=audio",
      "--num_shards=0", "--num_video_frames=64", "--num_workers=0", f"--output_dir={out}",
      "--nooverwrite", "--progress_every=5.0", "--runner=", "--split=train",
      "--split_column=", "--nostore_frame_embeddings"]
  with open(os.path.join(out, "manifest.csv")) as f:
    manifest = f.read()
  shard = os.path.join(out, "train-00000-of-00001.tfrecord")
  with open(shard, "rb") as f:
    shard_bytes = f.read()
  copy = str(tmp_path / "copy.flags")
  with open(copy, "w") as f:
    f.write("\n".join(lines) + "\n")
  # --overwrite deletes the folder (and the flag file in it): the run writes it again.
  res = run_binary("prepare_data", f"--flagfile={copy}", "--overwrite", timeout=300)
  assert res.returncode == 0, res.stderr[-2000:]
  with open(os.path.join(out, "manifest.csv")) as f:
    assert f.read() == manifest
  with open(shard, "rb") as f:
    assert f.read() == shard_bytes
  with open(flagfile) as f:
    assert f.read().splitlines() == [l if l != "--nooverwrite" else "--overwrite"
                                     for l in lines]


def test_a_refused_run_keeps_the_flagfile_of_the_folder(tmp_path):
  """A resume with other settings is refused; the folder keeps the flags it was made with."""
  file_list = _tiny_list(tmp_path)
  out = str(tmp_path / "out")
  res = run_binary("prepare_data", f"--file_list={file_list}", f"--output_dir={out}",
                   "--num_workers=0", timeout=300)
  assert res.returncode == 0, res.stderr[-2000:]
  with open(os.path.join(out, "prepare_data.flags")) as f:
    before = f.read()
  res = run_binary("prepare_data", f"--file_list={file_list}", f"--output_dir={out}",
                   "--num_workers=0", "--max_seconds=5", timeout=300)
  assert res.returncode == 2, res.stderr[-2000:]
  with open(os.path.join(out, "prepare_data.flags")) as f:
    assert f.read() == before


def _one_error_line(res, binary):
  lines = res.stderr.strip().splitlines()
  assert res.returncode == 2, res.stderr[-2000:]
  assert len(lines) == 1 and lines[0].startswith(f"{binary}: error: "), res.stderr[-2000:]
  return lines[0]


def test_prepare_data_stops_on_an_embedder_that_cannot_be_built(tmp_path):
  file_list = _tiny_list(tmp_path)
  for args, expected in (
      (["--embedder=resnet125"], "Unknown frame embedder. Expected one of ('resnet152', "
       "'hub:<path>', 'tflite:<path>', 'tiny', 'color_layout'). Received: 'resnet125'"),
      (["--embedder=resnet152", "--embedder_weights=/nonexistent/r.h5"],
       "ResNet-152 weights file not found: /nonexistent/r.h5")):
    out = tmp_path / "out"
    res = run_binary("prepare_data", f"--file_list={file_list}", f"--output_dir={out}",
                     "--modalities=audio,visual", "--num_workers=0", *args, timeout=300)
    assert _one_error_line(res, "prepare_data") == f"prepare_data: error: {expected}"
    assert not out.exists()  # no manifest, no clip, no flag file
  res = run_binary("prepare_data", f"--file_list={file_list}", f"--output_dir={out}",
                   "--modalities=audio", "--num_workers=0", "--embedder=resnet125",
                   timeout=300)
  assert res.returncode == 0, res.stderr[-2000:]  # audio only: the embedder is not used


def test_tag_stops_on_an_embedder_that_cannot_be_built(tmp_path):
  """Before the model loads or a file is tagged (--model does not even exist)."""
  _tiny_list(tmp_path)
  output = tmp_path / "tags" / "tags.json"
  output.parent.mkdir()
  for args, expected in (
      (["--embedder=resnet125"], "Received: 'resnet125'"),
      (["--embedder=resnet152", "--embedder_weights=/nonexistent/r.h5"],
       "ResNet-152 weights file not found: /nonexistent/r.h5")):
    res = run_binary("tag", f"--model={tmp_path / 'no_model'}", f"--output={output}",
                     *args, str(tmp_path / "a0.wav"), timeout=300)
    assert _one_error_line(res, "tag").endswith(expected)
    assert not (tmp_path / "tags" / "tag.flags").exists()


def test_paths_on_other_file_systems_are_prepared_or_refused_before_any_work(tmp_path):
  # s3:// is refused with its reason (tensorflow-io's S3 file system aborts at exit).
  res = run_binary("prepare_data", "--file_list=s3://bucket/list.csv",
                   f"--output_dir={tmp_path / 'out'}", timeout=300)
  assert res.returncode == 2, res.stderr
  lines = [l for l in res.stderr.splitlines() if l.strip()]
  assert lines == ["prepare_data: error: s3://bucket/list.csv: s3:// paths are not supported: "
                   "tensorflow-io 0.37.1's S3 file system aborts the process at exit "
                   "(tensorflow/io#2039); mount the bucket (e.g. s3fs, mountpoint-s3) and pass "
                   "the local path, or copy the data to gs:// or local disk."]
  assert not (tmp_path / "out").exists()
  # hdfs:// reaches tensorflow-io's file system (no Hadoop here: its own one-line error),
  # instead of TensorFlow's "File system scheme 'hdfs' not implemented".
  res = run_binary("evaluate_model", "--model=hdfs://localhost:1/m.keras",
                   "--data_dir=hdfs://localhost:1/d", "--splits=eval", timeout=300)
  assert res.returncode == 2 and "Traceback" not in res.stderr
  assert "not implemented" not in res.stderr and "libhdfs" in res.stderr, res.stderr


def test_export_without_the_metadata_library_stops_before_any_work(tmp_path):
  """bin/export --tflite_dir without mediapipe: one line naming the library, nothing written
  (the SavedModel export would otherwise run first and leave a version folder behind)."""
  fake = tmp_path / "fake" / "mediapipe"
  fake.mkdir(parents=True)
  (fake / "__init__.py").write_text("raise ImportError('simulated: mediapipe not installed')\n")
  env = dict(os.environ, PYTHONPATH=str(tmp_path / "fake"))
  res = subprocess.run([sys.executable, os.path.join(REPO, "bin", "export"),
                        f"--audio_model={tmp_path / 'audio.keras'}",
                        f"--labels={tmp_path / 'labels.csv'}",
                        f"--export_base={tmp_path / 'serving'}",
                        f"--tflite_dir={tmp_path / 'tflite'}"],
                       capture_output=True, text=True, timeout=300, env=env)
  assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
  errors = [l for l in res.stderr.splitlines() if "mediapipe" in l]
  assert errors and "simulated: mediapipe not installed" in errors[-1], res.stderr[-2000:]
  assert not (tmp_path / "serving").exists() and not (tmp_path / "tflite").exists()


def test_tag_repeats_a_run_from_its_flagfile(tmp_path):
  """tag.flags holds the flags and the tagged paths: `--flagfile` alone (with another
  --output) tags the same files with the same results."""
  _tiny_list(tmp_path)
  lite = os.path.join(REPO, "tests", "data", "legacy_df56a22", "tflite",
                      "audio_tagger_float32.tflite")
  first = tmp_path / "run1" / "tags.json"
  first.parent.mkdir()
  res = run_binary("tag", f"--model={lite}", "--tflite", "--top_k=3", f"--output={first}",
                   str(tmp_path / "a0.wav"), str(tmp_path / "a1.wav"), timeout=300)
  assert res.returncode == 0, res.stderr[-2000:]
  flagfile = first.parent / "tag.flags"
  lines = flagfile.read_text().splitlines()
  assert str(tmp_path / "a0.wav") in lines and str(tmp_path / "a1.wav") in lines
  again = tmp_path / "run2" / "tags.json"
  again.parent.mkdir()
  res = run_binary("tag", f"--flagfile={flagfile}", f"--output={again}", timeout=300)
  assert res.returncode == 0, res.stderr[-2000:]
  results = [json.loads(p.read_text()) for p in (first, again)]
  assert len(results[0]) == 2 and results[0] == results[1]
