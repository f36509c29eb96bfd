"""Did a decoded audio track end early? The tolerance, and the container-specific signs.

A decoder keeps what decodes before a cut, so `media.read_audio` compares where decoding
stopped with where the container says the audio ends (`declared_end`, `shortfall_warning`).
Two containers hide a cut from FFmpeg and are checked on the file itself: a WAV file's
length is taken from the file size when its data chunk runs past the end
(`wav_declared_seconds` reads the header's own figure), and Ogg declares no length at all
(FFmpeg reads it from the last page present), so there a missing end-of-stream page is the
sign (`ogg_end_of_stream_missing`).
"""

import os

import av
import tensorflow as tf

# A decoded audio track may end short of the length its container declares without being
# truncated: AAC/MP3 priming and padding (about 50 ms), a container duration that is the
# longest stream's (video outlasting audio by a few frames), durations rounded to
# milliseconds. Measured on the 453 real files with audio in ../shared/data (ESC-10, video/,
# real_av/, librosa/), the largest such shortfall is 0.118 s against the container's
# duration (moviepy_fire2.mp4, whose video outlasts its audio) and 0.011 s against the
# audio stream's, which is what is compared when the container gives it
# (media_test::test_real_files_are_not_reported_truncated checks a sample). A shortfall
# beyond max(0.5 s, 5 % of the wanted length) is reported: losses smaller than that go
# unseen. 5 % covers durations estimated from the bitrate (an MP3 without a Xing header;
# only a VBR one can be off by more, and a cut CBR one is estimated from the cut size, so
# its truncation cannot be seen at all).
TOLERANCE_SECONDS = 0.5
TOLERANCE_FRACTION = 0.05


def declared_end(container, stream):
  """Where the container says `stream` ends (seconds on the frames' clock), 0.0: unknown."""
  if stream.duration and stream.time_base:
    begin = stream.start_time if stream.start_time is not None else 0
    return float((begin + stream.duration) * stream.time_base)
  if container.duration:
    begin = container.start_time if container.start_time is not None else 0
    return (begin + container.duration) / av.time_base
  return 0.0


def shortfall_warning(declared_end_seconds, decoded_end, start_seconds, end_seconds,
                      first_time, decoded_seconds):
  """The `DecodedAudio.truncation` text for a track decoded up to `decoded_end`: "" unless
  decoding stopped short of the declared end (or of the segment's end, when that comes
  first) by more than the tolerance."""
  if not declared_end_seconds:
    return ""
  wanted_end = (declared_end_seconds if end_seconds is None else
                min(end_seconds, declared_end_seconds))
  wanted = wanted_end - max(start_seconds or 0.0, first_time)
  shortfall = wanted_end - decoded_end
  if wanted <= 0 or shortfall <= max(TOLERANCE_SECONDS, TOLERANCE_FRACTION * wanted):
    return ""
  segment = ""
  if start_seconds is not None or end_seconds is not None:
    segment = f" for {start_seconds or 0.0:g}-{wanted_end:g} s"
  return (f"decoded {decoded_seconds:.1f} s of the {wanted:.1f} s the container declares"
          f"{segment} (truncated?)")


_OGG_PAGE_HEADER = 27  # bytes before the segment table
_OGG_MAX_PAGE = _OGG_PAGE_HEADER + 255 + 255 * 255


def _read_part(path, offset, length):
  """(file size, up to `length` bytes from `offset`; a negative offset counts from the
  end). None when the file cannot be read: these checks follow a decode that went
  through, and are not worth a failure."""
  try:
    if "://" in path:
      f = tf.io.gfile.GFile(path, "rb")
      size = f.size()
    else:
      f = open(path, "rb")  # pylint: disable=consider-using-with
      size = f.seek(0, os.SEEK_END)
    with f:
      f.seek(max(0, size + offset) if offset < 0 else min(offset, size))
      return size, f.read(length)
  except (OSError, tf.errors.OpError):
    return None


def ogg_end_of_stream_missing(path):
  """True when the file does not end with a complete Ogg page marked end-of-stream.

  Every Ogg stream closed by its writer ends with such a page (all 414 Ogg files in
  ../shared/data do); a truncated file ends inside a page or after one without the mark.
  Reads the last page only (at most 65 307 bytes).
  """
  part = _read_part(path, -_OGG_MAX_PAGE, _OGG_MAX_PAGE)
  if part is None:
    return False
  tail = part[1]
  at = tail.rfind(b"OggS")
  while at >= 0:  # the last page is the one that ends exactly at the end of the file
    if len(tail) - at >= _OGG_PAGE_HEADER and tail[at + 4] == 0:
      table = tail[at + _OGG_PAGE_HEADER:at + _OGG_PAGE_HEADER + tail[at + 26]]
      if len(table) == tail[at + 26] and at + _OGG_PAGE_HEADER + len(table) + sum(
          table) == len(tail):
        return not tail[at + 5] & 0x04
    at = tail.rfind(b"OggS", 0, at)
  return True


def wav_declared_seconds(path):
  """The length a RIFF/WAVE header declares (its data chunk's size), 0.0 when unknown.

  FFmpeg takes a WAV file's length from the file size when the data chunk runs past the
  end, so a cut file would look complete. Streamed WAVs (size 0 or 0xFFFFFFFF) declare
  nothing. Reads the chunk headers at the file's start (one read of 64 KiB).
  """
  part = _read_part(path, 0, 65536)
  if part is None:
    return 0.0
  head = part[1]
  if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
    return 0.0
  at, bytes_per_second = 12, 0
  while at + 8 <= len(head):
    chunk, size = head[at:at + 4], int.from_bytes(head[at + 4:at + 8], "little")
    if chunk == b"fmt " and at + 16 <= len(head):
      bytes_per_second = int.from_bytes(head[at + 16:at + 20], "little")
    elif chunk == b"data":
      if not bytes_per_second or size in (0, 0xFFFFFFFF):
        return 0.0
      return size / bytes_per_second
    at += 8 + size + (size & 1)  # chunks are padded to an even size
  return 0.0
