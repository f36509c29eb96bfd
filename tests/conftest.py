"""Shared fixtures: the real third-party data in ../shared/data (skipped when absent)."""

import os
import subprocess
import sys

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.environ.get("AV_SOUND_TF_SHARED_DATA",
                             os.path.join(os.path.dirname(REPO), "shared", "data"))


def shared_path(*parts):
  """Path under the shared data folder, or skip the test with a message."""
  path = os.path.join(SHARED_DATA, *parts)
  if not os.path.exists(path):
    pytest.skip(f"shared data not found: {path} (set AV_SOUND_TF_SHARED_DATA to the folder "
                "that holds audioset/, esc10/, librosa/ and video/)")
  return path


def run_binary(binary, *args, timeout=900):
  """Runs bin/<binary> with this interpreter; returns the CompletedProcess (text output)."""
  return subprocess.run([sys.executable, os.path.join(REPO, "bin", binary), *args],
                        capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def esc10_dir():
  return shared_path("esc10")


@pytest.fixture
def video_dir():
  return shared_path("video")


@pytest.fixture
def audioset_dir():
  return shared_path("audioset")
