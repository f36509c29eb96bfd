"""Tagging audio and video files with an exported model (bin/tag).

`Tagger` loads a SavedModel from bin/export (or a .tflite tagger) and tags whole files,
streaming them: memory does not grow with the recording (a 10-hour file tags in the memory
of a 10-minute one; benchmarks/stream_benchmark.py, docs/benchmarks.md).

* The file's audio is decoded to 16 kHz mono block by block (`media.iter_audio`) and scored
  as it arrives (`timeline.SegmentScorer`): with a SavedModel the segment scores (one every
  0.32 s) are those of one ``tag_waveform`` call on the whole recording, computed in calls
  of ``window_seconds`` of audio (default 30 s) that overlap by the receptive field. A
  file's score for a class is the mean of all its MIL segment scores, i.e. the model's own
  average-pooling g() over the whole recording.
* With a .tflite tagger (fixed window, e.g. 1 s), windows slide with 50 % overlap and the
  file score is the mean of the window scores (`timeline.WindowScorer`).
* Timeline (`timeline=True`): the segment scores over time (SavedModel) or window scores
  (TFLite), spooled to a temporary file as they are computed, and the sound events: runs of
  consecutive steps whose score is at least `threshold`, as [start, end] seconds per class,
  found as the scores arrive (`timeline.EventTracker`). The result keeps the timeline of
  the top classes only.
* Video files, when the export has ``tag_audiovisual`` and a frame embedder is given: 64
  frames are sampled and embedded, fused with the first ``AUDIOVISUAL_SECONDS`` (10 s) of
  audio; the fused scores replace the audio scores, and each top class reports which
  modality dominated (attention weight on audio > 0.5: "audio").

`tag_files` is bin/tag's loop: every input tagged in turn, its result printed and written
(`ResultWriter`), its timeline plotted, progress logged.

A file that cannot be decoded gets ``status="failed"`` and its reason; the others are
still tagged. Inputs that are not regular files (a FIFO would block the decoder forever, a
socket, a device) are refused up front by `expand_inputs`, with the reason.

`ResultWriter` writes the results as they are produced: after every file a local output
is a complete, valid JSON list (or CSV), so an interrupted run keeps every finished result
(gs:// objects cannot be appended to: rewritten whole at most every 30 s and at the end).
It checks that the output can be written before any work starts.

A .tflite tagger's name must end in ``.tflite`` (`tflite.labels_path_for`); its class map
is read from the model's TFLite metadata (`tflite.read_label_map`; older models without
metadata: ``<name>.labels.csv`` beside it), and its bytes are checked before the
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
from av_sound_tf.core import progress as progress_lib
from av_sound_tf.serving import timeline as timeline_lib

SEGMENT_HOP_SECONDS = timeline_lib.SEGMENT_HOP_SECONDS  # 0.32 s between MIL segments
SEGMENT_SPAN_SECONDS = timeline_lib.SEGMENT_SPAN_SECONDS  # 0.96 s: the frames of a segment
AUDIOVISUAL_SECONDS = 10.0  # audio fused with a video's frames: its first 10 s
events_from_scores = timeline_lib.events_from_scores


@dataclasses.dataclass
class TagResult:
  path: str
  status: str
  reason: str = ""
  labels: List[dict] = dataclasses.field(default_factory=list)
  duration_seconds: float = 0.0
  timeline: Optional[dict] = None
  events: Optional[List[dict]] = None

  # timeline: {"step_seconds": the span of a step, "times": [steps] (seconds),
  # "scores": {name: [steps]} for the top classes}, NumPy arrays.

  def to_dict(self, with_timeline=True):
    d = {"path": self.path, "status": self.status, "reason": self.reason,
         "labels": self.labels, "duration_seconds": round(self.duration_seconds, 3)}
    if self.events is not None:
      d["events"] = self.events
    if self.timeline is not None and with_timeline:  # scores over time, top classes
      d["timeline"] = {
          "step_seconds": self.timeline["step_seconds"],
          "times": _rounded(self.timeline["times"], 3),
          "scores": {name: _rounded(x, 4) for name, x in self.timeline["scores"].items()},
      }
    return d


def _rounded(values, digits):
  return np.round(np.asarray(values, np.float64), digits).tolist()


class Tagger:
  """Tags files with a SavedModel (bin/export) or a .tflite tagger, streaming them.

  Args:
    model_path: a SavedModel version folder, or a ``.tflite`` file with `tflite`.
    tflite: whether `model_path` is a TFLite tagger.
    top_k: classes per file.
    window_seconds: SavedModel: seconds of audio per model call, the receptive-field
      overlap included (at least 2.9 s; at most the export's ``max_seconds``, 600 s by
      default; a longer one is cut to it). The scores do not depend on it; longer calls
      overlap less.
    embedder: a frame embedder (`embedders.build_embedder`) for audiovisual tagging.
    threads: TFLite interpreter threads.
    block_seconds: seconds of audio decoded per block.
  """

  def __init__(self, model_path: str, tflite: bool = False, top_k: int = 5,
               window_seconds: float = 30.0, embedder=None, threads: int = 1,
               block_seconds: float = 1.0):
    self.top_k = top_k
    self.embedder = embedder
    self.block_seconds = block_seconds
    if tflite:
      from av_sound_tf.serving import tflite as tflite_lib  # pylint: disable=g-import-not-at-top
      tflite_lib.labels_path_for(model_path)  # refuses a name without .tflite
      content = tflite_lib.read_model(model_path)  # checks the bytes first
      self.runner = tflite_lib.Runner(model_path, threads, content=content)
      # The class map in the model's TFLite metadata; <name>.labels.csv for older models.
      label_map, _ = tflite_lib.read_label_map(model_path, content)
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
      self.window = int(round(window_seconds * constants.SAMPLE_RATE))
      info = tf.io.gfile.join(model_path, "assets.extra", "export_info.json")
      if tf.io.gfile.exists(info):  # calls no longer than the signatures accept
        max_seconds = json.loads(tf.io.gfile.GFile(info).read()).get("max_seconds") or 1e9
        self.window = min(self.window, int(max_seconds * constants.SAMPLE_RATE))
      if self.window < timeline_lib.min_chunk_samples():
        raise ValueError(f"window_seconds must be >= "
                         f"{timeline_lib.min_chunk_samples() / constants.SAMPLE_RATE:.2f} "
                         f"(the receptive field on both sides). Received: {window_seconds}")
      self.runner = None

  @property
  def audiovisual(self):
    return self.signatures is not None and "tag_audiovisual" in self.signatures and \
        self.embedder is not None

  def scorer(self):
    """A fresh streaming scorer for one file (`timeline.SegmentScorer` / `WindowScorer`)."""
    if self.runner is not None:
      return timeline_lib.WindowScorer(lambda w: self.runner(w)["clip_scores"][0],
                                       self.window, max(1, self.window // 2))
    return timeline_lib.SegmentScorer(self.segment_scores, self.window)

  def segment_scores(self, waveform):
    """One ``tag_waveform`` call: waveform [samples] -> segment scores [segments, C]."""
    out = self.signatures["tag_waveform"](waveform=tf.constant(waveform[None, :]))
    return out["segment_scores"].numpy()[0]

  def tag_file(self, path, timeline=False, threshold=0.5) -> TagResult:
    """Decodes, scores and (with `timeline`) finds the events of one file as a stream."""
    scorer = self.scorer()
    track = timeline_lib.ScoreTrack(len(self.names), timeline, self.names, self.mids,
                                    threshold, scorer.hop_seconds, scorer.span_seconds)
    fuse = self.audiovisual and media.media_kind(path) == "video"
    head, head_len = [], 0  # the audio fused with the frames
    try:
      stream = media.iter_audio(path, self.block_seconds)
      for block in stream:
        if fuse and head_len < AUDIOVISUAL_SECONDS * constants.SAMPLE_RATE:
          head.append(block)
          head_len += block.shape[0]
        track.add(*scorer.add(block))
      track.add(*scorer.finish())
      scores, alpha = track.mean(), None
      if fuse:
        scores, alpha = self._fuse(path, np.concatenate(head))
      top = np.argsort(-scores)[:self.top_k]
      result = TagResult(path, "ok", "", self._labels(scores, alpha, top),
                         stream.samples / constants.SAMPLE_RATE)
      if timeline:
        times, steps = track.columns(top)
        result.timeline = {"times": times, "step_seconds": scorer.span_seconds,
                           "scores": {self.names[c]: steps[:, i] for i, c in enumerate(top)}}
        result.events = track.tracker.events()
      return result
    except media.MediaError as e:
      return TagResult(path, "failed", e.reason)
    except (tf.errors.OpError, ValueError) as e:
      return TagResult(path, "failed", f"model error: {str(e).splitlines()[0][:200]}")
    finally:
      track.close()

  def _labels(self, scores, alpha, top):
    labels = []
    for c in top:
      entry = {"name": self.names[c], "mid": self.mids[c], "score": round(float(scores[c]), 6)}
      if alpha is not None:
        entry["modality"] = "audio" if alpha[c] > 0.5 else "visual"
        entry["alpha_audio"] = round(float(alpha[c]), 4)
      labels.append(entry)
    return labels

  def _fuse(self, path, waveform):
    frames = media.sample_video_frames(path, 64, self.embedder.image_size)
    mean, _ = self.embedder.embed_clip(frames)
    chunk = waveform[:int(AUDIOVISUAL_SECONDS * constants.SAMPLE_RATE)]
    out = self.signatures["tag_audiovisual"](waveform=tf.constant(chunk[None, :]),
                                             embedding_mean=tf.constant(mean[None, :]))
    return out["fused_scores"].numpy()[0], out["attention_weights"].numpy()[0]


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


def _json_text(result: TagResult, indent="") -> str:
  """`result.to_dict()` as indented JSON, a timeline's arrays on one line each (an hour's
  timeline is 11,250 numbers per class: a line per number would be 10x the text)."""
  d = result.to_dict(with_timeline=False)
  arrays = []
  if result.timeline is not None:
    tl = result.timeline
    arrays = [(tl["times"], 3)] + [(x, 4) for x in tl["scores"].values()]
    d["timeline"] = {"step_seconds": tl["step_seconds"], "times": "\0" + "0",
                     "scores": {name: f"\0{i + 1}" for i, name in enumerate(tl["scores"])}}
  text = "\n".join(indent + line for line in json.dumps(d, indent=2).splitlines())
  for i, (values, digits) in enumerate(arrays):  # one array's list at a time
    text = text.replace(f'"\\u0000{i}"', json.dumps(_rounded(values, digits)), 1)
  return text


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
    return _json_text(result, indent="  ")

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
      files.write_text(self.path, "[\n" + ",\n".join(_json_text(r, "  ") for r in
                                                     self._results) + "\n]\n")
    self._written_at = time.monotonic()

  def close(self):
    """Finishes the file (creating it, empty, when nothing was added)."""
    if not self.local:
      self._rewrite()
      return
    if self._file is None:
      self._open()
    self._file.close()


def tag_files(paths, model_path, *, tflite=False, top_k=5, window_seconds=30.0, embedder=None,
              threads=1, writer: Optional[ResultWriter] = None, timeline=False,
              threshold=0.5, plot_dir=None, progress_every=5.0, echo=None) -> dict:
  """Tags files, globs and folders one file at a time (bin/tag): each result is printed
  (`format_result`, through `echo`), added to `writer` (so an output file holds every
  finished result) and, with `plot_dir` and `timeline`, plotted to
  ``<plot_dir>/<file name>.png``; then it is dropped, so memory does not grow with the
  number of files either. Refused inputs (`expand_inputs`) are reported first.

  The model is loaded (`Tagger`) after the inputs are expanded; `writer` is not closed.

  Returns:
    {"inputs": every input accounted for (tagged or refused), "failed": those that failed}.
  """
  echo = echo or (lambda line: print(line, flush=True))
  inputs, refused = expand_inputs(paths)
  tagger = Tagger(model_path, tflite, top_k, window_seconds, embedder, threads)
  failed = 0
  for path, reason in refused:
    result = TagResult(path, "failed", reason)
    failed += 1
    echo(format_result(result, False))
    if writer:
      writer.add(result)
  done = progress_lib.Progress(len(inputs), "tag", "files", every=progress_every)
  for path in inputs:
    result = tagger.tag_file(path, timeline, threshold)
    failed += result.status != "ok"
    done.update(failed=result.status != "ok")
    if writer:
      writer.add(result)  # written now: an interrupted run keeps it
    echo(format_result(result, timeline))
    if plot_dir and result.timeline is not None:
      tf.io.gfile.makedirs(plot_dir)
      png = tf.io.gfile.join(plot_dir, os.path.basename(path) + ".png")
      timeline_lib.plot_timeline(result.timeline, result.path, png)
      echo(f"  timeline plot: {png}")
  done.finish()
  return {"inputs": len(inputs) + len(refused), "failed": failed}
