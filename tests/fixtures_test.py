"""The vendored subset of ../shared/data (tests/data/shared_subset), checked so it cannot rot:

* every file has an attribution row (source, author, license) in the folder's README.md, and
  every row names a file that is there;
* every file is byte-identical to the original it copies: its SHA-256 is listed in SHA256SUMS,
  and, where ../shared/data has the original, the original's SHA-256 is the same;
* only the folders whose licenses allow redistribution are there (never real_av/ or models);
* esc10/labels.csv lists exactly the vendored clips (tests read clips through it);
* the whole folder stays under MAX_BYTES;
* shared_path's rule: ../shared/data first, the subset for a file not there, a skip for
  whole_set=True or a file in neither.
"""

import csv
import hashlib
import os
import re

import pytest

from tests import conftest
from tests.conftest import SHARED_DATA, SUBSET

# 7,549,184 bytes of files today: 21 ESC-10 clips (1.9 MB; beam, prepare, faults, tflite and
# tag tests), 8 video files (4.5 MB; media, faults, prepare, tag tests), one librosa recording
# (0.38 MB; streaming_test), the AudioSet class list and ontology (0.36 MB; labels, prepare).
# Raise it only for a file a test needs, and say which test in the commit.
MAX_BYTES = 8_000_000
FOLDERS = {"audioset", "esc10", "librosa", "video"}
META = {"README.md", "SHA256SUMS"}  # the folder's own files, not copies


def _vendored():
  """Relative paths (with /) of every copied file in the subset."""
  found = []
  for root, _, names in os.walk(SUBSET):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), SUBSET).replace(os.sep, "/")
      if rel not in META:
        found.append(rel)
  return sorted(found)


def _sha256(path):
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def _attribution_rows():
  """{path: [source, author, license]} from README.md's table rows `| `path` | ... |`."""
  rows = {}
  for line in open(os.path.join(SUBSET, "README.md"), encoding="utf-8"):
    m = re.match(r"^\| `([^`]+)` \|(.*)\|\s*$", line)
    if m:
      rows[m.group(1)] = [c.strip() for c in m.group(2).split(" | ")]
  return rows


def test_every_vendored_file_has_an_attribution_row():
  files = _vendored()
  assert len(files) >= 20, files
  rows = _attribution_rows()
  assert sorted(set(files) - set(rows)) == [], "vendored without a README.md row"
  assert sorted(set(rows) - set(files)) == [], "README.md rows for files that are not there"
  for path, cells in rows.items():
    assert len(cells) == 3 and all(cells), (path, cells)  # source, author, license
    assert re.search(r"CC BY|CC0|MIT", cells[2]), (path, cells[2])


def test_copies_are_byte_identical_to_their_originals():
  listed = {}
  for line in open(os.path.join(SUBSET, "SHA256SUMS"), encoding="utf-8"):
    digest, path = line.rstrip("\n").split("  ", 1)
    listed[path] = digest
  files = _vendored()
  assert sorted(listed) == files
  compared = 0
  for path in files:
    assert _sha256(os.path.join(SUBSET, path)) == listed[path], path
    original = os.path.join(SHARED_DATA, path)
    if os.path.exists(original) and path != "esc10/labels.csv":  # labels.csv is an excerpt
      assert _sha256(original) == listed[path], f"{path} differs from {original}"
      compared += 1
  if os.path.isdir(SHARED_DATA):  # with ../shared/data every copy has its original there
    assert compared == len(files) - 1, compared


def test_only_redistributable_folders():
  assert set(os.listdir(SUBSET)) == FOLDERS | META
  assert not any(p.startswith(("real_av/", "models/")) for p in _vendored())


def test_esc10_labels_list_exactly_the_vendored_clips():
  with open(os.path.join(SUBSET, "esc10", "labels.csv"), newline="") as f:
    listed = [r["path"] for r in csv.DictReader(f)]
  clips = [p[len("esc10/"):] for p in _vendored() if p.startswith("esc10/") and
           p.endswith(".ogg")]
  assert sorted(listed) == clips and len(clips) == len(set(listed))
  # Two clips of every class (beam_prepare_test takes two of each), one fold-5 clip at least
  # (tflite_test's parity windows come from fold 5).
  classes = {c.split("/")[0] for c in clips}
  assert len(classes) == 10
  assert all(sum(c.startswith(k + "/") for c in clips) >= 2 for k in classes)
  assert any(c.split("/")[1].startswith("5-") for c in clips)


def test_subset_stays_small():
  total = sum(os.path.getsize(os.path.join(SUBSET, p)) for p in _vendored())
  assert total <= MAX_BYTES, f"{total} bytes vendored, limit {MAX_BYTES}"


def _resolve(*parts, **kw):
  """shared_path's answer: the path, or "skip: <message>" (a skip here must not skip the test)."""
  try:
    return conftest.shared_path(*parts, **kw)
  except pytest.skip.Exception as e:
    return f"skip: {e}"


def test_shared_path_falls_back_to_the_subset_file_by_file(tmp_path, monkeypatch):
  monkeypatch.setattr(conftest, "SHARED_DATA", str(tmp_path))
  dog = ("esc10", "001 - Dog bark", "1-100032-A.ogg")
  assert _resolve(*dog) == os.path.join(SUBSET, *dog)
  assert _resolve("esc10") == os.path.join(SUBSET, "esc10")
  (tmp_path / "esc10").mkdir()
  (tmp_path / "esc10" / "labels.csv").write_text("path,class\n")
  assert _resolve("esc10", "labels.csv") == str(tmp_path / "esc10" / "labels.csv")
  assert _resolve("esc10", "labels.csv", whole_set=True) == str(tmp_path / "esc10" / "labels.csv")
  assert _resolve(*dog) == os.path.join(SUBSET, *dog)  # the rest still falls back
  assert _resolve("audioset", "ontology.json", whole_set=True).startswith(
      f"skip: shared data not found: {tmp_path}/audioset/ontology.json (needs the whole data set")
  assert _resolve("real_av", "clips").startswith(
      f"skip: shared data not found: {tmp_path}/real_av/clips (not in the vendored subset either")
