#!/usr/bin/env python3
"""Benchmark: why media.py decodes with PyAV and resamples with libsoxr.

Prints, measured side by side in one run on the same real files (ESC-10 OGG clips, 44.1 kHz,
5 s), milliseconds per clip and the ratio against our decoder:
  * our decode_audio (PyAV decode, channel mean, libsoxr to 16 kHz);
  * tensorflow-io: AudioIOTensor decode, then tfio.audio.resample to 16 kHz;
  * PyAV decode with FFmpeg's swresample (PyAV's AudioResampler) instead of libsoxr;
and, on one 10 s 44.1 kHz mono signal, the resamplers alone (libsoxr "HQ" against
swresample through PyAV), plus the cost of the per-file container probe.

  .venv/bin/python benchmarks/decode_benchmark.py [--clips=40]

Not a test. Each figure is the best of --repeats passes (the machine is shared).
"""

import glob
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import av
import numpy as np
import soxr

from av_sound_tf.core import constants
from av_sound_tf.core import media

FLAGS = flags.FLAGS
flags.DEFINE_integer("clips", 40, "ESC-10 clips to decode.")
flags.DEFINE_integer("repeats", 3, "Passes per measurement (the best is printed).")
flags.DEFINE_string("esc10", os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "..", "shared", "data", "esc10"), "ESC-10 folder.")


def best_ms(fn, items, repeats):
  """Best over `repeats` passes of the mean milliseconds per item."""
  fn(items[0])  # warm-up (imports, op registration, first-call costs)
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    for x in items:
      fn(x)
    best = min(best, (time.perf_counter() - t) / len(items) * 1000)
  return best


def decode_tfio(path):
  import logging  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  logging.getLogger("tensorflow").setLevel(logging.ERROR)  # its retracing notes
  import tensorflow_io as tfio  # pylint: disable=g-import-not-at-top
  audio = tfio.audio.AudioIOTensor(path)
  y = tf.reduce_mean(tf.cast(audio.to_tensor(), tf.float32), axis=1)
  rate = int(audio.rate.numpy())
  return tfio.audio.resample(y, rate_in=rate, rate_out=constants.SAMPLE_RATE).numpy()


def decode_swresample(path):
  """PyAV decode with FFmpeg's resampler (mono, 16 kHz, float), frame by frame."""
  resampler = av.AudioResampler(format="flt", layout="mono", rate=constants.SAMPLE_RATE)
  chunks = []
  with av.open(path) as container:
    for frame in container.decode(container.streams.audio[0]):
      for out in resampler.resample(frame):
        chunks.append(out.to_ndarray().reshape(-1))
  for out in resampler.resample(None):
    chunks.append(out.to_ndarray().reshape(-1))
  return np.concatenate(chunks)


def resample_swr(y, rate):
  """One whole-signal swresample call through PyAV (the fastest way to use it)."""
  frame = av.AudioFrame.from_ndarray(y[None, :], format="flt", layout="mono")
  frame.sample_rate = rate
  resampler = av.AudioResampler(format="flt", layout="mono", rate=constants.SAMPLE_RATE)
  out = [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
  out += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
  return np.concatenate(out)


def main(argv):
  del argv
  paths = sorted(glob.glob(os.path.join(FLAGS.esc10, "*", "*.ogg")))[:FLAGS.clips]
  if not paths:
    raise app.UsageError(f"no ESC-10 .ogg files under {FLAGS.esc10}")
  info = media.probe(paths[0])
  print(f"machine: {os.cpu_count()} CPUs; PyAV {av.__version__}, soxr {soxr.__version__}; "
        f"{len(paths)} ESC-10 clips ({info.audio_codec}, {info.duration_seconds:.1f} s), "
        f"best of {FLAGS.repeats}")
  ours = best_ms(media.decode_audio, paths, FLAGS.repeats)
  rows = [("ours: PyAV decode + libsoxr (media.decode_audio)", ours)]
  try:
    rows.append(("tensorflow-io AudioIOTensor + tfio.audio.resample",
                 best_ms(decode_tfio, paths, FLAGS.repeats)))
  except Exception as e:  # pylint: disable=broad-except
    print(f"  tensorflow-io: not measured ({type(e).__name__}: {str(e)[:120]})")
  rows.append(("PyAV decode + swresample per frame", best_ms(decode_swresample, paths,
                                                               FLAGS.repeats)))
  print("\nDecode to 16 kHz mono, ms per clip:")
  for name, ms in rows:
    print(f"  {name:<52} {ms:7.2f} ms   {ms / ours:5.2f}x ours")

  rng = np.random.default_rng(0)
  y = rng.uniform(-0.5, 0.5, 441000).astype(np.float32)  # 10 s at 44.1 kHz
  t_soxr = best_ms(lambda s: soxr.resample(s, 44100, constants.SAMPLE_RATE, quality="HQ"),
                   [y] * 10, FLAGS.repeats)
  t_swr = best_ms(lambda s: resample_swr(s, 44100), [y] * 10, FLAGS.repeats)
  print("\nResampling one 10 s 44.1 kHz mono signal to 16 kHz, one call:")
  print(f"  libsoxr HQ (ours)              {t_soxr:7.2f} ms")
  print(f"  FFmpeg swresample (PyAV)       {t_swr:7.2f} ms   {t_swr / t_soxr:5.2f}x libsoxr")

  t_probe = best_ms(media.probe, paths, FLAGS.repeats)
  print(f"\nContainer probe (header only, media.probe): {t_probe:.3f} ms per file "
        f"= {100 * t_probe / ours:.1f} % of our decode")


if __name__ == "__main__":
  app.run(main)
