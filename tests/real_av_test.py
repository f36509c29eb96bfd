"""Real clips end to end (issue 16): bin/prepare_data with audio and MobileNet TFLite frame
embeddings on the real H.264/AAC clips of ../shared/data/real_av, then bin/tag with an
audiovisual SavedModel from bin/export and the same embedder.

The clips have odd frame sizes (298x224, 398x224, portrait 576x720, up to 1280x720), audio
at 22.05 and 44.1 kHz, mono and stereo, frame rates from 15.25 to 30 fps (each clip's own
rate is constant: none of the 30 has a variable frame rate, checked with PyAV's packet
timestamps), 6 to 10 s long. FIVE covers each of these in `make test`; the test over all 30
is marked slow (288 s wall, 1.8 CPU-minutes, on 2 cores shared with other jobs).
"""

import csv
import json
import os

import av
import keras
import numpy as np
import pytest

from av_sound_tf.core import dataset_info
from av_sound_tf.core import labels
from av_sound_tf.core import media
from av_sound_tf.core import schema
from av_sound_tf.modeling import fusion
from av_sound_tf.modeling import models
from tests.conftest import mobilenet_path, run_binary, shared_path
from tests.embedders_test import _by_hand
from tests.prep_helpers import read_manifest

# 22.05 kHz mono at 25 fps, 298x224; 15.25 fps; a 6 s clip at 398x224; portrait 576x720;
# 21.5 fps 640x360 stereo.
FIVE = ("specvqgan__vas_drum_video_02480.mp4", "specvqgan__vas_cough_video_00331.mp4",
        "specvqgan__vas_dog_video_02677.mp4", "specvqgan__53UdZyM9MyE_252000_262000.mp4",
        "difffoley__car.mp4")


def _write_list(names, path):
  """A bin/prepare_data file list (path, labels) for `names` from real_av/labels.csv."""
  root = shared_path("real_av")
  with open(os.path.join(root, "labels.csv"), newline="") as f:
    rows = {os.path.basename(r["filename"]): r for r in csv.DictReader(f)}
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["path", "labels"])
    for name in names:
      writer.writerow([os.path.join(root, rows[name]["filename"]), rows[name]["labels"]])
  return {os.path.join(root, rows[n]["filename"]): rows[n]["labels"] for n in names}


def _stream_facts(path):
  """(audio rate, audio seconds, video width, height, frames per second) read with PyAV."""
  with av.open(path) as container:
    audio, video = container.streams.audio[0], container.streams.video[0]
    seconds = float(audio.duration * audio.time_base) if audio.duration else float(
        container.duration / av.time_base)
    return (audio.rate, seconds, video.codec_context.width, video.codec_context.height,
            float(video.average_rate))


def _prepare_and_check(names, tmp_path, num_workers):
  wanted = _write_list(names, tmp_path / "list.csv")
  out = tmp_path / "prepared"
  res = run_binary("prepare_data", f"--file_list={tmp_path / 'list.csv'}",
                   f"--output_dir={out}", "--modalities=audio,visual",
                   f"--embedder=tflite:{mobilenet_path()}", f"--num_workers={num_workers}",
                   "--progress_every=0")
  assert res.returncode == 0, res.stderr[-3000:]
  assert f"written {len(names)}, failed 0" in res.stdout
  manifest = read_manifest(out)
  assert sorted(r["path"] for r in manifest) == sorted(wanted)  # every clip accounted for
  assert {(r["status"], r["embedding_dim"], r["has_audio"], r["has_video"])
          for r in manifest} == {("written", "1024", "1", "1")}
  info = dataset_info.DatasetInfo.read(str(out)).info
  assert info["embedding_dim"] == 1024 and info["splits"]["data"]["num_examples"] == len(names)
  label_map = labels.LabelMap.from_csv(str(out / schema.LABELS_FILE))
  examples = {ex["source_path"].numpy().decode(): ex for ex in schema.read_examples(
      schema.list_shards(str(out), "data"), info["num_classes"])}
  assert sorted(examples) == sorted(wanted)
  for path, ex in examples.items():
    rate, seconds, width, height, fps = _stream_facts(path)
    # The audio, whatever its rate and channels, is 16 kHz log-mel over its whole length.
    assert ex["duration_seconds"].numpy() == pytest.approx(seconds, abs=0.06), path
    samples = int(round(ex["duration_seconds"].numpy() * 16000))
    assert abs(ex["log_mel"].shape[0] - (1 + (samples - 256) // 160)) <= 1, path
    assert np.isfinite(ex["log_mel"].numpy()).all()
    embedding = ex["embedding_mean"].numpy()
    assert embedding.shape == (1024,) and np.isfinite(embedding).all() and embedding.max() > 0
    assert sorted(label_map.names[i] for i in ex["label_indices"].numpy()) == sorted(
        wanted[path].split(";")), path
    ex["facts"] = (rate, width, height, fps)
  return out, examples


def _check_one_embedding_by_hand(path, stored):
  """The stored mean embedding is the mean of the MobileNet outputs of the 64 frames
  media.sample_video_frames picks, run through the raw interpreter and dequantized."""
  frames = media.sample_video_frames(path, 64, 224)
  np.testing.assert_allclose(stored, _by_hand(mobilenet_path(), frames).mean(axis=0),
                             rtol=1e-5, atol=1e-5)


def _export_audiovisual(prepared, tmp_path):
  """An audiovisual SavedModel (random weights) for the prepared class map, via bin/export."""
  class_map = str(prepared / schema.LABELS_FILE)
  num_classes = len(labels.LabelMap.from_csv(class_map).names)
  keras.utils.set_random_seed(3)
  stats = dict(audio_mean=np.full(num_classes, 0.5), audio_variance=np.full(num_classes, 0.01),
               visual_mean=np.full(num_classes, 0.5),
               visual_variance=np.full(num_classes, 0.01))
  paths = {}
  for name, model in (
      ("audio", models.MILConvNet(num_classes=num_classes, num_frames=128, width=0.0625)),
      ("visual", models.VisualDNN(num_classes=num_classes, embedding_dim=1024, width=0.01)),
      ("fusion", fusion.FusionModel(num_classes, "attention", **stats))):
    paths[name] = str(tmp_path / f"{name}.keras")
    model.save(paths[name])
  res = run_binary("export", f"--audio_model={paths['audio']}", f"--labels={class_map}",
                   f"--visual_model={paths['visual']}", f"--fusion_model={paths['fusion']}",
                   f"--export_base={tmp_path / 'serving'}", "--max_seconds=30")
  assert res.returncode == 0, res.stderr[-3000:]
  return str(tmp_path / "serving" / "av_sound" / "1"), num_classes


def _tag_and_check(saved, paths, tmp_path, top_k):
  output = tmp_path / "tags.json"
  res = run_binary("tag", f"--model={saved}", f"--embedder=tflite:{mobilenet_path()}",
                   f"--output={output}", f"--top_k={top_k}", "--progress_every=0", *paths)
  assert res.returncode == 0, res.stderr[-3000:]
  results = json.loads(output.read_text())
  assert sorted(r["path"] for r in results) == sorted(paths)  # one row per file
  for r in results:
    assert r["status"] == "ok", r
    assert len(r["labels"]) == top_k
    assert all(l["modality"] in ("audio", "visual") and 0 <= l["alpha_audio"] <= 1
               for l in r["labels"])  # fused with the frames' MobileNet embedding
  return results


def test_five_real_clips_prepared_with_mobilenet_and_tagged(tmp_path):
  """Five real clips covering every odd property: all written with 1024-d MobileNet
  embeddings (one checked against the interpreter by hand), then tagged audiovisually."""
  out, examples = _prepare_and_check(FIVE, tmp_path, num_workers=0)
  facts = {os.path.basename(p): ex["facts"] for p, ex in examples.items()}
  # What the five clips are meant to cover, read from the files themselves.
  assert facts[FIVE[0]][0] == 22050 and facts[FIVE[0]][1:3] == (298, 224)
  assert facts[FIVE[1]][3] == pytest.approx(15.25)
  assert facts[FIVE[3]][1] < facts[FIVE[3]][2]  # portrait
  assert len({round(f[3], 2) for f in facts.values()}) == 5  # five frame rates
  path = next(p for p in examples if p.endswith(FIVE[0]))
  _check_one_embedding_by_hand(path, examples[path]["embedding_mean"].numpy())
  saved, _ = _export_audiovisual(out, tmp_path)
  _tag_and_check(saved, sorted(examples), tmp_path, top_k=3)


@pytest.mark.slow
def test_all_real_clips_prepared_with_mobilenet_and_tagged(tmp_path):
  """All 30 real clips, two worker processes: every clip written with 1024-d embeddings;
  all 30 tagged audiovisually, one row each."""
  names = sorted(n for n in os.listdir(shared_path("real_av", "clips")) if n.endswith(".mp4"))
  assert len(names) == 30
  out, examples = _prepare_and_check(names, tmp_path, num_workers=2)
  rates = {ex["facts"][0] for ex in examples.values()}
  assert rates == {22050, 44100}
  saved, _ = _export_audiovisual(out, tmp_path)
  _tag_and_check(saved, sorted(examples), tmp_path, top_k=2)


def test_a_bad_tflite_embedder_stops_both_binaries_before_any_clip(tmp_path):
  """A truncated TFLite file: bin/prepare_data and bin/tag stop with one line naming it,
  exit status 2, no traceback, before any clip is read or any shard written."""
  content = open(mobilenet_path(), "rb").read()
  bad = tmp_path / "truncated.tflite"
  bad.write_bytes(content[:len(content) // 3])
  _write_list(FIVE[:1], tmp_path / "list.csv")
  clip = shared_path("real_av", "clips", FIVE[0])
  for binary, args in (
      ("prepare_data", [f"--file_list={tmp_path / 'list.csv'}",
                        f"--output_dir={tmp_path / 'out'}", "--modalities=audio,visual"]),
      ("tag", [f"--model={tmp_path}", f"--output={tmp_path / 'tags.json'}", clip])):
    res = run_binary(binary, *args, f"--embedder=tflite:{bad}")
    lines = [l for l in res.stderr.splitlines() if l.startswith(f"{binary}: error:")]
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert lines == [f"{binary}: error: {bad}: truncated or damaged TFLite model: its "
                     f"flatbuffer does not parse within the file's {len(content) // 3} "
                     "bytes"], res.stderr[-2000:]
  assert not (tmp_path / "out" / "manifest.csv").exists()
  assert not (tmp_path / "tags.json").exists()
