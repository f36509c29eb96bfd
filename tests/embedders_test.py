"""Frame embedders: shapes, the clip mean, determinism, local weights and TF-Hub modules."""

import numpy as np
import pytest
import tensorflow as tf

from av_sound_tf.core import embedders


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
