"""Frame embedders: shapes, the clip mean, determinism, local weights, TF-Hub modules, TFLite
models (the real MobileNet v1 extractor and small float/int8/uint8 conversions), and the
golden similarity of real frames (same clip vs different clips)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from av_sound_tf.core import embedders
from tests.conftest import mobilenet_path, shared_path


def _frames(n=5, size=64, seed=0):
  return np.random.default_rng(seed).integers(0, 256, [n, size, size, 3], dtype=np.uint8)


def test_tiny_embedder():
  emb = embedders.build_embedder("tiny", image_size=64)
  frames = _frames()
  mean, per_frame = emb.embed_clip(frames)
  assert per_frame.shape == (5, emb.dim) and mean.shape == (emb.dim,)
  np.testing.assert_allclose(mean, per_frame.mean(axis=0), rtol=1e-6)
  np.testing.assert_array_equal(per_frame, emb(frames))  # same frames, same embedding
  other = embedders.build_embedder("tiny", image_size=64)  # fixed seed: same weights
  np.testing.assert_allclose(other(frames), per_frame, rtol=1e-5)
  assert not np.allclose(per_frame[0], per_frame[1])


def test_batching_does_not_change_results():
  emb = embedders.build_embedder("tiny", image_size=32)
  frames = _frames(n=40, size=32)
  emb.batch_size = 7
  a = emb(frames)
  emb.batch_size = 64
  np.testing.assert_allclose(a, emb(frames), rtol=1e-5, atol=1e-6)


def test_bad_input_and_names():
  emb = embedders.build_embedder("tiny", image_size=32)
  with pytest.raises(ValueError, match="frames"):
    emb(np.zeros([32, 32, 3], np.uint8))
  with pytest.raises(ValueError, match="Unknown frame embedder"):
    embedders.build_embedder("vgg")
  with pytest.raises(FileNotFoundError, match="weights file not found"):
    embedders.build_embedder("resnet152", weights="/nonexistent/resnet.weights.h5",
                             image_size=32)


def test_resnet152_random_weights():
  emb = embedders.build_embedder("resnet152", weights="none", image_size=64)
  out = emb(_frames(n=2))
  assert out.shape == (2, 2048) and emb.dim == 2048
  assert np.all(np.isfinite(out)) and np.all(out >= 0)  # after ReLU + average pooling


def test_hub_module_directory(tmp_path):
  """Any TF-Hub image feature-vector SavedModel: float images in [0, 1] -> [n, dim]."""

  class Module(tf.Module):

    def __init__(self):
      super().__init__()
      self.w = tf.Variable(tf.random.stateless_normal([3, 6], seed=[1, 2]))

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    def __call__(self, images):
      return tf.matmul(tf.reduce_mean(images, axis=[1, 2]), self.w)

  path = str(tmp_path / "hub_module")
  tf.saved_model.save(Module(), path)
  emb = embedders.build_embedder(f"hub:{path}", image_size=32)
  frames = _frames(n=3, size=32)
  assert emb.dim == 6
  got = emb(frames)
  assert got.shape == (3, 6)
  reloaded = tf.saved_model.load(path)
  np.testing.assert_allclose(got, reloaded(tf.constant(frames / 255.0, tf.float32)).numpy(),
                             rtol=1e-5)


def test_color_layout_embedder():
  emb = embedders.build_embedder("color_layout", image_size=64)
  frames = np.zeros([3, 64, 64, 3], np.uint8)
  frames[1, :32, :, 0] = 255  # red top half
  frames[2] = 255  # white
  out = emb(frames)
  assert out.shape == (3, 256) and emb.dim == 256
  thumb = out[:, :192].reshape(3, 8, 8, 3)
  np.testing.assert_allclose(thumb[0], 0)
  np.testing.assert_allclose(thumb[1, :4, :, 0], 1.0)  # the red half, where it is
  np.testing.assert_allclose(thumb[1, 4:, :, 0], 0.0)
  hist = out[:, 192:]
  np.testing.assert_allclose(hist.sum(axis=1), 1.0, rtol=1e-6)
  assert hist[0, 0] == 1.0 and hist[2, 63] == 1.0  # all black / all white bins
  assert hist[1, 0] == pytest.approx(0.5) and hist[1, 48] == pytest.approx(0.5)  # red bin
  with pytest.raises(ValueError, match="divisible by 8"):
    embedders.build_embedder("color_layout", image_size=60)
  # Random frames against an independent NumPy reference: block means and bin counts.
  frames = np.random.default_rng(0).integers(0, 256, [5, 64, 64, 3], dtype=np.uint8)
  thumb = frames.reshape(5, 8, 8, 8, 8, 3).mean(axis=(2, 4)) / 255.0
  bins = frames // 64
  index = (bins[..., 0] * 16 + bins[..., 1] * 4 + bins[..., 2]).reshape(5, -1)
  hist = np.stack([np.bincount(row, minlength=64) for row in index]) / (64 * 64)
  np.testing.assert_allclose(emb(frames), np.concatenate([thumb.reshape(5, -1), hist], 1),
                             atol=1e-6)


def test_check_embedder_names_what_cannot_be_built(tmp_path, monkeypatch):
  """check_embedder fails in one line naming the embedder or the weights, builds nothing."""
  with pytest.raises(ValueError, match=r"Unknown frame embedder.*Received: 'resnet125'$"):
    embedders.check_embedder("resnet125")
  with pytest.raises(FileNotFoundError,
                     match=r"^ResNet-152 weights file not found: /nonexistent/r\.h5$"):
    embedders.check_embedder("resnet152", "/nonexistent/r.h5")
  with pytest.raises(FileNotFoundError, match=r"^TF-Hub module not found: .*no_module"):
    embedders.check_embedder(f"hub:{tmp_path / 'no_module'}")
  with pytest.raises(ValueError, match="color_layout needs image_size divisible by 8"):
    embedders.check_embedder("color_layout", image_size=60)
  for ok in (("tiny", None), ("color_layout", None), ("resnet152", "none")):
    embedders.check_embedder(*ok)


def test_check_embedder_imagenet_weights_offline(tmp_path, monkeypatch):
  """No cached ImageNet weights and no network: one line with the URL and the advice; cached
  weights need no network; the probe is asked with a timeout (it never hangs)."""
  monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
  probes = []
  monkeypatch.setattr(embedders, "_reachable", lambda url, timeout: probes.append(
      (url, timeout)) or False)
  with pytest.raises(ValueError) as error:
    embedders.check_embedder("resnet152", "imagenet")
  message = str(error.value)
  assert "\n" not in message
  assert embedders.RESNET152_WEIGHTS_URL in message and "--embedder_weights=" in message
  assert probes == [(embedders.RESNET152_WEIGHTS_URL, embedders.NETWORK_TIMEOUT_SECONDS)]
  with pytest.raises(ValueError, match="ImageNet weights"):  # the builder checks first too
    embedders.build_embedder("resnet152", None, image_size=32)
  with pytest.raises(ValueError, match=r"TF-Hub module https://example\.invalid/m cannot "
                     r"be reached"):
    embedders.check_embedder("hub:https://example.invalid/m")
  cached = tmp_path / "keras" / "models" / embedders.RESNET152_WEIGHTS_FILE
  cached.parent.mkdir(parents=True)
  cached.write_bytes(b"h5")
  probes.clear()
  embedders.check_embedder("resnet152")
  assert not probes


def test_reachable_gives_up_on_a_dead_address():
  assert not embedders._reachable("https://127.0.0.1:9/x", timeout=1.0)  # nothing listens


# ---- tflite:<path> and local ResNet-152 weights on real frames (issue 16) -----------------

# Eight real clips of eight different sound sources (VAS, VGGSound, Diff-Foley samples).
GOLDEN_CLIPS = ("difffoley__car.mp4", "specvqgan__vas_baby_video_01951.mp4",
                "specvqgan__vas_cough_video_00331.mp4", "specvqgan__vas_dog_video_02677.mp4",
                "specvqgan__vas_fireworks_video_02997.mp4",
                "specvqgan__vas_hammer_video_00323.mp4", "vtaldm__-26aVYRtEAc_000030.mp4",
                "specvqgan__3HgbEKrbA9s_54000_64000.mp4")
GOLDEN_FRAMES = 6


@pytest.fixture(scope="module")
def real_frames():
  """GOLDEN_FRAMES frames of each golden clip, 224 x 224: {clip: uint8 [n, 224, 224, 3]}."""
  from av_sound_tf.core import media  # pylint: disable=g-import-not-at-top
  return {name: media.sample_video_frames(shared_path("real_av", "clips", name),
                                          GOLDEN_FRAMES, 224)
          for name in GOLDEN_CLIPS}


def _similarity(embeddings, center=False):
  """Cosine similarity of frame embeddings within a clip and across clips.

  Returns (mean within, mean across, per-clip within minus across [clips]); within-clip
  pairs exclude a frame with itself. center: subtract the mean embedding of all frames
  first (random ResNet weights map every image near one direction; centring shows what
  varies)."""
  x = np.concatenate(embeddings).astype(np.float64)
  if center:
    x = x - x.mean(axis=0)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  sim = x @ x.T
  clip = np.repeat(np.arange(len(embeddings)), [len(e) for e in embeddings])
  same = (clip[:, None] == clip[None, :]) & ~np.eye(len(clip), dtype=bool)
  other = clip[:, None] != clip[None, :]
  per_clip = np.array([sim[same & (clip[:, None] == i)].mean() -
                       sim[other & (clip[:, None] == i)].mean()
                       for i in range(len(embeddings))])
  return sim[same].mean(), sim[other].mean(), per_clip


def _by_hand(path, frames):
  """Reference: the raw interpreter, one frame at a time, dequantized with numpy."""
  interpreter = tf.lite.Interpreter(model_path=path)
  interpreter.allocate_tensors()
  inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
  scale, zero = out["quantization"]
  rows = []
  for frame in frames:
    interpreter.set_tensor(inp["index"], frame[None])
    interpreter.invoke()
    rows.append((interpreter.get_tensor(out["index"]).reshape(-1).astype(np.float64) - zero)
                * scale)
  return np.array(rows)


def test_tflite_mobilenet_matches_the_interpreter_by_hand(real_frames):
  """The uint8 MobileNet: size, dtype and quantization read from the file; batches of any
  size give what the interpreter gives frame by frame, dequantized."""
  path = mobilenet_path()
  emb = embedders.build_embedder(f"tflite:{path}")
  assert (emb.name, emb.dim, emb.image_size) == (f"tflite:{path}", 1024, 224)
  assert emb.fn.input["dtype"] == np.uint8 and emb.fn.output["dtype"] == np.uint8
  frames = np.concatenate([real_frames[GOLDEN_CLIPS[0]], real_frames[GOLDEN_CLIPS[1]][:3]])
  want = _by_hand(path, frames)
  assert want.max() > 1.0  # dequantized (the raw output is uint8 with scale 0.0235)
  for batch in (16, 4, 1):  # one batch of 9; 4 + 4 + 1 (the batch axis resized); one by one
    emb.batch_size = batch
    got = emb(frames)
    assert got.dtype == np.float32 and got.shape == (9, 1024)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  assert emb.fn.resizable
  mean, per_frame = emb.embed_clip(frames)
  np.testing.assert_allclose(mean, want.mean(axis=0), rtol=1e-5)


def test_tflite_mobilenet_golden_similarity_on_real_frames(real_frames):
  """Frames of one real clip are more alike than frames of different clips. Measured (8
  clips x 6 frames): within 0.824, across 0.467, margin 0.356; every clip's own margin at
  least 0.244 (all 30 clips x 8 frames: within 0.850, across 0.469)."""
  emb = embedders.build_embedder(f"tflite:{mobilenet_path()}")
  within, across, per_clip = _similarity([emb(real_frames[c]) for c in GOLDEN_CLIPS])
  print(f"MobileNet TFLite: within {within:.3f}, across {across:.3f}, margin "
        f"{within - across:.3f}, smallest per-clip margin {per_clip.min():.3f}")
  assert within - across > 0.2
  assert per_clip.min() > 0.1


def test_tflite_batch_refused_falls_back_to_frame_by_frame(real_frames):
  """A model whose batch axis cannot be resized runs frame by frame, with the same result."""
  emb = embedders.build_embedder(f"tflite:{mobilenet_path()}")
  frames = real_frames[GOLDEN_CLIPS[2]][:3]
  want = emb(frames)
  fresh = embedders.build_embedder(f"tflite:{mobilenet_path()}")
  resize = fresh.fn.interpreter.resize_tensor_input
  calls = []

  def refuse_batches(index, shape, strict=False):
    calls.append(int(shape[0]))
    if shape[0] != 1:
      raise RuntimeError("tensor shape is fixed")
    return resize(index, shape, strict)

  fresh.fn.interpreter.resize_tensor_input = refuse_batches
  np.testing.assert_allclose(fresh(frames), want, rtol=1e-6, atol=1e-6)
  assert not fresh.fn.resizable and calls == [3, 1]
  np.testing.assert_allclose(fresh(frames), want, rtol=1e-6, atol=1e-6)
  assert calls == [3, 1]  # remembered: no second attempt


def _convert(model_fn, size, quantize=None):
  """A TFLite file from a tf.function over [1, size, size, 3] float images in [0, 1];
  quantize: None (float32 in and out), tf.int8 or tf.uint8 (full integer)."""
  concrete = model_fn.get_concrete_function(tf.TensorSpec([1, size, size, 3], tf.float32))
  converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], model_fn)
  if quantize is not None:
    rng = np.random.default_rng(0)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: (
        [rng.integers(0, 256, [1, size, size, 3]).astype(np.float32) / 255] for _ in range(32))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = quantize
    converter.inference_output_type = quantize
  return converter.convert()


@pytest.fixture(scope="module")
def small_models(tmp_path_factory):
  """A conv net with a spatial output [1, 4, 4, 8] (pooled by the embedder), as float32,
  int8 and uint8 TFLite files, and the float reference function."""
  tmp = tmp_path_factory.mktemp("tflite_embedders")
  kernel = tf.constant(np.random.default_rng(1).normal(0, 0.3, [4, 4, 3, 8]), tf.float32)

  @tf.function
  def net(images):  # images in [0, 1] (the float convention)
    return tf.nn.relu(tf.nn.conv2d(images - 0.5, kernel, strides=4, padding="VALID"))

  paths = {}
  for name, quantize in (("float32", None), ("int8", tf.int8), ("uint8", tf.uint8)):
    paths[name] = str(tmp / f"{name}.tflite")
    with open(paths[name], "wb") as f:
      f.write(_convert(net, 16, quantize))
  return paths, net


@pytest.mark.parametrize("kind,tolerance", [("float32", 1e-5), ("int8", 0.06),
                                            ("uint8", 0.06)])
def test_tflite_float_int8_and_uint8_models(small_models, kind, tolerance):
  """Inputs follow each dtype's convention (float: RGB / 255; int8: pixel - 128; uint8: the
  pixel), the spatial output is average-pooled and the quantized output dequantized: every
  variant gives the float network's mean features, to the quantization error."""
  paths, net = small_models
  emb = embedders.build_embedder(f"tflite:{paths[kind]}")
  assert (emb.dim, emb.image_size) == (8, 16)
  frames = _frames(n=5, size=16, seed=3)
  want = tf.reduce_mean(net(tf.constant(frames / 255.0, tf.float32)), axis=[1, 2]).numpy()
  got = emb(frames)
  assert got.shape == (5, 8) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=tolerance * np.abs(want).max())
  # Frames of another size are resized to the model's: a flat colour stays that colour.
  flat = np.broadcast_to(np.array([200, 30, 90], np.uint8), [2, 48, 48, 3])
  np.testing.assert_allclose(emb(flat), emb(np.ascontiguousarray(flat[:, :16, :16])),
                             rtol=1e-6, atol=1e-6)


def test_bad_tflite_files_fail_in_one_line(tmp_path):
  """Missing, empty, text, truncated, or not an image feature-vector model: one line naming
  the file, from check_embedder and build_embedder alike (no interpreter crash)."""
  content = open(mobilenet_path(), "rb").read()
  (tmp_path / "empty.tflite").write_bytes(b"")
  (tmp_path / "text.tflite").write_text("not a model\n" * 10)
  (tmp_path / "half.tflite").write_bytes(content[:len(content) // 2])

  @tf.function
  def audio(waveform):
    return tf.reduce_mean(waveform, axis=1, keepdims=True)

  concrete = audio.get_concrete_function(tf.TensorSpec([1, 16000], tf.float32))
  (tmp_path / "audio.tflite").write_bytes(
      tf.lite.TFLiteConverter.from_concrete_functions([concrete], audio).convert())
  cases = {
      "missing.tflite": (FileNotFoundError, "TFLite frame embedder not found: "),
      "empty.tflite": (ValueError, "empty file \\(0 bytes\\), not a TFLite model"),
      "text.tflite": (ValueError, "not a TFLite model \\(no TFL3 file identifier"),
      "half.tflite": (ValueError, "truncated"),
      "audio.tflite": (ValueError, "not an image feature-vector model: expected one input "
                                   "\\[1, height, width, 3\\].*\\[1, 16000\\]"),
  }
  for name, (error, pattern) in cases.items():
    path = str(tmp_path / name)
    for call in (embedders.check_embedder, embedders.build_embedder):
      with pytest.raises(error, match=pattern) as raised:
        call(f"tflite:{path}")
      assert path in str(raised.value) and "\n" not in str(raised.value), name
  with pytest.raises(ValueError, match="Unknown frame embedder"):
    embedders.check_embedder("tflite:")
  embedders.check_embedder(f"tflite:{mobilenet_path()}")


def test_resnet152_local_weights_file_on_real_frames(real_frames, tmp_path):
  """--embedder_weights=<local .h5> (the format of Keras' downloaded ImageNet file): the
  embedder computes with the file's weights, and on real frames (64 px, random weights)
  frames of one clip are more alike than frames of different clips once the common
  direction is removed. Measured (5 clips x 4 frames, seed 7): centred within 0.915, across
  -0.196, margin 1.111; other seeds and frames: 0.546 (64 px), 0.692 (112 px), 0.786
  (224 px)."""
  import keras  # pylint: disable=g-import-not-at-top
  keras.utils.set_random_seed(7)
  model = keras.applications.ResNet152(include_top=False, weights=None, pooling="avg",
                                       input_shape=(64, 64, 3))
  path = str(tmp_path / "resnet152_random_notop.h5")
  model.save(path)  # legacy HDF5, as keras.applications' weight files
  emb = embedders.build_embedder("resnet152", weights=path, image_size=64)
  clips = [tf.cast(tf.round(tf.image.resize(real_frames[c][:4], [64, 64], antialias=True)),
                   tf.uint8).numpy() for c in GOLDEN_CLIPS[:5]]
  got = [emb(f) for f in clips]
  want = model(keras.applications.resnet.preprocess_input(
      clips[0].astype(np.float32)), training=False).numpy()
  # The embedder's own initial weights came later from the seeded generator, so they
  # differ from the file's: equal outputs mean the file was loaded.
  np.testing.assert_allclose(got[0], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  within, across, per_clip = _similarity(got, center=True)
  print(f"ResNet-152 (random weights from {path}), centred: within {within:.3f}, across "
        f"{across:.3f}, margin {within - across:.3f}")
  assert within - across > 0.3


def test_launcher_probe_is_not_repeated_in_workers(tmp_path, monkeypatch):
  """A URL the launcher's check found reachable is remembered in the environment, so the
  check build_embedder runs in each worker (a child process) makes no second probe."""
  monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))  # weights not cached
  monkeypatch.setenv(embedders.REACHABLE_ENV, "")
  probes = []
  monkeypatch.setattr(embedders, "_reachable",
                      lambda url, timeout: probes.append(url) or True)
  embedders.check_embedder("resnet152")
  embedders.check_embedder("resnet152")
  assert probes == [embedders.RESNET152_WEIGHTS_URL]  # asked once
  assert os.environ[embedders.REACHABLE_ENV] == embedders.RESNET152_WEIGHTS_URL
  child = subprocess.run(
      [sys.executable, "-c",
       "from av_sound_tf.core import embedders\n"
       "def no_probe(url, timeout): raise AssertionError('probed ' + url)\n"
       "embedders._reachable = no_probe\n"
       "embedders.check_embedder('resnet152')\n"
       "print('no probe')"],
      capture_output=True, text=True, env=dict(os.environ), timeout=300)
  assert child.returncode == 0 and "no probe" in child.stdout, child.stderr[-2000:]
  monkeypatch.setattr(embedders, "_reachable",
                      lambda url, timeout: probes.append(url) or False)
  with pytest.raises(ValueError, match="cannot be reached"):  # not remembered: asked again
    embedders.check_embedder("hub:https://example.invalid/m")
  assert probes[-1] == "https://example.invalid/m"
