"""Shared fixtures: the real third-party data in ../shared/data, or its vendored subset.

shared_path(*parts) looks a file up under ../shared/data (or $AV_SOUND_TF_SHARED_DATA); when it
is not there it takes the copy in tests/data/shared_subset (21 ESC-10 clips, 8 of the 9 video
files, one librosa recording, two AudioSet files: byte-identical copies, with their attribution
in that folder's README.md), so a fresh clone runs the suite. Tests that need a whole data set
(all 400 ESC-10 clips, the full AudioSet segment lists, real_av/) pass whole_set=True or name
files the subset lacks, and skip with a message when ../shared is absent.
"""

import os
import subprocess
import sys

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.environ.get("AV_SOUND_TF_SHARED_DATA",
                             os.path.join(os.path.dirname(REPO), "shared", "data"))
SUBSET = os.path.join(REPO, "tests", "data", "shared_subset")


def shared_path(*parts, whole_set=False):
  """Path under the shared data folder, else its vendored copy, else skip with a message.

  whole_set: the test needs the whole data set (it counts all of it), so the vendored subset
  never stands in for it.
  """
  path = os.path.join(SHARED_DATA, *parts)
  if os.path.exists(path):
    return path
  vendored = os.path.join(SUBSET, *parts)
  if not whole_set and os.path.exists(vendored):
    return vendored
  why = "needs the whole data set" if whole_set else "not in the vendored subset either"
  pytest.skip(f"shared data not found: {path} ({why}; set AV_SOUND_TF_SHARED_DATA to the "
              "folder that holds audioset/, esc10/, librosa/ and video/)")


# The ImageNet MobileNet v1 frame-embedding extractor in ../shared/models (Apache-2.0).
MOBILENET = ("coral_mobilenet_v1_embedding",
             "mobilenet_v1_1.0_224_quant_embedding_extractor.tflite")


def shared_model_path(*parts):
  """Path under ../shared/models (beside the shared data folder), or skip with a message."""
  root = os.environ.get("AV_SOUND_TF_SHARED_MODELS",
                        os.path.join(os.path.dirname(SHARED_DATA), "models"))
  path = os.path.join(root, *parts)
  if not os.path.exists(path):
    pytest.skip(f"shared model not found: {path} (set AV_SOUND_TF_SHARED_MODELS to the folder "
                "that holds coral_mobilenet_v1_embedding/)")
  return path


def mobilenet_path():
  return shared_model_path(*MOBILENET)


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
