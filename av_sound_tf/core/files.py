"""Writing text, CSV and JSON through tf.io.gfile (local paths, gs://, ...), atomically.

Every file is written to ``<path>.incomplete`` and renamed when complete, so a reader (or a
resumed run) never sees half a file.
"""

import csv
import io
import json
import os
import stat
from typing import Optional, Sequence

import tensorflow as tf


def write_text(path: str, text: str):
  tmp = path + ".incomplete"
  with tf.io.gfile.GFile(tmp, "w") as f:
    f.write(text)
  tf.io.gfile.rename(tmp, path, overwrite=True)


def csv_text(rows: Sequence[dict], header: Optional[Sequence[str]] = None) -> str:
  """CSV with a header row; `header` defaults to the first row's keys; extra keys dropped."""
  buf = io.StringIO()
  fields = list(header if header is not None else (rows[0] if rows else []))
  writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
  writer.writeheader()
  writer.writerows(rows)
  return buf.getvalue()


def write_csv(path: str, rows: Sequence[dict], header: Optional[Sequence[str]] = None):
  write_text(path, csv_text(rows, header))


def save_figure(fig, path: str, dpi: int = 110):
  """Writes a matplotlib figure as PNG through tf.io.gfile (gs:// too) and closes it."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=dpi)
  plt.close(fig)
  with tf.io.gfile.GFile(path, "wb") as f:
    f.write(buf.getvalue())


def write_json(path: str, value, sort_keys=False):
  write_text(path, json.dumps(value, indent=2, sort_keys=sort_keys))


def not_regular_file_reason(path: str) -> Optional[str]:
  """Why `path` cannot be read as a file (a FIFO, socket, device or folder), or None.

  Opening a FIFO blocks until a writer appears, so every reader of user-named files checks
  this first (with `os.stat`, which follows symlinks and never blocks). Paths on other file
  systems (``gs://``) hold only regular objects and are not checked here.
  """
  if "://" in path:
    return None
  try:
    mode = os.stat(path).st_mode
  except FileNotFoundError:
    return None  # the caller's own "file not found"
  except OSError as e:
    return f"cannot stat ({e.strerror})"
  if stat.S_ISREG(mode):
    return None
  kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else
          "a folder" if stat.S_ISDIR(mode) else
          "a socket" if stat.S_ISSOCK(mode) else
          "a device" if (stat.S_ISCHR(mode) or stat.S_ISBLK(mode)) else "not a regular file")
  return f"not a regular file: {kind}"


# File systems that TensorFlow itself lacks and tensorflow-io registers when imported.
TFIO_SCHEMES = ("hdfs", "viewfs", "har", "az", "http", "https")
# tensorflow-io 0.37.1 (the last release, the one TF 2.17 can load) registers s3 too, but
# its S3 file system aborts the process at exit ("pure virtual method called", exit status
# 134: tensorflow/io#2039, fixed by tensorflow/io#2120 after that release).
BROKEN_SCHEMES = {"s3": ("tensorflow-io 0.37.1's S3 file system aborts the process at exit "
                         "(tensorflow/io#2039); mount the bucket (e.g. s3fs, mountpoint-s3) "
                         "and pass the local path, or copy the data to gs:// or local disk")}


def scheme(path: str) -> str:
  """``gs`` for ``gs://b/x``; "" for a local path."""
  return path.split("://", 1)[0].lower() if "://" in path else ""


def prepare_file_system(path: str):
  """Makes `path`'s file system usable through tf.io.gfile, or raises ValueError.

  TensorFlow reads local paths and ``gs://`` itself; ``hdfs://``, ``az://`` and
  ``http(s)://`` need tensorflow-io, imported here lazily (it costs about a second and is
  not needed otherwise). ``s3://`` is refused with the reason (see `BROKEN_SCHEMES`).
  """
  name = scheme(path)
  if name in BROKEN_SCHEMES:
    raise ValueError(f"{path}: {name}:// paths are not supported: {BROKEN_SCHEMES[name]}.")
  if name in TFIO_SCHEMES:
    import tensorflow_io  # pylint: disable=g-import-not-at-top,unused-import
