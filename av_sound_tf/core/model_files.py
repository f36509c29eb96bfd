"""Loading model files safely, with errors that name the file.

`.tflite` files: `read_tflite_file` / `check_tflite_flatbuffer` verify the flatbuffer before
any interpreter sees it (the interpreter does not, and crashes the process on a truncated
file). Used by the frame embedders (core) and the TFLite taggers (serving/tflite.py, which
adds the metadata's packed label files).

`.keras` files:

Every model file the project reads goes through `load_keras_model`: Keras **safe mode** is
always on, so a file that carries Python code (a ``Lambda`` layer's bytecode, a serialized
``lambda``) is refused instead of run. Keras's own refusal names neither the file nor the
layer clearly (``The `{arg_name}` of this `Lambda` layer ...``); here it becomes one line:

  evil.keras: refused to load: the model contains Python code (a Lambda layer), ...

The project's own layers are registered Keras classes and load without code. Import the
modules that define them (av_sound_tf.models, .fusion, ...) before loading, as every caller
does.
"""

import zipfile

import keras
import tensorflow as tf

from av_sound_tf.core import files


class UnsafeModelError(ValueError):
  """A model file that would run Python code when loaded (refused by safe mode)."""


def _first_line(error: Exception) -> str:
  text = str(error).strip() or type(error).__name__
  return text.splitlines()[0][:300]


def check_readable(path: str, what: str, kind: str):
  """Raises FileNotFoundError (``<what> not found: <path>``) for a missing path, ValueError
  (``<path>: <reason>, not <kind>``) for a folder, FIFO or other non-regular file (a FIFO
  would block the reader forever)."""
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(f"{what} not found: {path}")
  reason = files.not_regular_file_reason(path)
  if reason:
    raise ValueError(f"{path}: {reason}, not {kind}")


def check_tflite_flatbuffer(content: bytes, path: str = "<bytes>"):
  """Raises ValueError naming `path` unless `content` is a whole TFLite flatbuffer.

  The file identifier ``TFL3`` (bytes 4-8), then a complete parse with the schema's generated
  Python reader, whose every read is bounds checked, and every external buffer (offset, size)
  inside the file.
  """
  if not content:
    raise ValueError(f"{path}: empty file (0 bytes), not a TFLite model")
  if len(content) < 8 or content[4:8] != b"TFL3":
    raise ValueError(f"{path}: not a TFLite model (no TFL3 file identifier at bytes 4-8; "
                     f"{len(content)} bytes)")
  from tensorflow.lite.python import schema_py_generated as schema_fb  # pylint: disable=g-import-not-at-top
  try:
    model = schema_fb.ModelT.InitFromObj(schema_fb.Model.GetRootAsModel(content, 0))
  except Exception:  # pylint: disable=broad-except  (struct.error, IndexError, ...)
    raise ValueError(f"{path}: truncated or damaged TFLite model: its flatbuffer does not "
                     f"parse within the file's {len(content)} bytes") from None
  for i, buffer in enumerate(model.buffers or []):
    if buffer.offset and buffer.offset + buffer.size > len(content):
      raise ValueError(f"{path}: truncated TFLite model: buffer {i} ends at byte "
                       f"{buffer.offset + buffer.size} of {len(content)}")
  if not model.subgraphs:
    raise ValueError(f"{path}: damaged TFLite model: no subgraph")


def read_tflite_file(path: str, what: str = "TFLite model", check=check_tflite_flatbuffer
                     ) -> bytes:
  """The bytes of a .tflite file, checked by `check(content, path)` before any interpreter
  sees them; FileNotFoundError / ValueError naming the file otherwise."""
  check_readable(path, what, "a TFLite model")
  with tf.io.gfile.GFile(path, "rb") as f:
    content = f.read()
  check(content, path)
  return content


def load_keras_model(path: str, what: str = "Model") -> keras.Model:
  """`keras.models.load_model(path, safe_mode=True)` with clear errors naming `path`.

  Raises FileNotFoundError (``<what> not found: <path>``), UnsafeModelError (a ValueError:
  the model contains Python code) or ValueError (not a readable model file).
  """
  check_readable(path, what, "a .keras model file")
  try:
    return keras.models.load_model(path, safe_mode=True)
  except (TypeError, OSError, KeyError, zipfile.BadZipFile) as e:
    raise ValueError(f"{path}: cannot load the model: {_first_line(e)}") from e
  except ValueError as e:
    text = str(e)
    if "safe_mode=False" in text:  # Keras's refusals of a Lambda layer / a lambda object
      kind = "a Lambda layer" if "`Lambda` layer" in text else "a serialized Python lambda"
      raise UnsafeModelError(
          f"{path}: refused to load: the model contains Python code ({kind}), which Keras "
          "safe mode does not run. Load only models you trust; rebuild this one without "
          "Lambda layers (use a registered Keras layer).") from None
    if text.startswith(("File not found", "File format not supported")):
      # Keras says "File not found" for a damaged zip although the file is there.
      raise ValueError(f"{path}: not a readable .keras model file (a zip archive written "
                       "by model.save; legacy .h5 also loads)") from None
    raise ValueError(f"{path}: cannot load the model: {_first_line(e)}") from e
