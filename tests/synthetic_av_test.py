"""The embedded audiovisual data set: determinism, labels vs ground truth, decodable files,
and the designed modality structure."""

import csv
import json
import os

import numpy as np
import pytest

from av_sound_tf.core import constants
from av_sound_tf.core import embedders
from av_sound_tf.core import labels
from av_sound_tf.core import media
from data_prep import synthetic_av


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("demo"))
  return out, synthetic_av.write_dataset(out, {"train": 16, "eval": 4}, seed=7, log=None)


def _decoded(path):
  return media.decode_audio(path), media.sample_video_frames(path, 24, 64)


def test_deterministic(generated, tmp_path):
  out, paths = generated
  again = synthetic_av.write_dataset(str(tmp_path / "again"), {"train": 16, "eval": 4},
                                     seed=7, log=None)
  other = synthetic_av.write_dataset(str(tmp_path / "other"), {"train": 16, "eval": 4},
                                     seed=8, log=None)
  truth = json.load(open(paths["ground_truth"]))
  assert truth["clips"] == json.load(open(again["ground_truth"]))["clips"]
  assert truth["clips"] != json.load(open(other["ground_truth"]))["clips"]
  for name in ("train_0000.mp4", "eval_0003.mp4"):
    a_audio, a_frames = _decoded(os.path.join(out, "media", name))
    b_audio, b_frames = _decoded(str(tmp_path / "again" / "media" / name))
    np.testing.assert_array_equal(a_audio, b_audio)
    np.testing.assert_array_equal(a_frames, b_frames)


def test_labels_agree_with_ground_truth(generated):
  out, paths = generated
  truth = json.load(open(paths["ground_truth"]))
  label_map = labels.LabelMap.from_csv(paths["class_labels"])
  assert label_map.names == [c.name for c in synthetic_av.CLASSES]
  assert [c["carrier"] for c in truth["classes"]] == ["audio"] * 4 + ["visual"] * 4 + [
      "both"] * 4
  rows = list(csv.DictReader(open(paths["labels"])))
  assert len(rows) == len(truth["clips"]) == 20
  for row, clip in zip(rows, truth["clips"]):
    assert row["path"] == clip["path"] and row["split"] == clip["split"]
    assert row["labels"].split(";") == clip["labels"] == [e["class"] for e in clip["events"]]
    assert 1 <= len(clip["labels"]) <= 3 and len(set(clip["labels"])) == len(clip["labels"])
    assert not (clip["audio_degraded"] and clip["video_degraded"])
    for e in clip["events"]:
      assert 0 <= e["start"] < e["end"] <= synthetic_av.SECONDS
    assert all(label_map.lookup(l) is not None for l in clip["labels"])


def test_files_decode_and_show_their_events(generated):
  out, paths = generated
  truth = json.load(open(paths["ground_truth"]))
  emb = embedders.build_embedder("color_layout", image_size=64)
  for clip in truth["clips"]:
    path = os.path.join(out, clip["path"])
    info = media.probe(path)
    assert info.has_audio and info.has_video and info.video_codec == "h264"
    audio, frames = _decoded(path)
    assert abs(len(audio) / 16000 - synthetic_av.SECONDS) < 0.1
    if clip["video_degraded"]:
      assert frames.max() < 20  # a black video (codec noise aside)
    else:
      assert frames.max() > 100  # some event is drawn
    assert np.isfinite(emb(frames)).all()


def test_modalities_carry_what_the_design_says():
  """Audio-only classes share one picture; visual classes make the same hum at four pitches
  4 Hz apart (alike, not identical: the vacuum cleaner and the hair dryer)."""
  groups = {}
  for c in synthetic_av.CLASSES:
    groups.setdefault(c.carrier, []).append(c)
  assert len({c.picture for c in groups["audio"]}) == 1
  assert len({c.sound for c in groups["audio"]}) == 4
  hums = sorted(c.sound for c in groups["visual"])
  assert hums == ["hum_56", "hum_60", "hum_64", "hum_68"]
  rng = np.random.default_rng(0)
  n = constants.SAMPLE_RATE
  spectra = [np.abs(np.fft.rfft(synthetic_av._sound(h, n, rng))) for h in hums]  # pylint: disable=protected-access
  for f0, spectrum in zip((56, 60, 64, 68), spectra):  # 1 Hz bins: peaks at k * f0
    assert sorted(np.argsort(spectrum)[-4:]) == [f0, 2 * f0, 3 * f0, 4 * f0]
  assert len({c.picture for c in groups["visual"]}) == 4
  assert len({c.sound for c in groups["both"]}) == len({c.picture for c in groups["both"]}) == 4
