#!/usr/bin/env python3
"""Profile of the log-mel front end: where the time of one 10 s clip goes.

Prints, measured in one run on one 10 s 16 kHz signal (999 frames of 512 points), the
milliseconds of each step of `features.log_mel_spectrogram`, each step XLA-compiled on its
own as the front end is, beside SciPy's pocketfft and librosa's whole melspectrogram, and a
DFT-as-matrix-multiply alternative (YAMNet's TFLite-safe STFT):

  .venv/bin/python benchmarks/frontend_profile.py [--repeats=200]

Not a test. Each figure is the median of --repeats calls.
"""

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import numpy as np
import tensorflow as tf

from av_sound_tf.core import features

FLAGS = flags.FLAGS
flags.DEFINE_integer("repeats", 200, "Calls per measurement (the median is printed).")


def median_ms(fn, *args):
  fn(*args)  # compile / warm up
  times = []
  for _ in range(FLAGS.repeats):
    t = time.perf_counter()
    out = fn(*args)
    if hasattr(out, "numpy"):
      out.numpy()
    times.append(time.perf_counter() - t)
  return 1000 * float(np.median(times))


def main(argv):
  del argv
  import librosa  # pylint: disable=g-import-not-at-top
  import scipy.fft  # pylint: disable=g-import-not-at-top
  p = features.DEFAULT_PARAMS
  y = np.random.default_rng(0).uniform(-0.5, 0.5, [1, 10 * p.sample_rate]).astype(np.float32)
  n_frames = p.num_frames(y.shape[1])
  compile_ = lambda f: tf.function(f, jit_compile=True)

  frame_window = compile_(lambda w: tf.signal.frame(w, p.window_length, p.hop_length) *
                          tf.signal.hann_window(p.window_length))
  frames = frame_window(y)  # [1, 999, 256]
  rfft = compile_(lambda f: tf.signal.rfft(f, [p.fft_length]))
  spectrum = rfft(frames)
  mel_matrix = tf.constant(features.mel_weight_matrix(p))
  power_mel_log = compile_(lambda s: tf.math.log(tf.tensordot(
      tf.math.square(tf.math.real(s)) + tf.math.square(tf.math.imag(s)), mel_matrix,
      axes=1) + p.log_offset))
  whole = features.compiled_log_mel_fn(p)

  # DFT as a matrix multiply: [frames, 256] x [256, 2 * 257] (real and imaginary parts).
  k = np.arange(p.fft_length // 2 + 1)
  n = np.arange(p.window_length)
  angle = 2 * np.pi * np.outer(n, k) / p.fft_length
  dft = tf.constant(np.concatenate([np.cos(angle), -np.sin(angle)], axis=1).astype(np.float32))
  bins = p.fft_length // 2 + 1
  dft_front_end = compile_(lambda w: tf.math.log(tf.tensordot(
      tf.math.square(tf.tensordot(frame_window(w), dft, axes=1)[..., :bins]) +
      tf.math.square(tf.tensordot(frame_window(w), dft, axes=1)[..., bins:]),
      mel_matrix, axes=1) + p.log_offset))
  np.testing.assert_allclose(dft_front_end(y).numpy(), whole(y).numpy(), atol=2e-3)

  frames_np = frames.numpy()[0]
  rows = [
      ("framing + Hann window (tf, XLA)", median_ms(frame_window, y)),
      (f"RFFT of {n_frames} x {p.fft_length} (tf, XLA)", median_ms(rfft, frames)),
      (f"RFFT of {n_frames} x {p.fft_length} (scipy pocketfft)",
       median_ms(lambda f: scipy.fft.rfft(f, p.fft_length, axis=-1), frames_np)),
      ("power, 257 x 64 mel projection, log (tf, XLA)", median_ms(power_mel_log, spectrum)),
      ("whole front end (features.compiled_log_mel_fn)", median_ms(whole, y)),
      ("whole front end, DFT as matmul (XLA)", median_ms(dft_front_end, y)),
      ("librosa.feature.melspectrogram + log", median_ms(
          lambda w: np.log(librosa.feature.melspectrogram(
              y=w, sr=p.sample_rate, n_fft=p.fft_length, win_length=p.window_length,
              hop_length=p.hop_length, center=False, power=2.0, n_mels=p.num_mel_bins,
              fmin=p.fmin, fmax=p.fmax) + p.log_offset), y[0])),
  ]
  print(f"machine: {os.cpu_count()} CPUs, TensorFlow {tf.__version__}, librosa "
        f"{librosa.__version__}; one 10 s clip, median of {FLAGS.repeats} calls")
  base = dict(rows)["whole front end (features.compiled_log_mel_fn)"]
  for name, ms in rows:
    print(f"  {name:<52} {ms:6.2f} ms   {ms / base:5.2f}x ours")


if __name__ == "__main__":
  app.run(main)
