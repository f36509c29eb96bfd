"""AudioSet lists, the label map and the ontology, on the real files."""

import glob
import os
import re

import pytest

from av_sound_tf.core import labels
from tests.conftest import shared_path


@pytest.fixture(scope="module")
def audioset_labels():
  return labels.LabelMap.from_csv(shared_path("audioset", "class_labels_indices.csv"))


def test_label_map(audioset_labels, tmp_path):
  lm = audioset_labels
  assert lm.num_classes == 527
  assert lm.lookup("/m/09x0r") == 0 and lm.names[0] == "Speech"
  assert lm.lookup("dog") == lm.lookup("/m/0bt9lr")
  assert lm.lookup("Not a class") is None
  path = str(tmp_path / "copy.csv")
  lm.to_csv(path)
  again = labels.LabelMap.from_csv(path)
  assert again.mids == lm.mids and again.names == lm.names


def test_label_map_errors(tmp_path):
  bad = tmp_path / "bad.csv"
  bad.write_text("id,name\n0,x\n")
  with pytest.raises(ValueError, match="index,mid,display_name"):
    labels.LabelMap.from_csv(str(bad))
  gap = tmp_path / "gap.csv"
  gap.write_text("index,mid,display_name\n0,/m/a,A\n2,/m/b,B\n")
  with pytest.raises(ValueError, match="without gaps"):
    labels.LabelMap.from_csv(str(gap))


def test_ontology():
  onto = labels.Ontology.from_json(shared_path("audioset", "ontology.json"))
  assert len(onto.nodes) == 632
  assert onto.name("/m/05tny_") == "Bark"
  assert "/m/0bt9lr" in onto.ancestors("/m/05tny_")  # Bark is under Dog
  assert "/m/0bt9lr" in onto.parents["/m/05tny_"]
  assert "/m/05tny_" in onto.children("/m/0bt9lr")
  assert len(onto.roots()) == 7


def test_official_eval_segments(audioset_labels):
  segs, problems = labels.read_segments_csv(
      shared_path("audioset", "eval_segments.csv", whole_set=True))
  assert len(segs) == 20371 and problems == []
  first = segs[0]
  assert (first.ytid, first.start_seconds, first.end_seconds) == ("--4gqARaEJE", 0.0, 10.0)
  assert first.labels == ["/m/068hy", "/m/07q6cd_", "/m/0bt9lr", "/m/0jbk"]
  assert first.line == 4
  assert sum(len(s.labels) for s in segs) == 51804  # the header's num_positive_labels
  assert all(audioset_labels.lookup(m) is not None for s in segs for m in s.labels)


def test_resaved_balanced_segments():
  segs, problems = labels.read_segments_csv(
      shared_path("audioset", "balanced_train_segments.csv", whole_set=True))
  assert len(segs) == 22160 and problems == []
  assert sum(len(s.labels) for s in segs) == 52882
  assert segs[0].ytid == "--PJHxphWEs" and segs[0].labels == ["/m/09x0r", "/t/dd00088"]


def test_malformed_rows_reported_with_line_numbers(tmp_path):
  path = tmp_path / "segs.csv"
  path.write_text(
      "# YTID, start_seconds, end_seconds, positive_labels\n"
      'aaaaaaaaaaa, 0.000, 10.000, "/m/09x0r"\n'
      "bbbbbbbbbbb, zero, 10.000, /m/09x0r\n"
      "ccccccccccc, 0.000\n"
      'ddddddddddd, 20.000, 10.000, "/m/09x0r"\n'
      'eeeeeeeeeee, 0.000, 10.000, ""\n'
      'aaaaaaaaaaa, 0.000, 10.000, "/m/09x0r"\n')
  segs, problems = labels.read_segments_csv(str(path))
  assert [s.ytid for s in segs] == ["aaaaaaaaaaa"]
  assert [p.line for p in problems] == [3, 4, 5, 6, 7]
  assert "bad start/end" in problems[0].reason
  assert "expected 4 fields" in problems[1].reason
  assert "not before" in problems[2].reason
  assert "empty label list" in problems[3].reason
  assert "duplicate" in problems[4].reason
  assert str(problems[0]).startswith(f"{path}:3:")


@pytest.mark.parametrize("name,expected", [
    ("--PJHxphWEs.mp4", ("--PJHxphWEs", None, None)),
    ("Y--PJHxphWEs.wav", ("--PJHxphWEs", None, None)),
    ("--PJHxphWEs_30_40.wav", ("--PJHxphWEs", 30.0, 40.0)),
    ("--PJHxphWEs_30.000_40.000.flac", ("--PJHxphWEs", 30.0, 40.0)),
    ("--PJHxphWEs_30000.m4a", ("--PJHxphWEs", 30000.0, None)),
    ("/data/x/Yabcdefghijk_0_10.mkv", ("abcdefghijk", 0.0, 10.0)),
    ("readme.mp4", (None, None, None)),
])
def test_parse_media_name(name, expected):
  assert labels.parse_media_name(name) == expected


def test_file_list(tmp_path):
  esc = shared_path("esc10", "labels.csv")
  rows, problems = labels.read_file_list(esc, label_column="class")
  # One row per clip in the folder: 400 for ESC-10, fewer for the vendored subset.
  clips = glob.glob(os.path.join(os.path.dirname(esc), "*", "*.ogg"))
  assert len(rows) == len(clips) >= 20 and problems == []
  assert sorted(r.path for r in rows) == sorted(clips)
  assert rows[0].labels == ["Dog bark"]
  assert os.path.exists(rows[0].path)  # relative to the CSV
  assert rows[0].extra["fold"] == "1"
  rows, _ = labels.read_file_list(esc, label_column="audioset_mids")
  assert rows[0].labels == ["/m/0bt9lr", "/m/05tny_"]
  with pytest.raises(ValueError, match="no column labels"):
    labels.read_file_list(esc)
  bad = tmp_path / "list.csv"
  bad.write_text("path,labels\na.wav,Dog\n,Dog\nb.wav,\nc.wav;Dog\nd.wav,Dog;Cat\n")
  rows, problems = labels.read_file_list(str(bad))
  assert [r.path for r in rows] == [str(tmp_path / "a.wav"), str(tmp_path / "d.wav")]
  assert rows[1].labels == ["Dog", "Cat"]
  assert [(p.line, p.reason) for p in problems] == [
      (3, "empty path"), (4, "empty label list"),
      (5, "wrong number of fields: 1, the header has 2")]


def _joined(first, last):
  return (f"unbalanced quote: a '\"' opens a field that does not close on this line (a CSV "
          f"reader would join lines {first}-{last} into one row)")


def test_unbalanced_quote_in_file_list_swallows_nothing(tmp_path):
  """A quote left open on line 3 is that line's problem; lines 4-6 stay rows of their own
  (a CSV reader joins lines 3-5 into one record, up to the quote that opens line 5, and
  reports line 5 alone)."""
  path = tmp_path / "list.csv"
  path.write_text('path,labels\n'
                  'a.wav,Dog\n'
                  '"b.wav,Dog\n'
                  'c.wav,Cat\n'
                  '"d, with comma.wav","Male speech, man speaking"\n'
                  'e.wav,Dog\n')
  rows, problems = labels.read_file_list(str(path))
  assert [(os.path.basename(r.path), r.labels, r.line) for r in rows] == [
      ("a.wav", ["Dog"], 2), ("c.wav", ["Cat"], 4),
      ("d, with comma.wav", ["Male speech", "man speaking"], 5), ("e.wav", ["Dog"], 6)]
  assert [(p.line, p.reason) for p in problems] == [(3, _joined(3, 5))]
  assert str(problems[0]).startswith(f"{path}:3: unbalanced quote")


def test_unbalanced_quotes_line_numbers_everywhere(tmp_path):
  """Two open quotes, one on the last line, CRLF line ends and a blank line: every
  physical line is a row or a problem, with its own line number."""
  path = tmp_path / "list.csv"
  path.write_bytes(b'path,labels,fold\r\n'
                   b'a.wav,"Dog,1\r\n'
                   b'b.wav,Dog,1\r\n'
                   b'\r\n'
                   b'c.wav,"Cat",2\r\n'
                   b'd.wav,Cat,"2\r\n')
  rows, problems = labels.read_file_list(str(path))
  assert [(os.path.basename(r.path), r.line, r.extra) for r in rows] == [
      ("b.wav", 3, {"fold": "1"}), ("c.wav", 5, {"fold": "2"})]
  assert [(p.line, p.reason) for p in problems] == [
      (2, _joined(2, 5)),
      (6, "unbalanced quote: a '\"' opens a field that does not close on this line")]


def test_unbalanced_quote_in_the_header_stops_with_its_line(tmp_path):
  path = tmp_path / "list.csv"
  path.write_text('\n"path,labels\na.wav,Dog\n')
  with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:2: bad header line: "
                     r"unbalanced quote: .*join lines 2-3 into one row\)$"):
    labels.read_file_list(str(path))
  (tmp_path / "empty.csv").write_text("\n")
  with pytest.raises(ValueError, match="empty.csv: no header line"):
    labels.read_file_list(str(tmp_path / "empty.csv"))


def test_unbalanced_quote_in_segment_list_swallows_nothing(tmp_path):
  path = tmp_path / "segs.csv"
  path.write_text(
      "# YTID, start_seconds, end_seconds, positive_labels\n"
      'aaaaaaaaaaa, 0.000, 10.000, "/m/09x0r\n'
      'bbbbbbbbbbb, 0.000, 10.000, /m/09x0r\n'
      'ccccccccccc, 30.000, 40.000, "/m/09x0r,/t/dd00088"\n'
      'ddddddddddd, 0.000, 10.000, "/m/09x0r\n'
      'eeeeeeeeeee, 0.000, 10.000, "/m/09x0r"\n')
  segs, problems = labels.read_segments_csv(str(path))
  assert [(s.ytid, s.labels, s.line) for s in segs] == [
      ("bbbbbbbbbbb", ["/m/09x0r"], 3), ("ccccccccccc", ["/m/09x0r", "/t/dd00088"], 4),
      ("eeeeeeeeeee", ["/m/09x0r"], 6)]
  assert [(p.line, p.reason) for p in problems] == [(2, _joined(2, 4)), (5, _joined(5, 6))]
