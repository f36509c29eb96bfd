"""TFLite Model Metadata of the on-device tagger, written with MediaPipe's metadata writers.

`tflite.convert` puts metadata on every tagger it writes (float32, float16, int8, and the
distilled student, which bin/export converts through the same function) with `write`:

* model: name and description (window length, sample rate, variant).
* input ``waveform`` [1, samples]: content ``AudioProperties`` (sample_rate 16000,
  channels 1), the description giving the window length in seconds and samples.
* output ``clip_scores`` [1, C]: a classification head (scores in [0, 1]) with the class map
  packed as two ``TENSOR_AXIS_LABELS`` associated files, line i = class i: ``labels.txt``
  (the MIDs; MediaPipe's ``category_name``) and ``labels_en.txt`` (the display names,
  locale ``en``; MediaPipe's ``display_name``). This is the labels-first-then-locales
  layout of the writer's own ``Labels`` helper.
* output ``segment_scores`` [1, segments, C]: described, unlabelled (one MIL segment per
  0.32 s of the window; a 1 s window has one, equal to the clip scores).

MediaPipe's ``AudioClassifier`` reports one classification head per output tensor: the
tagger's scores are the head whose ``head_name`` is ``clip_scores`` (tests/metadata_test.py
runs it on an ESC-10 recording). The ``segment_scores`` head has no labels; for a window
longer than 1 s MediaPipe flattens its [segments, C] scores into segments x C categories
(checked with a 3 s window: 70 categories for 7 segments of 10 classes).

Why MediaPipe 0.10.21 (`REQUIREMENT`): the TFLite Support writers (tflite-support 0.4.4,
the last release) need protobuf < 4, and the pinned stack has protobuf >= 4.21. MediaPipe
0.10.30 and later (the ctypes rewrite; checked 0.10.35, 1.0.0, 1.2.3) ship a
``metadata.py`` that imports ``_pywrap_metadata_version``, a module their wheels no longer
contain, so no metadata can be written or read with them. 0.10.21 is the last release whose
writers work, and it resolves with every pin in one pip call (it adds jax, jaxlib,
opencv-contrib-python, sentencepiece, sounddevice). Being heavy, it is the ``tflite`` extra
(``pip install .[tflite]``; requirements.txt, hence `make install`, includes it): `convert`
refuses to start without it (`check_available`), so no tagger is written without metadata.

Reading (`read_label_map`, for bin/tag --tflite) uses the library's ``MetadataDisplayer``;
a model without metadata (written before it existed) returns None and the caller falls back
to the ``<name>.labels.csv`` sidecar. `has_metadata` needs only TensorFlow.
"""

import io
import json
import zipfile
import zlib
from typing import Optional

from av_sound_tf.core import labels as labels_lib

REQUIREMENT = "mediapipe==0.10.21"
INSTALL_HINT = ("pip install 'av-sound-tf[tflite]' (or `make install`, which installs "
                "requirements.txt)")
METADATA_NAME = b"TFLITE_METADATA"  # the model's metadata entry the writer adds
MIDS_FILE = "labels.txt"  # one MID per line: category_name
NAMES_FILE = "labels_en.txt"  # one display name per line, locale en: display_name
NAMES_LOCALE = "en"
INPUT, CLIP, SEGMENTS = "waveform", "clip_scores", "segment_scores"


class MissingLibraryError(ImportError, ValueError):
  """The metadata library (`REQUIREMENT`) is not installed. A ValueError too, so that a
  binary reports it as one line (`cli.run`)."""


def _library():
  """MediaPipe's metadata modules, or MissingLibraryError with the install line."""
  try:
    from mediapipe.tasks.metadata import metadata_schema_py_generated as metadata_fb  # pylint: disable=g-import-not-at-top
    from mediapipe.tasks.python.metadata import metadata  # pylint: disable=g-import-not-at-top
    from mediapipe.tasks.python.metadata.metadata_writers import metadata_info  # pylint: disable=g-import-not-at-top
    from mediapipe.tasks.python.metadata.metadata_writers import metadata_writer  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise MissingLibraryError(
        f"TFLite metadata needs {REQUIREMENT} ({e}); install it with {INSTALL_HINT}"
        ) from None
  return metadata_fb, metadata, metadata_info, metadata_writer


def check_available():
  """Raises MissingLibraryError (one line, with the install command) unless the metadata
  writer can be imported. `tflite.convert` calls it before any work."""
  _library()


def _model(content: bytes):
  from tensorflow.lite.python import schema_py_generated as schema_fb  # pylint: disable=g-import-not-at-top
  return schema_fb.ModelT.InitFromObj(schema_fb.Model.GetRootAsModel(content, 0))


def has_metadata(content: bytes) -> bool:
  """Whether a (checked) TFLite flatbuffer carries TFLite Model Metadata."""
  from tensorflow.lite.python import schema_py_generated as schema_fb  # pylint: disable=g-import-not-at-top
  model = schema_fb.Model.GetRootAsModel(content, 0)
  return any(model.Metadata(i).Name() == METADATA_NAME for i in range(model.MetadataLength()))


def _signature_tensors(content: bytes, path: str) -> dict:
  """{signature name: (tensor name in the subgraph, shape, TFLite type)} of the tagger."""
  model = _model(content)
  if not model.signatureDefs or not model.subgraphs:
    raise ValueError(f"{path}: no signature: not a TFLite tagger from tflite.convert")
  signature = model.signatureDefs[0]
  tensors = model.subgraphs[signature.subgraphIndex].tensors
  found = {}
  for t in list(signature.inputs or []) + list(signature.outputs or []):
    tensor = tensors[t.tensorIndex]
    found[t.name.decode()] = (tensor.name.decode(), [int(d) for d in tensor.shape],
                              tensor.type)
  missing = {INPUT, CLIP, SEGMENTS} - set(found)
  if missing:
    raise ValueError(f"{path}: not a TFLite tagger from tflite.convert: its signature lacks "
                     f"{sorted(missing)} (has {sorted(found)})")
  return found


def _check_names(label_map, path):
  for what, values in (("MID", label_map.mids), ("display name", label_map.names)):
    for i, v in enumerate(values):
      if not v or "\n" in v or "\r" in v:
        raise ValueError(f"{path}: class {i}: {what} {v!r} cannot go into a one-label-per-"
                         "line metadata label file (empty, or has a line break)")


def write(content: bytes, label_map: labels_lib.LabelMap, sample_rate: int,
          name: str = "audio_tagger", description: str = "",
          path: str = "<bytes>") -> bytes:
  """`content` (a tagger from `tflite.convert`) with TFLite Model Metadata populated (see
  the module docstring). Raises ValueError naming `path` when the model's signature or class
  count does not fit `label_map`."""
  metadata_fb, _, metadata_info, metadata_writer = _library()
  tensors = _signature_tensors(content, path)
  samples = tensors[INPUT][1][-1]
  classes = tensors[CLIP][1][-1]
  if classes != label_map.num_classes:
    raise ValueError(f"{path}: the model scores {classes} classes, the class map has "
                     f"{label_map.num_classes}")
  _check_names(label_map, path)
  seconds = samples / sample_rate

  class AudioTensorMd(metadata_info.TensorMd):
    """An input tensor with AudioProperties (sample rate, channels) set."""

    def create_metadata(self):
      tensor = super().create_metadata()
      tensor.content.contentProperties.sampleRate = sample_rate
      tensor.content.contentProperties.channels = 1
      return tensor

  class TaggerWriter(metadata_writer.MetadataWriter):
    """The generic writer, with the tagger's audio input and its two named outputs."""

    def add_tagger(self):
      self._input_mds.append(AudioTensorMd(
          name=INPUT, tensor_name=tensors[INPUT][0],
          content_type=metadata_fb.ContentProperties.AudioProperties,
          description=(f"{seconds:g} s window of {sample_rate} Hz mono audio: float32 "
                       f"waveform [1, {samples}] ({samples} samples) in [-1, 1]; longer "
                       "recordings are tagged window by window (bin/tag --tflite slides it "
                       "with 50 % overlap and averages the clip scores).")))
      label_files = self._create_label_file_md(
          metadata_writer.Labels().add(label_map.mids, exported_filename=MIDS_FILE)
          .add(label_map.names, NAMES_LOCALE, exported_filename=NAMES_FILE))
      self._output_mds.append(metadata_info.ClassificationTensorMd(
          name=CLIP, tensor_name=tensors[CLIP][0], label_files=label_files,
          tensor_type=tensors[CLIP][2],
          description=(f"Clip scores [1, {classes}]: one independent sigmoid score in [0, 1] "
                       "per class for the window (multi-label; not a softmax). The class "
                       f"map: {MIDS_FILE} (MIDs) and {NAMES_FILE} (display names), line i "
                       "= class i.")))
      self._output_mds.append(metadata_info.TensorMd(
          name=SEGMENTS, tensor_name=tensors[SEGMENTS][0],
          description=(f"MIL segment scores [1, {tensors[SEGMENTS][1][1]}, {classes}]: one "
                       "row per 0.96 s segment every 0.32 s of the window; the clip scores "
                       "are their average.")))
      return self

  writer = TaggerWriter.create(bytearray(content))
  writer.add_general_info(name, description or (
      f"Weakly labeled sound tagger (MIL ConvNet, av-sound-tf): {seconds:g} s windows of "
      f"{sample_rate} Hz mono audio -> {classes} class scores; log-mel front end inside."))
  populated, _ = writer.add_tagger().populate()
  return bytes(populated)


def read(content: bytes) -> Optional[dict]:
  """The metadata as a dict (the library's JSON form), or None for a model without any."""
  if not has_metadata(content):
    return None
  _, metadata, _, _ = _library()
  return json.loads(metadata.MetadataDisplayer.with_model_buffer(content).get_metadata_json())


def packed_file(content: bytes, name: str, path: str = "<bytes>") -> bytes:
  """The bytes of the associated file `name` packed in the model (ValueError naming it)."""
  _, metadata, _, _ = _library()
  displayer = metadata.MetadataDisplayer.with_model_buffer(content)
  if name not in displayer.get_packed_associated_file_list():
    raise ValueError(f"{path}: no associated file {name!r} packed in the model "
                     f"(has {displayer.get_packed_associated_file_list()})")
  return displayer.get_associated_file_buffer(name)


def _recorded_files(node) -> set:
  """Names of the associated files that a metadata dict (the library's JSON) records."""
  if isinstance(node, list):
    return set().union(*(_recorded_files(n) for n in node)) if node else set()
  if not isinstance(node, dict):
    return set()
  found = {f["name"] for f in node.get("associated_files", []) if "name" in f}
  return found.union(*(_recorded_files(v) for k, v in node.items() if k != "associated_files"))


def check_packed_files(content: bytes, path: str = "<bytes>"):
  """Raises ValueError naming `path` unless every associated file that the metadata records
  is packed whole in the model (the writer appends them as a zip archive after the
  flatbuffer, so a file cut anywhere in that tail still parses as a model).

  Part of `tflite.check_model_bytes`. A model without metadata passes; so does one whose
  metadata cannot be read here (the library is not installed): the interpreter never reads
  the packed files, and whatever reads them needs the library.
  """
  if not has_metadata(content):
    return
  try:
    _, metadata, _, _ = _library()
  except MissingLibraryError:
    return
  try:
    displayer = metadata.MetadataDisplayer.with_model_buffer(content)
    recorded = _recorded_files(json.loads(displayer.get_metadata_json()))
    packed = set(displayer.get_packed_associated_file_list())
  except Exception as e:  # pylint: disable=broad-except  (flatbuffer / JSON errors)
    raise ValueError(f"{path}: damaged TFLite metadata: {str(e).splitlines()[0][:200]}"
                     ) from None
  missing = sorted(recorded - packed)
  if missing:
    raise ValueError(f"{path}: truncated or damaged TFLite model: the associated files "
                     f"{missing} that its metadata records are not packed in it (the zip "
                     "archive at its end is cut or damaged)")
  if packed:
    try:
      with zipfile.ZipFile(io.BytesIO(content)) as archive:
        bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
      bad = str(e)
    if bad:
      raise ValueError(f"{path}: damaged TFLite model: its packed associated files do not "
                       f"read back (bad: {bad})")


def read_label_map(content: bytes, path: str = "<bytes>") -> Optional[labels_lib.LabelMap]:
  """The class map packed in the metadata of `content`; None when the model has no metadata.

  The ``clip_scores`` output's label files: the one without a locale (MIDs) and the one in
  locale ``en`` (display names). Raises ValueError naming `path` when the metadata is there
  but its labels are missing or do not match the model's class count, and
  MissingLibraryError when the metadata is there but the library is not installed.
  """
  meta = read(content)
  if meta is None:
    return None
  outputs = {t.get("name"): t for t in meta["subgraph_metadata"][0].get(
      "output_tensor_metadata", [])}
  if CLIP not in outputs:
    raise ValueError(f"{path}: its TFLite metadata describes no {CLIP!r} output "
                     f"(outputs: {sorted(outputs)})")
  files = [f for f in outputs[CLIP].get("associated_files", [])
           if f.get("type") == "TENSOR_AXIS_LABELS"]
  by_locale = {f.get("locale"): f["name"] for f in files}
  if None not in by_locale or NAMES_LOCALE not in by_locale:
    raise ValueError(f"{path}: its TFLite metadata lacks the {CLIP!r} label files (MIDs "
                     f"without a locale, names in locale {NAMES_LOCALE!r}; has {by_locale})")
  mids, names = (packed_file(content, by_locale[locale], path).decode("utf-8").split("\n")
                 for locale in (None, NAMES_LOCALE))
  classes = _signature_tensors(content, path)[CLIP][1][-1]
  if not len(mids) == len(names) == classes:
    raise ValueError(f"{path}: its metadata label files have {len(mids)} and {len(names)} "
                     f"lines for {classes} classes")
  return labels_lib.LabelMap(mids, names)

