"""Per-clip work, shared by the local runner (data_prep/prepare.py) and the Beam pipeline
(data_prep/beam_prepare.py): one `ClipJob` in, one serialized Example (or a failure) out.

* `PrepareConfig`: everything that decides what the shards contain (stored with the run,
  see `shards.start_run`).
* `ClipProcessor`: decodes a clip (`core.media`), computes the log-mel front end
  (`core.features`) and the frame embeddings (`core.embedders`, built once per worker) and
  builds its `tf.train.Example` (`core.schema`). Every failure becomes a `ClipResult`
  with the reason; nothing a clip does stops the run. With both modalities the audio is
  decoded in a second thread while the video frames decode (FFmpeg releases the GIL);
  results and failures are taken in the same order as before (audio, then video).
"""

from concurrent import futures
import dataclasses
import functools
import traceback
from typing import Optional, Tuple

from absl import logging
import numpy as np

from av_sound_tf.core import audio_samples
from av_sound_tf.core import features
from av_sound_tf.core import media
from av_sound_tf.core import schema
from data_prep import inputs as inputs_lib

MODALITIES = ("audio", "visual")


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
  """Everything that decides what the shards contain (stored as prepare_config.json)."""

  output_dir: str
  modalities: Tuple[str, ...] = ("audio",)
  num_shards: int = 0  # per split; 0: ceil(examples / examples_per_shard)
  examples_per_shard: int = 1000
  min_audio_seconds: float = 0.1
  max_seconds: float = 60.0  # longer media: the first max_seconds are kept (0: no limit)
  allow_missing_modality: bool = False
  embedder: str = "resnet152"
  embedder_weights: Optional[str] = None
  image_size: int = 224
  num_video_frames: int = 64
  store_frame_embeddings: bool = False
  log_mel: features.LogMelParams = features.DEFAULT_PARAMS

  def __post_init__(self):
    bad = [m for m in self.modalities if m not in MODALITIES]
    if bad or not self.modalities:
      raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}. "
                       f"Received: {self.modalities}")

  @property
  def audio(self):
    return "audio" in self.modalities

  @property
  def visual(self):
    return "visual" in self.modalities

  def content_dict(self):
    """The fields that change shard contents (a resumed run must match them)."""
    d = dataclasses.asdict(self)
    d.pop("output_dir")
    d["modalities"] = list(self.modalities)
    if not self.visual:
      for k in ("embedder", "embedder_weights", "image_size", "num_video_frames",
                "store_frame_embeddings"):
        d.pop(k)
    return d


@dataclasses.dataclass
class ClipResult:
  """One clip's outcome: its serialized Example, or why it failed.

  `num_frames` (log-mel frames) and `embedding_dim` (0 without video) describe what was
  written; the manifest records both, so the dataset info needs no shard read back.
  """

  status: str  # "written" or "failed"
  reason: str = ""
  example: bytes = b""
  num_frames: int = 0
  duration_seconds: float = 0.0
  has_audio: bool = False
  has_video: bool = False
  warnings: str = ""
  embedding_dim: int = 0


class ClipProcessor:
  """Decodes one clip and builds its serialized Example. One instance per worker.

  `threads`: 1 (the default) prepares each clip on the calling thread, the least CPU per
  clip, for workers that fill every core (the Beam runner's); 0 decodes a clip's audio
  and converts its frames on helper threads and lets FFmpeg thread the video decoder (see
  `media.sample_video`), the least wall time where cores are idle. bin/prepare_data
  chooses with `prepare.clip_threads`.
  """

  def __init__(self, config: PrepareConfig, threads: int = 1):
    self.config = config
    self.threads = threads
    self._embedder = None
    self._log_mel_fn = features.compiled_log_mel_fn(config.log_mel)
    self._audio_thread = None  # threads != 1: started on the first clip with both modalities

  @property
  def embedder(self):
    if self._embedder is None:  # built lazily: loading ResNet-152 takes seconds
      from av_sound_tf.core import embedders
      self._embedder = embedders.build_embedder(
          self.config.embedder, self.config.embedder_weights, self.config.image_size)
    return self._embedder

  def _segment(self, job, probe):
    if job.trim == "always":
      return job.start_seconds, job.end_seconds
    if job.trim == "auto" and job.start_seconds is not None and job.end_seconds is not None:
      duration = probe().duration_seconds
      if duration > (job.end_seconds - job.start_seconds) + 1.0:
        return job.start_seconds, job.end_seconds
    return None, None

  def log_mel(self, waveform):
    """Log-mel of one waveform. The input is zero-padded to whole seconds so that the
    compiled front end sees few distinct shapes; frames past the true length are dropped
    (frames do not overlap the padding, so this is exact)."""
    params = self.config.log_mel
    n = waveform.shape[0]
    bucket = -(-n // params.sample_rate) * params.sample_rate
    padded = np.zeros([1, bucket], np.float32)
    padded[0, :n] = waveform
    return self._log_mel_fn(padded)[0, :params.num_frames(n)].numpy()

  def __call__(self, job: inputs_lib.ClipJob) -> ClipResult:
    if job.error:
      return ClipResult("failed", job.error)
    try:
      return self._process(job)
    except media.MediaError as e:
      return ClipResult("failed", e.reason)
    except Exception as e:  # pylint: disable=broad-except
      # Unknown failures are recorded with their type, never allowed to stop the run.
      logging.debug("Unexpected error on %s:\n%s", job.path, traceback.format_exc())
      return ClipResult("failed", f"unexpected {type(e).__name__}: {str(e)[:200]}")

  def _process(self, job):
    cfg = self.config
    # The container's header is read at most once per clip, by whichever step needs it first.
    probe = functools.lru_cache(maxsize=1)(lambda: media.probe(job.path))
    start, end = self._segment(job, probe)
    warnings = []
    if end is None and cfg.max_seconds:
      full = probe().duration_seconds
      if full and full > cfg.max_seconds + 0.5:
        end = (start or 0.0) + cfg.max_seconds
        warnings.append(f"{full:.0f} s long: kept the first {cfg.max_seconds:g} s")
    # The audio's truncation check compares with the segment actually asked for (trim,
    # --max_seconds), so a cut never reads as a truncation.
    audio = video = None
    if cfg.audio and cfg.visual and self.threads != 1:
      # Both decode at once; their errors are raised in order.
      if self._audio_thread is None:
        self._audio_thread = futures.ThreadPoolExecutor(1, "audio")
      audio = self._audio_thread.submit(media.read_audio, job.path, start, end,
                                        cfg.log_mel.sample_rate).result
    elif cfg.audio:
      audio = _later(media.read_audio, job.path, start, end, cfg.log_mel.sample_rate)
    if cfg.visual:
      video = _later(media.sample_video_frames, job.path, cfg.num_video_frames,
                     cfg.image_size, start, end, self.threads)
    log_mel, duration = None, 0.0
    if cfg.audio:
      try:
        decoded = audio()
      except media.MediaError as e:
        if not (cfg.allow_missing_modality and cfg.visual):
          raise
        warnings.append(f"audio missing: {e.reason}")
        decoded = None
      waveform = None if decoded is None else decoded.waveform
      if waveform is not None:
        duration = waveform.shape[0] / cfg.log_mel.sample_rate
        if duration < max(cfg.min_audio_seconds,
                          cfg.log_mel.window_length / cfg.log_mel.sample_rate):
          raise media.MediaError(job.path, f"audio too short: {duration:.3f} s "
                                 f"(minimum {cfg.min_audio_seconds} s)" +
                                 (f"; {decoded.truncation}" if decoded.truncation else ""))
        if decoded.truncation:
          warnings.append(decoded.truncation)
        silence = audio_samples.digital_silence_fraction(waveform, cfg.log_mel.sample_rate)
        if silence >= 0.5:
          warnings.append(f"audio is digital silence for {silence:.0%} of its length")
        log_mel = self.log_mel(waveform)
    embedding_mean = per_frame = None
    num_video_frames = 0
    if cfg.visual:
      try:
        frames = video()
      except media.MediaError as e:
        if not (cfg.allow_missing_modality and log_mel is not None):
          raise
        warnings.append(f"video missing: {e.reason}")
        frames = None
      if frames is not None:
        embedding_mean, per_frame = self.embedder.embed_clip(frames)
        num_video_frames = frames.shape[0]
        if not duration:
          duration = (end - start) if end is not None else probe().duration_seconds
    if log_mel is None and embedding_mean is None:
      raise media.MediaError(job.path, "neither audio nor video could be decoded")
    try:
      example = _make_example(job, start, end, duration, log_mel, embedding_mean,
                              per_frame if cfg.store_frame_embeddings else None,
                              num_video_frames)
    except ValueError as e:  # non-finite features (corrupt samples)
      raise media.MediaError(job.path, str(e)) from None
    return ClipResult(
        "written", example=example.SerializeToString(),
        num_frames=0 if log_mel is None else log_mel.shape[0], duration_seconds=duration,
        has_audio=log_mel is not None, has_video=embedding_mean is not None,
        warnings="; ".join(warnings),
        embedding_dim=0 if embedding_mean is None else int(np.size(embedding_mean)))


def _later(fn, *args):
  """Runs fn(*args) now; the returned callable gives its result or raises its error."""
  try:
    result = fn(*args)
  except Exception as e:  # pylint: disable=broad-except
    error = e

    def fail():
      raise error
    return fail
  return lambda: result


def _make_example(job, start, end, duration, log_mel, embedding_mean, per_frame,
                  num_video_frames):
  return schema.make_example(
      clip_id=job.clip_id, source_path=job.path, label_indices=job.label_indices,
      label_mids=job.label_mids, start_seconds=start or 0.0,
      end_seconds=end if end is not None else (start or 0.0) + duration,
      duration_seconds=duration, log_mel=log_mel, embedding_mean=embedding_mean,
      frame_embeddings=per_frame, num_video_frames=num_video_frames, labeled=job.labeled)
