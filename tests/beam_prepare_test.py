"""The Apache Beam preparation pipeline (DirectRunner, 2 worker processes) on ESC-10 files:
the same shards as the single-process writer, dead letters, counters, idempotent writes."""

import csv
import os
import shutil

import pytest

from av_sound_tf.core import dataset_info
from av_sound_tf.core import schema
from data_prep import featurize
from data_prep import inputs
from data_prep import prepare
from data_prep import shards
from tests.conftest import run_binary, shared_path
from tests.prep_helpers import ESC_CLIPS, read_manifest, shard_bytes, write_list

beam_prepare = pytest.importorskip("data_prep.beam_prepare",
                                   reason="apache-beam is not installed (pip install .[beam])")


@pytest.fixture(scope="module")
def file_list(tmp_path_factory):
  """Two clips of each ESC-10 class, a missing file and a text file named .ogg."""
  tmp = tmp_path_factory.mktemp("beam")
  esc = shared_path("esc10")
  rows = []
  for cls in sorted(os.listdir(esc)):
    if os.path.isdir(os.path.join(esc, cls)):
      rows += [(os.path.join(esc, cls, c), cls[6:])
               for c in sorted(os.listdir(os.path.join(esc, cls)))[:2]]
  (tmp / "notes.ogg").write_text("not audio\n" * 20)
  rows += [(str(tmp / "missing.ogg"), "Rain"), (str(tmp / "notes.ogg"), "Rain")]
  return write_list(tmp / "list.csv", rows)


@pytest.fixture(scope="module")
def single_process(file_list, tmp_path_factory):
  out = tmp_path_factory.mktemp("local") / "out"
  prepare.prepare(inputs.from_file_list(file_list),
                  featurize.PrepareConfig(output_dir=str(out), num_shards=3), num_workers=0,
                  progress_every=0)
  return out


def _beam(file_list, out, **kw):
  return beam_prepare.prepare_with_beam(
      inputs.from_file_list(file_list), featurize.PrepareConfig(output_dir=str(out), num_shards=3),
      runner="DirectRunner", num_workers=2, log=lambda *_: None, **kw)


def _clips(out):
  """{clip id: log-mel bytes} over all shards."""
  found = {}
  for ex in schema.read_examples(schema.list_shards(str(out), "data"), 10):
    clip_id = ex["clip_id"].numpy().decode()
    assert clip_id not in found, f"{clip_id} twice"
    found[clip_id] = ex["log_mel"].numpy().tobytes()
  return found


def test_same_output_as_the_single_process_writer(file_list, single_process, tmp_path):
  out = tmp_path / "beam"
  summary = _beam(file_list, out)
  assert (summary.total, summary.written, summary.failed) == (22, 20, 2)
  assert summary.counters["written"] == 20 and summary.counters["shards written"] == 3
  assert summary.counters["failed: file not found"] == 1
  assert summary.counters["failed: not a readable media file"] == 1
  # Same clip ids, same log-mel bytes; in fact the same shard files, byte for byte.
  assert _clips(out) == _clips(single_process)
  assert shard_bytes(out) == shard_bytes(single_process)
  assert read_manifest(out) == read_manifest(single_process)
  assert (dataset_info.DatasetInfo.read(str(out)).info ==
          dataset_info.DatasetInfo.read(str(single_process)).info)
  dead = [p for p in os.listdir(out / "failed") if p.endswith(".csv")]
  rows = [r for p in dead for r in csv.DictReader(open(out / "failed" / p))]
  assert sorted(os.path.basename(r["path"]) for r in rows) == ["missing.ogg", "notes.ogg"]
  assert all(r["reason"] for r in rows)


def test_retried_bundles_write_each_clip_once(file_list, single_process, tmp_path):
  """A retried ProcessClip bundle emits its clips again; WriteShard keeps one of each, and a
  retried WriteShard rewrites the same bytes."""
  found = inputs.from_file_list(file_list)
  config = featurize.PrepareConfig(output_dir=str(tmp_path), num_shards=3)
  _, _, pending, _ = shards.start_run(found, config)
  processor = featurize.ClipProcessor(config)
  name = "data-00000-of-00003.tfrecord"
  items = [(job, processor(job)) for job, shard in pending if shard == name]
  retried = items + items[:3]  # three clips delivered twice
  writer = beam_prepare.WriteShard(str(tmp_path))
  list(writer.process((name, retried)))
  first = open(tmp_path / name, "rb").read()
  list(writer.process((name, list(reversed(retried)))))  # the retry, in another order
  assert open(tmp_path / name, "rb").read() == first == shard_bytes(single_process)[name]


def test_resume_redoes_only_missing_shards(file_list, single_process, tmp_path):
  out = tmp_path / "beam"
  _beam(file_list, out)
  os.remove(out / "data-00001-of-00003.tfrecord")
  os.remove(out / ".manifest" / "data-00001-of-00003.tfrecord.csv")
  summary = _beam(file_list, out)
  assert summary.skipped_shards == 2 and summary.counters["shards written"] == 1
  assert shard_bytes(out) == shard_bytes(single_process)
  assert summary.total == 22


def test_binary_with_a_runner(file_list, tmp_path):
  res = run_binary("prepare_data", f"--file_list={file_list}", f"--output_dir={tmp_path / 'o'}",
                   "--runner=DirectRunner", "--num_workers=2", "--num_shards=2",
                   "--max_failure_fraction=0.2")
  assert res.returncode == 0, res.stderr[-3000:]
  assert "Beam counter written: 20" in res.stdout
  res = run_binary("prepare_data", f"--file_list={file_list}", f"--output_dir={tmp_path / 'x'}",
                   "--runner=MapReduceRunner")
  assert res.returncode != 0 and "Traceback" not in res.stderr
  assert "Unknown --runner=MapReduceRunner" in res.stderr


def test_duplicates_leaks_and_damaged_shards_as_the_local_writer(tmp_path):
  """The Beam runner shares start_run: the same duplicate rows fail with the same reasons,
  a split leak stops it before the pipeline, and a rerun redoes a damaged shard."""
  esc = shared_path("esc10")
  d = tmp_path / "media"
  d.mkdir()
  shutil.copy(os.path.join(esc, ESC_CLIPS[0]), d / "x.ogg")
  shutil.copy(os.path.join(esc, ESC_CLIPS[0]), d / "copy.ogg")
  os.symlink(d / "x.ogg", d / "link.ogg")
  shutil.copy(os.path.join(esc, ESC_CLIPS[2]), d / "rain.ogg")
  shutil.copy(os.path.join(esc, ESC_CLIPS[4]), d / "clock.ogg")
  file_list = write_list(d / "list.csv", [
      ("x.ogg", "Dog"), ("./x.ogg", "Dog"), ("link.ogg", "Dog"), ("rain.ogg", "Rain"),
      ("copy.ogg", "Dog"), ("clock.ogg", "Clock")])
  local, beam = tmp_path / "local", tmp_path / "beam"
  prepare.prepare(inputs.from_file_list(file_list),
                  featurize.PrepareConfig(output_dir=str(local), num_shards=2), num_workers=0,
                  progress_every=0)
  config = featurize.PrepareConfig(output_dir=str(beam), num_shards=2)
  run = lambda: beam_prepare.prepare_with_beam(  # pylint: disable=unnecessary-lambda-assignment
      inputs.from_file_list(file_list), config, runner="DirectRunner", num_workers=2,
      log=lambda *_: None)
  summary = run()
  assert (summary.total, summary.written, summary.failed) == (6, 3, 3)
  assert summary.counters["failed: duplicate"] == 3
  assert read_manifest(beam) == read_manifest(local)
  assert shard_bytes(beam) == shard_bytes(local)
  first = str(d / "x.ogg")
  assert sorted(r["reason"] for r in read_manifest(beam) if r["status"] == "failed") == [
      f"duplicate of {first} (line 2)"] * 3
  # A flipped byte in a kept shard: the rerun redoes that shard only.
  name = "data-00001-of-00002.tfrecord"
  data = bytearray((beam / name).read_bytes())
  data[len(data) // 2] ^= 0xFF
  (beam / name).write_bytes(bytes(data))
  summary = run()
  assert summary.skipped_shards == 1 and summary.counters["shards written"] == 1
  assert shard_bytes(beam) == shard_bytes(local)
  assert read_manifest(beam) == read_manifest(local)
  # The copy in another split: refused before any job is written for the pipeline.
  folds = write_list(d / "folds.csv", [("x.ogg", "Dog", "train"), ("copy.ogg", "Dog", "test")],
                     header=("path", "labels", "fold"))
  with pytest.raises(inputs.SplitLeakError, match="would put a recording in two splits"):
    beam_prepare.prepare_with_beam(
        inputs.from_file_list(folds, split_column="fold"),
        featurize.PrepareConfig(output_dir=str(tmp_path / "leak")), runner="DirectRunner",
        num_workers=2, log=lambda *_: None)
  assert os.path.exists(tmp_path / "leak" / shards.SPLIT_LEAKS)
  assert not os.path.exists(tmp_path / "leak" / beam_prepare.BEAM_DIR)


def test_tflite_embedder_built_once_per_worker_in_setup(tmp_path, monkeypatch):
  """ProcessClip.setup builds the frame embedder (here the MobileNet TFLite interpreter)
  before the first clip; every clip of that DoFn instance reuses it. Setup also works in a
  process where TensorFlow already runs (the in-memory DirectRunner of a resumed run: its
  thread settings can no longer change)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from av_sound_tf.core import embedders  # pylint: disable=g-import-not-at-top
  _ = tf.constant(1) + 1  # TensorFlow's context now exists, as in the launcher
  from tests.conftest import mobilenet_path  # pylint: disable=g-import-not-at-top
  clips = sorted(os.listdir(shared_path("real_av", "clips")))[:2]
  file_list = write_list(tmp_path / "list.csv", [
      (os.path.join(shared_path("real_av", "clips"), c), "x") for c in clips])
  config = featurize.PrepareConfig(output_dir=str(tmp_path / "out"),
                                   modalities=("audio", "visual"),
                                   embedder=f"tflite:{mobilenet_path()}", num_video_frames=4)
  _, _, pending, _ = shards.start_run(inputs.from_file_list(file_list), config)
  built = []
  build = embedders.build_embedder
  monkeypatch.setattr(embedders, "build_embedder",
                      lambda *a, **k: built.append(a) or build(*a, **k))
  fn = beam_prepare.ProcessClip(config)
  fn.setup()
  assert len(built) == 1 and fn.processor._embedder.dim == 1024  # before any clip
  out = [o for job, shard in pending
         for o in fn.process(beam_prepare._job_to_json(job, shard))]
  assert [result.status for _, (_, result) in out] == ["written", "written"]
  assert [result.embedding_dim for _, (_, result) in out] == [1024, 1024]
  assert len(built) == 1
