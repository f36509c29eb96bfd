"""The TFRecord schema: exact keys, shapes and values after a write/read round trip."""

import numpy as np
import pytest
import tensorflow as tf

from av_sound_tf.core import dataset_info
from av_sound_tf.core import schema


def _write(path, examples):
  with tf.io.TFRecordWriter(str(path)) as w:
    for ex in examples:
      w.write(ex.SerializeToString())


def test_round_trip_audio_visual(tmp_path):
  rng = np.random.default_rng(0)
  log_mel = rng.normal(size=[499, 64]).astype(np.float32)
  mean = rng.normal(size=[32]).astype(np.float32)
  per_frame = rng.normal(size=[64, 32]).astype(np.float32)
  ex = schema.make_example("clip/1", "/data/a.mp4", [3, 1], ["/m/c", "/m/a"], 30.0, 40.0,
                           4.99, log_mel, mean, per_frame, 64)
  path = tmp_path / "a.tfrecord"
  _write(path, [ex])
  (got,) = list(schema.read_examples(str(path), num_classes=5, embedding_dim=32))
  assert got["clip_id"].numpy() == b"clip/1"
  assert got["source_path"].numpy() == b"/data/a.mp4"
  np.testing.assert_array_equal(got["labels"].numpy(), [0, 1, 0, 1, 0])
  np.testing.assert_array_equal(got["label_indices"].numpy(), [3, 1])
  assert got["start_seconds"].numpy() == 30.0 and got["end_seconds"].numpy() == 40.0
  assert got["has_audio"].numpy() == 1 and got["has_video"].numpy() == 1
  assert got["num_frames"].numpy() == 499
  np.testing.assert_array_equal(got["log_mel"].numpy(), log_mel.astype(np.float16))
  np.testing.assert_array_equal(got["embedding_mean"].numpy(), mean)
  np.testing.assert_array_equal(got["frame_embeddings"].numpy(),
                                per_frame.astype(np.float16))
  raw = tf.train.Example.FromString(ex.SerializeToString())
  # "labeled" is written only for unlabeled clips (absent means labeled).
  assert set(raw.features.feature) == set(schema.FEATURE_SPEC) - {"labeled"}
  assert got["labeled"].numpy() == 1
  assert raw.features.feature["schema_version"].int64_list.value == [schema.SCHEMA_VERSION]


def test_missing_modalities_batch_together(tmp_path):
  audio_only = schema.make_example("a", "a.wav", [0], ["x"], log_mel=np.zeros([10, 64]))
  video_only = schema.make_example("v", "v.mp4", [], [], embedding_mean=np.ones([8]))
  path = tmp_path / "m.tfrecord"
  _write(path, [audio_only, video_only])
  ds = schema.read_examples(str(path), num_classes=2, embedding_dim=8)
  a, v = list(ds)
  assert a["has_video"].numpy() == 0 and a["embedding_mean"].shape == (8,)
  np.testing.assert_array_equal(a["embedding_mean"].numpy(), np.zeros(8))
  assert v["has_audio"].numpy() == 0 and v["log_mel"].shape == (0, 64)
  np.testing.assert_array_equal(v["labels"].numpy(), [0, 0])  # no labels: all zeros
  batch = next(iter(ds.map(lambda d: d["embedding_mean"]).batch(2)))
  assert batch.shape == (2, 8)


def test_rejects_bad_log_mel():
  with pytest.raises(ValueError, match="frames, bins"):
    schema.make_example("a", "a", [], [], log_mel=np.zeros([3]))


def test_shard_name_and_listing(tmp_path):
  assert schema.shard_name("train", 3, 16) == "train-00003-of-00016.tfrecord"
  for k in range(2):
    (tmp_path / schema.shard_name("1", k, 2)).write_bytes(b"")
  (tmp_path / schema.shard_name("10", 0, 1)).write_bytes(b"")
  assert [p.split("/")[-1] for p in schema.list_shards(str(tmp_path), "1")] == [
      "1-00000-of-00002.tfrecord", "1-00001-of-00002.tfrecord"]
  with pytest.raises(FileNotFoundError, match="No shards for split 'eval'"):
    schema.list_shards(str(tmp_path), "eval")


def test_dataset_info(tmp_path):
  dataset_info.DatasetInfo.write(str(tmp_path), {"num_classes": 3})
  info = dataset_info.DatasetInfo.read(str(tmp_path))
  assert info.num_classes == 3 and info.info["schema_version"] == schema.SCHEMA_VERSION
  with pytest.raises(FileNotFoundError, match="prepare_data"):
    dataset_info.DatasetInfo.read(str(tmp_path / "nope"))


def _audioset_example(video_id, start, labels, embedding):
  ex = tf.train.SequenceExample()
  ctx = ex.context.feature
  ctx["video_id"].bytes_list.value.append(video_id.encode())
  ctx["start_time_seconds"].float_list.value.append(start)
  ctx["end_time_seconds"].float_list.value.append(start + 10)
  ctx["labels"].int64_list.value.extend(labels)
  fl = ex.feature_lists.feature_list["audio_embedding"]
  for row in embedding:
    fl.feature.add().bytes_list.value.append(row.astype(np.uint8).tobytes())
  return ex


def test_audioset_released_embeddings(tmp_path):
  rng = np.random.default_rng(0)
  full = rng.integers(0, 256, size=[10, 128])
  short = rng.integers(0, 256, size=[7, 128])
  path = tmp_path / "bal_train00.tfrecord"
  _write(path, [_audioset_example("--PJHxphWEs", 30.0, [0, 137], full),
                _audioset_example("abcdefghijk", 0.0, [526], short)])
  a, b = list(schema.read_audioset_embeddings(str(tmp_path / "*.tfrecord")))
  assert a["clip_id"].numpy() == b"--PJHxphWEs_30"
  assert a["video_id"].numpy() == b"--PJHxphWEs"
  assert a["labels"].shape == (527,) and a["labels"].numpy().sum() == 2
  assert a["labels"].numpy()[137] == 1
  np.testing.assert_allclose(a["audio_embedding"].numpy(), full / 255.0 * 4 - 2, atol=1e-6)
  assert b["num_frames"].numpy() == 7
  np.testing.assert_allclose(b["audio_embedding"].numpy()[:7], short / 255.0 * 4 - 2,
                             atol=1e-6)
  np.testing.assert_array_equal(b["audio_embedding"].numpy()[7:], 0)
  with pytest.raises(FileNotFoundError):
    schema.read_audioset_embeddings(str(tmp_path / "none*.tfrecord"))
