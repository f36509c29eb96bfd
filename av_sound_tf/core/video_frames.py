"""Which video frames a clip is represented by, and decoding only what those frames need.

The rule (paper Sec. 3.2: "we sample 64 frames from the videos"): the segment [start, end)
is cut into `num_frames` equal parts and target k is the middle of part k,
``start + (k + 0.5) * (end - start) / num_frames``; frame k is the first frame whose
presentation time is at or after target k (times are PyAV's ``frame.time``,
``pts * time_base``), and a target past the last frame takes the last frame. A frame can be
picked for several targets (a clip with fewer frames than targets); it is decoded and
converted once.

`sample_frames` finds the picks without decoding every frame: it reads the packets of the
segment first (demuxing costs about 2 % of decoding), computes the picks from the packets'
presentation times, and then decodes every packet except the non-reference frames that
are not picked (no other frame is predicted from them, so skipping them changes no other
frame). On the 30 real H.264 clips of ../shared/data/real_av 41 % of the frames are
non-reference and 31 % are never decoded (64 frames per clip); benchmarks/frame_benchmark.py
measures the effect. A packet is a non-reference
frame when the demuxer marks it disposable, or, for H.264 in the MP4/Matroska (avcC)
layout, when every NAL unit in it has ``nal_ref_idc == 0`` and it holds a slice (no IDR,
no parameter sets). Other codecs decode every frame.

The fast path checks itself: every decoded frame must be one of the frames the packets
announced, and every pick must decode. Otherwise (packets without timestamps, a decode
error, a codec that merges or drops frames) it returns None and the caller decodes the
segment frame by frame (`sample_frames_sequentially`), the rule applied to decoded times.
Both paths pick the same frames on a well-formed stream (tests/media_test.py compares them
with a full decode on every real clip).
"""

import bisect
from concurrent import futures
import fractions
import threading
from typing import Callable, List, Optional, Tuple

import av
import numpy as np

# Packets demuxed after the last pick is settled (its pts is below the packets' decode
# times), in case a stream's decode and presentation times are not strictly ordered.
_REORDER_MARGIN = 16

_H264_SLICE, _H264_IDR, _H264_SPS, _H264_PPS = 1, 5, 7, 8


class NoFrames(Exception):
  """The video track yields no frame; the message is the reason."""


def frame_targets(num_frames: int, start: float, end: float) -> List[float]:
  """The target times (seconds) of the paper's rule: the middles of `num_frames` equal
  parts of [start, end)."""
  return [start + (k + 0.5) * (end - start) / num_frames for k in range(num_frames)]


def pick(times: List[float], targets: List[float]) -> List[int]:
  """Index into `times` (sorted presentation times) of the frame each target takes: the
  first at or after it, or the last frame."""
  last = len(times) - 1
  return [min(bisect.bisect_left(times, t), last) for t in targets]


class FrameFitter:
  """The standard ImageNet evaluation transform (resize the shorter side to 256, center
  crop 224), scaled to image_size, to RGB uint8 [image_size, image_size, 3].

  It crops first and scales second: the center square of side shorter side * 224 / 256
  (rounded to even pixels, so that 4:2:0 chroma is cut on its own grid) is scaled to
  image_size^2. This is the picture of scaling the whole frame and cropping, moved by at
  most one source pixel (the even rounding), and it costs about half the CPU, since the
  scaler reads and writes only what is kept (tests/media_test.py compares it with an
  independent numpy + TensorFlow resize; benchmarks/frame_benchmark.py measures it).

  One FFmpeg filter graph (``crop``, then ``scale``: swscale, bilinear, on the calling
  thread) serves every frame of a size and format; the crop only moves plane pointers. It
  writes planar RGB (``gbrp``), which costs about half the CPU of packed ``rgb24`` at these
  sizes and gives the same pixels (swscale computes both the same way and packs them
  differently; tests/media_test.py compares them with ``to_ndarray(format="rgb24")``).

  The first `capacity` frames are written into one block [capacity, size, size, 3], so
  that `stack` returns a clip's frames without copying them again when each was converted
  once, in order (the usual case: frames are decoded in presentation order).
  """

  def __init__(self, image_size: int, capacity: int = 0):
    self.image_size = image_size
    self._graph = self._key = None
    self._capacity = capacity
    self._block = None
    self._issued = []  # the views of the block handed out, in order

  def crop_box(self, width: int, height: int) -> Tuple[int, int, int]:
    """(side, left, top) of the square cut from a width x height frame."""
    side = min(width, height) * 224 / 256
    side = min(max(2, 2 * int(round(side / 2))), min(width, height))
    return side, (width - side) // 4 * 2, (height - side) // 4 * 2

  def _build(self, frame):
    side, left, top = self.crop_box(frame.width, frame.height)
    graph = av.filter.Graph()
    source = graph.add_buffer(width=frame.width, height=frame.height, format=frame.format,
                              time_base=frame.time_base or fractions.Fraction(1, 1000))
    crop = graph.add("crop", f"{side}:{side}:{left}:{top}")
    scale = graph.add("scale", f"{self.image_size}:{self.image_size}:flags=bilinear:threads=1")
    planar_rgb = graph.add("format", "gbrp")
    sink = graph.add("buffersink")
    source.link_to(crop)
    crop.link_to(scale)
    scale.link_to(planar_rgb)
    planar_rgb.link_to(sink)
    graph.configure()
    self._graph = graph

  def __call__(self, frame) -> np.ndarray:
    key = (frame.width, frame.height, frame.format.name)
    if key != self._key:
      self._build(frame)
      self._key = key
    self._graph.push(frame)
    scaled = self._graph.pull()
    size = self.image_size
    if len(self._issued) < self._capacity:
      if self._block is None:
        self._block = np.empty([self._capacity, size, size, 3], np.uint8)
      rgb = self._block[len(self._issued)]
      self._issued.append(rgb)
    else:
      rgb = np.empty([size, size, 3], np.uint8)
    for channel, plane in enumerate((scaled.planes[2], scaled.planes[0], scaled.planes[1])):
      rows = np.ndarray([size, size], np.uint8, buffer=plane,
                        strides=[plane.line_size, 1])  # a view without the row padding
      rgb[:, :, channel] = rows
    return rgb

  def stack(self, frames: list) -> np.ndarray:
    """`frames` (this fitter's outputs) as one array [n, size, size, 3]: the block itself
    when they are its first n frames in order, else a copy."""
    if len(frames) == len(self._issued) and all(a is b for a, b in zip(frames, self._issued)):
      return self._block[:len(frames)]
    return np.stack(frames)


class InlineConverter:
  """Runs a frame conversion (`FrameFitter`) on the calling thread, for workers that already
  fill every core, where a helper thread's hand-offs only add CPU
  (benchmarks/frame_benchmark.py measures both settings). Calling it returns a completed
  future; a conversion's error is raised by `result`, as with `BackgroundConverter`. Use it
  as a context manager."""

  def __init__(self, convert: Callable):
    self._convert = convert

  def __call__(self, frame) -> futures.Future:
    future = futures.Future()
    try:
      future.set_result(self._convert(frame))
    except Exception as e:  # pylint: disable=broad-except
      future.set_exception(e)
    return future

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    pass

  @staticmethod
  def result(converted: list) -> list:
    """The converted frames, in order (a conversion's error is raised here)."""
    return [item.result() for item in converted]


class BackgroundConverter(InlineConverter):
  """`InlineConverter` on one helper thread while the caller goes on decoding. FFmpeg's
  decoder and scaler release the GIL, so on a machine with a core to spare the conversion
  costs no wall time. At most `in_flight` decoded frames wait for conversion (a 4K frame is
  12 MB), so memory stays bounded when the decoder runs ahead.
  """

  def __init__(self, convert: Callable, in_flight: int = 4):
    super().__init__(convert)
    self._slots = threading.BoundedSemaphore(in_flight)
    self._pool = futures.ThreadPoolExecutor(1, "frame-convert")

  def __call__(self, frame) -> futures.Future:
    self._slots.acquire()
    try:
      future = self._pool.submit(self._convert, frame)
    except BaseException:
      self._slots.release()
      raise
    future.add_done_callback(lambda _: self._slots.release())
    return future

  def __exit__(self, *exc):
    self._pool.shutdown(wait=True)


def _avcc_length_size(stream) -> Optional[int]:
  """Bytes of each NAL unit's length prefix for H.264 in the avcC layout, else None."""
  extradata = stream.codec_context.extradata
  if stream.codec_context.name != "h264" or not extradata or len(extradata) < 7:
    return None
  if extradata[0] != 1:  # Annex B start codes (MPEG-TS, raw .h264): not parsed here
    return None
  return (extradata[4] & 3) + 1


def is_non_reference(packet, length_size: Optional[int]) -> bool:
  """True when no other frame is predicted from this packet's frame (see module doc)."""
  if packet.is_disposable:
    return True
  if length_size is None:
    return False
  data = bytes(packet)
  i, n, slices = 0, len(data), 0
  while i + length_size < n:
    size = int.from_bytes(data[i:i + length_size], "big")
    header = data[i + length_size]
    kind = header & 31
    if header >> 5 or kind in (_H264_IDR, _H264_SPS, _H264_PPS):
      return False  # a reference NAL unit, or one a later frame needs
    slices += kind == _H264_SLICE
    i += length_size + size
  return slices > 0 and i == n  # a malformed length: decode it


def _to_seconds(stream):
  num, den = stream.time_base.numerator, stream.time_base.denominator
  return lambda pts: float(pts) * num / den  # PyAV's frame.time, to the last bit


def _demux(container, stream, last_target):
  """The segment's packets and the sorted presentation times (pts) of the frames they
  show; None when a packet lacks timestamps."""
  seconds = _to_seconds(stream)
  packets, shown, settled, after = [], [], None, 0
  for packet in container.demux(stream):
    if packet.size == 0:  # the end-of-stream marker
      break
    if packet.pts is None or packet.dts is None:
      return None
    packets.append(packet)
    if not packet.is_discard:  # an edit list's pre-roll: decoded, never shown
      shown.append(packet.pts)
      if seconds(packet.pts) >= last_target and (settled is None or packet.pts < settled):
        settled = packet.pts
    if settled is not None and packet.dts > settled:
      after += 1  # later packets show later frames
      if after > _REORDER_MARGIN:
        break
  return packets, sorted(set(shown))


def sample_frames(container, stream, targets: List[float],
                  convert: Callable) -> Optional[Tuple[list, List[float]]]:
  """(converted frames, their times) per target, decoding only what the picks need.

  `container` is positioned at the segment (seeked, or at the start); `convert` maps a
  decoded frame to what is returned. None when the fast path cannot vouch for its picks
  (see module doc); the caller then reopens the file for `sample_frames_sequentially`.
  """
  demuxed = _demux(container, stream, targets[-1])
  if demuxed is None or not demuxed[1]:
    return None
  packets, shown = demuxed
  seconds = _to_seconds(stream)
  times = [seconds(pts) for pts in shown]
  picks = pick(times, targets)
  wanted = {shown[i] for i in picks}
  known = set(shown)
  length_size = _avcc_length_size(stream)
  got = {}

  def take(frames):
    for frame in frames:
      if frame.pts not in known:
        return False
      if frame.pts in wanted and frame.pts not in got:
        got[frame.pts] = convert(frame)
    return True

  try:
    for packet in packets:
      if packet.pts not in wanted and is_non_reference(packet, length_size):
        continue
      if not take(packet.decode()):
        return None
      if len(got) == len(wanted):
        break
    else:
      if not take(stream.decode(None)):  # the decoder's delayed frames
        return None
  except (av.error.FFmpegError, ValueError):
    return None
  if len(got) != len(wanted):
    return None
  return [got[shown[i]] for i in picks], [times[i] for i in picks]


def sample_frames_sequentially(container, stream, targets: List[float],
                               convert: Callable) -> Tuple[list, List[float]]:
  """The rule applied while decoding every frame in order (a frame without a time counts
  as 0 s; a decode error keeps the frames before it). Raises NoFrames."""
  picked, times = [], []
  last = last_time = converted = None
  try:
    for frame in container.decode(stream):
      last = frame
      last_time = frame.time if frame.time is not None else 0.0
      converted = None
      while len(picked) < len(targets) and last_time >= targets[len(picked)]:
        if converted is None:
          converted = convert(frame)
        picked.append(converted)
        times.append(last_time)
      if len(picked) == len(targets):
        break
  except (av.error.FFmpegError, ValueError) as e:
    if last is None:
      text = str(e).strip() or type(e).__name__
      raise NoFrames(f"video track does not decode ({text.splitlines()[0][:200]})") from e
  if last is None:
    raise NoFrames("video track holds no frames")
  if len(picked) < len(targets):
    tail = converted if converted is not None else convert(last)
    picked.extend([tail] * (len(targets) - len(picked)))
    times.extend([last_time] * (len(targets) - len(times)))
  return picked, times
