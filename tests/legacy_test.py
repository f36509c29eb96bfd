"""Files written by an earlier version still load and give the same numbers.

tests/data/legacy_df56a22/ was written by `make_legacy.py` (beside it) with the code of
commit df56a22: the four model kinds as .keras files (the audio model compiled with
ReplicaMeanAdam and trained one step, so its optimizer is saved too), their outputs on fixed
inputs, a prepared-data folder (three synthetic tones), a SavedModel from bin/export's
library function and a float32 TFLite tagger. Moving code between modules must never break
these: the registered Keras package name stays ``av_sound_tf``.
"""

import os

import numpy as np
import pytest
import tensorflow as tf

from av_sound_tf.core import dataset_info
from av_sound_tf.core import model_files
from av_sound_tf.core import schema
from av_sound_tf.modeling import fusion  # pylint: disable=unused-import  (registers fusion layers)
from av_sound_tf.serving import export
from av_sound_tf.serving import tflite
from av_sound_tf.train import distribution  # pylint: disable=unused-import  (registers ReplicaMeanAdam)

LEGACY = os.path.join(os.path.dirname(__file__), "data", "legacy_df56a22")


@pytest.fixture(scope="module")
def reference():
  return dict(np.load(os.path.join(LEGACY, "reference_outputs.npz")))


@pytest.mark.parametrize("name,inputs", [
    ("audio_mil", "log_mel"), ("mobile_mil", "log_mel"), ("visual_dnn", "embedding"),
    ("attention_fusion", "fusion")])
def test_old_keras_files_load_and_predict_the_same(name, inputs, reference):
  model = model_files.load_keras_model(os.path.join(LEGACY, f"{name}.keras"))
  if inputs == "fusion":
    x = {k[len("fusion_"):]: v for k, v in reference.items() if k.startswith("fusion_")}
    got = np.asarray(model(x, training=False))
  else:
    got = model.predict(reference[inputs], verbose=0)
  np.testing.assert_allclose(got, reference[name], atol=1e-6)
  if name == "audio_mil":  # the optimizer of a compiled, trained model comes back too
    assert type(model.optimizer).__name__ == "ReplicaMeanAdam"
    assert int(model.optimizer.iterations.numpy()) == 1


def test_old_prepared_data_reads(tmp_path):
  data_dir = os.path.join(LEGACY, "prepared")
  info = dataset_info.DatasetInfo.read(data_dir)
  assert info.num_classes == 3 and info.num_examples(["data"]) == 3
  label_map = info.label_map()
  assert label_map.names == ["high", "low", "mid"]
  examples = list(schema.read_examples(info.shards("data"), 3))
  assert [e["clip_id"].numpy().decode() for e in examples] == ["tone0", "tone1", "tone2"]
  for e, label in zip(examples, ("low", "mid", "high")):
    assert e["log_mel"].shape == (99, 64)
    assert np.flatnonzero(e["labels"].numpy()).tolist() == [label_map.lookup(label)]


def test_old_savedmodel_and_tflite_tag_like_the_old_keras_model():
  audio = model_files.load_keras_model(os.path.join(LEGACY, "audio_mil.keras"))
  waveform = export.test_signals(2, 16000)
  expected = export.keras_reference(audio, waveform)["clip_scores"]
  loaded = tf.saved_model.load(os.path.join(LEGACY, "serving", "av_sound", "1"))
  got = loaded.signatures["tag_waveform"](waveform=tf.constant(waveform))["clip_scores"]
  np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)
  runner = tflite.Runner(os.path.join(LEGACY, "tflite", "audio_tagger_float32.tflite"))
  for i in range(2):
    np.testing.assert_allclose(runner(waveform[i:i + 1])["clip_scores"], expected[i:i + 1],
                               atol=1e-4)
