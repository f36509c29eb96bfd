"""File systems through tf.io.gfile: which schemes work, and the FIFO check."""

import os
import subprocess
import sys

import pytest

from av_sound_tf.core import files

_PROBE = """
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import tensorflow as tf
from av_sound_tf.core import files
path = sys.argv[1]
def usable():
  try:
    tf.io.gfile.exists(path)
    return True
  except tf.errors.UnimplementedError:
    return False
  except tf.errors.OpError:
    return True  # the scheme is registered; there is just no server
before = usable()
files.prepare_file_system(path)
print(before, usable(), "tensorflow_io" in sys.modules)
"""


@pytest.mark.parametrize("path", ["hdfs://localhost:1/x", "http://localhost:1/x"])
def test_tensorflow_io_schemes_are_registered_when_a_path_needs_them(path):
  # A fresh process: once tensorflow_io is imported, its schemes stay registered.
  out = subprocess.run([sys.executable, "-c", _PROBE, path], capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ["False", "True", "True"]


def test_local_and_gcs_paths_do_not_import_tensorflow_io(tmp_path):
  out = subprocess.run([sys.executable, "-c", _PROBE.replace(
      'print(before, usable(), "tensorflow_io" in sys.modules)',
      'files.prepare_file_system("gs://bucket/x"); print("tensorflow_io" in sys.modules)'),
      str(tmp_path)], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ["False"]


def test_s3_is_refused_with_the_reason():
  with pytest.raises(ValueError, match=r"s3://b/x: s3:// paths are not supported: .*"
                                       r"tensorflow/io#2039"):
    files.prepare_file_system("s3://b/x")
  assert files.scheme("S3://b/x") == "s3" and files.scheme("/a/b") == ""


def test_not_regular_file_reason(tmp_path):
  fifo = tmp_path / "pipe"
  os.mkfifo(fifo)
  assert files.not_regular_file_reason(str(fifo)) == "not a regular file: a FIFO (named pipe)"
  assert files.not_regular_file_reason(str(tmp_path)) == "not a regular file: a folder"
  (tmp_path / "f").write_text("x")
  assert files.not_regular_file_reason(str(tmp_path / "f")) is None
  assert files.not_regular_file_reason(str(tmp_path / "missing")) is None
  assert files.not_regular_file_reason("gs://bucket/x") is None


def test_installing_the_package_pulls_no_test_or_benchmark_tools():
  """Runtime requirements are separate from test ones: pytest, librosa and the TF Serving
  protos come only with the `test` extra (or requirements.txt for development)."""
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  runtime = [r for r in importlib.metadata.requires("av-sound-tf") if "extra ==" not in r]
  names = {r.split(";")[0].split("<")[0].split(">")[0].split("=")[0].strip().lower()
           for r in runtime}
  assert "tensorflow" in names and "tensorflow-io" in names
  assert not names & {"pytest", "pytest-xdist", "librosa", "tensorflow-serving-api",
                      "apache-beam", "torch"}
