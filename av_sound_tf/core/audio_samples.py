"""Decoded audio samples to mono float32, and which files libsndfile decodes.

`media` decodes audio with FFmpeg (PyAV frames: `frame_to_mono`) or, for local WAV, FLAC,
AIFF and Ogg Vorbis files, with libsndfile (`open_soundfile`); both average the channels
with `channel_mean`, so a PCM file gives the same samples either way.
"""

import numpy as np

from av_sound_tf.core import constants
from av_sound_tf.core import files

# Integer sample formats -> float in [-1, 1].
_INT_SCALE = {"u8": (128.0, 128.0), "s16": (0.0, 32768.0), "s32": (0.0, 2147483648.0),
              "s64": (0.0, 9223372036854775808.0)}
_SAMPLE_DTYPES = {"u8": np.uint8, "s16": np.int16, "s32": np.int32, "s64": np.int64,
                  "flt": np.float32, "dbl": np.float64}


def frame_to_mono(frame):
  """An audio frame of any sample format and layout -> mono float32 (channel mean).

  The planes are read in place (no ``to_ndarray`` copy) and averaged by `channel_mean`:
  NumPy's ``mean`` over the channel axis, to the last bit for up to 7 channels
  (tests/media_test.py compares the two on several sample formats and layouts).
  """
  fmt = frame.format.name.rstrip("p")
  dtype = _SAMPLE_DTYPES[fmt]
  n, channels = frame.samples, len(frame.layout.channels)
  if frame.format.is_planar:
    planes = [np.frombuffer(p, dtype, count=n) for p in frame.planes[:channels]]
  else:  # interleaved: one plane [samples * channels]
    data = np.frombuffer(frame.planes[0], dtype, count=n * channels)
    planes = [data[c::channels] for c in range(channels)]
  if fmt in _INT_SCALE:
    offset, scale = _INT_SCALE[fmt]
    planes = [(p.astype(np.float32) - offset) / scale for p in planes]
  return channel_mean(planes, np.float64 if fmt == "dbl" else np.float32)


def channel_mean(planes, dtype=np.float32):
  """Channels summed in order and divided by their count, in `dtype`, as float32 (a copy:
  a decoder's buffers are reused)."""
  mono = planes[0].astype(dtype)
  for plane in planes[1:]:
    mono += plane
  if len(planes) > 1:
    mono /= len(planes)
  return mono.astype(np.float32, copy=False)


# libsndfile (``soundfile``) decodes these containers and codecs for `media.iter_audio`: about
# 1.4x faster than FFmpeg through PyAV on Ogg Vorbis (benchmarks/peers_benchmark.py), the
# same samples for PCM and within 5e-7 for Vorbis (tests/media_test.py). Everything else
# (MP3, Opus, AAC, video containers, gs:// paths, files libsndfile refuses) goes to FFmpeg.
_SOUNDFILE_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".aiff", ".aif")
SOUNDFILE_FORMATS = {"WAV": "wav", "WAVEX": "wav", "FLAC": "flac", "OGG": "ogg",
                      "AIFF": "aiff"}
_SOUNDFILE_SUBTYPES = ("PCM_U8", "PCM_S8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE",
                       "VORBIS")


def open_soundfile(path):
  """A `soundfile.SoundFile` when libsndfile should decode `path`, else None."""
  if "://" in path or not path.lower().endswith(_SOUNDFILE_EXTENSIONS):
    return None
  try:
    import soundfile  # pylint: disable=g-import-not-at-top
  except (ImportError, OSError):  # no wheel, or no libsndfile: FFmpeg decodes everything
    return None
  if files.not_regular_file_reason(path):
    return None  # FFmpeg's path reports it
  try:
    handle = soundfile.SoundFile(path)
  except (RuntimeError, OSError, TypeError, ValueError):  # LibsndfileError is a RuntimeError
    return None
  if (handle.format not in SOUNDFILE_FORMATS or handle.subtype not in _SOUNDFILE_SUBTYPES
      or not handle.seekable() or handle.frames <= 0 or handle.samplerate <= 0):
    handle.close()
    return None
  return handle


def soundfile_blocks(handle, begin, stop, block):
  """Mono float32 blocks of `block` frames (the last one shorter) of an open
  `soundfile.SoundFile`, from frame `begin` to `stop` (None: its end). A failed read raises
  soundfile's error (a RuntimeError)."""
  position = begin
  if position:
    handle.seek(position)
  while stop is None or position < stop:
    want = block if stop is None else min(block, stop - position)
    data = handle.read(want, dtype="float32", always_2d=True)
    if not data.shape[0]:
      return
    position += data.shape[0]
    yield channel_mean(data.T)
    if data.shape[0] < want:
      return


def digital_silence_fraction(waveform: np.ndarray,
                             sample_rate=constants.SAMPLE_RATE) -> float:
  """Fraction of 100 ms blocks that are exactly zero (a sign of a broken or missing track)."""
  block = sample_rate // 10
  n = waveform.shape[0] // block
  if n == 0:
    return float(np.all(waveform == 0))
  blocks = waveform[:n * block].reshape(n, block)
  return float(np.mean(np.all(blocks == 0, axis=1)))

