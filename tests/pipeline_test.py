"""tf.data pipelines: shapes, crops, determinism and exact resumption, weights, augmentation,
sharding, and AudioSet's released features."""


import numpy as np
import pytest
import tensorflow as tf

from av_sound_tf.core import dataset_info
from av_sound_tf.core import schema
from av_sound_tf.train import pipeline
from tests import synthetic
from tests.schema_test import _audioset_example

FLOOR = float(np.log(1e-6))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("prepared"))
  examples = synthetic.write_prepared(out, splits=(("train", 30), ("validation", 10)),
                                      num_frames=(100, 300), shards=3)
  return out, examples


def _cfg(**kw):
  base = dict(kind="audio", num_classes=4, batch_size=4, num_frames=256, shuffle_buffer=8,
              embedding_dim=16)
  base.update(kw)
  return pipeline.InputConfig(**base)


def _take(ds, n):
  return [tuple(np.asarray(t) for t in b) for b in ds.take(n)]


def test_eval_dataset_order_crops_and_padding(data):
  out, examples = data
  files = schema.list_shards(out, "validation")
  for crop in ("start", "center"):
    batches = list(pipeline.eval_dataset(files, _cfg(eval_crop=crop), with_ids=True))
    ids = [i.decode() for b in batches for i in b[2].numpy()]
    # File order: shard 0 holds examples 0, 3, 6, 9; shard 1 holds 1, 4, 7; ...
    assert ids == [f"validation/{j}" for k in range(3) for j in range(k, 10, 3)]
    x = np.concatenate([b[0] for b in batches])
    assert x.shape == (10, 256, 64)
    for row, name in zip(x, ids):
      y, log_mel, _ = examples["validation"][int(name.split("/")[1])]
      ref = log_mel.astype(np.float16).astype(np.float32)
      n = ref.shape[0]
      if n >= 256:
        offset = (n - 256) // 2 if crop == "center" else 0
        np.testing.assert_array_equal(row, ref[offset:offset + 256])
      else:
        np.testing.assert_array_equal(row[:n], ref)
        np.testing.assert_allclose(row[n:], FLOOR, rtol=1e-6)


def test_train_batches_and_random_crops(data):
  out, examples = data
  files = schema.list_shards(out, "train")
  cfg = _cfg()
  batch = _take(pipeline.train_dataset(files, cfg, num_examples=30), 1)[0]
  x, y = batch
  assert x.shape == (4, 256, 64) and y.shape == (4, 4)
  refs = [e[1].astype(np.float16).astype(np.float32) for e in examples["train"]]
  offsets = []  # of the crops of clips longer than the window
  for x, _ in _take(pipeline.train_dataset(files, cfg, num_examples=30), 4):
    for row in x:  # every crop is a window of some clip (or a padded clip)
      found = False
      for ref in refs:
        if ref.shape[0] > 256:
          for off in range(ref.shape[0] - 255):
            if np.array_equal(ref[off:off + 256], row):
              found = True
              offsets.append((off, ref.shape[0] - 256))
              break
        elif np.array_equal(ref, row[:ref.shape[0]]):
          found = True
          np.testing.assert_array_equal(row[ref.shape[0]:], np.float32(FLOOR))
        if found:
          break
      assert found
  # Random windows: not always the start, and anywhere up to the last one.
  assert len(offsets) >= 3 and len({o for o, _ in offsets}) >= 3
  assert all(0 <= o <= last for o, last in offsets) and max(o for o, _ in offsets) > 0


AUGMENTED = dict(mixup_alpha=0.2, time_mask=48, freq_mask=8)


@pytest.mark.parametrize("augment", [{}, AUGMENTED], ids=["plain", "augmented"])
def test_train_stream_is_deterministic_and_resumes_exactly(data, augment):
  """A stream resumed at epoch 3 replays the uninterrupted stream's batches 15-19 exactly,
  crops, SpecAugment masks and mixup weights included."""
  out, _ = data
  files = schema.list_shards(out, "train")
  cfg = _cfg(**augment)
  steps = 5  # an epoch shorter than a pass (30 examples / batch 4 = 7.5 batches)
  a = _take(pipeline.train_dataset(files, cfg, num_examples=30), 20)
  b = _take(pipeline.train_dataset(files, cfg, num_examples=30), 20)
  for u, v in zip(a, b):
    np.testing.assert_array_equal(u[0], v[0])
  resumed = _take(pipeline.train_dataset(files, cfg, num_examples=30, initial_epoch=3,
                                         steps_per_epoch=steps), 5)
  for u, v in zip(a[15:20], resumed):
    np.testing.assert_array_equal(u[0], v[0])
    np.testing.assert_array_equal(u[1], v[1])
  other_seed = _take(pipeline.train_dataset(files, _cfg(seed=1), num_examples=30), 1)
  assert not np.array_equal(other_seed[0][0], a[0][0])


def test_every_example_once_per_pass(data):
  out, examples = data
  files = schema.list_shards(out, "train")
  cfg = _cfg(batch_size=1, num_frames=320)
  seen = []
  for x, _ in _take(pipeline.train_dataset(files, cfg, num_examples=30), 60):
    seen.append(x[0, :100, 0].tobytes())
  first, second = seen[:30], seen[30:]
  assert len(set(first)) == 30 and set(first) == set(second) and first != second


def test_class_balance_weights(data):
  out, examples = data
  terms = pipeline.class_balance_weights([10, 5, 0, 85], 100)
  # Over the set, sum of w = sum_c count_c * t_c = 100 = N: the mean weight is 1.
  assert float(np.dot([10, 5, 0, 85], terms)) == pytest.approx(100.0, rel=1e-6)
  assert terms[1] > terms[0] > terms[3] and terms[2] == 0
  files = schema.list_shards(out, "train")
  info = dataset_info.DatasetInfo.read(out)
  cfg = _cfg(balance=True, batch_size=30, num_frames=96)
  x, y, w = _take(pipeline.train_dataset(files, cfg, num_examples=30,
                                         class_counts=info.class_counts(["train"])),
                  1)[0]
  assert w.shape == (30,) and np.mean(w) == pytest.approx(1.0, rel=1e-5)
  with pytest.raises(ValueError, match="class_counts"):
    pipeline.train_dataset(files, cfg, num_examples=30)


def test_mixup_mixes_examples_and_labels_with_one_weight(data):
  """Each mixed row is lam * row + (1 - lam) * the reversed batch's row, for the features
  and the labels with the same lam, against the same stream without mixup."""
  out, _ = data
  files = schema.list_shards(out, "train")
  cfg = _cfg(num_frames=96, batch_size=6)
  plain = _take(pipeline.train_dataset(files, cfg, num_examples=30), 3)
  mixed = _take(pipeline.train_dataset(files, _cfg(num_frames=96, batch_size=6,
                                                   mixup_alpha=0.4), num_examples=30), 3)
  lams = []
  for (x0, y0), (x, y) in zip(plain, mixed):
    for i in range(len(y)):
      j = len(y) - 1 - i
      if np.array_equal(y0[i], y0[j]):
        continue  # same class: the labels do not show lam
      c = int(np.argmax(y0[i]))
      lam = y[i, c]  # single-label rows: y_i = lam e_c + (1 - lam) e_c'
      lams.append(lam)
      np.testing.assert_allclose(y[i], lam * y0[i] + (1 - lam) * y0[j], atol=1e-6)
      np.testing.assert_allclose(x[i], lam * x0[i] + (1 - lam) * x0[j], atol=1e-4)
  assert len(lams) >= 6 and 0.05 < np.std(lams)  # Beta(0.4, 0.4): spread, not constant
  assert not np.array_equal(mixed[0][0], plain[0][0])


def test_spec_augment_masks_one_band_of_each_axis_exactly():
  """Inputs far from the floor: exactly one contiguous band of rows and one of columns
  becomes the floor, of widths 0..max (each width drawn), and nothing else changes."""
  x = np.full([40, 16], 2.5, np.float32) + np.arange(16, dtype=np.float32)
  widths = {"time": set(), "freq": set()}
  for k in range(200):
    got = pipeline.spec_augment(tf.constant(x), tf.constant([7, k], tf.int64), 5, 3,
                                FLOOR).numpy()
    floor = got == np.float32(FLOOR)
    rows = np.flatnonzero(floor.all(axis=1))
    cols = np.flatnonzero(floor.all(axis=0))
    for band, size, name in ((rows, 40, "time"), (cols, 16, "freq")):
      if len(band):
        assert np.array_equal(band, np.arange(band[0], band[0] + len(band)))
        assert band[-1] < size
      widths[name].add(len(band))
    expected = x.copy()
    expected[rows, :] = FLOOR
    expected[:, cols] = FLOOR
    np.testing.assert_array_equal(got, expected)  # nothing outside the bands moved
    again = pipeline.spec_augment(tf.constant(x), tf.constant([7, k], tf.int64), 5, 3, FLOOR)
    np.testing.assert_array_equal(again.numpy(), got)  # a function of the seed
  assert widths == {"time": {0, 1, 2, 3, 4, 5}, "freq": {0, 1, 2, 3}}
  np.testing.assert_array_equal(
      pipeline.spec_augment(tf.constant(x), tf.constant([7, 0], tf.int64), 0, 0, FLOOR), x)


def test_train_masks_replace_cells_of_the_unmasked_crop_with_the_floor(data):
  """In the training stream (crops of 96 frames from clips of 100 or more: no padding), the
  masked batch equals the unmasked one except for one band of frames and one of mel bins per
  example, which hold the log-mel floor."""
  out, _ = data
  files = schema.list_shards(out, "train")
  cfg = _cfg(num_frames=96, batch_size=10)
  (x0, y0), = _take(pipeline.train_dataset(files, cfg, num_examples=30), 1)
  (x, y), = _take(pipeline.train_dataset(files, _cfg(num_frames=96, batch_size=10,
                                                     time_mask=20, freq_mask=6),
                                         num_examples=30), 1)
  np.testing.assert_array_equal(y, y0)
  assert not np.any(x0 == np.float32(FLOOR))  # the inputs differ from the mask value
  masked_cells = 0
  for a, b in zip(x0, x):
    floor = b == np.float32(FLOOR)
    rows = np.flatnonzero(floor.all(axis=1))
    cols = np.flatnonzero(floor.all(axis=0))
    assert len(rows) <= 20 and len(cols) <= 6
    expected = a.copy()
    expected[rows, :] = FLOOR
    expected[:, cols] = FLOOR
    np.testing.assert_array_equal(b, expected)
    masked_cells += floor.sum()
  assert masked_cells > 0


def test_visual_pipeline(data):
  out, examples = data
  files = schema.list_shards(out, "validation")
  x, y = _take(pipeline.eval_dataset(files, _cfg(kind="visual")), 1)[0]
  assert x.shape == (4, 16)
  np.testing.assert_array_equal(x[0], examples["validation"][0][2])
  with pytest.raises(ValueError, match="embedding_dim"):
    _cfg(kind="visual", embedding_dim=0)


def test_missing_modality_is_filtered(tmp_path):
  path = str(tmp_path / "m-00000-of-00001.tfrecord")
  with tf.io.TFRecordWriter(path) as w:
    w.write(schema.make_example("a", "a", [0], ["x"], log_mel=np.zeros([100, 64])).SerializeToString())
    w.write(schema.make_example("v", "v", [1], ["y"], embedding_mean=np.ones(16)).SerializeToString())
  audio = list(pipeline.eval_dataset([path], _cfg(batch_size=8)))
  visual = list(pipeline.eval_dataset([path], _cfg(kind="visual", batch_size=8)))
  assert audio[0][0].shape[0] == 1 and visual[0][0].shape[0] == 1


def test_sharding_per_input_pipeline(data):
  out, _ = data
  files = schema.list_shards(out, "validation")

  def ids(ctx):
    ds = pipeline.eval_dataset(files, _cfg(batch_size=100), with_ids=True, input_context=ctx)
    return [i.decode() for b in ds for i in b[2].numpy()]

  by_file = [ids(tf.distribute.InputContext(2, k, 2)) for k in range(2)]
  by_record = [ids(tf.distribute.InputContext(4, k, 4)) for k in range(4)]
  for parts in (by_file, by_record):  # 3 files: by file for 2 pipelines, by record for 4
    everything = [i for p in parts for i in p]
    assert sorted(everything) == sorted(ids(None)) and len(set(everything)) == 10


def test_audioset_embedding_pipeline(tmp_path):
  rng = np.random.default_rng(0)
  path = str(tmp_path / "bal_train.tfrecord")
  with tf.io.TFRecordWriter(path) as w:
    for i in range(6):
      w.write(_audioset_example(f"vid{i:08d}", 0.0, [i % 527], rng.integers(0, 256, [10, 128]))
              .SerializeToString())
  cfg = pipeline.InputConfig(kind="embedding", num_classes=527, batch_size=3, shuffle_buffer=4)
  x, y = _take(pipeline.train_dataset([path], cfg), 1)[0]
  assert x.shape == (3, 10, 128) and y.shape == (3, 527)
  # Each example is one written clip, dequantized q / 255 * 4 - 2, with its label.
  rng = np.random.default_rng(0)
  written = [rng.integers(0, 256, [10, 128]) / 255.0 * 4 - 2 for _ in range(6)]
  for row, labels in zip(x, y):
    (i,) = [i for i in range(6) if np.allclose(row, written[i], atol=1e-6)]
    np.testing.assert_array_equal(np.flatnonzero(labels), [i % 527])
