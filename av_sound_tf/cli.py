"""Shared plumbing for the absl binaries in bin/: quiet logs and clear errors.

A binary's ``main`` raises `UsageError` (bad flags) or lets library errors such as
``ValueError``/``FileNotFoundError`` escape; `run` turns them into one line on stderr and
exit status 2 instead of a stack trace. ``--verbosity=1`` (or ``AV_SOUND_TF_DEBUG=1``)
shows the trace for debugging.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import logging  # pylint: disable=g-import-not-at-top

UsageError = app.UsageError

# Errors that carry a message meant for the user.
_USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError,
                KeyError)


def _is_user_error(error):
  if isinstance(error, _USER_ERRORS):
    return True
  tf = sys.modules.get("tensorflow")  # tf.io.gfile raises tf.errors.NotFoundError etc.
  return tf is not None and isinstance(error, tf.errors.OpError)


def run(main):
  """`absl.app.run(main)` with clear one-line errors."""

  def wrapped(argv):
    try:
      return main(argv)
    except app.UsageError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      if not _is_user_error(e) or os.environ.get("AV_SOUND_TF_DEBUG") or (
          logging.get_verbosity() >= logging.DEBUG):
        raise
      name = os.path.basename(sys.argv[0])
      message = getattr(e, "message", None) or str(e)
      print(f"{name}: error: {message}", file=sys.stderr)
      return 2

  logging.set_verbosity(logging.INFO)
  app.run(wrapped)
