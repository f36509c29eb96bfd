"""The log-mel front end: one implementation for data prep, training, serving and TFLite.

Parameters follow the paper (Fayek & Kumar, Sec. 3.1): 16 kHz mono audio, 64 mel bands,
16 ms windows (256 samples) shifted by 10 ms (160 samples), i.e. 100 frames per second.
The paper leaves the rest open; our choices, and why:

* Window: periodic Hann of 256 samples (the same as librosa's default ``window="hann"``).
* FFT length: 512. The 256-sample frame is zero-padded to 512 points; this interpolates the
  spectrum to 31.25 Hz bins, so that the narrow low-frequency mel bands each cover at least
  two FFT bins (with a 256-point FFT several of them would see a single 62.5 Hz bin).
* No centering: frame ``t`` covers samples ``[160 t, 160 t + 256)``; a waveform of ``n``
  samples gives ``1 + (n - 256) // 160`` frames (999 frames for 10 s). The readers pad or
  crop to the model's input length (1024 frames = 10.24 s in Table 1), so nothing is
  truncated at write time.
* Mel filterbank: Slaney mel scale with Slaney area normalization (librosa's defaults,
  ``htk=False, norm="slaney"``), fmin = 50 Hz (drops DC and mains hum), fmax = 8 kHz
  (Nyquist). The matrix is computed once in NumPy here and stored as a constant.
* Power spectrogram (|X|^2, librosa's default ``power=2``), then ``log(mel + 1e-6)``. The
  additive floor keeps the function smooth and finite for digital silence (log(1e-6) =
  -13.8, about 60 dB below a quiet -40 dBFS tone) and converts to TFLite without special ops.

The STFT is `tf.signal.rfft` of Hann-windowed frames that `frame_blocks` cuts with
reshapes and slices: the frames of ``tf.signal.stft``, bit for bit, without its gather (about
15 % less CPU time per compiled 10 s clip in a one-off A/B run on one thread; the ratio to
librosa is benchmarks/peers_benchmark.py's, docs/benchmarks.md). The RFFT used to block
TFLite conversion (YAMNet keeps a DFT-as-matmul path for that reason); with TensorFlow 2.17
the converter lowers it to the builtin ``RFFT2D`` op, which ``tests/features_test.py`` proves
by converting the layer with ``TFLITE_BUILTINS`` only and comparing the interpreter's output
with TensorFlow's.
"""

import dataclasses
import functools

import keras
import numpy as np
import tensorflow as tf

from av_sound_tf.core import constants


@dataclasses.dataclass(frozen=True)
class LogMelParams:
  """Front-end parameters. The defaults are the paper's (see the module docstring)."""

  sample_rate: int = constants.SAMPLE_RATE
  window_length: int = 256  # 16 ms
  hop_length: int = constants.HOP_LENGTH  # 10 ms -> constants.FRAMES_PER_SECOND
  fft_length: int = 512
  num_mel_bins: int = 64
  fmin: float = 50.0
  fmax: float = 8000.0
  log_offset: float = 1e-6

  def __post_init__(self):
    if self.fft_length < self.window_length:
      raise ValueError(
          f"fft_length must be >= window_length. Received: fft_length={self.fft_length}, "
          f"window_length={self.window_length}")
    if not 0 <= self.fmin < self.fmax <= self.sample_rate / 2:
      raise ValueError(
          f"Need 0 <= fmin < fmax <= sample_rate / 2. Received: fmin={self.fmin}, "
          f"fmax={self.fmax}, sample_rate={self.sample_rate}")

  @property
  def frames_per_second(self) -> float:
    return self.sample_rate / self.hop_length

  def num_frames(self, num_samples: int) -> int:
    """Number of log-mel frames for a waveform of `num_samples` samples (0 if too short)."""
    if num_samples < self.window_length:
      return 0
    return 1 + (num_samples - self.window_length) // self.hop_length

  def to_dict(self):
    return dataclasses.asdict(self)


DEFAULT_PARAMS = LogMelParams()


# Slaney's mel scale (librosa, htk=False): linear below 1 kHz, logarithmic above.
_F_SP = 200.0 / 3  # Hz per mel in the linear part
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOGSTEP = np.log(6.4) / 27.0


def _hz_to_mel(hz):
  hz = np.asarray(hz, dtype=np.float64)
  return np.where(hz >= _MIN_LOG_HZ,
                  _MIN_LOG_MEL + np.log(np.maximum(hz, _MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOGSTEP,
                  hz / _F_SP)


def _mel_to_hz(mel):
  mel = np.asarray(mel, dtype=np.float64)
  return np.where(mel >= _MIN_LOG_MEL, _MIN_LOG_HZ * np.exp(_LOGSTEP * (mel - _MIN_LOG_MEL)),
                  _F_SP * mel)


@functools.lru_cache(maxsize=8)
def mel_weight_matrix(params: LogMelParams = DEFAULT_PARAMS) -> np.ndarray:
  """Slaney-normalized triangular mel filters, shape [fft_length // 2 + 1, num_mel_bins]."""
  num_bins = params.fft_length // 2 + 1
  fft_hz = np.linspace(0, params.sample_rate / 2, num_bins)
  mel_edges = np.linspace(_hz_to_mel(params.fmin), _hz_to_mel(params.fmax),
                          params.num_mel_bins + 2)
  hz_edges = _mel_to_hz(mel_edges)
  widths = np.diff(hz_edges)
  ramps = hz_edges[:, None] - fft_hz[None, :]
  lower = -ramps[:-2] / widths[:-1, None]
  upper = ramps[2:] / widths[1:, None]
  weights = np.maximum(0, np.minimum(lower, upper))
  weights *= (2.0 / (hz_edges[2:] - hz_edges[:-2]))[:, None]  # Slaney area normalization
  if not np.all(weights.max(axis=1) > 0):
    raise ValueError(f"Empty mel filters for {params}; use a longer fft_length or fewer bands.")
  return weights.T.astype(np.float32)


def frame_blocks(waveform, frame_length: int, frame_step: int):
  """`tf.signal.frame(waveform, frame_length, frame_step)` (no padding at the end), cut with
  reshapes and slices instead of a gather.

  The waveform is split into blocks of `frame_step` samples; frame t is blocks t, t+1, ...
  joined and cut to `frame_length`. Same values, in the same order, as tf.signal.frame.

  Args:
    waveform: float tensor [..., samples].
    frame_length: samples per frame.
    frame_step: samples between frame starts.

  Returns:
    [..., frames, frame_length] with frames = max(0, 1 + (samples - frame_length) //
    frame_step).
  """
  waveform = tf.convert_to_tensor(waveform, dtype=tf.float32)
  shape = tf.shape(waveform)
  samples = shape[-1]
  flat = tf.reshape(waveform, [-1, samples])
  frames = tf.maximum(0, 1 + (samples - frame_length) // frame_step)
  spans = -(-frame_length // frame_step)  # blocks that one frame touches
  needed = (frames + spans - 1) * frame_step
  flat = tf.pad(flat, [[0, 0], [0, tf.maximum(0, needed - samples)]])[:, :needed]
  blocks = tf.reshape(flat, [tf.shape(flat)[0], frames + spans - 1, frame_step])
  out = tf.concat([blocks[:, j:j + frames] for j in range(spans)], axis=-1)
  out = tf.reshape(out[..., :frame_length],
                   tf.concat([shape[:-1], [frames, frame_length]], axis=0))
  if not tf.executing_eagerly():  # keep what is known statically (Keras, TFLite)
    n = waveform.shape[-1]
    out.set_shape(waveform.shape[:-1].concatenate(
        [None if n is None else max(0, 1 + (n - frame_length) // frame_step), frame_length]))
  return out


def log_mel_spectrogram(waveform, params: LogMelParams = DEFAULT_PARAMS):
  """Log-mel spectrogram of 16 kHz mono waveforms.

  Args:
    waveform: float tensor [..., samples] at `params.sample_rate`, values in [-1, 1].
    params: front-end parameters.

  Returns:
    float32 tensor [..., frames, num_mel_bins] with frames = params.num_frames(samples).
  """
  frames = frame_blocks(waveform, params.window_length, params.hop_length)
  window = tf.signal.hann_window(params.window_length, dtype=tf.float32)  # periodic
  stft = tf.signal.rfft(frames * window, [params.fft_length])  # [..., frames, bins]
  power = tf.math.square(tf.math.real(stft)) + tf.math.square(tf.math.imag(stft))
  mel = tf.tensordot(power, tf.constant(mel_weight_matrix(params)), axes=1)
  return tf.math.log(mel + params.log_offset)


@functools.lru_cache(maxsize=8)
def compiled_log_mel_fn(params: LogMelParams = DEFAULT_PARAMS):
  """A traced and XLA-compiled `log_mel_spectrogram` for batches [batch, samples].

  Data preparation calls this on batches of waveforms; it is about 1.5x faster than the
  eager function on CPU (docs/benchmarks.md). It is the same computation, not a copy.
  """

  @tf.function(input_signature=[tf.TensorSpec([None, None], tf.float32)], jit_compile=True,
               reduce_retracing=True)
  def fn(waveforms):
    return log_mel_spectrogram(waveforms, params)

  return fn


def log_mel_numpy(waveform: np.ndarray, params: LogMelParams = DEFAULT_PARAMS) -> np.ndarray:
  """Log-mel of one 1-D waveform as a NumPy array [frames, bins] (empty if too short)."""
  waveform = np.asarray(waveform, dtype=np.float32)
  if waveform.ndim != 1:
    raise ValueError(f"Expected a 1-D waveform. Received: shape={waveform.shape}")
  if params.num_frames(waveform.shape[0]) == 0:
    return np.zeros([0, params.num_mel_bins], np.float32)
  return compiled_log_mel_fn(params)(waveform[None, :])[0].numpy()


@keras.saving.register_keras_serializable(package=constants.PACKAGE)
class LogMel(keras.layers.Layer):
  """Keras layer: waveform [batch, samples] -> log-mel [batch, frames, num_mel_bins].

  The same computation as `log_mel_spectrogram`, so that an exported model (SavedModel or
  TFLite) takes raw 16 kHz audio.

  Example:
    >>> layer = LogMel()
    >>> layer(np.zeros([2, 16000], "float32")).shape
    TensorShape([2, 99, 64])
  """

  def __init__(self, sample_rate=DEFAULT_PARAMS.sample_rate,
               window_length=DEFAULT_PARAMS.window_length,
               hop_length=DEFAULT_PARAMS.hop_length, fft_length=DEFAULT_PARAMS.fft_length,
               num_mel_bins=DEFAULT_PARAMS.num_mel_bins, fmin=DEFAULT_PARAMS.fmin,
               fmax=DEFAULT_PARAMS.fmax, log_offset=DEFAULT_PARAMS.log_offset, **kwargs):
    super().__init__(**kwargs)
    self.sample_rate = sample_rate
    self.window_length = window_length
    self.hop_length = hop_length
    self.fft_length = fft_length
    self.num_mel_bins = num_mel_bins
    self.fmin = fmin
    self.fmax = fmax
    self.log_offset = log_offset
    self.params = LogMelParams(sample_rate, window_length, hop_length, fft_length,
                               num_mel_bins, float(fmin), float(fmax), log_offset)

  @classmethod
  def from_params(cls, params: LogMelParams, **kwargs):
    return cls(**params.to_dict(), **kwargs)

  def call(self, waveform):
    return log_mel_spectrogram(waveform, self.params)

  def compute_output_shape(self, input_shape):
    samples = input_shape[-1]
    frames = None if samples is None else self.params.num_frames(samples)
    return tuple(input_shape[:-1]) + (frames, self.num_mel_bins)

  def get_config(self):
    config = super().get_config()
    config.update(self.params.to_dict())
    return config
