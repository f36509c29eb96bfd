"""Shard bookkeeping, shared by the local runner (data_prep/prepare.py) and the Beam
pipeline (data_prep/beam_prepare.py): what a run writes besides the examples themselves.

* A run begins with `start_run` and ends with `finalize`; in between, each planned shard
  is written by one `ShardWriter` from `featurize.ClipResult`s in input order.
* Shards: the jobs of each split are cut into ``num_shards`` contiguous blocks
  (`assign_shards`), shard ``k`` written as ``<split>-0000k-of-0000N.tfrecord``. A shard is
  written to ``<name>.incomplete`` and renamed when complete; then its manifest part
  ``.manifest/<name>.csv`` is written the same way. The manifest part is the commit mark.
* Resume: a rerun with the same inputs and flags keeps a shard only when it passes
  `verify_shard` against its manifest part (the part lists every input of the shard, and the
  shard reads to its end with valid CRCs and holds exactly the part's written records);
  every other shard is redone from scratch, damaged ones with a warning naming the shard
  and the reason. An interrupted or damaged run thus ends with every input exactly once.
* Duplicates: before planning, `inputs.mark_duplicates` fails later rows of a recording
  listed twice (another spelling, a symlink, a byte-identical copy); a recording in two
  splits stops the run before anything is written, listed in ``split_leaks.csv``.
* Accounting: ``manifest.csv`` has one row per input (``written`` with shard and index, or
  ``failed`` with the reason), including malformed list rows and media files without a
  row. Segment rows without a media file go to ``missing_media.csv``. The dataset info
  (`core.dataset_info.DatasetInfo`) is written last, from the manifest parts.
"""

import collections
import concurrent.futures
import csv
import dataclasses
import hashlib
import json
import time

from absl import logging
import numpy as np
import tensorflow as tf

from av_sound_tf.core import dataset_info
from av_sound_tf.core import files
from av_sound_tf.core import schema
from data_prep import inputs as inputs_lib

MANIFEST = "manifest.csv"
MANIFEST_PARTS = ".manifest"
MISSING_MEDIA = "missing_media.csv"
SPLIT_LEAKS = "split_leaks.csv"
SPLIT_LEAK_COLUMNS = ("path", "line", "split", "clip_id", "same_as", "same_as_line",
                      "same_as_split", "same_as_clip_id", "why")
RUN_CONFIG = "prepare_config.json"
MANIFEST_COLUMNS = ("path", "status", "reason", "clip_id", "split", "shard", "index_in_shard",
                    "labels", "num_frames", "duration_seconds", "has_audio", "has_video",
                    "embedding_dim", "warnings")
UNFINISHED = "unfinished"


@dataclasses.dataclass
class Summary:
  """What a run did; `failure_fraction` decides the exit status of bin/prepare_data."""

  total: int
  written: int
  failed: int
  skipped_shards: int
  reasons: collections.Counter
  splits: dict
  unmatched_files: int
  missing_media: int
  elapsed_seconds: float
  clips_per_second: float
  output_dir: str
  counters: dict = dataclasses.field(default_factory=dict)  # Beam counters, when run there

  @property
  def failure_fraction(self):
    return self.failed / max(self.total, 1)

  def table(self):
    lines = [f"Prepared {self.total} inputs into {self.output_dir} in "
             f"{self.elapsed_seconds:.1f} s ({self.clips_per_second:.1f} clips/s):",
             f"  written {self.written}, failed {self.failed} "
             f"({100 * self.failure_fraction:.1f} %)"]
    if self.skipped_shards:
      lines.append(f"  resumed: {self.skipped_shards} complete shard(s) kept from a previous run")
    lines.append("  split        shards   examples")
    for name, s in sorted(self.splits.items()):
      lines.append(f"  {name:<12} {s['num_shards']:>6}   {s['num_examples']:>8}")
    if self.reasons:
      lines.append("  failures by reason:")
      for reason, n in self.reasons.most_common():
        lines.append(f"    {n:>6}  {reason}")
    if self.unmatched_files:
      lines.append(f"  {self.unmatched_files} media file(s) had no row in the list (failed)")
    if self.missing_media:
      lines.append(f"  {self.missing_media} list row(s) had no media file: see {MISSING_MEDIA}")
    for name, value in sorted(self.counters.items()):
      lines.append(f"  Beam counter {name}: {value}")
    lines.append(f"  manifest: {tf.io.gfile.join(self.output_dir, MANIFEST)}")
    return "\n".join(lines)


def reason_kind(reason):
  """The reason without file-specific details, for counting failures by kind."""
  if reason.startswith("duplicate of "):
    return "duplicate"  # "duplicate of <first path> (line N)"
  return reason.split(" (")[0].split(": ")[0] if reason else ""


def _read_csv(path):
  with tf.io.gfile.GFile(path) as f:
    return list(csv.DictReader(f))


def _manifest_row(job, result, shard="", index_in_shard=""):
  return {
      "path": job.path, "status": result.status, "reason": result.reason,
      "clip_id": job.clip_id, "split": job.split, "shard": shard,
      "index_in_shard": index_in_shard, "labels": ";".join(job.label_mids),
      "num_frames": result.num_frames, "duration_seconds": f"{result.duration_seconds:.3f}",
      "has_audio": int(result.has_audio), "has_video": int(result.has_video),
      "embedding_dim": result.embedding_dim, "warnings": result.warnings,
  }


def assign_shards(jobs, config):
  """{split: (num_shards, [(job, shard_index), ...])}, jobs in input order."""
  by_split = collections.defaultdict(list)
  for job in jobs:
    by_split[job.split].append(job)
  plan = {}
  for split, split_jobs in sorted(by_split.items()):
    n = len(split_jobs)
    num_shards = config.num_shards or -(-n // config.examples_per_shard)
    num_shards = max(1, min(num_shards, n))
    plan[split] = (num_shards, [(j, i * num_shards // n) for i, j in enumerate(split_jobs)])
  return plan


def _check_run_config(config, inputs_fingerprint):
  path = tf.io.gfile.join(config.output_dir, RUN_CONFIG)
  current = {"config": config.content_dict(), "inputs": inputs_fingerprint}
  current = json.loads(json.dumps(current))
  if tf.io.gfile.exists(path):
    with tf.io.gfile.GFile(path) as f:
      previous = json.load(f)
    if previous != current:
      raise ValueError(
          f"{config.output_dir} holds a run with other inputs or flags ({path}); a resumed "
          "run must use the same ones. Use a new --output_dir, or --overwrite.")
  else:
    files.write_text(path, json.dumps(current, indent=2, sort_keys=True))


def _fingerprint(jobs):
  h = hashlib.sha256()
  for j in jobs:
    h.update(f"{j.clip_id}|{j.path}|{j.split}|{j.label_indices}|{j.start_seconds}|"
             f"{j.end_seconds}|{j.error}{'' if j.labeled else '|unlabeled'}\n".encode())
  return {"num_jobs": len(jobs), "sha256": h.hexdigest()}


def start_run(inputs, config, overwrite=False, fingerprint_content=True):
  """What every runner (local or Beam) does first: fails duplicate rows and refuses split
  leaks (`inputs.mark_duplicates`), checks a resumed run's settings, writes the label map,
  plans the shards, and lists the (job, shard name) pairs still to do (shards of an
  earlier run that pass `verify_shard` are kept).

  Args:
    inputs: the jobs and list problems (data_prep.inputs).
    config: a `featurize.PrepareConfig`.
    overwrite: delete an existing run in config.output_dir first.
    fingerprint_content: also find byte-identical copies under other names.

  Returns:
    (plan, shard_names {(split, k): name}, pending, number of kept shards).

  Raises:
    inputs.SplitLeakError: a recording would land in two splits; every such row is listed
      in ``<output_dir>/split_leaks.csv`` and nothing else is written.
  """
  out = config.output_dir
  if overwrite and tf.io.gfile.exists(out):
    tf.io.gfile.rmtree(out)
  tf.io.gfile.makedirs(tf.io.gfile.join(out, MANIFEST_PARTS))
  leaks = inputs_lib.mark_duplicates(inputs, fingerprint_content)
  if leaks:
    _refuse_split_leaks(out, leaks)
  _check_run_config(config, _fingerprint(inputs.jobs))
  inputs.label_map.to_csv(tf.io.gfile.join(out, schema.LABELS_FILE))
  for stale in tf.io.gfile.glob(tf.io.gfile.join(out, "*.incomplete")):
    tf.io.gfile.remove(stale)
  plan = assign_shards(inputs.jobs, config)
  shard_names, planned = {}, collections.Counter()
  for split, (num_shards, assigned) in plan.items():
    for k in range(num_shards):
      shard_names[(split, k)] = schema.shard_name(split, k, num_shards)
    planned.update(shard_names[(split, k)] for _, k in assigned)
  names = list(shard_names.values())
  with concurrent.futures.ThreadPoolExecutor(8) as pool:  # remote file systems: in parallel
    problems = dict(zip(names, pool.map(lambda n: verify_shard(out, n, planned[n]), names)))
  for name, problem in problems.items():
    if problem and problem != UNFINISHED:
      logging.warning("[prepare] redoing shard %s: %s", name, problem)
  pending, skipped = [], 0
  for split, (num_shards, assigned) in plan.items():
    done = {k for k in range(num_shards) if problems[shard_names[(split, k)]] is None}
    skipped += len(done)
    pending.extend((job, shard_names[(split, k)]) for job, k in assigned if k not in done)
  return plan, shard_names, pending, skipped


def _refuse_split_leaks(out, leaks):
  rows = [{"path": l.job.path, "line": l.job.line, "split": l.job.split,
           "clip_id": l.job.clip_id, "same_as": l.first.path, "same_as_line": l.first.line,
           "same_as_split": l.first.split, "same_as_clip_id": l.first.clip_id, "why": l.why}
          for l in leaks]
  report = tf.io.gfile.join(out, SPLIT_LEAKS)
  files.write_text(report, files.csv_text(rows, SPLIT_LEAK_COLUMNS))
  l = leaks[0]
  raise inputs_lib.SplitLeakError(
      f"{len(leaks)} input(s) would put a recording in two splits (test data leaking into "
      f"training), e.g. {l.job.path} (line {l.job.line}, split {l.job.split}) is the same "
      f"recording as {l.first.path} (line {l.first.line}, split {l.first.split}) "
      f"({l.why}). Nothing was written; every case is listed in {report}. Give each "
      "recording (all its copies and segments) one split.", leaks)


class ShardWriter:
  """Writes one shard: examples to ``<name>.incomplete``, renamed when complete, then its
  manifest part (the commit mark a resumed run checks). Rewriting a shard gives the same
  bytes, so a retried writer (a Beam bundle) is harmless."""

  def __init__(self, out, name):
    self.out, self.name = out, name
    self.rows = []
    self.written = 0
    self.writer = tf.io.TFRecordWriter(tf.io.gfile.join(out, name) + ".incomplete")

  def add(self, job, result):
    if result.status == "written":
      self.writer.write(result.example)
      self.rows.append(_manifest_row(job, result, self.name, self.written))
      self.written += 1
    else:
      self.rows.append(_manifest_row(job, result))
      logging.warning("[prepare] failed: %s: %s", job.path, result.reason)

  def close(self):
    self.writer.close()
    tf.io.gfile.rename(tf.io.gfile.join(self.out, self.name) + ".incomplete",
                       tf.io.gfile.join(self.out, self.name), overwrite=True)
    files.write_text(tf.io.gfile.join(self.out, MANIFEST_PARTS, self.name + ".csv"),
                     files.csv_text(self.rows, MANIFEST_COLUMNS))

  def abandon(self):
    self.writer.close()


def verify_shard(out, name, num_inputs):
  """None when shard `name` of an earlier run can be kept, else why it must be redone.

  A kept shard has its manifest part (the commit mark) listing its `num_inputs` planned
  inputs in this version's columns, and its file reads to the end with valid CRCs
  (`schema.count_records`) holding exactly the part's written records: this catches a
  flipped byte, a cut mid-record and a cut at a record boundary. `UNFINISHED`: the part or
  the shard does not exist (an interrupted run; not worth a warning).
  """
  part = tf.io.gfile.join(out, MANIFEST_PARTS, name + ".csv")
  path = tf.io.gfile.join(out, name)
  if not (tf.io.gfile.exists(part) and tf.io.gfile.exists(path)):
    return UNFINISHED
  try:
    rows = _read_csv(part)
  except (csv.Error, UnicodeDecodeError, tf.errors.OpError) as e:
    return f"its manifest part {part} cannot be read ({e})"
  if len(rows) != num_inputs or any(r.get("status") not in ("written", "failed")
                                     for r in rows):
    return f"its manifest part lists {len(rows)} of {num_inputs} input(s)"
  missing = [c for c in MANIFEST_COLUMNS if c not in rows[0]]
  if missing:  # a part written by an older version (finalize needs every column)
    return f"its manifest part lacks the column(s) {', '.join(missing)}"
  written = sum(r["status"] == "written" for r in rows)
  try:
    records = schema.count_records(path)
  except schema.CorruptShardError as e:
    return str(e)
  if records != written:
    return f"{records} record(s) but its manifest part lists {written} written"
  return None


def finalize(inputs, config, plan, shard_names, skipped, t0, clips_per_second):
  """Joins the manifest parts into manifest.csv, writes missing_media.csv and the dataset
  info (`DatasetInfo.write`); returns the run's `Summary`."""
  out = config.output_dir
  rows = []
  for p in inputs.problems:
    rows.append({"path": f"{p.source}:{p.line}", "status": "failed", "reason": p.reason})
  for path in inputs.unmatched_files:
    rows.append({"path": path, "status": "failed", "reason": "no row for this file in the list"})
  splits = {}
  embedding_dim = 0  # the first written clip with video gives it (all clips share it)
  num_classes = inputs.label_map.num_classes
  for split, (num_shards, _) in plan.items():
    file_examples = {}
    unlabeled = 0
    class_counts = np.zeros(num_classes, np.int64)
    for k in range(num_shards):
      name = shard_names[(split, k)]
      part = _read_csv(tf.io.gfile.join(out, MANIFEST_PARTS, name + ".csv"))
      rows.extend(part)
      written = [r for r in part if r["status"] == "written"]
      file_examples[name] = len(written)
      unlabeled += sum(1 for r in written if not r["labels"])
      for r in written:
        embedding_dim = embedding_dim or int(r["embedding_dim"] or 0)
        for mid in filter(None, r["labels"].split(";")):
          class_counts[inputs.label_map.lookup(mid)] += 1
    splits[split] = {"num_shards": num_shards, "num_examples": sum(file_examples.values()),
                     "files": list(file_examples), "file_examples": file_examples,
                     "class_counts": class_counts.tolist(), "num_unlabeled": unlabeled}
  files.write_text(tf.io.gfile.join(out, MANIFEST), files.csv_text(rows, MANIFEST_COLUMNS))
  if inputs.missing_media:
    files.write_text(tf.io.gfile.join(out, MISSING_MEDIA), files.csv_text(
        [{"ytid": s.ytid, "start_seconds": s.start_seconds, "end_seconds": s.end_seconds,
          "labels": ";".join(s.labels), "line": s.line} for s in inputs.missing_media],
        header=("ytid", "start_seconds", "end_seconds", "labels", "line")))
  dataset_info.DatasetInfo.write(out, {
      "num_classes": inputs.label_map.num_classes,
      "labels_file": schema.LABELS_FILE,
      "modalities": list(config.modalities),
      "log_mel": config.log_mel.to_dict(),
      "embedder": config.embedder if config.visual else None,
      "embedding_dim": embedding_dim if config.visual else 0,
      "num_video_frames": config.num_video_frames if config.visual else 0,
      "splits": splits,
  })
  failed = [r for r in rows if r["status"] != "written"]
  return Summary(
      total=len(rows), written=len(rows) - len(failed), failed=len(failed),
      skipped_shards=skipped, reasons=collections.Counter(reason_kind(r["reason"]) for r in failed),
      splits=splits, unmatched_files=len(inputs.unmatched_files),
      missing_media=len(inputs.missing_media), elapsed_seconds=time.time() - t0,
      clips_per_second=clips_per_second, output_dir=out)
