"""Scores over time for long recordings, computed in chunks in bounded memory (bin/tag).

A recording is decoded block by block (`media.iter_audio`) and its blocks are fed to a
scorer, which calls the model whenever it holds enough audio and returns the steps that are
final. Nothing that grows with the recording is kept in memory: the steps' scores go to a
spool file on disk (`ScoreTrack`), the file scores are running sums, and sound events are
found as the steps arrive (`EventTracker`).

SavedModel taggers (`SegmentScorer`): the result is the model's **whole-file pass**, one
``tag_waveform`` call on the whole waveform, i.e. a segment score every 0.32 s
(`SEGMENT_HOP_SECONDS`, 32 log-mel frames) over the recording, each seeing 0.96 s
(`SEGMENT_SPAN_SECONDS`) nominally. Chunks start on the segment grid (a multiple of 5,120
samples: frames and poolings line up with the whole-file pass) and overlap by
`CONTEXT_SEGMENTS` segments on each side, whose scores are dropped: a segment's receptive
field reaches past its 96 frames, and near a chunk's edge the network's zero padding stands
in for audio the whole-file pass sees. The field is 212 frames for Table 1's network (four
poolings and B5: 58 frames beyond the 96 on each side) and 247 for MobileMIL (strided
'same' convolutions pad after, so more of it lies on the right). Measured on exported
models, every segment at least 2 segments from a chunk's inner edges equals the whole-file
pass bit for bit for MILConvNet; MobileMIL needs 3 on the right (the third from the edge
is off by about 1e-7, the second by 4e-6). So 3 segments (0.96 s) of context serve both.
tests/streaming_test.py proves the equality on a real recording for both networks.

TFLite taggers (`WindowScorer`): fixed windows sliding by half a window, as before; the
stream keeps the half window the next window shares.
"""

import tempfile

import numpy as np

from av_sound_tf.core import constants
from av_sound_tf.core import features
from av_sound_tf.core import files
from av_sound_tf.modeling import models

# 0.32 s between MIL segments; 0.96 s: the frames one segment covers.
SEGMENT_HOP_SECONDS = models.FRAMES_PER_SEGMENT / constants.FRAMES_PER_SECOND
SEGMENT_SPAN_SECONDS = models.MIN_FRAMES / constants.FRAMES_PER_SECOND
SEGMENT_HOP_SAMPLES = models.FRAMES_PER_SEGMENT * constants.HOP_LENGTH  # 5,120
CONTEXT_SEGMENTS = 3
_PARAMS = features.DEFAULT_PARAMS
# n segments need 32 n + 64 frames, i.e. 5,120 n + 10,336 samples: n hops plus this tail.
_SEGMENT_TAIL = _PARAMS.window_length + (models.MIN_FRAMES - models.FRAMES_PER_SEGMENT - 1
                                         ) * _PARAMS.hop_length


def min_chunk_samples(context=CONTEXT_SEGMENTS) -> int:
  """The shortest chunk that still yields a segment besides its context (2.9 s for 3)."""
  return (2 * context + 1) * SEGMENT_HOP_SAMPLES + _SEGMENT_TAIL


def _concat(blocks):
  return np.concatenate(blocks) if len(blocks) > 1 else blocks[0]


class SegmentScorer:
  """A whole-file pass of a segment model, chunk by chunk.

  Args:
    score_fn: waveform float32 [samples] -> segment scores [segments, C] (one model call).
    chunk_samples: samples per call, context included (at least `min_chunk_samples`).
    context: segments dropped at each inner edge of a chunk.

  `add(block)` and, after the last block, `finish()` return (first step index, scores
  [steps, C]) of the steps that became final (scores None when there are none).
  """

  hop_seconds = SEGMENT_HOP_SECONDS
  span_seconds = SEGMENT_SPAN_SECONDS

  def __init__(self, score_fn, chunk_samples: int, context: int = CONTEXT_SEGMENTS):
    if chunk_samples < min_chunk_samples(context):
      raise ValueError(f"chunk_samples must be >= {min_chunk_samples(context)} (context of "
                       f"{context} segments on each side). Received: {chunk_samples}")
    self.score_fn, self.chunk, self.context = score_fn, int(chunk_samples), context
    self._blocks, self._held = [], 0  # audio from sample self._offset on
    self._offset = 0  # a multiple of SEGMENT_HOP_SAMPLES
    self._next = 0  # the next segment to return
    self._offset_after = 0  # where the audio kept after a chunk starts

  def add(self, block):
    if block.size:
      self._blocks.append(block)
      self._held += block.shape[0]
    parts = []
    while self._held >= self.chunk:
      x = _concat(self._blocks)
      parts.append(self._score(x[:self.chunk], final=False))
      keep = x[self._offset_after - self._offset:]
      self._offset = self._offset_after
      self._blocks, self._held = [keep], keep.shape[0]
    return _join(parts)

  def finish(self):
    if not self._held:
      return self._next, None
    x = _concat(self._blocks)
    self._blocks, self._held = [], 0
    return self._score(x, final=True)

  def _score(self, x, final):
    scores = np.asarray(self.score_fn(x))
    first = self._next - self._offset // SEGMENT_HOP_SAMPLES
    end = scores.shape[0] if final else scores.shape[0] - self.context
    start_index = self._next
    self._next = self._offset // SEGMENT_HOP_SAMPLES + max(end, first)
    self._offset_after = max(0, self._next - self.context) * SEGMENT_HOP_SAMPLES
    return start_index, scores[first:end] if end > first else None


class WindowScorer:
  """Fixed windows of `window` samples every `hop` samples (a TFLite tagger); a recording
  shorter than one window is zero-padded to it. `window_fn`: window -> scores [C]."""

  def __init__(self, window_fn, window: int, hop: int):
    self.window_fn, self.window, self.hop = window_fn, int(window), int(hop)
    self.hop_seconds = self.hop / constants.SAMPLE_RATE
    self.span_seconds = self.window / constants.SAMPLE_RATE
    self._blocks, self._held, self._next = [], 0, 0

  def add(self, block):
    if block.size:
      self._blocks.append(block)
      self._held += block.shape[0]
    if self._held < self.window:
      return self._next, None
    x = _concat(self._blocks)
    starts = range(0, x.shape[0] - self.window + 1, self.hop)
    steps = np.stack([self.window_fn(x[s:s + self.window]) for s in starts])
    first = self._next
    self._next += len(starts)
    keep = x[len(starts) * self.hop:]
    self._blocks, self._held = [keep], keep.shape[0]
    return first, steps

  def finish(self):
    if self._next == 0 and self._held:  # shorter than a window: one padded window
      x = _concat(self._blocks)
      self._next = 1
      return 0, np.asarray(self.window_fn(np.pad(x, (0, self.window - x.shape[0]))))[None]
    return self._next, None


def _join(parts):
  parts = [p for p in parts if p[1] is not None]
  if not parts:
    return None, None
  return parts[0][0], np.concatenate([p[1] for p in parts])


class EventTracker:
  """Sound events from scores that arrive in pieces: runs of consecutive steps with score
  >= threshold, as {name, mid, start, end, peak} (end = the last step's time + `span`).
  Runs whose spans overlap (start <= the class's previous event's end) merge. `events()`
  sorts them by start, then peak (descending), then class."""

  def __init__(self, names, mids, threshold, hop, span):
    self.names, self.mids, self.threshold = names, mids, threshold
    self.hop, self.span = hop, span
    self._open = {}  # class -> [first step, last step, peak]
    self._last = {}  # class -> its latest event (for merging)
    self._events = []  # (class, event)

  def add(self, first, scores):
    if scores is None:
      return
    above = scores >= self.threshold
    steps = scores.shape[0]
    for c in sorted(set(np.flatnonzero(above.any(axis=0)).tolist()) | set(self._open)):
      edges = np.diff(np.concatenate([[0], above[:, c].astype(np.int8), [0]]))
      starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1
      if c in self._open and (not starts.size or starts[0] > 0):
        self._close(c)  # the open run ended just before this piece
      for s, e in zip(starts, ends):
        peak = float(scores[s:e + 1, c].max())
        if s == 0 and c in self._open:
          run = self._open[c]
          run[1], run[2] = first + e, max(run[2], peak)
        else:
          self._open[c] = [first + s, first + e, peak]
        if e < steps - 1:
          self._close(c)

  def _close(self, c):
    first, last, peak = self._open.pop(c)
    start, end = float(first * self.hop), float(last * self.hop + self.span)
    prev = self._last.get(c)
    if prev is not None and start <= prev["end"]:  # overlapping receptive fields: merge
      prev["end"] = round(end, 2)
      prev["peak"] = round(max(prev["peak"], peak), 4)
    else:
      event = {"name": self.names[c], "mid": self.mids[c], "start": round(start, 2),
               "end": round(end, 2), "peak": round(peak, 4)}
      self._last[c] = event
      self._events.append((c, event))

  def events(self):
    for c in sorted(self._open):
      self._close(c)
    return [e for _, e in sorted(self._events, key=lambda x: (x[1]["start"],
                                                              -x[1]["peak"], x[0]))]


def events_from_scores(times, scores, names, mids, threshold, span):
  """Events of a whole score matrix [steps, C] whose steps are `times` (evenly spaced)."""
  hop = float(times[1] - times[0]) if len(times) > 1 else 1.0
  tracker = EventTracker(names, mids, threshold, hop, span)
  tracker.add(int(round(times[0] / hop)) if len(times) else 0, np.asarray(scores))
  return tracker.events()


class ScoreTrack:
  """What a file's steps add up to: the mean score per class (the model's average pooling
  over the recording) and, with `timeline`, the steps' scores (spooled to a temporary file
  on disk as they arrive) and the events.

  Args:
    num_classes: C.
    timeline: keep the steps and find events.
    names, mids, threshold, hop, span: for the events (`EventTracker`).
  """

  def __init__(self, num_classes, timeline=False, names=None, mids=None, threshold=0.5,
               hop=SEGMENT_HOP_SECONDS, span=SEGMENT_SPAN_SECONDS):
    self.num_classes, self.hop, self.span = num_classes, hop, span
    self.total = np.zeros([num_classes], np.float64)
    self.steps = 0
    self._spool = tempfile.TemporaryFile() if timeline else None  # pylint: disable=consider-using-with
    self.tracker = EventTracker(names, mids, threshold, hop, span) if timeline else None

  def add(self, first, scores):
    if scores is None:
      return
    scores = np.asarray(scores, np.float32)
    self.total += scores.sum(axis=0, dtype=np.float64)
    self.steps += scores.shape[0]
    if self._spool is not None:
      self._spool.write(scores.tobytes())
      self.tracker.add(first, scores)

  def mean(self):
    if not self.steps:
      raise ValueError("no scores: the recording gave no window")
    return (self.total / self.steps).astype(np.float32)

  def columns(self, classes, rows_per_read=4096):
    """(times [steps], scores [steps, len(classes)]) read back from the spool."""
    self._spool.seek(0)
    out = []
    row_bytes = 4 * self.num_classes
    while True:
      data = self._spool.read(rows_per_read * row_bytes)
      if not data:
        break
      out.append(np.frombuffer(data, np.float32).reshape(-1, self.num_classes)[:, classes])
    scores = np.concatenate(out) if out else np.zeros([0, len(classes)], np.float32)
    return np.arange(scores.shape[0]) * self.hop, scores

  def close(self):
    if self._spool is not None:
      self._spool.close()


def plot_timeline(timeline: dict, source: str, path: str):
  """PNG of a result's timeline ({"times", "scores": {name: [steps]}}) of `source`."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(10, 4))
  for name, scores in timeline["scores"].items():
    ax.plot(timeline["times"], scores, label=name)
  ax.set_xlabel("time (s)")
  ax.set_ylabel("score")
  ax.set_ylim(0, 1)
  ax.set_title(f"Sound events over time: {source.split('/')[-1]}")
  ax.legend(loc="upper right", fontsize=8)
  fig.tight_layout()
  files.save_figure(fig, path, dpi=100)
