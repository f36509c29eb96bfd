"""Loading `.keras` model files safely, with errors that name the file.

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


def load_keras_model(path: str, what: str = "Model") -> keras.Model:
  """`keras.models.load_model(path, safe_mode=True)` with clear errors naming `path`.

  Raises FileNotFoundError (``<what> not found: <path>``), UnsafeModelError (a ValueError:
  the model contains Python code) or ValueError (not a readable model file).
  """
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(f"{what} not found: {path}")
  reason = files.not_regular_file_reason(path)
  if reason:  # a FIFO would block the zip reader forever
    raise ValueError(f"{path}: {reason}, not a .keras model file")
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
