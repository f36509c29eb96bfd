"""Decoding audio files and video containers with PyAV (FFmpeg) and libsndfile.

Why PyAV and libsoxr (benchmarks/decode_benchmark.py, side by side; docs/benchmarks.md): per
5 s ESC-10 OGG clip, tensorflow-io's ``AudioIOTensor`` + ``tfio.audio.resample`` costs about
19x our decode, PyAV with FFmpeg's swresample 1.4x; libsoxr resamples 10 s 3.3x faster than
swresample. tensorflow-io's video ops need FFmpeg 4.2/3.4/2.8 shared libraries that current
systems lack; PyAV ships its own FFmpeg. Local WAV, FLAC, AIFF and Ogg Vorbis files go to
libsndfile, about 1.4x faster on Vorbis, with the same samples (`audio_samples`).

Audio channels are averaged (librosa's ``to_mono`` convention: a tone at amplitude a in both
channels stays at amplitude a; FFmpeg's own stereo-to-mono matrix adds the channels at -3 dB
each, which raises correlated content by 3 dB and can clip), then resampled by libsoxr.
Every failure is raised as `MediaError` whose message names the file and the reason;
callers record it and move on.

Truncated files: a decoder keeps what decodes before a cut, so `read_audio` compares where
decoding stopped with where the container says the audio ends (`DecodedAudio.truncation`);
the tolerance and the WAV and Ogg checks are in `core.truncation`.
"""

import dataclasses
import os

import av
import numpy as np
import soxr

from av_sound_tf.core import audio_samples
from av_sound_tf.core import constants
from av_sound_tf.core import containers
from av_sound_tf.core import truncation as truncation_lib
from av_sound_tf.core import video_frames

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".mp3", ".m4a", ".aac", ".opus", ".wma",
                    ".aiff", ".aif")
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".flv",
                    ".3gp", ".ogv", ".wmv")
MEDIA_EXTENSIONS = AUDIO_EXTENSIONS + VIDEO_EXTENSIONS

MediaError = containers.MediaError


@dataclasses.dataclass
class MediaInfo:
  """What a container holds, read from its headers."""

  path: str
  duration_seconds: float
  has_audio: bool
  has_video: bool
  audio_codec: str = ""
  video_codec: str = ""


def probe(path) -> MediaInfo:
  """Reads duration and streams of a media file without decoding it."""
  with containers.open_container(path) as container:
    audio = container.streams.audio
    video = [s for s in container.streams.video if not containers.is_cover_art(s)]
    return MediaInfo(
        path=path,
        duration_seconds=containers.duration(container),
        has_audio=bool(audio),
        has_video=bool(video),
        audio_codec=audio[0].codec_context.name if audio else "",
        video_codec=video[0].codec_context.name if video else "")


@dataclasses.dataclass
class DecodedAudio:
  """A decoded audio track, and whether it ended short of what its container declares.

  Attributes:
    waveform: float32 [samples] at the requested rate, values in [-1, 1].
    sample_rate: its rate.
    declared_end_seconds: where the container says the audio track ends (the audio
      stream's own duration when given, else the container's); 0.0 when it does not say.
    decoded_end_seconds: where decoding stopped, on the same clock (the end of the
      segment, the end of the data, or a decode error).
    truncation: "" or a warning such as ``decoded 2.5 s of the 18.2 s the container
      declares (truncated?)`` when the decoded audio falls short of the declared end (or
      of the segment's end, when that comes first) by more than `core.truncation`'s
      tolerance, or when an Ogg stream that was decoded to its end lacks its
      end-of-stream page.
  """

  waveform: np.ndarray
  sample_rate: int
  declared_end_seconds: float = 0.0
  decoded_end_seconds: float = 0.0
  truncation: str = ""

  @property
  def duration_seconds(self):
    return self.waveform.shape[0] / self.sample_rate


def decode_audio(path, start_seconds=None, end_seconds=None,
                 sample_rate=constants.SAMPLE_RATE) -> np.ndarray:
  """`read_audio`'s waveform: mono float32 at `sample_rate` (see there)."""
  return read_audio(path, start_seconds, end_seconds, sample_rate).waveform


def read_audio(path, start_seconds=None, end_seconds=None,
               sample_rate=constants.SAMPLE_RATE) -> DecodedAudio:
  """Decodes the first audio track to mono float32 at `sample_rate`: the whole of
  `iter_audio`'s blocks (1 s blocks; see there for the decoding and the errors).

  Args:
    path: audio or video file (local path or any tf.io.gfile URL).
    start_seconds: optional start of the segment to keep (seconds from the file's start).
    end_seconds: optional end of the segment (exclusive).
    sample_rate: output sample rate.

  A track that decodes to less than its container declares is returned as far as it
  decodes, with `DecodedAudio.truncation` saying so (one container open; a WAV or Ogg
  file decoded to its end also has its header or last page read). Returns `DecodedAudio`.

  Raises:
    MediaError: no audio track, undecodable audio, no samples in the segment, or NaN or
      Inf samples.
  """
  stream = iter_audio(path, 1.0, start_seconds, end_seconds, sample_rate)
  waveform = np.concatenate(list(stream))
  truncation = stream.truncation()  # may raise declared_end_seconds (a cut WAV's header)
  return DecodedAudio(waveform, sample_rate, stream.declared_end_seconds,
                      stream.decoded_end_seconds, truncation)


def iter_audio(path, block_seconds=1.0, start_seconds=None, end_seconds=None,
               sample_rate=constants.SAMPLE_RATE) -> "AudioStream":
  """The first audio track as consecutive mono float32 blocks at `sample_rate` (an
  `AudioStream`: iterate it; memory does not grow with the file).

  Frames are decoded by FFmpeg (or libsndfile for local WAV, FLAC, AIFF and Ogg Vorbis
  files: sample-exact seeks), averaged over channels, cut to the segment at the native
  rate, and resampled with libsoxr (``soxr``, "HQ" quality) in one continuous stream
  (`soxr.ResampleStream`: its filter state carries across blocks, so the blocks
  concatenate to the waveform of a whole-file resampling), in blocks of about
  `block_seconds` of native audio (the last one shorter): libsoxr was chosen by
  measurement (3.3x faster than FFmpeg's swresample through PyAV on a 10 s 44.1 kHz clip,
  benchmarks/decode_benchmark.py), and per-frame resampler calls cost more than the
  filtering. Samples are clipped to [-1, 1].

  Errors are raised as `MediaError` when they are found: opening (no audio track, not a
  readable file) and a track that does not decode at all on the first block; a block with
  NaN or Inf samples when it is reached; no samples at all (or none in the segment) after
  the last block. A decode error after the first frame ends the stream early (what decoded
  before a corrupt tail is kept); `AudioStream.truncation` says so once it is exhausted.
  """
  return AudioStream(path, block_seconds, start_seconds, end_seconds, sample_rate)


class AudioStream:
  """Iterable of resampled mono blocks (`iter_audio`). Once exhausted it also holds
  `samples` (the total), `declared_end_seconds` and `decoded_end_seconds` (see
  `DecodedAudio`), and `truncation()` computes `DecodedAudio.truncation`."""

  def __init__(self, path, block_seconds, start_seconds, end_seconds, sample_rate):
    if block_seconds <= 0:
      raise ValueError(f"block_seconds must be > 0. Received: {block_seconds}")
    self.path = path
    self.block_seconds = block_seconds
    self.start_seconds = start_seconds
    self.end_seconds = end_seconds
    self.sample_rate = sample_rate
    self.samples = 0
    self.declared_end_seconds = 0.0
    self.decoded_end_seconds = 0.0
    self._first_time = 0.0
    self._formats = []
    self._to_the_end = False
    self._done = False

  def __iter__(self):
    self.samples, self._done = 0, False
    handle = audio_samples.open_soundfile(self.path)
    if handle is not None:
      with handle:
        yield from self._iter_soundfile(handle)
    else:
      yield from self._iter_ffmpeg()

  def _iter_soundfile(self, handle):
    """libsndfile's path (`audio_samples.open_soundfile`): sample-exact seeks."""
    path, start_seconds, end_seconds = self.path, self.start_seconds, self.end_seconds
    rate = handle.samplerate
    self.declared_end_seconds = handle.frames / rate
    self._formats = [audio_samples.SOUNDFILE_FORMATS[handle.format]]
    resampler, block = self._resampler_and_block(rate)
    begin = 0 if start_seconds is None else max(0, int(round(start_seconds * rate)))
    stop = None if end_seconds is None else int(round(end_seconds * rate))
    position = begin = min(begin, handle.frames)
    try:
      for mono in audio_samples.soundfile_blocks(handle, begin, stop, block):
        position += mono.shape[0]
        yield self._block([mono], resampler, last=False)
    except RuntimeError as e:  # soundfile.LibsndfileError: keep what decoded before it
      if position == begin:
        raise MediaError(path, f"audio track does not decode ({containers.short(e)})") from e
    last = self._finish([], resampler, 0.0, position, rate, stop)
    if last.size:
      yield last

  def _iter_ffmpeg(self):
    path, start_seconds, end_seconds = self.path, self.start_seconds, self.end_seconds
    with containers.open_container(path) as container:
      if not container.streams.audio:
        raise MediaError(path, "no audio track")
      stream = container.streams.audio[0]
      self.declared_end_seconds = truncation_lib.declared_end(container, stream)
      self._formats = container.format.name.split(",")
      if start_seconds and start_seconds > 0:
        # Seek lands at or before the wanted time; decoded frames carry their own times.
        try:
          container.seek(int(start_seconds * av.time_base), any_frame=False)
        except av.error.FFmpegError:
          pass
      resampler, rate, first_time, block = None, None, 0.0, 0
      begin = stop = None  # the segment in native samples from the first decoded frame
      position = 0  # native samples decoded so far
      pending, pending_len = [], 0
      try:
        for frame in container.decode(stream):
          if rate is None:
            rate = frame.sample_rate
            first_time = frame.time if frame.time is not None else 0.0
            begin = 0 if start_seconds is None else max(
                0, int(round((start_seconds - first_time) * rate)))
            stop = None if end_seconds is None else int(
                round((end_seconds - first_time) * rate))
            resampler, block = self._resampler_and_block(rate)
          mono = audio_samples.frame_to_mono(frame)
          lo, hi = max(begin - position, 0), mono.shape[0]
          if stop is not None:
            hi = min(hi, stop - position)
          position += mono.shape[0]
          if hi > lo:
            pending.append(mono[lo:hi])
            pending_len += hi - lo
            if pending_len >= block:  # few resampler calls, bounded memory
              yield self._block(pending, resampler, last=False)
              pending, pending_len = [], 0
          if stop is not None and position >= stop:
            break
      except (av.error.FFmpegError, ValueError) as e:
        if rate is None:
          raise MediaError(path, f"audio track does not decode ({containers.short(e)})") from e
        # Keep what decoded before a corrupt tail; the caller sees the shorter length.
      if rate is None:
        raise MediaError(path, "audio track holds no samples")
    last = self._finish(pending, resampler, first_time, position, rate, stop)
    if last.size:
      yield last

  def _resampler_and_block(self, rate):
    """The resampler from `rate` (None: no resampling) and the native samples per block."""
    resampler = None
    if rate != self.sample_rate:
      resampler = soxr.ResampleStream(rate, self.sample_rate, 1, dtype="float32")
    return resampler, max(1, int(round(self.block_seconds * rate)))

  def _finish(self, pending, resampler, first_time, position, rate, stop):
    """The last block; decoding stopped `position` native samples after `first_time`."""
    last = self._block(pending, resampler, last=True)
    if self.samples == 0:
      raise MediaError(self.path, f"no audio samples between {self.start_seconds} s and "
                       f"{self.end_seconds} s")
    self._first_time = first_time
    self.decoded_end_seconds = first_time + position / rate
    self._to_the_end = stop is None or position < stop  # decoding ran out before the segment
    self._done = True
    return last

  def _block(self, pending, resampler, last):
    x = np.concatenate(pending) if pending else np.zeros([0], np.float32)
    if resampler is not None:
      x = resampler.resample_chunk(x, last=last)
    if not np.all(np.isfinite(x)):
      raise MediaError(self.path, "audio decodes to NaN or Inf samples")
    self.samples += x.shape[0]
    return np.clip(x, -1.0, 1.0)

  def truncation(self) -> str:
    """`DecodedAudio.truncation` of the exhausted stream (reads a WAV header or an Ogg
    file's last page when decoding ran to the end)."""
    if not self._done:
      raise ValueError(f"{self.path}: the audio stream has not been read to its end")
    declared_end, formats = self.declared_end_seconds, self._formats
    if self._to_the_end and "wav" in formats:  # FFmpeg hides a cut WAV's declared length
      declared_end = max(declared_end, truncation_lib.wav_declared_seconds(self.path))
      self.declared_end_seconds = declared_end
    seconds = self.samples / self.sample_rate
    warning = truncation_lib.shortfall_warning(declared_end, self.decoded_end_seconds,
                                               self.start_seconds, self.end_seconds,
                                               self._first_time, seconds)
    if (not warning and self._to_the_end and "ogg" in formats and
        truncation_lib.ogg_end_of_stream_missing(self.path)):
      warning = (f"decoded {seconds:.1f} s; the Ogg stream ends without its end-of-stream "
                 "page (truncated?)")
    return warning


@dataclasses.dataclass
class SampledFrames:
  """Frames sampled from a video segment (`sample_video`).

  Attributes:
    frames: uint8 [num_frames, image_size, image_size, 3] RGB.
    times: float64 [num_frames], the presentation time (seconds) of each picked frame.
    targets: float64 [num_frames], the times the rule aimed at (`video_frames`).
  """

  frames: np.ndarray
  times: np.ndarray
  targets: np.ndarray


def sample_video(path, num_frames=64, image_size=224, start_seconds=None,
                 end_seconds=None, decoder_threads=0) -> SampledFrames:
  """Samples `num_frames` frames spread evenly over a video segment (paper Sec. 3.2).

  Frame k is the first frame at or after time start + (k + 0.5) * duration / num_frames
  (end: `end_seconds`, else the container's duration); a video that ends early repeats
  its last frame. Only the frames the picks need are decoded (`core.video_frames`: the rule,
  kept exact), and only picks go through the ImageNet transform (`FrameFitter`).
  `decoder_threads`: 0, FFmpeg's automatic threads and the frames converted on a helper
  thread (the least wall time on an idle machine); 1, all on the calling thread, for
  workers that fill every core (the least CPU; benchmarks/frame_benchmark.py); n > 1: n
  frame threads and the helper thread.

  Returns `SampledFrames`. Raises MediaError (no video track, no decodable frame) or
  ValueError (num_frames < 1, decoder_threads < 0)."""
  if num_frames < 1:
    raise ValueError(f"num_frames must be >= 1. Received: {num_frames}")
  if decoder_threads < 0:
    raise ValueError(f"decoder_threads must be >= 0. Received: {decoder_threads}")
  picked, fitter = None, video_frames.FrameFitter(image_size, capacity=num_frames)
  with (video_frames.InlineConverter(fitter) if decoder_threads == 1 else
        video_frames.BackgroundConverter(fitter)) as convert:
    with containers.open_container(path) as container:
      stream, targets = _video_segment(path, container, num_frames, start_seconds,
                                       end_seconds, decoder_threads)
      try:
        picked = video_frames.sample_frames(container, stream, targets, convert)
      except (av.error.FFmpegError, ValueError):
        picked = None  # e.g. a demuxing error: decode frame by frame below
    if picked is None:
      with containers.open_container(path) as container:
        stream, targets = _video_segment(path, container, num_frames, start_seconds,
                                         end_seconds, decoder_threads)
        try:
          picked = video_frames.sample_frames_sequentially(container, stream, targets,
                                                           convert)
        except video_frames.NoFrames as e:
          raise MediaError(path, str(e)) from e
    converted, times = picked
    try:
      frames = convert.result(converted)
    except (av.error.FFmpegError, ValueError) as e:
      raise MediaError(path, "video frames do not convert to RGB "
                       f"({containers.short(e)})") from e
  return SampledFrames(fitter.stack(frames), np.asarray(times, np.float64),
                       np.asarray(targets, np.float64))


def _video_segment(path, container, num_frames, start_seconds, end_seconds, decoder_threads):
  """The first video stream (its decoder threads set) and the targets; seeks to the
  segment's start."""
  streams = [s for s in container.streams.video if not containers.is_cover_art(s)]
  if not streams:
    raise MediaError(path, "no video track")
  stream = streams[0]
  if decoder_threads == 0:
    stream.thread_type = "AUTO"  # frame and slice threads: the fastest full decode here
  else:
    stream.thread_type = "FRAME"
    stream.codec_context.thread_count = decoder_threads
  start = float(start_seconds or 0.0)
  end = end_seconds if end_seconds is not None else containers.duration(container)
  if not end or end <= start:
    end = start + 1.0  # unknown duration: targets fall back to the first frames
  if start > 0:
    try:
      container.seek(int(start * av.time_base), any_frame=False)
    except av.error.FFmpegError:
      pass
  return stream, video_frames.frame_targets(num_frames, start, end)


def sample_video_frames(path, num_frames=64, image_size=224, start_seconds=None,
                        end_seconds=None, decoder_threads=0) -> np.ndarray:
  """`sample_video`'s frames: uint8 [num_frames, image_size, image_size, 3]."""
  return sample_video(path, num_frames, image_size, start_seconds, end_seconds,
                      decoder_threads).frames


def media_kind(path) -> str:
  """'audio', 'video' or '' from the file extension (containers are probed later anyway)."""
  ext = os.path.splitext(path)[1].lower()
  if ext in AUDIO_EXTENSIONS:
    return "audio"
  if ext in VIDEO_EXTENSIONS:
    return "video"
  return ""
