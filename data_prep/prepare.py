"""The single-machine preparation pipeline: `ClipJob`s -> sharded TFRecords + manifest.

Design:
* Workers (processes; ``num_workers=0`` runs in-process, e.g. for a GPU embedder) decode,
  compute the log-mel front end and frame embeddings and serialize one Example per clip.
  The main process writes shards in input order, so a run is deterministic.
* Shards: the jobs of each split are cut into ``num_shards`` contiguous blocks, shard ``k``
  written as ``<split>-0000k-of-0000N.tfrecord``. A shard is written to
  ``<name>.incomplete`` and renamed when complete; then its manifest part
  ``.manifest/<name>.csv`` is written the same way. The manifest part is the commit mark.
* Resume: a rerun with the same inputs and flags keeps a shard only when it passes a check
  against its manifest part (the part lists every input of the shard, and the shard reads
  to its end with valid CRCs and holds exactly the part's written records); every other
  shard is redone from scratch, damaged ones with a warning naming the shard and the
  reason. An interrupted or damaged run thus ends with every input exactly once.
* Duplicates: before planning, `inputs.mark_duplicates` fails later rows of a recording
  listed twice (another spelling, a symlink, a byte-identical copy); a recording in two
  splits stops the run before anything is written, listed in ``split_leaks.csv``.
* Accounting: ``manifest.csv`` has one row per input (``written`` with shard and index, or
  ``failed`` with the reason), including malformed list rows and media files without a
  row. Segment rows without a media file go to ``missing_media.csv``.
"""

import collections
import concurrent.futures
import csv
import dataclasses
import functools
import json
import multiprocessing
import time
import traceback
from typing import Optional, Tuple

from absl import logging
import numpy as np
import tensorflow as tf

from av_sound_tf.core import features
from av_sound_tf.core import files
from av_sound_tf.core import media
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
                    "warnings")
MODALITIES = ("audio", "visual")


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
  """Everything that decides what the shards contain (stored as prepare_config.json)."""

  output_dir: str
  modalities: Tuple[str, ...] = ("audio",)
  num_shards: int = 0  # per split; 0: ceil(examples / examples_per_shard)
  examples_per_shard: int = 1000
  min_audio_seconds: float = 0.1
  max_seconds: float = 60.0  # longer media: the first max_seconds are kept (0: no limit)
  allow_missing_modality: bool = False
  embedder: str = "resnet152"
  embedder_weights: Optional[str] = None
  image_size: int = 224
  num_video_frames: int = 64
  store_frame_embeddings: bool = False
  log_mel: features.LogMelParams = features.DEFAULT_PARAMS

  def __post_init__(self):
    bad = [m for m in self.modalities if m not in MODALITIES]
    if bad or not self.modalities:
      raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}. "
                       f"Received: {self.modalities}")

  @property
  def audio(self):
    return "audio" in self.modalities

  @property
  def visual(self):
    return "visual" in self.modalities

  def content_dict(self):
    """The fields that change shard contents (a resumed run must match them)."""
    d = dataclasses.asdict(self)
    d.pop("output_dir")
    d["modalities"] = list(self.modalities)
    if not self.visual:
      for k in ("embedder", "embedder_weights", "image_size", "num_video_frames",
                "store_frame_embeddings"):
        d.pop(k)
    return d


@dataclasses.dataclass
class ClipResult:
  status: str  # "written" or "failed"
  reason: str = ""
  example: bytes = b""
  num_frames: int = 0
  duration_seconds: float = 0.0
  has_audio: bool = False
  has_video: bool = False
  warnings: str = ""


class ClipProcessor:
  """Decodes one clip and builds its serialized Example. One instance per worker."""

  def __init__(self, config: PrepareConfig):
    self.config = config
    self._embedder = None
    self._log_mel_fn = features.compiled_log_mel_fn(config.log_mel)

  @property
  def embedder(self):
    if self._embedder is None:  # built lazily: loading ResNet-152 takes seconds
      from av_sound_tf.core import embedders
      self._embedder = embedders.build_embedder(
          self.config.embedder, self.config.embedder_weights, self.config.image_size)
    return self._embedder

  def _segment(self, job, probe):
    if job.trim == "always":
      return job.start_seconds, job.end_seconds
    if job.trim == "auto" and job.start_seconds is not None and job.end_seconds is not None:
      duration = probe().duration_seconds
      if duration > (job.end_seconds - job.start_seconds) + 1.0:
        return job.start_seconds, job.end_seconds
    return None, None

  def log_mel(self, waveform):
    """Log-mel of one waveform. The input is zero-padded to whole seconds so that the
    compiled front end sees few distinct shapes; frames past the true length are dropped
    (frames do not overlap the padding, so this is exact)."""
    params = self.config.log_mel
    n = waveform.shape[0]
    bucket = -(-n // params.sample_rate) * params.sample_rate
    padded = np.zeros([1, bucket], np.float32)
    padded[0, :n] = waveform
    return self._log_mel_fn(padded)[0, :params.num_frames(n)].numpy()

  def __call__(self, job: inputs_lib.ClipJob) -> ClipResult:
    if job.error:
      return ClipResult("failed", job.error)
    try:
      return self._process(job)
    except media.MediaError as e:
      return ClipResult("failed", e.reason)
    except Exception as e:  # pylint: disable=broad-except
      # Unknown failures are recorded with their type, never allowed to stop the run.
      logging.debug("Unexpected error on %s:\n%s", job.path, traceback.format_exc())
      return ClipResult("failed", f"unexpected {type(e).__name__}: {str(e)[:200]}")

  def _process(self, job):
    cfg = self.config
    # The container's header is read at most once per clip, by whichever step needs it first.
    probe = functools.lru_cache(maxsize=1)(lambda: media.probe(job.path))
    start, end = self._segment(job, probe)
    warnings = []
    if end is None and cfg.max_seconds:
      full = probe().duration_seconds
      if full and full > cfg.max_seconds + 0.5:
        end = (start or 0.0) + cfg.max_seconds
        warnings.append(f"{full:.0f} s long: kept the first {cfg.max_seconds:g} s")
    log_mel, duration = None, 0.0
    if cfg.audio:
      try:
        # Compared with the segment actually asked for (trim, --max_seconds), so a cut
        # never reads as a truncation.
        decoded = media.read_audio(job.path, start, end, cfg.log_mel.sample_rate)
      except media.MediaError as e:
        if not (cfg.allow_missing_modality and cfg.visual):
          raise
        warnings.append(f"audio missing: {e.reason}")
        decoded = None
      waveform = None if decoded is None else decoded.waveform
      if waveform is not None:
        duration = waveform.shape[0] / cfg.log_mel.sample_rate
        if duration < max(cfg.min_audio_seconds,
                          cfg.log_mel.window_length / cfg.log_mel.sample_rate):
          raise media.MediaError(job.path, f"audio too short: {duration:.3f} s "
                                 f"(minimum {cfg.min_audio_seconds} s)" +
                                 (f"; {decoded.truncation}" if decoded.truncation else ""))
        if decoded.truncation:
          warnings.append(decoded.truncation)
        silence = media.digital_silence_fraction(waveform, cfg.log_mel.sample_rate)
        if silence >= 0.5:
          warnings.append(f"audio is digital silence for {silence:.0%} of its length")
        log_mel = self.log_mel(waveform)
    embedding_mean = per_frame = None
    num_video_frames = 0
    if cfg.visual:
      try:
        frames = media.sample_video_frames(job.path, cfg.num_video_frames, cfg.image_size,
                                           start, end)
      except media.MediaError as e:
        if not (cfg.allow_missing_modality and log_mel is not None):
          raise
        warnings.append(f"video missing: {e.reason}")
        frames = None
      if frames is not None:
        embedding_mean, per_frame = self.embedder.embed_clip(frames)
        num_video_frames = frames.shape[0]
        if not duration:
          duration = (end - start) if end is not None else probe().duration_seconds
    if log_mel is None and embedding_mean is None:
      raise media.MediaError(job.path, "neither audio nor video could be decoded")
    try:
      example = _make_example(job, start, end, duration, log_mel, embedding_mean,
                              per_frame if cfg.store_frame_embeddings else None,
                              num_video_frames)
    except ValueError as e:  # non-finite features (corrupt samples)
      raise media.MediaError(job.path, str(e)) from None
    return ClipResult(
        "written", example=example.SerializeToString(),
        num_frames=0 if log_mel is None else log_mel.shape[0], duration_seconds=duration,
        has_audio=log_mel is not None, has_video=embedding_mean is not None,
        warnings="; ".join(warnings))


def _make_example(job, start, end, duration, log_mel, embedding_mean, per_frame,
                  num_video_frames):
  return schema.make_example(
      clip_id=job.clip_id, source_path=job.path, label_indices=job.label_indices,
      label_mids=job.label_mids, start_seconds=start or 0.0,
      end_seconds=end if end is not None else (start or 0.0) + duration,
      duration_seconds=duration, log_mel=log_mel, embedding_mean=embedding_mean,
      frame_embeddings=per_frame, num_video_frames=num_video_frames, labeled=job.labeled)


_WORKER = None


def _init_worker(config):
  global _WORKER
  # One thread per worker process: the parallelism comes from the processes.
  tf.config.threading.set_intra_op_parallelism_threads(1)
  tf.config.threading.set_inter_op_parallelism_threads(1)
  _WORKER = ClipProcessor(config)


def _work(job):
  return _WORKER(job)


class Progress:
  """Logs clips done, rate, ETA and failures at most every `every` seconds."""

  def __init__(self, total, already_done=0, every=5.0, log=logging.info):
    self.total, self.done, self.failed = total, already_done, 0
    self.start_done = already_done
    self.every, self.log = every, log
    self.t0 = self.last = time.time()

  def update(self, failed=False):
    self.done += 1
    self.failed += int(failed)
    now = time.time()
    if now - self.last >= self.every or self.done == self.total:
      self.last = now
      self.log("%s", self.line())

  def rate(self):
    elapsed = max(time.time() - self.t0, 1e-9)
    return (self.done - self.start_done) / elapsed

  def line(self):
    rate = self.rate()
    if not self.total:  # unknown total (one Beam worker's share)
      return (f"[prepare] {self.done} clips on this worker, {rate:.1f} clips/s, "
              f"{self.failed} failed")
    left = self.total - self.done
    eta = time.strftime("%H:%M:%S", time.gmtime(left / rate)) if rate > 0 else "?"
    pct = 100.0 * self.done / max(self.total, 1)
    return (f"[prepare] {self.done}/{self.total} clips ({pct:.1f}%), {rate:.1f} clips/s, "
            f"ETA {eta}, {self.failed} failed")


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
      "warnings": result.warnings,
  }


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
  import hashlib
  h = hashlib.sha256()
  for j in jobs:
    h.update(f"{j.clip_id}|{j.path}|{j.split}|{j.label_indices}|{j.start_seconds}|"
             f"{j.end_seconds}|{j.error}{'' if j.labeled else '|unlabeled'}\n".encode())
  return {"num_jobs": len(jobs), "sha256": h.hexdigest()}


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


def prepare(inputs: inputs_lib.Inputs, config: PrepareConfig, num_workers: int = 2,
            overwrite: bool = False, progress_every: float = 5.0,
            fingerprint_content: bool = True) -> Summary:
  """Writes sharded TFRecords, the manifest and dataset_info.json for `inputs`.

  Args:
    inputs: the jobs and list problems (see data_prep.inputs).
    config: what to compute.
    num_workers: worker processes; 0 runs in this process.
    overwrite: delete an existing run in config.output_dir first.
    progress_every: seconds between progress lines.
    fingerprint_content: also find byte-identical copies under other names (see
      `inputs.mark_duplicates`); False compares resolved paths only (benchmarks).

  Returns:
    A `Summary`.

  Raises:
    inputs.SplitLeakError: a recording would land in two splits (nothing is written).
  """
  t0 = time.time()
  out = config.output_dir
  plan, shard_names, pending, skipped = start_run(inputs, config, overwrite,
                                                  fingerprint_content)
  total = len(inputs.jobs)
  progress = Progress(total, already_done=total - len(pending), every=progress_every)
  logging.info("[prepare] %d inputs, %d to process (%d complete shards kept), %d workers",
               total, len(pending), skipped, num_workers)

  pool = None
  if num_workers > 0 and pending:
    ctx = multiprocessing.get_context("spawn")
    pool = ctx.Pool(num_workers, initializer=_init_worker, initargs=(config,))
    results = pool.imap(_work, [job for job, _ in pending], chunksize=2)
  else:
    processor = ClipProcessor(config)
    results = (processor(job) for job, _ in pending)

  writer = None
  try:
    for (job, name), result in zip(pending, results):
      if writer is None or writer.name != name:
        if writer is not None:
          writer.close()
        writer = ShardWriter(out, name)
      writer.add(job, result)
      progress.update(failed=result.status != "written")
    if writer is not None:
      writer.close()
      writer = None
  finally:
    if writer is not None:
      writer.abandon()
    if pool is not None:
      pool.terminate()
      pool.join()

  return finalize(inputs, config, plan, shard_names, skipped, t0, progress.rate())


def start_run(inputs, config, overwrite=False, fingerprint_content=True):
  """What every writer (this module's, the Beam pipeline's) does first: fails duplicate
  rows and refuses split leaks (`inputs.mark_duplicates`), checks a resumed run's
  settings, writes the label map, plans the shards, and lists the (job, shard name) pairs
  still to do (shards of an earlier run that pass `verify_shard` are kept).

  Returns (plan, shard_names {(split, k): name}, pending, number of kept shards).

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


UNFINISHED = "unfinished"


def verify_shard(out, name, num_inputs):
  """None when shard `name` of an earlier run can be kept, else why it must be redone.

  A kept shard has its manifest part (the commit mark) listing its `num_inputs` planned
  inputs, and its file reads to the end with valid CRCs (`schema.count_records`) holding
  exactly the part's written records: this catches a flipped byte, a cut mid-record and a
  cut at a record boundary. `UNFINISHED`: the part or the shard does not exist (an
  interrupted run; not worth a warning).
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
  written = sum(r["status"] == "written" for r in rows)
  try:
    records = schema.count_records(path)
  except schema.CorruptShardError as e:
    return str(e)
  if records != written:
    return f"{records} record(s) but its manifest part lists {written} written"
  return None


def finalize(inputs, config, plan, shard_names, skipped, t0, clips_per_second):
  """Joins the manifest parts, writes manifest.csv, missing_media.csv, dataset_info.json."""
  out = config.output_dir
  rows = []
  for p in inputs.problems:
    rows.append({"path": f"{p.source}:{p.line}", "status": "failed", "reason": p.reason})
  for path in inputs.unmatched_files:
    rows.append({"path": path, "status": "failed", "reason": "no row for this file in the list"})
  splits = {}
  embedding_dim = 0
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
  if config.visual:
    embedding_dim = _embedding_dim(out, splits)
  schema.write_dataset_info(tf.io.gfile.join(out, schema.DATASET_INFO), {
      "num_classes": inputs.label_map.num_classes,
      "labels_file": schema.LABELS_FILE,
      "modalities": list(config.modalities),
      "log_mel": config.log_mel.to_dict(),
      "embedder": config.embedder if config.visual else None,
      "embedding_dim": embedding_dim,
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


def _embedding_dim(out, splits):
  """The embedding size, read back from the first written example."""
  for s in splits.values():
    for name in s["files"]:
      for record in tf.data.TFRecordDataset(tf.io.gfile.join(out, name)):
        ex = tf.train.Example.FromString(record.numpy())
        dims = ex.features.feature["embedding_dim"].int64_list.value
        if dims and dims[0]:
          return int(dims[0])
  return 0
