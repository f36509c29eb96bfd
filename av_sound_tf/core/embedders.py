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
* ``tflite:<path>``: any TFLite image feature-vector model (e.g. the uint8 MobileNet v1
  embedding extractor, 1024-d). Its input size, dtype and quantization are read from the
  model: uint8 inputs take the RGB pixels as they are, int8 inputs the pixels minus 128
  (the quantized image convention: the quantization parameters map them onto whatever
  range the network was trained on), float inputs RGB in [0, 1] (the TF-Hub convention).
  Frames of another size are resized (bilinear, antialiased) to the model's. The output is
  dequantized with its scale and zero point and average-pooled over any spatial axes to one
  vector per frame. Frames go through in batches when the model lets its batch axis be
  resized, else one by one. The interpreter is built once per `FrameEmbedder` (one per
  worker) with the worker's thread count (TensorFlow's intra-op setting, else all cores).
* ``color_layout``: a fixed, weight-free descriptor (256-d): the frame averaged to an 8 x 8
  RGB thumbnail (192 values, the MPEG-7 "colour layout" idea) plus a 4 x 4 x 4 RGB colour
  histogram (64 values). It needs no download, costs well under a millisecond per frame
  (docs/benchmarks.md), and carries real visual signal (colour, position, coarse shape):
  the embedded demo data set uses it where ImageNet weights cannot be downloaded. It is no
  substitute for ResNet-152 on real video.

The per-clip bag vector is the mean of the frame embeddings (`embed_clip`).

`check_embedder(spec, weights)` finds, in milliseconds and without building anything, what
would stop `build_embedder`: an unknown name, a missing local weights file or TF-Hub folder,
ImageNet weights that are neither in Keras' cache nor downloadable (no network), a TFLite
file that is missing, damaged or not an image feature-vector model. Its error is one line
naming the embedder or the file; `build_embedder` runs it first, and the binaries run it
before any clip. A URL the probe found reachable is remembered in the environment
(``AV_SOUND_TF_REACHABLE_URLS``), so the preparation workers, child processes of the
launcher that already probed, do not probe again.
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

from av_sound_tf.core import model_files


@dataclasses.dataclass
class FrameEmbedder:
  """Maps uint8 RGB frames [n, size, size, 3] to float32 embeddings [n, dim].

  `fn` takes a uint8 batch (numpy) and returns a tensor or an array [batch, dim].
  """

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
        np.asarray(self.fn(frames[i:i + self.batch_size]))
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
# URLs a probe found reachable, space-separated; child processes (the preparation workers)
# inherit it and skip the probe their launcher already made.
REACHABLE_ENV = "AV_SOUND_TF_REACHABLE_URLS"


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


def _probe(url: str, timeout: float) -> bool:
  """`_reachable`, asked once per process tree: a URL found reachable is remembered in
  REACHABLE_ENV (inherited by the workers); an unreachable one is asked again next time."""
  known = os.environ.get(REACHABLE_ENV, "").split()
  if url in known:
    return True
  if not _reachable(url, timeout):
    return False
  os.environ[REACHABLE_ENV] = " ".join(known + [url])
  return True


def _check_resnet152_weights(weights: Optional[str], timeout: float):
  weights = weights or "imagenet"
  if weights == "none":
    return
  if weights == "imagenet":
    if not _keras_cached(RESNET152_WEIGHTS_FILE) and not _probe(RESNET152_WEIGHTS_URL,
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
    if not cached and not _probe(path, timeout):
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
    bins = tf.cast(tf.bitwise.right_shift(frames, 6), tf.int32)  # 4 bins per channel
    index = bins[..., 0] * 16 + bins[..., 1] * 4 + bins[..., 2]
    counts = tf.math.bincount(tf.reshape(index, [tf.shape(frames)[0], -1]), minlength=64,
                              maxlength=64, dtype=tf.float32, axis=-1)  # [n, 64]
    return tf.concat([thumb, counts / float(image_size * image_size)], axis=-1)

  return FrameEmbedder("color_layout", grid * grid * 3 + 64, image_size, fn)


# ---- tflite:<path> ------------------------------------------------------------------------

_TFLITE_INPUT_DTYPES = (np.uint8, np.int8, np.float32)


def _dequantize(values: np.ndarray, detail: dict) -> np.ndarray:
  """Real values of a quantized output (per tensor or per channel); floats pass through."""
  if detail["dtype"] == np.float32:
    return values.astype(np.float32)
  q = detail["quantization_parameters"]
  scales, zeros = q["scales"], q["zero_points"]
  if scales.size == 0:  # integer output without quantization: take the integers
    return values.astype(np.float32)
  shape = [1] * values.ndim
  if scales.size > 1:
    shape[q["quantized_dimension"]] = -1
  return ((values.astype(np.float32) - zeros.reshape(shape)) * scales.reshape(shape)
          ).astype(np.float32)


class TFLiteFrames:
  """A TFLite image feature-vector model as a frame function: uint8 frames [n, h, w, 3]
  -> float32 [n, dim] (see the module docstring for the input and output conventions).

  Raises FileNotFoundError or ValueError, one line naming the file, for a missing file, a
  damaged flatbuffer, or a model that is not an image feature-vector model (one input
  [1, height, width, 3] of uint8, int8 or float32; one output [1, ..., dim]).
  """

  def __init__(self, path: str, num_threads: Optional[int] = None):
    content = model_files.read_tflite_file(path, "TFLite frame embedder")
    if num_threads is None:  # the worker's setting (1 in preparation workers), else all
      num_threads = tf.config.threading.get_intra_op_parallelism_threads() or os.cpu_count()
    try:
      self.interpreter = tf.lite.Interpreter(model_content=content, num_threads=num_threads)
    except (ValueError, RuntimeError) as e:
      raise ValueError(f"{path}: the TFLite interpreter refuses it: "
                       f"{str(e).splitlines()[0][:200]}") from None
    inputs = self.interpreter.get_input_details()
    outputs = self.interpreter.get_output_details()
    shape = inputs[0]["shape"] if len(inputs) == 1 else []
    if (len(inputs) != 1 or len(shape) != 4 or shape[-1] != 3
        or inputs[0]["dtype"] not in _TFLITE_INPUT_DTYPES):
      raise ValueError(
          f"{path}: not an image feature-vector model: expected one input [1, height, width, "
          f"3] of uint8, int8 or float32. Received: "
          f"{[(list(d['shape']), np.dtype(d['dtype']).name) for d in inputs]}")
    if (len(outputs) != 1 or len(outputs[0]["shape"]) < 2
        or outputs[0]["dtype"] not in _TFLITE_INPUT_DTYPES):
      raise ValueError(
          f"{path}: not an image feature-vector model: expected one output [1, ..., dim]. "
          f"Received: {[(list(d['shape']), np.dtype(d['dtype']).name) for d in outputs]}")
    self.path = path
    self.input, self.output = inputs[0], outputs[0]
    self.height, self.width = int(shape[1]), int(shape[2])
    self.dim = int(outputs[0]["shape"][-1])
    self.batch = None  # the batch size the tensors are allocated for
    self.resizable = True  # until the interpreter refuses a batch axis other than 1

  def _allocate(self, n: int) -> int:
    """Allocates the tensors for a batch of `n` frames where the model lets its batch axis
    be resized, else for one frame; returns the batch size allocated."""
    n = n if self.resizable else 1
    if n == self.batch:
      return n
    try:
      self.interpreter.resize_tensor_input(self.input["index"],
                                           [n, self.height, self.width, 3])
      self.interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as e:
      self.batch = None
      if n == 1:
        raise ValueError(f"{self.path}: the TFLite interpreter cannot allocate the model: "
                         f"{str(e).splitlines()[0][:200]}") from None
      self.resizable = False
      return self._allocate(1)
    self.batch = n
    return n

  def _to_input(self, frames: np.ndarray) -> np.ndarray:
    if frames.shape[1:3] != (self.height, self.width):
      frames = tf.cast(tf.round(tf.clip_by_value(tf.image.resize(
          frames, [self.height, self.width], antialias=True), 0, 255)), tf.uint8).numpy()
    dtype = self.input["dtype"]
    if dtype == np.uint8:
      return np.ascontiguousarray(frames)
    if dtype == np.int8:
      return (frames.astype(np.int16) - 128).astype(np.int8)
    return frames.astype(np.float32) / 255.0

  def _run(self, x: np.ndarray) -> np.ndarray:
    self.interpreter.set_tensor(self.input["index"], x)
    self.interpreter.invoke()
    out = _dequantize(self.interpreter.get_tensor(self.output["index"]), self.output)
    return out.reshape(x.shape[0], -1, self.dim).mean(axis=1)  # pool any spatial axes

  def __call__(self, frames) -> np.ndarray:
    x = self._to_input(np.asarray(frames, np.uint8))
    if self._allocate(x.shape[0]) == x.shape[0]:
      return self._run(x)
    return np.concatenate([self._run(x[i:i + 1]) for i in range(x.shape[0])])


def _tflite(path: str) -> FrameEmbedder:
  frames = TFLiteFrames(path)
  # Measured on the MobileNet v1 embedder (benchmarks/embedder_benchmark.py): batches of 16
  # and frame-by-frame cost the same per frame; 16 bounds the activations' memory.
  return FrameEmbedder(f"tflite:{path}", frames.dim, max(frames.height, frames.width),
                       frames, batch_size=16)


EMBEDDERS = ("resnet152", "hub:<path>", "tflite:<path>", "tiny", "color_layout")


def build_embedder(spec: str = "resnet152", weights: Optional[str] = None,
                   image_size: int = 224) -> FrameEmbedder:
  """Builds a frame embedder from its name (see the module docstring).

  Args:
    spec: ``resnet152``, ``hub:<module path or URL>``, ``tflite:<path>``, ``tiny`` or
      ``color_layout``.
    weights: for ``resnet152``: ``imagenet`` (default), ``none``, or a local weights file.
    image_size: square input size the frames are cropped to (``tflite:`` embedders take
      the model's own size, and resize frames of another size to it).
  """
  if spec.startswith("tflite:") and len(spec) > len("tflite:"):
    return _tflite(spec[len("tflite:"):])  # checks the file as it reads it, once
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
    ValueError: an unknown embedder, an image size color_layout cannot use, weights or
      a module that need an unreachable download, or a TFLite file that is damaged or not
      an image feature-vector model.
    FileNotFoundError: a local weights file, TF-Hub folder or TFLite file that does not
      exist.
  """
  if spec == "resnet152":
    _check_resnet152_weights(weights, timeout)
  elif spec.startswith("hub:") and len(spec) > len("hub:"):
    _check_hub(spec[len("hub:"):], timeout)
  elif spec.startswith("tflite:") and len(spec) > len("tflite:"):
    TFLiteFrames(spec[len("tflite:"):], num_threads=1)  # reads and checks; no tensors
  elif spec == "color_layout":
    if image_size % _COLOR_GRID:
      raise ValueError(f"color_layout needs image_size divisible by {_COLOR_GRID}. "
                       f"Received: image_size={image_size}")
  elif spec != "tiny":
    raise ValueError(f"Unknown frame embedder. Expected one of {EMBEDDERS}. Received: "
                     f"{spec!r}")
