"""The TFRecord schema: feature keys, dtypes, parse specs, writer and readers in one module.

One `tf.train.Example` per clip:

| key                    | type        | content                                              |
|------------------------|-------------|------------------------------------------------------|
| schema_version         | int64       | `SCHEMA_VERSION`                                     |
| clip_id                | bytes       | unique id (``<YTID>_<start>`` or the relative path)  |
| source_path            | bytes       | the media file it came from                          |
| start_seconds          | float       | segment start within the source (0 if whole file)    |
| end_seconds            | float       | segment end within the source                        |
| duration_seconds       | float       | length of the decoded audio (or video) segment       |
| labels                 | int64 list  | class indices into the label map                     |
| label_mids             | bytes list  | the same labels as MIDs (or names)                   |
| has_audio, has_video   | int64       | 1 when the modality was decoded                      |
| log_mel                | bytes       | float16 little-endian, row-major [frames, mel_bins]  |
| log_mel_shape          | int64 [2]   | [frames, mel_bins]; frames = 0 without audio          |
| embedding_mean         | bytes       | float32 [dim]: the mean frame embedding (paper 3.2)  |
| embedding_dim          | int64       | dim (0 without video)                                |
| frame_embeddings       | bytes       | optional float16 [num_video_frames, dim]             |
| num_video_frames       | int64       | frames sampled from the video (64 by default)        |

Tensors are stored as raw bytes with explicit shapes so that the reader needs no dimension
up front. `read_examples` turns shards into a `tf.data.Dataset` of dicts; the training
pipelines build on it. `read_audioset_embeddings` reads AudioSet's released VGGish features
(`tf.train.SequenceExample`) into the same kind of dicts.
"""

import os
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf


SCHEMA_VERSION = 1
LABELS_FILE = "class_labels_indices.csv"
SHARD_SUFFIX = ".tfrecord"

FEATURE_SPEC = {
    "schema_version": tf.io.FixedLenFeature([], tf.int64, default_value=0),
    "clip_id": tf.io.FixedLenFeature([], tf.string),
    "source_path": tf.io.FixedLenFeature([], tf.string, default_value=""),
    "start_seconds": tf.io.FixedLenFeature([], tf.float32, default_value=0.0),
    "end_seconds": tf.io.FixedLenFeature([], tf.float32, default_value=0.0),
    "duration_seconds": tf.io.FixedLenFeature([], tf.float32, default_value=0.0),
    "labels": tf.io.VarLenFeature(tf.int64),
    "label_mids": tf.io.VarLenFeature(tf.string),
    "has_audio": tf.io.FixedLenFeature([], tf.int64, default_value=0),
    "has_video": tf.io.FixedLenFeature([], tf.int64, default_value=0),
    "log_mel": tf.io.FixedLenFeature([], tf.string, default_value=""),
    "log_mel_shape": tf.io.FixedLenFeature([2], tf.int64, default_value=[0, 0]),
    "embedding_mean": tf.io.FixedLenFeature([], tf.string, default_value=""),
    "embedding_dim": tf.io.FixedLenFeature([], tf.int64, default_value=0),
    "frame_embeddings": tf.io.FixedLenFeature([], tf.string, default_value=""),
    "num_video_frames": tf.io.FixedLenFeature([], tf.int64, default_value=0),
    # 0 for a clip without labels (targets from a distillation teacher); absent = 1.
    "labeled": tf.io.FixedLenFeature([], tf.int64, default_value=1),
}


def _bytes(values):
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))


def _int64(values):
  return tf.train.Feature(int64_list=tf.train.Int64List(value=values))


def _float(values):
  return tf.train.Feature(float_list=tf.train.FloatList(value=values))


def make_example(clip_id: str,
                 source_path: str,
                 label_indices: Sequence[int],
                 label_mids: Sequence[str],
                 start_seconds: float = 0.0,
                 end_seconds: float = 0.0,
                 duration_seconds: float = 0.0,
                 log_mel: Optional[np.ndarray] = None,
                 embedding_mean: Optional[np.ndarray] = None,
                 frame_embeddings: Optional[np.ndarray] = None,
                 num_video_frames: int = 0,
                 labeled: bool = True) -> tf.train.Example:
  """Builds the `tf.train.Example` for one clip (see the module docstring for the keys).

  Args:
    log_mel: float [frames, mel_bins], or None when the clip has no audio.
    embedding_mean: float [dim], or None when the clip has no video.
    frame_embeddings: optional float [num_video_frames, dim], stored as float16.
    labeled: False for a clip without labels (written as labeled=0).
  """
  feature = {
      "schema_version": _int64([SCHEMA_VERSION]),
      "clip_id": _bytes([clip_id.encode()]),
      "source_path": _bytes([source_path.encode()]),
      "start_seconds": _float([start_seconds]),
      "end_seconds": _float([end_seconds]),
      "duration_seconds": _float([duration_seconds]),
      "labels": _int64([int(i) for i in label_indices]),
      "label_mids": _bytes([m.encode() for m in label_mids]),
      "has_audio": _int64([int(log_mel is not None)]),
      "has_video": _int64([int(embedding_mean is not None)]),
  }
  if not labeled:
    feature["labeled"] = _int64([0])
  if log_mel is not None:
    log_mel = np.asarray(log_mel)
    if log_mel.ndim != 2:
      raise ValueError(f"log_mel must be [frames, bins]. Received: shape={log_mel.shape}")
    with np.errstate(over="ignore"):  # overflow to inf is what _check_finite reports
      _check_finite("log_mel", log_mel.astype("<f2"))
    feature["log_mel"] = _bytes([log_mel.astype("<f2").tobytes()])
    feature["log_mel_shape"] = _int64(list(log_mel.shape))
  if embedding_mean is not None:
    embedding_mean = np.asarray(embedding_mean).reshape(-1)
    _check_finite("embedding_mean", embedding_mean.astype("<f4"))
    feature["embedding_mean"] = _bytes([embedding_mean.astype("<f4").tobytes()])
    feature["embedding_dim"] = _int64([embedding_mean.shape[0]])
    feature["num_video_frames"] = _int64([int(num_video_frames)])
  if frame_embeddings is not None:
    frame_embeddings = np.asarray(frame_embeddings)
    with np.errstate(over="ignore"):
      _check_finite("frame_embeddings", frame_embeddings.astype("<f2"))
    feature["frame_embeddings"] = _bytes([frame_embeddings.astype("<f2").tobytes()])
    feature["num_video_frames"] = _int64([frame_embeddings.shape[0]])
  return tf.train.Example(features=tf.train.Features(feature=feature))


def _check_finite(name, stored):
  """Rejects NaN/Inf, including values that overflow the stored float16."""
  bad = int(np.size(stored) - np.count_nonzero(np.isfinite(stored)))
  if bad:
    raise ValueError(f"{name} has {bad} non-finite value(s) (NaN, Inf or beyond float16)")


def multi_hot(indices, num_classes: int):
  """int64 class indices [n] -> float32 multi-hot [num_classes] (zeros when n = 0)."""
  labels = tf.reduce_max(tf.one_hot(indices, num_classes, dtype=tf.float32), axis=0)
  return tf.ensure_shape(
      tf.cond(tf.size(indices) > 0, lambda: labels, lambda: tf.zeros([num_classes])),
      [num_classes])


def parse_example(serialized, num_classes: int, num_mel_bins: int = 64,
                  embedding_dim: int = 0):
  """Parses one serialized Example into a dict of dense tensors.

  Args:
    serialized: scalar string tensor.
    num_classes: size of the label space (for the multi-hot ``labels``).
    num_mel_bins: mel bins of ``log_mel`` (fixes the static shape).
    embedding_dim: when > 0, ``embedding_mean`` is always [embedding_dim]: zeros for a
      clip without video (``has_video`` says which), so that clips batch together.

  Returns:
    dict with clip_id, source_path, start/end/duration_seconds, labels (float32 multi-hot
    [num_classes]), label_indices (int64 [n]), has_audio, has_video, labeled (0 for a
    clip prepared without labels), log_mel (float32
    [frames, num_mel_bins]), num_frames, embedding_mean (float32 [dim]) and, when stored,
    frame_embeddings (float32 [num_video_frames, dim]).
  """
  p = tf.io.parse_single_example(serialized, FEATURE_SPEC)
  indices = tf.sparse.to_dense(p["labels"])
  labels = multi_hot(indices, num_classes)
  log_mel = tf.io.decode_raw(p["log_mel"], tf.float16, little_endian=True)
  frames = p["log_mel_shape"][0]
  log_mel = tf.reshape(tf.cast(log_mel, tf.float32), [frames, num_mel_bins])
  emb = tf.io.decode_raw(p["embedding_mean"], tf.float32, little_endian=True)
  if embedding_dim:
    emb = tf.cond(tf.size(emb) > 0, lambda: emb, lambda: tf.zeros([embedding_dim]))
    emb = tf.ensure_shape(emb, [embedding_dim])
  frame_emb = tf.io.decode_raw(p["frame_embeddings"], tf.float16, little_endian=True)
  frame_emb = tf.reshape(tf.cast(frame_emb, tf.float32), [-1, tf.maximum(p["embedding_dim"], 1)])
  return {
      "clip_id": p["clip_id"],
      "source_path": p["source_path"],
      "start_seconds": p["start_seconds"],
      "end_seconds": p["end_seconds"],
      "duration_seconds": p["duration_seconds"],
      "labels": labels,
      "label_indices": indices,
      "has_audio": p["has_audio"],
      "has_video": p["has_video"],
      "labeled": p["labeled"],
      "log_mel": log_mel,
      "num_frames": frames,
      "embedding_mean": emb,
      "frame_embeddings": frame_emb,
  }


def shard_name(prefix: str, index: int, num_shards: int) -> str:
  """``<prefix>-00000-of-00016.tfrecord``."""
  return f"{prefix}-{index:05d}-of-{num_shards:05d}{SHARD_SUFFIX}"


def list_shards(data_dir, split: str):
  """The shard files of one split, in order (raises if there are none)."""
  files = sorted(tf.io.gfile.glob(tf.io.gfile.join(data_dir, f"{split}-*-of-*{SHARD_SUFFIX}")))
  if not files:
    raise FileNotFoundError(f"No shards for split {split!r} in {data_dir}")
  return files


class CorruptShardError(ValueError):
  """A TFRecord shard that cannot be read to its end (the message names the file)."""


def count_records(path) -> int:
  """Records in one TFRecord file, reading it to the end (checks every record's CRC).

  Raises CorruptShardError naming the file when a record is truncated or corrupted.
  """
  ds = tf.data.TFRecordDataset(path, buffer_size=8 << 20)
  try:
    return int(ds.reduce(np.int64(0), lambda n, _: n + 1))
  except tf.errors.DataLossError as e:
    raise CorruptShardError(f"{path}: corrupted or truncated TFRecord ({e.message})") from None
  except tf.errors.OpError as e:
    raise CorruptShardError(f"{path}: cannot be read ({e.message})") from None


def check_shards(files, skip_corrupt: bool = False, expected_records: Optional[int] = None,
                 log=None):
  """Reads every shard to its end before a run relies on it.

  tf.data reports a damaged record as "corrupted record at <offset>", without the file, in
  the middle of training. This check names the file up front.

  Args:
    files: shard paths.
    skip_corrupt: False: raise CorruptShardError at the first bad shard; True: leave bad
      shards out, log each, and return them.
    expected_records: when given (the count bin/prepare_data recorded) and no shard was
      skipped, a different total is an error: a shard truncated exactly at a record
      boundary, or replaced, passes the CRC checks but not this count.
    log: callable for the per-shard warnings (default: absl logging.warning).

  Returns:
    (good_files, skipped [(file, reason)], num_records in good_files).
  """
  if log is None:
    from absl import logging  # pylint: disable=g-import-not-at-top
    log = logging.warning
  good, skipped, total = [], [], 0
  for path in files:
    try:
      n = count_records(path)
    except CorruptShardError as e:
      if not skip_corrupt:
        raise CorruptShardError(f"{e} Re-run bin/prepare_data on this split (it redoes "
                                "damaged shards), or pass --skip_corrupt_shards to train "
                                "without it.") from None
      log(f"Skipping shard: {e}")
      skipped.append((path, str(e)))
      continue
    good.append(path)
    total += n
  if expected_records is not None and not skipped and total != expected_records:
    raise CorruptShardError(
        f"The shards {os.path.dirname(files[0]) if files else ''} hold {total} records but "
        f"bin/prepare_data wrote {expected_records}: a shard was truncated or replaced. "
        "Re-run bin/prepare_data on this directory.")
  return good, skipped, total


def read_examples(files, num_classes: int, num_mel_bins: int = 64, embedding_dim: int = 0,
                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True) -> tf.data.Dataset:
  """Shards -> `tf.data.Dataset` of parsed dicts (see `parse_example`), in file order."""
  if isinstance(files, str):
    files = [files]
  ds = tf.data.TFRecordDataset(list(files))
  return ds.map(
      lambda s: parse_example(s, num_classes, num_mel_bins, embedding_dim),
      num_parallel_calls=num_parallel_calls,
      deterministic=deterministic)


# AudioSet's released VGGish features ("audioset_v1_embeddings"): one SequenceExample per
# 10 s segment, 128 uint8 values per second, the 8-bit quantization of PCA-whitened VGGish
# embeddings clipped to [-2, 2] (vggish_postprocess.py: QUANTIZE_MIN_VAL/MAX_VAL).
AUDIOSET_CONTEXT_SPEC = {
    "video_id": tf.io.FixedLenFeature([], tf.string),
    "start_time_seconds": tf.io.FixedLenFeature([], tf.float32, default_value=0.0),
    "end_time_seconds": tf.io.FixedLenFeature([], tf.float32, default_value=0.0),
    "labels": tf.io.VarLenFeature(tf.int64),
}
AUDIOSET_SEQUENCE_SPEC = {
    "audio_embedding": tf.io.FixedLenSequenceFeature([], tf.string),
}
AUDIOSET_EMBEDDING_DIM = 128
_QUANT_MIN, _QUANT_MAX = -2.0, 2.0


def parse_audioset_embedding_example(serialized, num_classes=527, num_seconds=10):
  """Parses one AudioSet feature SequenceExample.

  Returns:
    dict with clip_id (``<video_id>_<start>``), video_id, start_seconds, end_seconds,
    labels (multi-hot [num_classes]), label_indices, audio_embedding (float32
    [num_seconds, 128], dequantized to [-2, 2], zero-padded or cropped) and num_frames
    (seconds actually present, at most num_seconds).
  """
  context, sequence = tf.io.parse_single_sequence_example(
      serialized, AUDIOSET_CONTEXT_SPEC, AUDIOSET_SEQUENCE_SPEC)
  indices = tf.sparse.to_dense(context["labels"])
  labels = multi_hot(indices, num_classes)
  raw = tf.io.decode_raw(sequence["audio_embedding"], tf.uint8)  # [seconds, 128]
  raw = tf.reshape(raw, [-1, AUDIOSET_EMBEDDING_DIM])
  emb = tf.cast(raw, tf.float32) * ((_QUANT_MAX - _QUANT_MIN) / 255.0) + _QUANT_MIN
  n = tf.minimum(tf.shape(emb)[0], num_seconds)
  emb = tf.pad(emb[:n], [[0, num_seconds - n], [0, 0]])
  emb = tf.ensure_shape(emb, [num_seconds, AUDIOSET_EMBEDDING_DIM])
  start = context["start_time_seconds"]
  clip_id = tf.strings.join(
      [context["video_id"], tf.strings.as_string(tf.cast(tf.round(start), tf.int64))], "_")
  return {
      "clip_id": clip_id,
      "video_id": context["video_id"],
      "start_seconds": start,
      "end_seconds": context["end_time_seconds"],
      "labels": labels,
      "label_indices": indices,
      "audio_embedding": emb,
      "num_frames": n,
  }


def read_audioset_embeddings(file_pattern, num_classes=527, num_seconds=10,
                             deterministic=True) -> tf.data.Dataset:
  """AudioSet's released embedding TFRecords -> `tf.data.Dataset` of parsed dicts."""
  files = sorted(tf.io.gfile.glob(file_pattern))
  if not files:
    raise FileNotFoundError(f"No AudioSet feature files match {file_pattern}")
  return tf.data.TFRecordDataset(files).map(
      lambda s: parse_audioset_embedding_example(s, num_classes, num_seconds),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)


# Model outputs, the input of the fusion models (bin/predict writes them): one Example per
# clip with the audio and visual models' clip scores and which modalities were present.
PREDICTION_SPEC = {
    "clip_id": tf.io.FixedLenFeature([], tf.string),
    "labels": tf.io.VarLenFeature(tf.int64),
    "h_audio": tf.io.VarLenFeature(tf.float32),
    "h_visual": tf.io.VarLenFeature(tf.float32),
    "has_audio": tf.io.FixedLenFeature([], tf.int64, default_value=0),
    "has_video": tf.io.FixedLenFeature([], tf.int64, default_value=0),
}


def make_prediction_example(clip_id, label_indices, h_audio, h_visual, has_audio,
                            has_video) -> tf.train.Example:
  """One clip's model outputs (h_audio, h_visual: [C]; zeros for a missing modality)."""
  return tf.train.Example(features=tf.train.Features(feature={
      "clip_id": _bytes([clip_id if isinstance(clip_id, bytes) else clip_id.encode()]),
      "labels": _int64([int(i) for i in label_indices]),
      "h_audio": _float(np.asarray(h_audio, np.float32).tolist()),
      "h_visual": _float(np.asarray(h_visual, np.float32).tolist()),
      "has_audio": _int64([int(has_audio)]),
      "has_video": _int64([int(has_video)]),
  }))


def parse_prediction_example(serialized, num_classes: int):
  """-> dict: clip_id, labels (multi-hot), h_audio, h_visual [C], audio_present and
  visual_present (float32 [1])."""
  p = tf.io.parse_single_example(serialized, PREDICTION_SPEC)
  indices = tf.sparse.to_dense(p["labels"])
  labels = multi_hot(indices, num_classes)
  dense = lambda k: tf.ensure_shape(tf.sparse.to_dense(p[k]), [num_classes])
  return {
      "clip_id": p["clip_id"],
      "labels": labels,
      "h_audio": dense("h_audio"),
      "h_visual": dense("h_visual"),
      "audio_present": tf.cast(p["has_audio"], tf.float32)[None],
      "visual_present": tf.cast(p["has_video"], tf.float32)[None],
  }
