"""Opening media containers with PyAV, and the error every media step raises
(`core.media` decodes audio and video with them)."""

import av
import tensorflow as tf

from av_sound_tf.core import files


class MediaError(Exception):
  """A media file could not be used; the message names the file and the reason."""

  def __init__(self, path, reason):
    super().__init__(f"{path}: {reason}")
    self.path = path
    self.reason = reason


def open_container(path):
  """Opens a local path directly, anything else (gs://, ...) through tf.io.gfile."""
  not_regular = files.not_regular_file_reason(path)
  if not_regular:  # FFmpeg would block forever on a FIFO
    raise MediaError(path, not_regular)
  try:
    if "://" in path:
      return av.open(tf.io.gfile.GFile(path, "rb"))
    return av.open(path)
  except FileNotFoundError as e:
    raise MediaError(path, "file not found") from e
  except (av.error.FFmpegError, OSError, ValueError, tf.errors.OpError) as e:
    raise MediaError(path, f"not a readable media file ({short(e)})") from e


def short(error):
  """The first line of an error's message, at most 200 characters."""
  text = str(error).strip() or type(error).__name__
  return text.splitlines()[0][:200]


def duration(container):
  """Seconds, from the container's header, else its longest stream's (0.0: unknown)."""
  if container.duration:
    return container.duration / av.time_base
  best = 0.0
  for stream in container.streams:
    if stream.duration and stream.time_base:
      best = max(best, float(stream.duration * stream.time_base))
  return best


def is_cover_art(stream):
  """mp3/m4a files can carry a still image as an "attached picture" video stream."""
  return bool(stream.disposition & av.stream.Disposition.attached_pic)
