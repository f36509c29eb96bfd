"""The two folders that stages hand to each other, and the one place that knows their layout.

* `DatasetInfo`: a prepared-data folder (bin/prepare_data's output): ``dataset_info.json``
  (classes, modalities, front-end parameters, embedding size, per-split shard lists and
  counts), the class map, the shards. Read by training, evaluation, prediction and the
  TFLite calibration; written once, by data preparation.
* `PredictionsInfo`: a predictions folder (bin/predict's output): ``predictions_info.json``,
  one TFRecord of both models' scores per split, the class map. Read by fusion training
  and the report.

Nothing else opens these JSON files or spells their names.
"""

import json
from typing import Dict, List, Optional, Sequence

import tensorflow as tf

from av_sound_tf.core import files
from av_sound_tf.core import labels as labels_lib
from av_sound_tf.core import schema

DATASET_INFO = "dataset_info.json"
PREDICTIONS_INFO = "predictions_info.json"


class _FolderInfo:
  """A stage's output folder described by one JSON file (`FILE`, written by `MADE_BY`)."""

  FILE = ""
  MADE_BY = ""

  def __init__(self, folder: str, info: dict):
    self.folder = folder
    self.info = info

  @classmethod
  def path(cls, folder: str) -> str:
    return tf.io.gfile.join(folder, cls.FILE)

  @classmethod
  def exists(cls, folder: str) -> bool:
    return tf.io.gfile.exists(cls.path(folder))

  @classmethod
  def read(cls, folder: str):
    """Reads and checks the folder's JSON file."""
    path = cls.path(folder)
    if not tf.io.gfile.exists(path):
      raise FileNotFoundError(f"{path} not found: is {folder} an output of {cls.MADE_BY}?")
    with tf.io.gfile.GFile(path) as f:
      try:
        info = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); re-run {cls.MADE_BY}.") from None
    cls._check(path, info)
    return cls(folder, info)

  @classmethod
  def _check(cls, path, info):
    del path, info

  @classmethod
  def write(cls, folder: str, info: dict):
    """Writes the folder's JSON file (atomically: the stage's last step)."""
    files.write_json(cls.path(folder), info, sort_keys=True)
    return cls(folder, info)

  @property
  def num_classes(self) -> int:
    return int(self.info["num_classes"])

  @property
  def splits(self) -> Dict[str, dict]:
    return self.info.get("splits", {})

  @property
  def labels_path(self) -> str:
    return tf.io.gfile.join(self.folder, self.info.get("labels_file", schema.LABELS_FILE))

  def label_map(self) -> labels_lib.LabelMap:
    return labels_lib.LabelMap.from_csv(self.labels_path)


class DatasetInfo(_FolderInfo):
  """A prepared-data folder: `DatasetInfo.read(data_dir)`; `DatasetInfo.write(...)` once."""

  FILE = DATASET_INFO
  MADE_BY = "bin/prepare_data"

  @property
  def data_dir(self) -> str:
    return self.folder

  @classmethod
  def _check(cls, path, info):
    if info.get("schema_version") != schema.SCHEMA_VERSION:
      raise ValueError(f"{path}: schema_version {info.get('schema_version')} is not "
                       f"{schema.SCHEMA_VERSION}; re-run bin/prepare_data with this version.")

  @classmethod
  def write(cls, folder: str, info: dict) -> "DatasetInfo":
    return super().write(folder, dict(info, schema_version=schema.SCHEMA_VERSION))

  @property
  def embedding_dim(self) -> int:
    return int(self.info.get("embedding_dim") or 0)

  @property
  def modalities(self) -> List[str]:
    return list(self.info.get("modalities", ["audio"]))

  def has_split(self, split: str) -> bool:
    return split in self.splits

  def num_examples(self, splits: Sequence[str]) -> Optional[int]:
    """Examples written for `splits` together; None when a split is not listed."""
    if not all(s in self.splits for s in splits):
      return None
    return sum(int(self.splits[s].get("num_examples", 0)) for s in splits)

  def class_counts(self, splits: Sequence[str]) -> Optional[List[int]]:
    """Positives per class over `splits`; None when a split does not list them."""
    counts = None
    for s in splits:
      c = self.splits.get(s, {}).get("class_counts")
      if c is None:
        return None
      counts = list(c) if counts is None else [a + b for a, b in zip(counts, c)]
    return counts

  def shards(self, split: str) -> List[str]:
    """The shard files of one split, in order (raises if there are none)."""
    return schema.list_shards(self.data_dir, split)


class PredictionsInfo(_FolderInfo):
  """A predictions folder (bin/predict): both models' scores per split."""

  FILE = PREDICTIONS_INFO
  MADE_BY = "bin/predict"

  @property
  def predictions_dir(self) -> str:
    return self.folder

  def file(self, split: str) -> str:
    """The TFRecord of one split's predictions."""
    if split not in self.splits:
      raise ValueError(f"No predictions for split {split!r} in {self.predictions_dir} "
                       f"(splits: {sorted(self.splits)})")
    return tf.io.gfile.join(self.predictions_dir, self.splits[split]["file"])

  def num_examples(self, split: str) -> Optional[int]:
    n = self.splits.get(split, {}).get("num_examples")
    return None if n is None else int(n)
