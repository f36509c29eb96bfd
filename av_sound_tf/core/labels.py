"""The label map and AudioSet's list formats: the one place that knows classes and MIDs.

* `LabelMap`: index <-> MID <-> display name, read from ``class_labels_indices.csv``
  (``index,mid,display_name``) or built from the labels seen in a file list.
* `Ontology`: ``ontology.json`` (names, child ids, hierarchy).
* `read_segments_csv`: AudioSet segment lists (``YTID, start_seconds, end_seconds,
  positive_labels``) in the official layout and in re-saved copies (comment lines kept or
  dropped, header with or without ``#``, integer or float seconds, with or without spaces).
* `read_file_list`: a plain CSV with a ``path`` and a labels column for data that is not
  from YouTube (ESC-10, your own recordings).

Problems (unknown labels, malformed rows) are returned as `RowProblem` records with line
numbers; nothing is dropped silently.
"""

import csv
import dataclasses
import io
import itertools
import json
import os
import re
from typing import Dict, List, Optional, Sequence

import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class RowProblem:
  """A row of an input list that could not be used, and why."""

  source: str
  line: int
  reason: str

  def __str__(self):
    return f"{self.source}:{self.line}: {self.reason}"


def _read_text(path):
  with tf.io.gfile.GFile(path, "r") as f:
    return f.read()


_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def _csv_lines(text, **fmt):
  """Parses CSV text one physical line at a time: yields (line number, fields, problem).

  A quote that opens a field and does not close on its line would make `csv` join the
  following lines into that field, swallowing their rows and reporting the last of them.
  Paths and labels never contain line breaks, so here a quoted field cannot span lines:
  the line that opens it is yielded with fields None and a problem naming the lines a
  CSV reader would have joined, and every following line is read as a row of its own.
  Every physical line is yielded exactly once (blank lines as empty field lists).
  """
  lines = _LINE_BREAK.split(text)
  if lines and lines[-1] == "":
    lines.pop()  # the final line break ends the last line; it does not start another
  n, start = len(lines), 0
  while start < n:
    # One reader over the lines (fast); restarted after each line whose quote stays open.
    # The empty sentinel line makes a quote left open on the last line detectable too.
    reader = csv.reader(itertools.chain(map(lines.__getitem__, range(start, n)), [""]), **fmt)
    done = 0  # lines consumed from `start`
    restart = None
    while True:
      try:
        row = next(reader)
      except StopIteration:
        break
      except csv.Error as e:
        line_no = start + done + 1
        yield line_no, None, f"not a valid CSV line ({e})"
        restart = line_no
        break
      line_no = start + done + 1
      if line_no > n:
        break  # the sentinel
      if reader.line_num - done > 1:
        last = min(start + reader.line_num, n)
        yield line_no, None, (
            "unbalanced quote: a '\"' opens a field that does not close on this line" +
            (f" (a CSV reader would join lines {line_no}-{last} into one row)"
             if last > line_no else ""))
        restart = line_no
        break
      done = reader.line_num
      yield line_no, row, None
    if restart is None:
      break
    start = restart


def split_labels(text: str) -> List[str]:
  """Splits a label field on ';' if it has one, else on ','; strips whitespace and quotes.

  AudioSet display names may contain commas ("Male speech, man speaking"): separate such
  names with ';'. (`data_prep.inputs` also re-joins comma-split pieces that form a known
  name.)
  """
  sep = ";" if ";" in (text or "") else ","
  return [t.strip().strip('"').strip() for t in (text or "").split(sep) if t.strip()]


class LabelMap:
  """Class index <-> AudioSet MID <-> display name.

  Labels in lists may be given as MIDs (``/m/0bt9lr``) or display names (``Dog``,
  case-insensitive); `lookup` accepts both.
  """

  def __init__(self, mids: Sequence[str], names: Sequence[str]):
    if len(mids) != len(names):
      raise ValueError(f"mids and names differ in length: {len(mids)} != {len(names)}")
    if len(set(mids)) != len(mids):
      raise ValueError("Duplicate MIDs in the label map.")
    self.mids = list(mids)
    self.names = list(names)
    self._by_mid = {m: i for i, m in enumerate(self.mids)}
    self._by_name = {}
    for i, n in enumerate(self.names):
      self._by_name.setdefault(n.lower(), i)

  def __len__(self):
    return len(self.mids)

  @property
  def num_classes(self):
    return len(self.mids)

  def lookup(self, label: str) -> Optional[int]:
    """Index of a MID or display name, or None when unknown."""
    label = label.strip()
    if label in self._by_mid:
      return self._by_mid[label]
    return self._by_name.get(label.lower())

  @classmethod
  def from_csv(cls, path) -> "LabelMap":
    """Reads ``class_labels_indices.csv`` (``index,mid,display_name``)."""
    rows = list(csv.DictReader(io.StringIO(_read_text(path))))
    if not rows or not {"index", "mid", "display_name"} <= set(rows[0]):
      raise ValueError(f"{path}: expected a header 'index,mid,display_name'")
    rows.sort(key=lambda r: int(r["index"]))
    if [int(r["index"]) for r in rows] != list(range(len(rows))):
      raise ValueError(f"{path}: indices must be 0..N-1 without gaps")
    return cls([r["mid"].strip() for r in rows], [r["display_name"].strip() for r in rows])

  @classmethod
  def from_labels(cls, labels: Sequence[str], ontology: "Optional[Ontology]" = None):
    """A label map over the distinct labels seen, sorted; MIDs get names from `ontology`."""
    distinct = sorted(set(labels))
    names = [ontology.name(l) if ontology and ontology.name(l) else l for l in distinct]
    return cls(distinct, names)

  def to_csv(self, path):
    """Writes the map in the ``class_labels_indices.csv`` layout."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["index", "mid", "display_name"])
    for i, (m, n) in enumerate(zip(self.mids, self.names)):
      writer.writerow([i, m, n])
    with tf.io.gfile.GFile(path, "w") as f:
      f.write(buf.getvalue())


class Ontology:
  """AudioSet's ``ontology.json``: names, descriptions and the class hierarchy."""

  def __init__(self, nodes: Sequence[dict]):
    self.nodes = {n["id"]: n for n in nodes}
    self.parents: Dict[str, List[str]] = {i: [] for i in self.nodes}
    for n in nodes:
      for child in n.get("child_ids", []):
        self.parents.setdefault(child, []).append(n["id"])

  @classmethod
  def from_json(cls, path) -> "Ontology":
    return cls(json.loads(_read_text(path)))

  def name(self, mid: str) -> Optional[str]:
    node = self.nodes.get(mid)
    return node["name"] if node else None

  def children(self, mid: str) -> List[str]:
    return list(self.nodes.get(mid, {}).get("child_ids", []))

  def ancestors(self, mid: str) -> List[str]:
    """All ancestors of `mid` (nearest first, each once)."""
    seen, order, frontier = set(), [], list(self.parents.get(mid, []))
    while frontier:
      m = frontier.pop(0)
      if m not in seen:
        seen.add(m)
        order.append(m)
        frontier.extend(self.parents.get(m, []))
    return order

  def roots(self) -> List[str]:
    return [m for m, p in self.parents.items() if not p and m in self.nodes]


@dataclasses.dataclass
class Segment:
  """One row of an AudioSet segment list."""

  ytid: str
  start_seconds: float
  end_seconds: float
  labels: List[str]
  line: int


def read_segments_csv(path):
  """Parses an AudioSet segment list.

  Accepts the official layout (``# Segments csv created ...``, ``# num_ytids=...``, ``#
  YTID, start_seconds, end_seconds, positive_labels``) and re-saved variants: comment lines
  dropped, a header line without its ``#``, integer seconds, no spaces after commas.

  Returns:
    (segments, problems): the parsed `Segment` rows, and a `RowProblem` for each row that
    is malformed (wrong field count, unparseable or inverted times, empty label list, a
    duplicate YTID/start pair).
  """
  segments, problems, seen = [], [], set()
  for line_no, row, problem in _csv_lines(_read_text(path), skipinitialspace=True):
    if problem:
      problems.append(RowProblem(path, line_no, problem))
      continue
    if not row or not "".join(row).strip():
      continue
    first = row[0].strip()
    if first.startswith("#"):
      continue
    if first.upper() == "YTID":  # a header whose '#' was lost in a re-save
      continue
    if len(row) != 4:
      problems.append(RowProblem(path, line_no, f"expected 4 fields, found {len(row)}"))
      continue
    try:
      start, end = float(row[1]), float(row[2])
    except ValueError:
      problems.append(RowProblem(path, line_no, f"bad start/end seconds {row[1]!r}, {row[2]!r}"))
      continue
    if not (0 <= start < end):
      problems.append(RowProblem(path, line_no, f"start {start} is not before end {end}"))
      continue
    labels = split_labels(row[3])
    if not labels:
      problems.append(RowProblem(path, line_no, "empty label list"))
      continue
    key = (first, start)
    if key in seen:
      problems.append(RowProblem(path, line_no, f"duplicate segment {first} at {start} s"))
      continue
    seen.add(key)
    segments.append(Segment(first, start, end, labels, line_no))
  return segments, problems


@dataclasses.dataclass
class FileListRow:
  """One row of a ``path,labels`` file list."""

  path: str
  labels: List[str]
  line: int
  extra: Dict[str, str]


def read_file_list(path, label_column="labels", path_column="path", allow_unlabeled=False):
  """Reads a CSV with a header holding at least a path column and a labels column.

  Labels are MIDs or class names separated by ',' or ';'. Relative paths are taken
  relative to the CSV's folder. An empty label list is a problem unless `allow_unlabeled`
  (clips for distillation, whose targets come from a teacher).

  Returns:
    (rows, problems).
  """
  fields = None
  base = os.path.dirname(path)
  rows, problems = [], []
  for line_no, values, problem in _csv_lines(_read_text(path), skipinitialspace=True):
    if fields is None:  # the header: the first line that is not blank
      if problem:  # nothing can be read without the column names
        raise ValueError(f"{path}:{line_no}: bad header line: {problem}")
      if not values or not "".join(values).strip():
        continue
      fields = [f.strip() for f in values]
      missing = [c for c in (path_column, label_column) if c not in fields]
      if missing:
        raise ValueError(f"{path}: the header has no column {', '.join(missing)}; "
                         f"columns are {fields}")
      continue
    if problem:
      problems.append(RowProblem(path, line_no, problem))
      continue
    if not values or not "".join(values).strip():
      continue  # a blank line
    if len(values) != len(fields):
      problems.append(RowProblem(path, line_no, f"wrong number of fields: {len(values)}, "
                                 f"the header has {len(fields)}"))
      continue
    row = dict(zip(fields, values))
    media = (row[path_column] or "").strip()
    if not media:
      problems.append(RowProblem(path, line_no, "empty path"))
      continue
    if not (os.path.isabs(media) or "://" in media):
      media = os.path.join(base, media)
    labels = split_labels(row[label_column])
    if not labels and not allow_unlabeled:
      problems.append(RowProblem(path, line_no, "empty label list"))
      continue
    extra = {k: v for k, v in row.items() if k not in (path_column, label_column)}
    rows.append(FileListRow(media, labels, line_no, extra))
  if fields is None:
    raise ValueError(f"{path}: no header line (expected columns {path_column} and "
                     f"{label_column})")
  return rows, problems


# <YTID>.ext, Y<YTID>.ext (PANNs), <YTID>_<start>_<end>.ext and <YTID>_<start>.ext
# (start/end as integers, floats or milliseconds as written by common downloaders).
_YTID = r"[A-Za-z0-9_-]{11}"
_NAME_PATTERNS = (
    re.compile(rf"^(?P<ytid>{_YTID})_(?P<start>\d+(?:\.\d+)?)(?:_(?P<end>\d+(?:\.\d+)?))?$"),
    re.compile(rf"^Y(?P<ytid>{_YTID})(?:_(?P<start>\d+(?:\.\d+)?)(?:_(?P<end>\d+(?:\.\d+)?))?)?$"),
    re.compile(rf"^(?P<ytid>{_YTID})$"),
)


def parse_media_name(filename: str):
  """Returns (ytid, start or None, end or None) for names users give AudioSet downloads.

  >>> parse_media_name("--PJHxphWEs_30_40.wav")
  ('--PJHxphWEs', 30.0, 40.0)
  >>> parse_media_name("Y--PJHxphWEs.mp4")
  ('--PJHxphWEs', None, None)
  """
  stem = os.path.splitext(os.path.basename(filename))[0]
  for pattern in _NAME_PATTERNS:
    m = pattern.match(stem)
    if m:
      d = m.groupdict()
      start = float(d["start"]) if d.get("start") else None
      end = float(d["end"]) if d.get("end") else None
      return d["ytid"], start, end
  return None, None, None
