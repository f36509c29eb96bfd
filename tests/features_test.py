"""The log-mel front end against librosa, on semantic inputs, as a layer, and in TFLite."""


import keras
import librosa
import numpy as np
import pytest
import tensorflow as tf

from av_sound_tf.core import features
from av_sound_tf.core import media
from tests.conftest import shared_path

P = features.DEFAULT_PARAMS


def librosa_log_mel(y, params=P):
  """librosa reference. librosa centers the 256-sample window inside each 512-sample FFT
  frame, so pad 128 zeros on each side to make its frame t cover y[160 t : 160 t + 256]."""
  pad = (params.fft_length - params.window_length) // 2
  y = np.pad(y, (pad, pad))
  mel = librosa.feature.melspectrogram(
      y=y, sr=params.sample_rate, n_fft=params.fft_length, win_length=params.window_length,
      hop_length=params.hop_length, window="hann", center=False, power=2.0,
      n_mels=params.num_mel_bins, fmin=params.fmin, fmax=params.fmax, htk=False,
      norm="slaney")
  return np.log(mel.T + params.log_offset)


def test_mel_matrix_equals_librosa():
  ours = features.mel_weight_matrix(P)
  ref = librosa.filters.mel(sr=16000, n_fft=512, n_mels=64, fmin=50.0, fmax=8000.0)
  assert ours.shape == (257, 64)
  np.testing.assert_allclose(ours, ref.T, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("num_samples", [256, 16000, 160000, 80016])
def test_num_frames(num_samples):
  out = features.log_mel_spectrogram(np.zeros([num_samples], np.float32))
  assert out.shape == (P.num_frames(num_samples), 64)
  assert P.num_frames(num_samples) == 1 + (num_samples - 256) // 160
  assert P.num_frames(255) == 0


def test_matches_librosa_on_noise():
  y = np.random.default_rng(0).uniform(-0.5, 0.5, 16000 * 3).astype(np.float32)
  ours = features.log_mel_spectrogram(y).numpy()
  ref = librosa_log_mel(y)
  assert ours.shape == ref.shape
  # Stated tolerance: 1e-3 in log units (0.1 % relative on the mel energies).
  np.testing.assert_allclose(ours, ref, atol=1e-3)


def test_matches_librosa_on_real_clip():
  path = shared_path("esc10", "001 - Dog bark", "1-100032-A.ogg")
  y = media.decode_audio(path)
  ours = features.log_mel_numpy(y)  # the compiled (XLA) path used by data preparation
  ref = librosa_log_mel(y)
  assert ours.shape == ref.shape == (P.num_frames(len(y)), 64)
  # Quiet bins sit near the 1e-6 floor where float32 rounding matters more; compare the
  # energies themselves relative to the clip's peak as well as the logs.
  np.testing.assert_allclose(ours, ref, atol=2e-3)


def test_silence_is_the_floor():
  out = features.log_mel_spectrogram(np.zeros([16000], np.float32)).numpy()
  np.testing.assert_allclose(out, np.log(P.log_offset), rtol=1e-6)


@pytest.mark.parametrize("freq", [250.0, 1000.0, 4000.0])
def test_sine_lands_in_its_band(freq):
  t = np.arange(16000) / 16000
  y = (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
  out = features.log_mel_spectrogram(y).numpy()
  centers = librosa.mel_frequencies(66, fmin=P.fmin, fmax=P.fmax)[1:-1]
  expected = int(np.argmin(np.abs(centers - freq)))
  assert abs(int(np.argmax(out.mean(axis=0))) - expected) <= 1
  # Far-away bands stay near the floor: the energy is concentrated.
  assert out.mean(axis=0)[expected] - np.median(out.mean(axis=0)) > 10


def test_compiled_equals_eager():
  y = np.random.default_rng(1).normal(0, 0.1, 20000).astype(np.float32)
  np.testing.assert_allclose(features.log_mel_numpy(y),
                             features.log_mel_spectrogram(y).numpy(), atol=1e-4)


def test_rejects_bad_params():
  with pytest.raises(ValueError, match="fft_length"):
    features.LogMelParams(fft_length=128)
  with pytest.raises(ValueError, match="fmax"):
    features.LogMelParams(fmax=9000.0)
  with pytest.raises(ValueError, match="1-D"):
    features.log_mel_numpy(np.zeros([2, 100]))


def test_layer_config_round_trip_and_saving(tmp_path):
  layer = features.LogMel(fmin=100.0, name="front_end")
  config = layer.get_config()
  clone = features.LogMel.from_config(config)
  assert clone.get_config() == config
  inputs = keras.Input([16000])
  model = keras.Model(inputs, features.LogMel()(inputs))
  assert model.output_shape == (None, 99, 64)
  x = np.random.default_rng(2).normal(0, 0.1, [2, 16000]).astype(np.float32)
  path = str(tmp_path / "front_end.keras")
  model.save(path)
  restored = keras.models.load_model(path)
  np.testing.assert_allclose(restored(x), model(x), atol=1e-6)
  np.testing.assert_allclose(model(x), features.log_mel_spectrogram(x), atol=1e-6)


def test_converts_to_tflite_builtins(tmp_path):
  """The front end converts with TFLITE_BUILTINS only (no Flex ops) and matches TF."""
  layer = features.LogMel()

  class FrontEnd(tf.Module):

    @tf.function(input_signature=[tf.TensorSpec([1, 16000], tf.float32)])
    def serve(self, waveform):
      return {"log_mel": layer(waveform)}

  module = FrontEnd()
  export_dir = str(tmp_path / "saved")
  tf.saved_model.save(module, export_dir, signatures={"serving_default": module.serve})
  converter = tf.lite.TFLiteConverter.from_saved_model(export_dir)
  converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
  tflite_model = converter.convert()
  interpreter = tf.lite.Interpreter(model_content=tflite_model)
  runner = interpreter.get_signature_runner()
  y = np.random.default_rng(3).normal(0, 0.1, [1, 16000]).astype(np.float32)
  got = runner(waveform=y)["log_mel"]
  np.testing.assert_allclose(got, layer(y).numpy(), atol=1e-4)
  ops = {d["op_name"] for d in interpreter._get_ops_details()}  # pylint: disable=protected-access
  assert "RFFT2D" in ops and not any(o.startswith("Flex") for o in ops), ops


@pytest.mark.parametrize("frame_length,frame_step", [(256, 160), (400, 160), (256, 128),
                                                     (100, 160), (160, 160)])
@pytest.mark.parametrize("shape", [[1000], [2, 3, 1000], [1, 255], [1, 0]])
def test_frame_blocks_equals_tf_signal_frame(frame_length, frame_step, shape):
  """The front end's framing (reshapes and slices, no gather) gives tf.signal.frame's frames,
  value for value, for any lengths, leading dimensions and too-short waveforms."""
  y = np.random.default_rng(4).normal(0, 0.1, shape).astype(np.float32)
  want = tf.signal.frame(y, frame_length, frame_step).numpy()
  got = features.frame_blocks(y, frame_length, frame_step).numpy()
  assert got.shape == want.shape
  np.testing.assert_array_equal(got, want)
  traced = tf.function(lambda w: features.frame_blocks(w, frame_length, frame_step))
  assert traced.get_concrete_function(tf.TensorSpec(shape)).output_shapes == want.shape


def test_log_mel_equals_the_tf_signal_stft_formula():
  """Exactly what the front end computed with tf.signal.stft (before frame_blocks), eager
  and XLA-compiled."""
  y = np.random.default_rng(5).normal(0, 0.1, [2, 48000]).astype(np.float32)
  stft = tf.signal.stft(y, P.window_length, P.hop_length, P.fft_length,
                        window_fn=tf.signal.hann_window)
  power = tf.math.square(tf.math.real(stft)) + tf.math.square(tf.math.imag(stft))
  want = tf.math.log(tf.tensordot(power, features.mel_weight_matrix(P), axes=1) +
                     P.log_offset).numpy()
  np.testing.assert_array_equal(features.log_mel_spectrogram(y).numpy(), want)
  np.testing.assert_allclose(features.compiled_log_mel_fn(P)(y).numpy(), want, atol=1e-5)
