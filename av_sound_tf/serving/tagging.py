"""Tagging audio and video files with an exported model (bin/tag).

`Tagger` loads a SavedModel from bin/export (or a .tflite tagger) and tags whole files:

* The file's audio is decoded to 16 kHz mono. With a SavedModel, recordings up to
  ``window_seconds`` (default 10 s) go through ``tag_waveform`` in one call; longer ones in
  consecutive windows. A file's score for a class is the mean of all its MIL segment
  scores, i.e. the model's own average-pooling g() over the whole recording.
* With a .tflite tagger (fixed window, e.g. 1 s), windows slide with 50 % overlap and the
  file score is the mean of the window scores.
* Timeline (`timeline=True`): the segment scores over time (one every 0.32 s, SavedModel)
  or window scores (TFLite), and the sound events: runs of consecutive steps whose score is
  at least `threshold`, as [start, end] seconds per class.
* Video files, when the export has ``tag_audiovisual`` and a frame embedder is given: 64
  frames are sampled and embedded, the fused scores replace the audio scores, and each top
  class reports which modality dominated (attention weight on audio > 0.5: "audio").

A file that cannot be decoded gets ``status="failed"`` and its reason; the others are
still tagged. Inputs that are not regular files (a FIFO would block the decoder forever, a
socket, a device) are refused up front by `expand_inputs`, with the reason.

`ResultWriter` writes the results as they are produced: after every file a local output
is a complete, valid JSON list (or CSV), so an interrupted run keeps every finished result
(gs:// objects cannot be appended to: rewritten whole at most every 30 s and at the end).
It checks that the output can be written before any work starts.

A .tflite tagger is found with its class map by one rule (`tflite.labels_path_for`:
``<name>.labels.csv`` beside ``<name>.tflite``), and its bytes are checked before the
interpreter sees them (`tflite.read_model`: a truncated file would crash the process).
"""

import dataclasses
import json
import os
import time
from typing import List, Optional

import numpy as np
import tensorflow as tf

from av_sound_tf.core import constants
from av_sound_tf.core import files
from av_sound_tf.core import media
from av_sound_tf.modeling import models

# 0.32 s between MIL segments; 0.96 s: the receptive field of one segment.
SEGMENT_HOP_SECONDS = models.FRAMES_PER_SEGMENT / constants.FRAMES_PER_SECOND
SEGMENT_SPAN_SECONDS = models.MIN_FRAMES / constants.FRAMES_PER_SECOND


@dataclasses.dataclass
class TagResult:
  path: str
  status: str
  reason: str = ""
  labels: List[dict] = dataclasses.field(default_factory=list)
  duration_seconds: float = 0.0
  timeline: Optional[dict] = None
  events: Optional[List[dict]] = None

  def to_dict(self):
    d = {"path": self.path, "status": self.status, "reason": self.reason,
         "labels": self.labels, "duration_seconds": round(self.duration_seconds, 3)}
    if self.events is not None:
      d["events"] = self.events
    if self.timeline is not None:  # segment scores over time for the top classes
      names = self.timeline["names"]
      d["timeline"] = {
          "step_seconds": self.timeline["step_seconds"],
          "times": [round(float(t), 3) for t in self.timeline["times"]],
          "scores": {l["name"]: [round(float(x), 4) for x in
                                 self.timeline["scores"][:, names.index(l["name"])]]
                     for l in self.labels},
      }
    return d


def events_from_scores(times, scores, names, mids, threshold, step):
  """Runs of consecutive steps with score >= threshold -> [{name, mid, start, end, peak}]."""
  events = []
  above = scores >= threshold
  for c in np.flatnonzero(above.any(axis=0)):
    t = 0
    while t < len(times):
      if above[t, c]:
        u = t
        while u + 1 < len(times) and above[u + 1, c]:
          u += 1
        start, end = float(times[t]), float(times[u] + step)
        peak = float(scores[t:u + 1, c].max())
        last = events[-1] if events and events[-1]["mid"] == mids[c] else None
        if last is not None and start <= last["end"]:  # overlapping receptive fields: merge
          last["end"] = round(end, 2)
          last["peak"] = round(max(last["peak"], peak), 4)
        else:
          events.append({"name": names[c], "mid": mids[c], "start": round(start, 2),
                         "end": round(end, 2), "peak": round(peak, 4)})
        t = u + 1
      else:
        t += 1
  return sorted(events, key=lambda e: (e["start"], -e["peak"]))


class Tagger:
  """Tags files with a SavedModel (bin/export) or a .tflite tagger."""

  def __init__(self, model_path: str, tflite: bool = False, top_k: int = 5,
               window_seconds: float = 10.0, embedder=None, threads: int = 1):
    self.top_k = top_k
    self.embedder = embedder
    if tflite:
      from av_sound_tf.core import labels as labels_lib  # pylint: disable=g-import-not-at-top
      from av_sound_tf.serving import tflite as tflite_lib  # pylint: disable=g-import-not-at-top
      labels_path = tflite_lib.labels_path_for(model_path)  # refuses a name without .tflite
      self.runner = tflite_lib.Runner(model_path, threads)  # checks the bytes first
      if not tf.io.gfile.exists(labels_path):
        raise FileNotFoundError(f"{labels_path} (the class map beside the .tflite) not found")
      label_map = labels_lib.LabelMap.from_csv(labels_path)
      self.names, self.mids = label_map.names, label_map.mids
      self.window = self.runner.samples
      self.signatures = None
    else:
      if not tf.io.gfile.exists(tf.io.gfile.join(model_path, "saved_model.pb")):
        raise FileNotFoundError(f"{model_path} is not a SavedModel from bin/export "
                                "(no saved_model.pb)")
      loaded = tf.saved_model.load(model_path)
      self._loaded = loaded
      self.signatures = loaded.signatures
      class_map = self.signatures["class_map"]()
      self.names = [n.decode() for n in class_map["display_name"].numpy()]
      self.mids = [m.decode() for m in class_map["mid"].numpy()]
      self.window = int(window_seconds * constants.SAMPLE_RATE)
      self.runner = None

  @property
  def audiovisual(self):
    return self.signatures is not None and "tag_audiovisual" in self.signatures and \
        self.embedder is not None

  def _scores_savedmodel(self, waveform):
    """(file scores [C], step times [T], step scores [T, C], step seconds)."""
    seg_scores, times = [], []
    for start in range(0, len(waveform), self.window):
      chunk = waveform[start:start + self.window]
      if start > 0 and len(chunk) < self.window // 10:
        break  # a sliver at the end: its padded segments would only add silence
      out = self.signatures["tag_waveform"](waveform=tf.constant(chunk[None, :]))
      seg = out["segment_scores"].numpy()[0]
      seg_scores.append(seg)
      times.extend(start / constants.SAMPLE_RATE + SEGMENT_HOP_SECONDS * np.arange(seg.shape[0]))
    steps = np.concatenate(seg_scores)
    return steps.mean(axis=0), np.asarray(times), steps, SEGMENT_SPAN_SECONDS

  def _scores_tflite(self, waveform):
    hop = max(1, self.window // 2)
    if len(waveform) < self.window:
      waveform = np.pad(waveform, (0, self.window - len(waveform)))
    starts = list(range(0, len(waveform) - self.window + 1, hop))
    steps = np.stack([self.runner(waveform[s:s + self.window])["clip_scores"][0]
                      for s in starts])
    return steps.mean(axis=0), np.asarray(starts) / constants.SAMPLE_RATE, steps, \
        self.window / constants.SAMPLE_RATE

  def tag_file(self, path, timeline=False, threshold=0.5) -> TagResult:
    try:
      waveform = media.decode_audio(path)
    except media.MediaError as e:
      return TagResult(path, "failed", e.reason)
    try:
      if self.runner is not None:
        scores, times, steps, step = self._scores_tflite(waveform)
      else:
        scores, times, steps, step = self._scores_savedmodel(waveform)
      alpha = None
      if self.audiovisual and media.media_kind(path) == "video":
        scores, alpha = self._fuse(path, waveform)
    except media.MediaError as e:
      return TagResult(path, "failed", e.reason)
    except (tf.errors.OpError, ValueError) as e:
      return TagResult(path, "failed", f"model error: {str(e).splitlines()[0][:200]}")
    top = np.argsort(-scores)[:self.top_k]
    labels = []
    for c in top:
      entry = {"name": self.names[c], "mid": self.mids[c], "score": round(float(scores[c]), 6)}
      if alpha is not None:
        entry["modality"] = "audio" if alpha[c] > 0.5 else "visual"
        entry["alpha_audio"] = round(float(alpha[c]), 4)
      labels.append(entry)
    result = TagResult(path, "ok", "", labels, len(waveform) / constants.SAMPLE_RATE)
    if timeline:
      result.timeline = {"times": times, "scores": steps, "step_seconds": step,
                         "names": self.names}
      result.events = events_from_scores(times, steps, self.names, self.mids, threshold, step)
    return result

  def _fuse(self, path, waveform):
    frames = media.sample_video_frames(path, 64, self.embedder.image_size)
    mean, _ = self.embedder.embed_clip(frames)
    chunk = waveform[:min(len(waveform), self.window)]
    out = self.signatures["tag_audiovisual"](waveform=tf.constant(chunk[None, :]),
                                             embedding_mean=tf.constant(mean[None, :]))
    return out["fused_scores"].numpy()[0], out["attention_weights"].numpy()[0]


def plot_timeline(result: TagResult, names, path, top_k=5):
  """PNG of the segment scores over time for the file's top classes."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  times, scores = result.timeline["times"], result.timeline["scores"]
  top = np.argsort(-scores.mean(axis=0))[:top_k]
  fig, ax = plt.subplots(figsize=(10, 4))
  for c in top:
    ax.plot(times, scores[:, c], label=names[c])
  ax.set_xlabel("time (s)")
  ax.set_ylabel("score")
  ax.set_ylim(0, 1)
  ax.set_title(f"Sound events over time: {result.path.split('/')[-1]}")
  ax.legend(loc="upper right", fontsize=8)
  fig.tight_layout()
  files.save_figure(fig, path, dpi=100)


def expand_inputs(paths):
  """Files, globs and folders -> (media files in order, [(input, reason)] refused).

  Refused, with the reason: an input that matches nothing (``no such file or folder``) and
  a match that is not a regular file (`files.not_regular_file_reason`: reading a FIFO
  blocks forever).
  """
  found, refused, seen = [], [], set()
  for p in paths:
    if tf.io.gfile.isdir(p):
      matches = [f for root, _, names in tf.io.gfile.walk(p) for f in
                 (tf.io.gfile.join(root, n) for n in sorted(names)) if media.media_kind(f)]
    elif any(ch in p for ch in "*?["):
      matches = sorted(tf.io.gfile.glob(p))
    else:
      matches = [p] if tf.io.gfile.exists(p) else []
    if matches:
      for m in matches:
        if m not in seen:
          seen.add(m)
          reason = files.not_regular_file_reason(m)
          if reason:
            refused.append((m, reason))
          else:
            found.append(m)
    else:
      refused.append((p, "no such file or folder"))
  return found, refused


def format_result(result: TagResult, timeline: bool) -> str:
  if result.status != "ok":
    return f"{result.path}: FAILED: {result.reason}"
  lines = [f"{result.path} ({result.duration_seconds:.1f} s)"]
  for e in result.labels:
    extra = f"  [{e['modality']}, alpha_audio {e['alpha_audio']:.2f}]" if "modality" in e \
        else ""
    lines.append(f"  {e['score']:.3f}  {e['name']}{extra}")
  if timeline and result.events is not None:
    lines.append(f"  events ({len(result.events)}):")
    for e in result.events[:50]:
      lines.append(f"    {e['start']:7.2f}-{e['end']:7.2f} s  {e['name']} (peak {e['peak']:.2f})")
  return "\n".join(lines)


def csv_rows(results):
  rows = []
  for r in results:
    if r.status != "ok":
      rows.append({"path": r.path, "status": r.status, "reason": r.reason})
    for rank, e in enumerate(r.labels, 1):
      rows.append({"path": r.path, "status": r.status, "reason": "", "rank": rank,
                   "name": e["name"], "mid": e["mid"], "score": e["score"]})
  return rows


CSV_FIELDS = ["path", "status", "reason", "rank", "name", "mid", "score"]


class ResultWriter:
  """Writes results to a .json list or a .csv as they are produced (bin/tag --output).

  A local file is complete and valid after every `add` (a JSON list of every finished
  result, or a CSV with a header), so a run that is interrupted (Ctrl-C, kill -9, a crash)
  keeps all finished results. It is extended in place, one write per result (the JSON
  list's closing bracket is overwritten by the next object): about 30 us per result.

  Other file systems (gs://) cannot append to an object, so the whole file is rewritten
  atomically (always valid), at most every `remote_interval` seconds (default 30: rewriting
  2,000 results after each one took 68 s even on a local disk) and by `close`; a kill -9
  there loses at most the last interval's results (bin/tag closes the writer on Ctrl-C and
  SIGTERM).

  The constructor checks that `path` can be written (its folder exists, a probe file can be
  created) and raises PermissionError / FileNotFoundError naming the path, so a bad
  ``--output`` fails before the model is loaded. The file itself is created by the first
  `add` (or `close`), so a run that fails before tagging leaves an earlier output alone.
  """

  def __init__(self, path: str, remote_interval: float = 30.0):
    self.path = path
    self.csv = path.endswith(".csv")
    self.local = "://" not in path
    self.remote_interval = remote_interval
    self._results = []  # remote paths: everything, rewritten each time
    self._written_at = None  # remote paths: time.monotonic() of the last rewrite
    self._file = None
    self._end = 0  # local JSON: the byte offset just past the last object
    folder = os.path.dirname(path)
    if self.local:
      folder = folder or "."
      if not os.path.isdir(folder):
        what = "is not a folder" if os.path.exists(folder) else "does not exist"
        raise FileNotFoundError(f"cannot write results to {path}: {folder} {what}")
      reason = files.not_regular_file_reason(path)
      if reason:
        raise ValueError(f"cannot write results to {path}: {reason}")
    probe = path + ".incomplete"
    try:
      with tf.io.gfile.GFile(probe, "w") as f:
        f.write("")
      tf.io.gfile.remove(probe)
    except (OSError, tf.errors.OpError) as e:
      detail = getattr(e, "strerror", None) or getattr(e, "message", None) or str(e)
      raise PermissionError(f"cannot write results to {path}: {detail.splitlines()[0]}"
                            ) from None

  def _text(self, result: "TagResult") -> str:
    if self.csv:
      return files.csv_text(csv_rows([result]), CSV_FIELDS).split("\n", 1)[1]
    return "\n".join("  " + line for line in
                     json.dumps(result.to_dict(), indent=2).splitlines())

  def _open(self):
    self._file = open(self.path, "wb", buffering=0)  # pylint: disable=consider-using-with
    if self.csv:
      self._file.write(files.csv_text([], CSV_FIELDS).encode())
    else:
      self._file.write(b"[\n]\n")
      self._end = 1

  def add(self, result: "TagResult"):
    """Appends one result: a local file holds it, complete and valid, when this returns
    (a remote one at the next rewrite)."""
    if not self.local:
      self._results.append(result)
      if self._written_at is None or \
          time.monotonic() - self._written_at >= self.remote_interval:
        self._rewrite()
      return
    if self._file is None:
      self._open()
    text = self._text(result).encode()
    if self.csv:
      self._file.write(text)
      return
    piece = (b",\n" if self._end > 1 else b"\n") + text
    self._file.seek(self._end)
    self._file.write(piece + b"\n]\n")  # one write: the list is never left open
    self._end += len(piece)

  def _rewrite(self):
    if self.csv:
      files.write_csv(self.path, csv_rows(self._results), CSV_FIELDS)
    else:
      files.write_json(self.path, [r.to_dict() for r in self._results])
    self._written_at = time.monotonic()

  def close(self):
    """Finishes the file (creating it, empty, when nothing was added)."""
    if not self.local:
      self._rewrite()
      return
    if self._file is None:
      self._open()
    self._file.close()
