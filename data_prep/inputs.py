"""Turns user inputs (a ``path,labels`` CSV, or an AudioSet segment list plus a media folder)
into `ClipJob`s: one per media input, with its labels resolved through the label map.

Every input ends up somewhere: a job (later written or failed), a list problem (malformed
row, reported with its line number), an unmatched file, or a segment row without media.

`mark_duplicates` (run by every writer before planning shards) finds one recording listed
twice: under another spelling (``./x.ogg``, ``sub/../x.ogg``), through a symlink, or as a
byte-identical copy under another name. Later rows fail as ``duplicate of <first path>
(line N)``; a recording in two splits is a `SplitLeakError`.
"""

import collections
import concurrent.futures
import dataclasses
import hashlib
import os
import posixpath
from typing import Dict, List, Optional

import tensorflow as tf

from av_sound_tf.core import files
from av_sound_tf.core import labels as labels_lib
from av_sound_tf.core import media


@dataclasses.dataclass
class ClipJob:
  """One media input to prepare."""

  index: int  # position in the input order; shard assignment is derived from it
  clip_id: str
  path: str
  split: str
  label_indices: List[int]
  label_mids: List[str]
  start_seconds: Optional[float] = None
  end_seconds: Optional[float] = None
  # "always": cut [start, end]; "auto": cut only if the file is longer than the segment
  # (a full YouTube video named <YTID>.mp4); "never": the file is the clip.
  trim: str = "never"
  error: str = ""  # a reason known before decoding (unknown labels) -> failed, not decoded
  labeled: bool = True  # False: an unlabeled clip (--allow_unlabeled), for distillation
  line: int = 0  # the list's line (file list or segment list), for messages


@dataclasses.dataclass
class Inputs:
  jobs: List[ClipJob]
  label_map: labels_lib.LabelMap
  problems: List[labels_lib.RowProblem]  # malformed rows, each an input that failed
  unmatched_files: List[str]  # media files without a row (segment-list mode)
  missing_media: List[labels_lib.Segment]  # rows without a media file (segment-list mode)


def _resolve(raw_labels, label_map, source, line):
  """(indices, mids, error) for a row's labels; unknown labels fail the row, never dropped."""
  indices, mids, unknown = [], [], []
  k = 0
  while k < len(raw_labels):
    label, i, used = raw_labels[k], label_map.lookup(raw_labels[k]), 1
    # A display name with commas ("Male speech, man speaking") split on ',': re-join.
    for n in range(2, 5):
      if i is not None or k + n > len(raw_labels):
        break
      joined = ", ".join(raw_labels[k:k + n])
      if label_map.lookup(joined) is not None:
        label, i, used = joined, label_map.lookup(joined), n
    k += used
    if i is None:
      unknown.append(label)
    elif i not in indices:
      indices.append(i)
      mids.append(label_map.mids[i])
  error = ""
  if unknown:
    error = (f"unknown label(s) {', '.join(repr(u) for u in unknown)} "
             f"({os.path.basename(source)} line {line})")
  return indices, mids, error


def _clip_id_from_path(path, base, keep_extension=False):
  """The path relative to the list's folder without extension; the whole path for files
  outside that folder (ids must be unique, basenames need not be)."""
  rel = path
  if base and path.startswith(base.rstrip("/") + "/"):
    rel = path[len(base.rstrip("/")) + 1:]
  return rel if keep_extension else os.path.splitext(rel)[0]


def normalize_path(path):
  """``./x.ogg``, ``sub/../x.ogg`` and ``a//x.ogg`` -> ``x.ogg``-style paths, textually.

  For ``gs://`` and other schemes the part after ``scheme://`` is normalized the same way
  (object stores have no symlinks; ``a/../b`` names no object there either).
  """
  if "://" in path:
    scheme, rest = path.split("://", 1)
    return f"{scheme}://{posixpath.normpath(rest)}" if rest else path
  return os.path.normpath(path)


def resolved_path(path):
  """The file a path names: symlinks followed for local paths, normalized otherwise."""
  return normalize_path(path) if "://" in path else os.path.realpath(path)


def _float_or_none(text):
  try:
    return float(text) if text not in (None, "") else None
  except ValueError:
    return None


def from_file_list(file_list, label_map=None, ontology=None, label_column="labels",
                   split_column="", default_split="data", allow_unlabeled=False) -> Inputs:
  """Jobs from a CSV with ``path`` and labels columns.

  Optional columns ``start_seconds`` and ``end_seconds`` cut a segment out of each file.
  `split_column` (e.g. ``fold``) sends rows to per-split shard sets named after its value.
  Without `label_map`, the label space is the distinct labels seen. With `allow_unlabeled`,
  rows with an empty label list become unlabeled clips (``labeled=False``).
  """
  rows, problems = labels_lib.read_file_list(file_list, label_column=label_column,
                                             allow_unlabeled=allow_unlabeled)
  if label_map is None:
    label_map = labels_lib.LabelMap.from_labels([l for r in rows for l in r.labels], ontology)
  base = os.path.dirname(file_list)
  base = normalize_path(base) if base else ""
  jobs, seen_ids = [], {}
  for row in rows:
    if split_column and split_column not in row.extra:
      raise ValueError(f"{file_list}: no column {split_column!r} for --split_column")
    split = (row.extra.get(split_column) or "").strip() if split_column else default_split
    split = _safe_split(split) or default_split
    indices, mids, error = _resolve(row.labels, label_map, file_list, row.line)
    start = _float_or_none(row.extra.get("start_seconds"))
    end = _float_or_none(row.extra.get("end_seconds"))
    path = normalize_path(row.path)  # ./x.ogg, sub/../x.ogg -> x.ogg
    clip_id = _clip_id_from_path(path, base)
    if clip_id in seen_ids and seen_ids[clip_id] != path:
      clip_id = _clip_id_from_path(path, base, keep_extension=True)  # a.mp4 next to a.ogg
    seen_ids.setdefault(clip_id, path)
    if start is not None:  # several segments of one file
      clip_id = f"{clip_id}_{start:g}"
    # The same path (and segment) twice is left to mark_duplicates, with copies and links.
    jobs.append(ClipJob(len(jobs), clip_id, path, split, indices, mids, start, end,
                        trim="always" if (start is not None or end is not None) else "never",
                        error=error, labeled=bool(row.labels), line=row.line))
  return Inputs(jobs, label_map, problems, [], [])


def _safe_split(name):
  return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def list_media_files(media_dir) -> List[str]:
  """All media files under `media_dir` (recursive, sorted; non-media files ignored)."""
  found = []
  for root, _, names in tf.io.gfile.walk(media_dir):
    for f in names:
      if media.media_kind(f):
        found.append(tf.io.gfile.join(root, f))
  return sorted(found)


def from_segments(segments_csv, media_dir, label_map, split="data") -> Inputs:
  """Jobs from an AudioSet segment list and a folder of downloaded media.

  Files are matched to rows by YouTube id as users name them: ``<YTID>.ext``,
  ``Y<YTID>.ext``, ``<YTID>_<start>_<end>.ext`` or ``<YTID>_<start>.ext`` (start/end in
  seconds or milliseconds). A name with times is taken as the already cut segment; a bare
  ``<YTID>`` file is cut to the row's segment when it is longer than the segment.
  """
  segments, problems = labels_lib.read_segments_csv(segments_csv)
  by_ytid: Dict[str, List[labels_lib.Segment]] = {}
  for seg in segments:
    by_ytid.setdefault(seg.ytid, []).append(seg)
  jobs, unmatched, used = [], [], set()
  for path in list_media_files(media_dir):
    ytid, start, end = labels_lib.parse_media_name(path)
    candidates = by_ytid.get(ytid, []) if ytid else []
    seg = None
    if start is not None:
      for c in candidates:
        if abs(c.start_seconds - start) < 0.5 or abs(c.start_seconds - start / 1000) < 0.5:
          seg = c
          break
    elif len(candidates) == 1:
      seg = candidates[0]
    if seg is None or id(seg) in used:
      unmatched.append(path)
      continue
    used.add(id(seg))
    indices, mids, error = _resolve(seg.labels, label_map, segments_csv, seg.line)
    jobs.append(ClipJob(
        seg.line, f"{seg.ytid}_{seg.start_seconds:g}", path, split, indices, mids,
        seg.start_seconds, seg.end_seconds,
        trim="never" if start is not None else "auto", error=error, line=seg.line))
  jobs.sort(key=lambda j: j.index)  # the list's order, whatever the file names
  for i, job in enumerate(jobs):
    job.index = i
  missing = [s for s in segments if id(s) not in used]
  return Inputs(jobs, label_map, problems, unmatched, missing)


class SplitLeakError(ValueError):
  """One recording would land in two splits (test data leaking into training)."""

  def __init__(self, message, leaks):
    super().__init__(message)
    self.leaks = leaks


@dataclasses.dataclass
class SplitLeak:
  job: ClipJob  # the later row
  first: ClipJob  # the first row of the same recording, in another split
  why: str  # "same file", "same content" or "same clip id"


def _size(path):
  """The size in bytes, or None when it cannot be read (the decoder will say why)."""
  try:
    if "://" in path:
      return tf.io.gfile.stat(path).length
    return os.stat(path).st_size
  except (OSError, tf.errors.OpError):
    return None


def content_digest(path, chunk_bytes=1 << 20):
  """SHA-256 of a file's bytes, read through tf.io.gfile for non-local paths."""
  h = hashlib.sha256()
  opener = open if "://" not in path else tf.io.gfile.GFile
  with opener(path, "rb") as f:
    while True:
      block = f.read(chunk_bytes)
      if not block:
        break
      h.update(block)
  return h.hexdigest()


def _content_ids(paths, num_threads):
  """{resolved path: content id}. Files of a size no other file has cannot be copies of
  each other, so only files that share their size with another are hashed (in full: a
  partial hash would call two PCM recordings with the same header and silent ends equal).
  """
  paths = sorted(set(paths))
  remote = [p for p in paths if "://" in p]
  sizes = {p: _size(p) for p in paths if "://" not in p}
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    sizes.update(zip(remote, pool.map(_size, remote)))  # one request each: in parallel
    by_size = collections.defaultdict(list)
    for p, size in sizes.items():
      if size is not None:
        by_size[size].append(p)
    to_hash = [p for group in by_size.values() if len(group) > 1 for p in group]

    def digest(p):
      try:
        return content_digest(p)
      except (OSError, tf.errors.OpError):
        return None  # unreadable: the decoder reports it

    ids = {p: p for p in paths}
    for p, d in zip(to_hash, pool.map(digest, to_hash)):
      if d is not None:
        ids[p] = f"sha256:{d}:{sizes[p]}"
  return ids


def mark_duplicates(inputs: Inputs, fingerprint_content: bool = True,
                    num_threads: int = 16) -> List[SplitLeak]:
  """Fails every later row of a recording listed twice; returns the rows that would put a
  recording in a second split (the caller stops the run on them).

  A recording is identified by its resolved path (normalized; symlinks followed for local
  files) and, with `fingerprint_content`, by its bytes (SHA-256 of files that share their
  size with another file). A clip is the recording plus its cut: rows cutting different
  segments (``start_seconds``) out of one file are different clips, not duplicates. A
  segment-list file is taken whole or cut to its row's segment depending on its length,
  so there a recording is one clip whatever its segment. Rows that already fail (unknown
  labels, ...) are left as they are and never count as a first occurrence. Non-regular
  files (FIFOs, devices, folders) fail here, before anything opens them.

  Sets `job.error` to ``duplicate of <first path> (line N)`` on later rows in the same
  split. Idempotent: calling it again changes nothing.
  """
  jobs = [j for j in inputs.jobs if not j.error]
  for job in jobs:
    reason = files.not_regular_file_reason(job.path)  # never open a FIFO to hash it
    if reason:
      job.error = reason
  jobs = [j for j in jobs if not j.error]
  resolved = {j.index: resolved_path(j.path) for j in jobs}
  ids = (_content_ids(resolved.values(), num_threads) if fingerprint_content
         else {p: p for p in resolved.values()})
  first_by_recording, first_by_clip, first_by_id = {}, {}, {}
  leaks = []
  for job in jobs:
    recording = ids[resolved[job.index]]
    clip = (recording, job.start_seconds, job.end_seconds) if job.trim == "always" else (
        recording,)
    first = first_by_recording.get(recording)
    if first is not None and first.split != job.split:
      why = "same file" if resolved[first.index] == resolved[job.index] else "same content"
      leaks.append(SplitLeak(job, first, why))
      continue
    first_id = first_by_id.get(job.clip_id)
    if first_id is not None and first_id.split != job.split:
      leaks.append(SplitLeak(job, first_id, "same clip id"))
      continue
    earlier = first_by_clip.get(clip) or first_id
    if earlier is not None:
      job.error = f"duplicate of {earlier.path} (line {earlier.line})"
      continue
    first_by_recording.setdefault(recording, job)
    first_by_clip[clip] = job
    first_by_id[job.clip_id] = job
  return leaks
