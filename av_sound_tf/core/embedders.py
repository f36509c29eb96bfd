"""Frame embedders: one vector per video frame (paper Sec. 3.2: ResNet-152 on ImageNet).

`build_embedder(spec)` returns a `FrameEmbedder`, whatever the backbone:

* ``resnet152``: ``keras.applications.ResNet152`` without its top, global average
  pooled: 2048-d. Weights: ``imagenet`` (downloaded by Keras where there is internet) or a
  local ``.h5``/``.weights.h5`` file (``weights=/path/...``); ``none`` gives random weights
  (for tests only: the embeddings then carry no meaning).
* ``hub:<path or URL>``: any TF-Hub image feature-vector module (a SavedModel directory),
  called on float images in [0, 1] as the TF-Hub image convention requires.
* ``tiny``: a small fixed-seed random ConvNet (32-d). It exists so that tests and quick
  runs exercise the whole visual path in milliseconds; it is not a visual model.
* ``color_layout``: a fixed, weight-free descriptor (256-d): the frame averaged to an 8 x 8
  RGB thumbnail (192 values, the MPEG-7 "colour layout" idea) plus a 4 x 4 x 4 RGB colour
  histogram (64 values). It needs no download and runs in microseconds per frame, and it
  carries real visual signal (colour, position, coarse shape): the embedded demo data set
  uses it where ImageNet weights cannot be downloaded. It is no substitute for ResNet-152
  on real video.

The per-clip bag vector is the mean of the frame embeddings (`embed_clip`).

`check_embedder(spec, weights)` finds, in milliseconds and without building anything, what
would stop `build_embedder`: an unknown name, a missing local weights file or TF-Hub folder,
ImageNet weights that are neither in Keras' cache nor downloadable (no network). Its error
is one line naming the embedder or the weights; `build_embedder` runs it first, and the
binaries run it before any clip.
"""

import dataclasses
import hashlib
import os
import socket
import tempfile
import urllib.parse
from typing import Callable, Optional

import keras
import numpy as np
import tensorflow as tf


@dataclasses.dataclass
class FrameEmbedder:
  """Maps uint8 RGB frames [n, size, size, 3] to float32 embeddings [n, dim]."""

  name: str
  dim: int
  image_size: int
  fn: Callable[[tf.Tensor], tf.Tensor]
  batch_size: int = 16

  def __call__(self, frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
      raise ValueError(f"Expected frames [n, h, w, 3]. Received: shape={frames.shape}")
    outputs = [
        self.fn(tf.constant(frames[i:i + self.batch_size])).numpy()
        for i in range(0, frames.shape[0], self.batch_size)
    ]
    return np.concatenate(outputs).astype(np.float32)

  def embed_clip(self, frames: np.ndarray):
    """Returns (mean embedding [dim], per-frame embeddings [n, dim])."""
    per_frame = self(frames)
    return per_frame.mean(axis=0), per_frame


# Where keras.applications.ResNet152(include_top=False, weights="imagenet") gets its weights,
# and the name Keras caches them under (<KERAS_HOME or ~/.keras>/models/<name>).
RESNET152_WEIGHTS_FILE = "resnet152_weights_tf_dim_ordering_tf_kernels_notop.h5"
RESNET152_WEIGHTS_URL = ("https://storage.googleapis.com/tensorflow/keras-applications/resnet/"
                         + RESNET152_WEIGHTS_FILE)
NETWORK_TIMEOUT_SECONDS = 5.0


def _keras_cached(name: str) -> bool:
  """Whether Keras' get_file would find `name` in its cache (it falls back to /tmp/.keras
  where the Keras home is not writable)."""
  home = os.path.expanduser(os.environ.get("KERAS_HOME", os.path.join("~", ".keras")))
  return any(os.path.isfile(os.path.join(base, "models", name))
             for base in (home, os.path.join("/tmp", ".keras")))


def _reachable(url: str, timeout: float) -> bool:
  """A TCP connection to the URL's host opens within `timeout` seconds (never hangs)."""
  parsed = urllib.parse.urlparse(url)
  port = parsed.port or (443 if parsed.scheme == "https" else 80)
  try:
    with socket.create_connection((parsed.hostname, port), timeout=timeout):
      return True
  except (OSError, ValueError):
    return False


def _check_resnet152_weights(weights: Optional[str], timeout: float):
  weights = weights or "imagenet"
  if weights == "none":
    return
  if weights == "imagenet":
    if not _keras_cached(RESNET152_WEIGHTS_FILE) and not _reachable(RESNET152_WEIGHTS_URL,
                                                                     timeout):
      raise ValueError(
          f"ResNet-152 ImageNet weights are not in Keras' cache and {RESNET152_WEIGHTS_URL} "
          "cannot be reached (no network?): download that file elsewhere and pass it with "
          "--embedder_weights=/path/to/" + RESNET152_WEIGHTS_FILE)
    return
  if not tf.io.gfile.exists(weights) or tf.io.gfile.isdir(weights):
    raise FileNotFoundError(f"ResNet-152 weights file not found: {weights}")


def _check_hub(path: str, timeout: float):
  if urllib.parse.urlparse(path).scheme in ("http", "https"):
    cache = os.environ.get("TFHUB_CACHE_DIR",
                           os.path.join(tempfile.gettempdir(), "tfhub_modules"))
    cached = os.path.isdir(os.path.join(cache, hashlib.sha1(path.encode()).hexdigest()))
    if not cached and not _reachable(path, timeout):
      raise ValueError(f"TF-Hub module {path} cannot be reached (no network?) and is not in "
                       f"the TF-Hub cache {cache}: use --embedder=hub:<local SavedModel folder>")
    return
  if not tf.io.gfile.exists(tf.io.gfile.join(path, "saved_model.pb")):
    raise FileNotFoundError(f"TF-Hub module not found: {path} (no saved_model.pb there)")


def _resnet152(weights: Optional[str], image_size: int) -> FrameEmbedder:
  weights = weights or "imagenet"
  model = keras.applications.ResNet152(
      include_top=False, weights="imagenet" if weights == "imagenet" else None,
      pooling="avg", input_shape=(image_size, image_size, 3))
  if weights not in ("imagenet", "none"):
    model.load_weights(weights)

  @tf.function(input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.uint8)])
  def fn(frames):
    x = keras.applications.resnet.preprocess_input(tf.cast(frames, tf.float32))
    return model(x, training=False)

  return FrameEmbedder("resnet152", 2048, image_size, fn)


def _hub(path: str, image_size: int) -> FrameEmbedder:
  import tensorflow_hub as hub  # imported here: only this embedder needs it

  module = hub.load(path)

  @tf.function(input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.uint8)])
  def fn(frames):
    return module(tf.cast(frames, tf.float32) / 255.0)

  dim = int(fn(tf.zeros([1, image_size, image_size, 3], tf.uint8)).shape[-1])
  return FrameEmbedder(f"hub:{path}", dim, image_size, fn)


def _tiny(image_size: int) -> FrameEmbedder:
  init = lambda seed: keras.initializers.HeNormal(seed=seed)
  inputs = keras.Input([image_size, image_size, 3])
  x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
  x = keras.layers.Conv2D(16, 5, strides=4, activation="relu", kernel_initializer=init(1))(x)
  x = keras.layers.Conv2D(32, 3, strides=2, activation="relu", kernel_initializer=init(2))(x)
  x = keras.layers.GlobalAveragePooling2D()(x)
  model = keras.Model(inputs, x, name="tiny_frame_embedder")

  @tf.function(input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.uint8)])
  def fn(frames):
    return model(tf.cast(frames, tf.float32), training=False)

  return FrameEmbedder("tiny", 32, image_size, fn)


_COLOR_GRID = 8  # color_layout's thumbnail: 8 x 8 cells, so image_size must divide by 8


def _color_layout(image_size: int) -> FrameEmbedder:
  grid = _COLOR_GRID  # image_size checked by check_embedder

  @tf.function(input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.uint8)])
  def fn(frames):
    x = tf.cast(frames, tf.float32) / 255.0
    thumb = tf.nn.avg_pool2d(x, image_size // grid, image_size // grid, "VALID")
    thumb = tf.reshape(thumb, [-1, grid * grid * 3])  # [n, 192]
    bins = tf.cast(tf.minimum(tf.cast(frames, tf.int32) // 64, 3), tf.int32)  # 4 per channel
    index = bins[..., 0] * 16 + bins[..., 1] * 4 + bins[..., 2]
    hist = tf.reduce_mean(tf.one_hot(tf.reshape(index, [tf.shape(frames)[0], -1]), 64),
                          axis=1)  # [n, 64], sums to 1
    return tf.concat([thumb, hist], axis=-1)

  return FrameEmbedder("color_layout", grid * grid * 3 + 64, image_size, fn)


EMBEDDERS = ("resnet152", "hub:<path>", "tiny", "color_layout")


def build_embedder(spec: str = "resnet152", weights: Optional[str] = None,
                   image_size: int = 224) -> FrameEmbedder:
  """Builds a frame embedder from its name (see the module docstring).

  Args:
    spec: ``resnet152``, ``hub:<module path or URL>``, ``tiny`` or ``color_layout``.
    weights: for ``resnet152``: ``imagenet`` (default), ``none``, or a local weights file.
    image_size: square input size the frames are cropped to.
  """
  check_embedder(spec, weights, image_size)  # refuses every name not handled below
  if spec == "resnet152":
    return _resnet152(weights, image_size)
  if spec.startswith("hub:"):
    return _hub(spec[len("hub:"):], image_size)
  if spec == "tiny":
    return _tiny(image_size)
  return _color_layout(image_size)


def check_embedder(spec: str = "resnet152", weights: Optional[str] = None,
                   image_size: int = 224,
                   timeout: float = NETWORK_TIMEOUT_SECONDS) -> None:
  """Raises (one line naming the embedder or its weights) when `build_embedder` would fail
  for want of a name, a file or the network; builds nothing and waits at most `timeout`
  seconds for a network probe (only when ImageNet weights or a hub URL are not cached).

  Raises:
    ValueError: an unknown embedder, an image size color_layout cannot use, or weights or
      a module that need an unreachable download.
    FileNotFoundError: a local weights file or TF-Hub folder that does not exist.
  """
  if spec == "resnet152":
    _check_resnet152_weights(weights, timeout)
  elif spec.startswith("hub:") and len(spec) > len("hub:"):
    _check_hub(spec[len("hub:"):], timeout)
  elif spec == "color_layout":
    if image_size % _COLOR_GRID:
      raise ValueError(f"color_layout needs image_size divisible by {_COLOR_GRID}. "
                       f"Received: image_size={image_size}")
  elif spec != "tiny":
    raise ValueError(f"Unknown frame embedder. Expected one of {EMBEDDERS}. Received: "
                     f"{spec!r}")
