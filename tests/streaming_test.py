"""Streaming tagging (issue 18): decoded blocks, chunked segment scores and events equal a
whole-file pass on a real recording; what the stream holds does not grow with the file."""

import json

import av
import keras
import librosa
import numpy as np
import pytest

from av_sound_tf.core import labels
from av_sound_tf.core import media
from av_sound_tf.modeling import models
from av_sound_tf.serving import export
from av_sound_tf.serving import tagging
from av_sound_tf.serving import timeline
from av_sound_tf.serving import tflite
from tests.conftest import run_binary, shared_path

# 61.5 s of music at 22.05 kHz (resampled on the way in).
RECORDING = ("librosa", "Kevin_MacLeod_-_Vibe_Ace.ogg")
NUM_CLASSES = 5


def _native_mono(path):
  """The first audio track at its own rate, channel mean, decoded here with PyAV."""
  with av.open(path) as container:
    stream = container.streams.audio[0]
    frames = [f.to_ndarray().astype(np.float64) for f in container.decode(stream)]
    rate = stream.sample_rate
  assert all(f.ndim == 2 for f in frames)  # planar float: [channels, samples]
  return np.concatenate([f.mean(axis=0) for f in frames]), rate


@pytest.mark.parametrize("name", [RECORDING, ("video", "moviepy_chaplin.mp4"),
                                  ("esc10", "002 - Rain", "1-17367-A.ogg")])
def test_streamed_blocks_concatenate_to_the_whole_file_waveform(name):
  """The resampler runs as one stream across blocks: the blocks of any size concatenate to
  read_audio's waveform exactly, and that is librosa's soxr_hq resampling of the whole
  native track (an independent decode and resampling)."""
  path = shared_path(*name)
  whole = media.read_audio(path)
  native, rate = _native_mono(path)
  reference = librosa.resample(native, orig_sr=rate, target_sr=16000, res_type="soxr_hq")
  n = len(whole.waveform)
  assert abs(len(reference) - n) <= 1  # the one-shot call may round the length up
  np.testing.assert_allclose(whole.waveform, np.clip(reference[:n], -1, 1), atol=2e-6)
  for block_seconds in (0.05, 0.7, 3.0):
    stream = media.iter_audio(path, block_seconds)
    blocks = list(stream)
    # Each block is about block_seconds (plus one decoded frame and the resampler delay).
    assert len(blocks) >= 2 and max(len(b) for b in blocks) <= 16000 * block_seconds + 4096
    np.testing.assert_array_equal(np.concatenate(blocks), whole.waveform)
    assert stream.samples == len(whole.waveform)
    assert stream.truncation() == whole.truncation == ""
  cut = media.read_audio(path, 2.0, 4.5).waveform
  np.testing.assert_array_equal(np.concatenate(list(media.iter_audio(path, 0.3, 2.0, 4.5))),
                                cut)


def test_stream_errors_are_media_errors(tmp_path):
  bad = tmp_path / "broken.ogg"
  bad.write_text("not audio")
  with pytest.raises(media.MediaError, match="not a readable media file"):
    list(media.iter_audio(str(bad)))
  stream = media.iter_audio(shared_path(*RECORDING))
  with pytest.raises(ValueError, match="not been read to its end"):
    stream.truncation()
  with pytest.raises(ValueError, match="block_seconds must be > 0"):
    media.iter_audio(shared_path(*RECORDING), 0)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
  """SavedModels of both audio networks (random weights) and a float32 TFLite tagger."""
  tmp = tmp_path_factory.mktemp("stream")
  labels_path = str(tmp / "labels.csv")
  labels.LabelMap([f"/m/{i}" for i in range(NUM_CLASSES)],
                  [f"class {i}" for i in range(NUM_CLASSES)]).to_csv(labels_path)
  out = {}
  keras.utils.set_random_seed(3)
  for name, model in (
      ("mil_convnet", models.MILConvNet(num_classes=NUM_CLASSES, num_frames=128,
                                        width=0.0625)),
      ("mobile_mil", models.MobileMIL(num_classes=NUM_CLASSES, num_frames=128, width=0.25))):
    path = str(tmp / f"{name}.keras")
    models.randomize_weights(model, seed=0).save(path)
    out[name] = export.export_saved_model(path, labels_path, str(tmp / name))["path"]
  out["mil_convnet_4s"] = export.export_saved_model(  # signatures refuse more than 4 s
      str(tmp / "mil_convnet.keras"), labels_path, str(tmp / "short"), max_seconds=4.0)["path"]
  out["tflite"] = tflite.convert(str(tmp / "mil_convnet.keras"), labels_path,
                                 str(tmp / "tflite"), variants=("float32",))["float32"]
  return out


@pytest.mark.parametrize("network", ["mil_convnet", "mobile_mil"])
def test_streamed_segment_scores_equal_a_whole_file_pass(exports, network):
  """A 61.5 s recording scored in 3.8 s calls (overlapping by the receptive field, ending
  mid-segment) gives the segment scores, file scores and events of ONE tag_waveform call
  on the whole waveform. A call of 10 segments exactly (no spare frames at its end) leaves
  the network's right edge as close to the kept segments as it gets. With 1 segment of
  context instead of 3, the scores differ by 4e-6 (MobileMIL) and 5e-3 (MILConvNet); with
  2, MobileMIL's differ by about 1e-7, too little to tell from rounding here."""
  path = shared_path(*RECORDING)
  chunk = 10 * timeline.SEGMENT_HOP_SAMPLES + 10336  # the samples of 10 segments
  tagger = tagging.Tagger(exports[network], top_k=NUM_CLASSES, window_seconds=chunk / 16000)
  calls = []
  score = tagger.segment_scores
  tagger.segment_scores = lambda x: calls.append(len(x)) or score(x)
  result = tagger.tag_file(path, timeline=True, threshold=0.5)
  assert result.status == "ok", result.reason
  whole = score(media.decode_audio(path))  # the whole-file pass: one call
  assert len(calls) >= 15 and max(calls) == chunk
  # Calls end mid-segment (not on the 0.32 s grid) and mid-block (1 s decode blocks).
  assert chunk % timeline.SEGMENT_HOP_SAMPLES and chunk % 16000 and chunk % 22050
  order = [tagger.names.index(l["name"]) for l in result.labels]
  got = np.stack([result.timeline["scores"][tagger.names[c]] for c in order], axis=1)
  assert got.shape == (len(whole), NUM_CLASSES) == (190, NUM_CLASSES)
  np.testing.assert_allclose(got, whole[:, order], atol=1e-6, rtol=0)
  assert np.std(whole) > 0.01  # the scores move: the comparison means something
  np.testing.assert_allclose(result.timeline["times"], np.arange(190) * 0.32)
  np.testing.assert_allclose([l["score"] for l in result.labels], whole.astype(np.float64).mean(axis=0)[order],
                             atol=1e-6)
  assert result.duration_seconds == pytest.approx(61.459, abs=1e-3)
  expected = _reference_events(whole, tagger.names, tagger.mids, 0.5, 0.32, 0.96)
  assert result.events == expected and len(expected) >= 2


def test_calls_are_cut_to_the_exports_longest_waveform(exports):
  """An export that takes at most 4 s per call: the 30 s default window is cut to 4 s, and
  the scores are those of the same network exported for 600 s (where 30 s calls fit)."""
  path = shared_path(*RECORDING)
  short = tagging.Tagger(exports["mil_convnet_4s"], top_k=NUM_CLASSES)
  assert short.window == 64000
  got = short.tag_file(path, timeline=True)
  assert got.status == "ok", got.reason
  reference = tagging.Tagger(exports["mil_convnet"], top_k=NUM_CLASSES).tag_file(
      path, timeline=True)
  assert [l["name"] for l in got.labels] == [l["name"] for l in reference.labels]
  for name, scores in reference.timeline["scores"].items():
    np.testing.assert_allclose(got.timeline["scores"][name], scores, atol=1e-6, rtol=0)


def test_streamed_tflite_windows_equal_a_whole_file_pass(exports):
  """TFLite: 1 s windows every 0.5 s over the streamed audio are the windows of the
  decoded whole waveform, run here one by one through the interpreter."""
  path = shared_path(*RECORDING)
  tagger = tagging.Tagger(exports["tflite"], tflite=True, top_k=NUM_CLASSES)
  result = tagger.tag_file(path, timeline=True, threshold=0.5)
  assert result.status == "ok", result.reason
  waveform = media.decode_audio(path)
  runner = tflite.Runner(exports["tflite"])
  starts = range(0, len(waveform) - 16000 + 1, 8000)
  whole = np.stack([runner(waveform[s:s + 16000])["clip_scores"][0] for s in starts])
  order = [tagger.names.index(l["name"]) for l in result.labels]
  got = np.stack([result.timeline["scores"][tagger.names[c]] for c in order], axis=1)
  np.testing.assert_allclose(got, whole[:, order], atol=1e-6, rtol=0)
  np.testing.assert_allclose(result.timeline["times"], np.arange(len(starts)) * 0.5)
  assert result.timeline["step_seconds"] == 1.0
  assert result.events == _reference_events(whole, tagger.names, tagger.mids, 0.5, 0.5, 1.0)
  short = tagger.scorer()  # shorter than a window: one zero-padded window
  assert short.add(waveform[:5000]) == (0, None)
  first, scores = short.finish()
  np.testing.assert_allclose(scores[0], runner(np.pad(waveform[:5000], (0, 11000)))[
      "clip_scores"][0], atol=1e-7)


def test_bin_tag_timeline_json_equals_the_whole_file_pass(exports, tmp_path):
  """bin/tag --timeline --output: the JSON timeline (written with its arrays on one line)
  holds the whole-file pass's scores of the top classes, rounded to 4 decimals."""
  path = shared_path(*RECORDING)
  out = tmp_path / "tags.json"
  res = run_binary("tag", f"--model={exports['mil_convnet']}", f"--output={out}",
                   "--timeline", "--top_k=2", "--window_seconds=5", "--threshold=0.5",
                   path, timeout=300)
  assert res.returncode == 0, res.stderr[-2000:]
  (got,) = json.load(open(out))
  tagger = tagging.Tagger(exports["mil_convnet"])
  whole = tagger.segment_scores(media.decode_audio(path))
  assert [l["name"] for l in got["labels"]] == [
      tagger.names[c] for c in np.argsort(-whole.astype(np.float64).mean(axis=0))[:2]]
  for name, scores in got["timeline"]["scores"].items():
    np.testing.assert_allclose(scores, whole[:, tagger.names.index(name)], atol=5.1e-5)
  assert got["timeline"]["times"][:3] == [0.0, 0.32, 0.64] and len(got["timeline"]["times"]) \
      == len(whole) and got["timeline"]["step_seconds"] == 0.96
  text = out.read_text()
  assert len(text.splitlines()) < 80  # arrays on one line, not one line per number


def _reference_events(scores, names, mids, threshold, hop, span):
  """Runs of steps >= threshold per class, merged when a run starts within the previous
  run's span (the rule bin/tag documents), sorted by start, then peak."""
  events = []
  for c in range(scores.shape[1]):
    mine = []
    t = 0
    while t < len(scores):
      if scores[t, c] < threshold:
        t += 1
        continue
      u = t
      while u + 1 < len(scores) and scores[u + 1, c] >= threshold:
        u += 1
      peak = float(scores[t:u + 1, c].max())
      if mine and t * hop <= mine[-1]["end"]:
        mine[-1]["end"] = round(u * hop + span, 2)
        mine[-1]["peak"] = round(max(mine[-1]["peak"], peak), 4)
      else:
        mine.append({"name": names[c], "mid": mids[c], "start": round(t * hop, 2),
                     "end": round(u * hop + span, 2), "peak": round(peak, 4)})
      t = u + 1
    events += mine
  return sorted(events, key=lambda e: (e["start"], -e["peak"]))


def test_events_found_piece_by_piece_equal_those_of_the_whole_matrix():
  """EventTracker fed in random pieces (runs cross the pieces' edges) = the reference on
  the whole score matrix, for 200 random matrices."""
  rng = np.random.default_rng(0)
  names, mids = [f"c{i}" for i in range(4)], [f"/m/{i}" for i in range(4)]
  for trial in range(200):
    steps = int(rng.integers(1, 60))
    scores = (rng.random([steps, 4]) < rng.uniform(0.1, 0.9)).astype(np.float32) * \
        rng.uniform(0.5, 1.0, [steps, 4]) + rng.uniform(0, 0.1, [steps, 4])
    tracker = timeline.EventTracker(names, mids, 0.5, 0.32, 0.96)
    cuts = np.sort(rng.integers(0, steps + 1, int(rng.integers(0, 6))))
    for a, b in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [steps]])):
      tracker.add(int(a), scores[a:b] if b > a else None)
    assert tracker.events() == _reference_events(scores, names, mids, 0.5, 0.32, 0.96), trial


def test_the_stream_holds_a_bounded_amount_of_audio():
  """An hour of 1 s blocks through the segment scorer (a fake model): the audio held never
  exceeds one call plus one block, every segment comes out once and in order, and each
  call starts on the segment grid."""
  chunk = 30 * 16000
  starts = []

  def fake_model(x):
    starts.append(len(x))
    return np.zeros([models.num_segments(1 + (len(x) - 256) // 160), 2], np.float32)

  scorer = timeline.SegmentScorer(fake_model, chunk)
  emitted, held = [], []
  for _ in range(3600):
    first, scores = scorer.add(np.zeros(16000, np.float32))
    held.append(scorer._held)  # pylint: disable=protected-access
    if scores is not None:
      emitted.append((first, len(scores)))
  first, scores = scorer.finish()
  emitted.append((first, len(scores)))
  assert max(held) < chunk + 16000
  assert [f for f, _ in emitted] == list(np.cumsum([0] + [n for _, n in emitted])[:-1])
  total = 3600 * 16000
  assert sum(n for _, n in emitted) == models.num_segments(1 + (total - 256) // 160)
  with pytest.raises(ValueError, match="chunk_samples must be >= 46176"):
    timeline.SegmentScorer(fake_model, 46175)
