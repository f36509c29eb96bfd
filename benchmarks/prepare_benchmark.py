#!/usr/bin/env python3
"""Benchmark: audio-only data preparation throughput and the log-mel front end vs librosa.

Not a test: it prints figures for docs/benchmarks.md. The clips are real audio: pairs of
ESC-10 recordings joined into 10 s clips and encoded as 44.1 kHz stereo AAC (.m4a), the
kind of file an AudioSet download gives. Beyond --unique_clips, the files are copies that
differ in a trailing MP4 `free` box (same audio, other bytes, the same size as the other
copies of their source): preparation refuses byte-identical copies, and same-size files
are what its duplicate check must hash, so this is its worst case.

It also measures the duplicate check (`inputs.mark_duplicates`: paths resolved, files that
share their size hashed with SHA-256) in the same run: preparation with and without content
fingerprints, alternating, and the check alone.

  .venv/bin/python benchmarks/prepare_benchmark.py [--clips=1000] [--unique_clips=200]
      [--fingerprint_repeats=2]
"""

import collections
import glob
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
import av
import numpy as np

from av_sound_tf.core import features
from av_sound_tf.core import media
from av_sound_tf.core import schema
from data_prep import featurize
from data_prep import inputs
from data_prep import prepare

FLAGS = flags.FLAGS
flags.DEFINE_integer("clips", 1000, "Clips to prepare (unique encodes are copied with "
                     "distinct trailing bytes).")
flags.DEFINE_integer("unique_clips", 200, "Distinct 10 s files to encode.")
flags.DEFINE_integer("num_workers", os.cpu_count() or 1, "Worker processes for preparation.")
flags.DEFINE_integer("frontend_clips", 100, "Clips for the front-end comparison.")
flags.DEFINE_string("esc10", os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "..", "shared", "data", "esc10"), "ESC-10 folder.")
flags.DEFINE_string("work_dir", None, "Where clips and shards go (default: a temp dir).")
flags.DEFINE_integer("fingerprint_repeats", 2, "Preparation runs with and without content "
                     "fingerprints each (alternating) for the overhead ratio; 0 skips it.",
                     lower_bound=0)


def encode_clip(path, left, right, rate=44100):
  """Writes 10 s of stereo AAC at 44.1 kHz."""
  with av.open(path, "w") as out:
    stream = out.add_stream("aac", rate=rate, layout="stereo")
    stereo = np.stack([left, right]).astype(np.float32)
    for i in range(0, stereo.shape[1], 1024):
      frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(stereo[:, i:i + 1024]),
                                         format="fltp", layout="stereo")
      frame.sample_rate = rate
      for packet in stream.encode(frame):
        out.mux(packet)
    for packet in stream.encode(None):
      out.mux(packet)


def make_clips(work_dir, n_unique, n_total):
  sources = sorted(glob.glob(os.path.join(FLAGS.esc10, "*", "*.ogg")))
  if len(sources) < 2:
    raise app.UsageError(f"ESC-10 not found under {FLAGS.esc10}")
  clip_dir = os.path.join(work_dir, "clips")
  os.makedirs(clip_dir, exist_ok=True)
  unique = []
  for i in range(n_unique):
    path = os.path.join(clip_dir, f"clip{i:04d}.m4a")
    if not os.path.exists(path):
      a = media.decode_audio(sources[(2 * i) % len(sources)], sample_rate=44100)
      b = media.decode_audio(sources[(2 * i + 1) % len(sources)], sample_rate=44100)
      y = np.zeros(441000, np.float32)
      y[:min(len(a), 220500)] = a[:220500]
      y[220500:220500 + min(len(b), 220500)] = b[:220500]
      encode_clip(path, y, 0.8 * y)
    unique.append(path)
  rows = []
  for i in range(n_total):
    path = unique[i % n_unique]
    if i >= n_unique:
      copy = os.path.join(clip_dir, f"copy{i:05d}.m4a")
      if not os.path.exists(copy):
        with open(path, "rb") as f:
          data = f.read()
        # An MP4 `free` box (size, type, payload) after the others: ignored by demuxers.
        payload = f"{i:012d}".encode()
        with open(copy, "wb") as f:
          f.write(data + (8 + len(payload)).to_bytes(4, "big") + b"free" + payload)
      path = copy
    rows.append(f"{path},Speech")
  file_list = os.path.join(work_dir, "list.csv")
  with open(file_list, "w") as f:
    f.write("path,labels\n" + "\n".join(rows) + "\n")
  return file_list, unique


def bench_prepare(file_list, work_dir, fingerprint_content=True):
  out = os.path.join(work_dir, "shards")
  found = inputs.from_file_list(file_list)
  config = featurize.PrepareConfig(output_dir=out)
  t0 = time.perf_counter()
  summary = prepare.prepare(found, config, num_workers=FLAGS.num_workers, overwrite=True,
                            progress_every=10, fingerprint_content=fingerprint_content)
  wall = time.perf_counter() - t0
  n = sum(1 for _ in schema.read_examples(schema.list_shards(out, "data"), 1))
  assert n == summary.written == FLAGS.clips, (n, summary.written)
  return wall, summary


def bench_fingerprint(file_list, work_dir, wall):
  """Preparation with and without content fingerprints (alternating), and the check alone."""
  walls = {True: [], False: []}
  for _ in range(FLAGS.fingerprint_repeats):
    for on in (False, True):
      walls[on].append(bench_prepare(file_list, work_dir, fingerprint_content=on)[0])
  walls[True].append(wall)  # the main run above had fingerprints on
  found = inputs.from_file_list(file_list)
  t = time.perf_counter()
  leaks = inputs.mark_duplicates(found)
  check = time.perf_counter() - t
  assert not leaks and not any(j.error for j in found.jobs)
  sizes = collections.Counter(os.path.getsize(j.path) for j in found.jobs)
  hashed = sum(n for n in sizes.values() if n > 1)
  megabytes = sum(os.path.getsize(j.path) for j in found.jobs) / 1e6
  return walls, check, hashed, megabytes


def bench_stages(paths):
  """Cost of each stage per clip, one clip at a time in this process."""
  import tensorflow as tf
  proc = featurize.ClipProcessor(featurize.PrepareConfig(output_dir="unused"))
  proc.log_mel(media.decode_audio(paths[0]))  # compile
  t_dec = t_mel = t_ser = 0.0
  for p in paths:
    t = time.perf_counter()
    y = media.decode_audio(p)
    t_dec += time.perf_counter() - t
    t = time.perf_counter()
    mel = proc.log_mel(y)
    t_mel += time.perf_counter() - t
    t = time.perf_counter()
    schema.make_example("x", p, [0], ["Speech"], log_mel=mel).SerializeToString()
    t_ser += time.perf_counter() - t
  k = 1000 / len(paths)
  del tf
  return t_dec * k, t_mel * k, t_ser * k


def bench_frontend(paths):
  import librosa
  import tensorflow as tf
  p = features.DEFAULT_PARAMS
  waves = [media.decode_audio(x)[:160000] for x in paths]
  waves = [np.pad(w, (0, 160000 - len(w))) for w in waves]
  batch = np.stack(waves)
  fn = features.compiled_log_mel_fn(p)
  fn(batch[:1]), fn(batch[:32])  # compile both shapes

  def librosa_mel(y):
    return np.log(librosa.feature.melspectrogram(
        y=y, sr=16000, n_fft=512, win_length=256, hop_length=160, center=False, power=2.0,
        n_mels=64, fmin=p.fmin, fmax=p.fmax) + p.log_offset)

  librosa_mel(waves[0])
  results = {}
  t = time.perf_counter()
  for y in waves:
    librosa_mel(y)
  results["librosa.feature.melspectrogram (1 clip/call)"] = (time.perf_counter() - t)
  t = time.perf_counter()
  for y in waves:
    fn(y[None]).numpy()
  results["av_sound_tf log-mel, compiled (1 clip/call)"] = time.perf_counter() - t
  t = time.perf_counter()
  for i in range(0, len(waves), 32):
    fn(batch[i:i + 32]).numpy()
  results["av_sound_tf log-mel, compiled (32 clips/call)"] = time.perf_counter() - t
  ds = tf.data.Dataset.from_tensor_slices(batch).map(
      lambda w: features.log_mel_spectrogram(w), num_parallel_calls=tf.data.AUTOTUNE)
  for _ in ds.take(4):
    pass
  t = time.perf_counter()
  for _ in ds:
    pass
  results["av_sound_tf log-mel, tf.data parallel map (both cores)"] = time.perf_counter() - t
  t = time.perf_counter()
  for y in waves:
    features.log_mel_spectrogram(y[None]).numpy()
  results["av_sound_tf log-mel, eager (1 clip/call)"] = time.perf_counter() - t
  del tf
  return {k: v / len(waves) * 1000 for k, v in results.items()}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  work_dir = FLAGS.work_dir or tempfile.mkdtemp(prefix="prep_bench_")
  print(f"machine: {os.cpu_count()} CPUs; work dir {work_dir}")
  file_list, unique = make_clips(work_dir, FLAGS.unique_clips, FLAGS.clips)
  wall, summary = bench_prepare(file_list, work_dir)
  print(f"\nAudio-only preparation, {FLAGS.clips} x 10 s AAC clips (44.1 kHz stereo), "
        f"{FLAGS.num_workers} workers:")
  print(f"  end to end (incl. worker start-up): {wall:.1f} s = {FLAGS.clips / wall:.1f} clips/s")
  print(f"  steady state (progress rate):       {summary.clips_per_second:.1f} clips/s")
  if FLAGS.fingerprint_repeats:
    walls, check, hashed, megabytes = bench_fingerprint(file_list, work_dir, wall)
    with_fp, without_fp = min(walls[True]), min(walls[False])
    print(f"\nDuplicate check (paths resolved; {hashed} of {FLAGS.clips} files share their "
          f"size and are hashed, {megabytes:.0f} MB in all):")
    print("  end to end with content fingerprints:    "
          + ", ".join(f"{w:.1f}" for w in walls[True]) + " s")
    print("  end to end without content fingerprints: "
          + ", ".join(f"{w:.1f}" for w in walls[False]) + " s")
    print(f"  ratio with / without (best of each):     {with_fp / without_fp:.3f} "
          "(run-to-run noise included)")
    print(f"  the check alone (mark_duplicates):       {check:.2f} s = "
          f"{1000 * check / FLAGS.clips:.2f} ms per clip = "
          f"{100 * check / without_fp:.1f} % of the best run without it")
  dec, mel, ser = bench_stages(unique[:50])
  print("\nPer-clip stage cost, one process, sequential (ms):")
  print(f"  decode + resample {dec:.1f} | log-mel {mel:.2f} | serialize {ser:.2f}")
  fe = bench_frontend(unique[:FLAGS.frontend_clips])
  base = fe["librosa.feature.melspectrogram (1 clip/call)"]
  print(f"\nFront end on the same {FLAGS.frontend_clips} x 10 s clips (ms per clip):")
  for name, ms in fe.items():
    print(f"  {name:<56} {ms:7.2f}   {base / ms:5.2f}x librosa")


if __name__ == "__main__":
  app.run(main)
