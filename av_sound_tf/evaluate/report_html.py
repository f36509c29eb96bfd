"""report.html: the fusion report as one self-contained page people can explore.

`write_html` renders the report's sections (the tables and Figures 2-4 that `report`
writes to report.md) and, for the classes with the largest gains and losses of the main
fusion model, a few eval clips each: an audio player, a frame from the middle of the clip,
the audio and visual models' scores for the class, the fusion model's score and the
attention weight on audio, alpha_a.

Everything is inline, so the file can be mailed or opened from anywhere: figures and frames
as ``data:image/png`` URIs, audio as ``data:audio/wav`` (16-bit mono 16 kHz, at most
`MAX_CLIP_SECONDS`); no script, no style sheet or font from elsewhere.

The clips' media come from the prepared data the predictions were made from
(``data_dir`` in predictions_info.json): its records name each clip's source file and
segment (`schema.FEATURE_SPEC`), which `core.media` decodes. A clip whose media cannot be
reached (no ``data_dir``, a moved file, a decode error) is listed with its scores and the
reason, and the page is still written.
"""

import base64
import dataclasses
import html
import io
import re
import wave
from typing import Dict, List, Optional, Sequence

import numpy as np
import tensorflow as tf

from av_sound_tf.core import constants
from av_sound_tf.core import dataset_info
from av_sound_tf.core import files
from av_sound_tf.core import media
from av_sound_tf.core import schema

HTML_FILE = "report.html"
MAX_CLIP_SECONDS = 10.0
FRAME_SIZE = 160

# The keys of a prepared record that locate a clip's media.
_SOURCE_KEYS = ("clip_id", "source_path", "start_seconds", "end_seconds", "has_audio",
                "has_video")

_STYLE = """
body { font-family: sans-serif; margin: 1.5em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #bbb; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #eee; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-style: italic; }
details { margin: 0.6em 0; border: 1px solid #ccc; border-radius: 4px; padding: 0.3em 0.8em; }
summary { cursor: pointer; font-weight: bold; }
.clips { display: flex; flex-wrap: wrap; gap: 12px; }
.clip { border: 1px solid #ddd; border-radius: 4px; padding: 8px; width: 330px; }
.clip img { width: 160px; height: 160px; image-rendering: pixelated; border: 1px solid #999; }
.clip audio { width: 310px; }
.clip table { font-size: 90%; }
.note { color: #a33; font-size: 90%; }
.labels { font-size: 90%; color: #555; }
"""


@dataclasses.dataclass
class Clips:
  """Per-clip arrays of one split, in the predictions file's order ([N] or [N, C])."""

  ids: Sequence[str]
  labels: np.ndarray
  h_audio: np.ndarray
  h_visual: np.ndarray
  fused: np.ndarray
  fused_name: str
  alpha: Optional[np.ndarray]  # attention weight on audio, alpha_a; None without attention
  alpha_name: Optional[str]
  present: np.ndarray  # [N, 2]: audio, video
  class_names: List[str]
  audio_is_better: np.ndarray  # [C] bool: the audio model's AP >= the visual model's


def pick_clips(clips: Clips, c: int, count: int, gain: bool) -> List[int]:
  """Up to `count` clips that contain class `c`, where the fusion model's score for `c`
  moved most against the better single model's: up for a gain, down for a loss."""
  positives = np.flatnonzero(clips.labels[:, c] > 0.5)
  single = clips.h_audio if clips.audio_is_better[c] else clips.h_visual
  delta = clips.fused[positives, c] - single[positives, c]
  order = np.argsort(-delta if gain else delta, kind="stable")
  return [int(i) for i in positives[order[:count]]]


def clip_sources(info: dataset_info.PredictionsInfo, split: str,
                 wanted: Sequence[str]) -> Dict[str, dict]:
  """{clip_id: {"source_path", "start_seconds", "end_seconds", "has_audio", "has_video"}}
  from the prepared records of `split`, for the clips in `wanted` that are found.

  Raises ValueError naming the reason when the prepared data cannot be read.
  """
  data_dir = info.info.get("data_dir")
  if not data_dir:
    raise ValueError(f"{info.path(info.folder)} names no prepared data (data_dir), so the "
                     "clips' media are unknown")
  try:
    shards = dataset_info.DatasetInfo.read(data_dir).shards(split)
  except (OSError, ValueError, tf.errors.OpError) as e:
    raise ValueError(f"prepared data {data_dir} cannot be read ({e})") from None
  spec = {k: schema.FEATURE_SPEC[k] for k in _SOURCE_KEYS}
  wanted, found = set(wanted), {}
  try:
    for record in tf.data.TFRecordDataset(shards):
      ex = tf.io.parse_single_example(record, spec)
      clip_id = ex["clip_id"].numpy().decode("utf-8", "replace")
      if clip_id in wanted:
        found[clip_id] = {k: v.numpy() for k, v in ex.items() if k != "clip_id"}
        found[clip_id]["source_path"] = found[clip_id]["source_path"].decode()
        if len(found) == len(wanted):
          break
  except tf.errors.OpError as e:
    raise ValueError(f"prepared data {data_dir} cannot be read ({e.message})") from None
  return found


def wav_bytes(waveform: np.ndarray, sample_rate: int) -> bytes:
  """A mono float waveform in [-1, 1] as a 16-bit PCM WAV file."""
  pcm = np.round(np.clip(waveform, -1.0, 1.0) * 32767).astype("<i2")
  buf = io.BytesIO()
  with wave.open(buf, "wb") as w:
    w.setnchannels(1)
    w.setsampwidth(2)
    w.setframerate(sample_rate)
    w.writeframes(pcm.tobytes())
  return buf.getvalue()


def _data_uri(mime, data):
  return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def clip_media(source: Optional[dict]) -> dict:
  """{"audio": WAV data URI or None, "frame": PNG data URI or None, "problems": [why media
  could not be read], "notes": [a modality the clip lacks]}."""
  out = {"audio": None, "frame": None, "problems": [], "notes": []}
  if source is None:
    out["problems"].append("not found in the prepared data")
    return out
  path = source["source_path"]
  start = float(source["start_seconds"])
  end = float(source["end_seconds"]) if source["end_seconds"] > start else None
  if source["has_audio"]:
    stop = start + MAX_CLIP_SECONDS if end is None else min(end, start + MAX_CLIP_SECONDS)
    try:
      audio = media.decode_audio(path, start, stop, constants.SAMPLE_RATE)
      out["audio"] = _data_uri("audio/wav", wav_bytes(audio, constants.SAMPLE_RATE))
    except (media.MediaError, OSError, ValueError, tf.errors.OpError) as e:
      out["problems"].append(f"audio not reachable: {e}")
  else:
    out["notes"].append("no audio in this clip")
  if source["has_video"]:
    try:
      frame = media.sample_video_frames(path, 1, FRAME_SIZE, start, end)[0]
      out["frame"] = _data_uri("image/png", tf.io.encode_png(frame).numpy())
    except (media.MediaError, OSError, ValueError, tf.errors.OpError) as e:
      out["problems"].append(f"video not reachable: {e}")
  else:
    out["notes"].append("no video in this clip")
  return out


def _inline(text):
  """Escapes text and turns Markdown's **bold** and `code` into HTML."""
  text = html.escape(str(text))
  text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
  return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def _table(header, rows):
  out = ["<table>", "<tr>" + "".join(f"<th>{_inline(h)}</th>" for h in header) + "</tr>"]
  out += ["<tr>" + "".join(f"<td>{_inline(v)}</td>" for v in row) + "</tr>" for row in rows]
  return "\n".join(out + ["</table>"])


def _score(x):
  return f"{x:.3f}"


def _clip_card(clips: Clips, i: int, c: int, source: Optional[dict], found: dict) -> str:
  has_a, has_v = clips.present[i] > 0
  rows = [["audio model", _score(clips.h_audio[i, c]) if has_a else "missing"],
          ["visual model", _score(clips.h_visual[i, c]) if has_v else "missing"],
          [clips.fused_name, _score(clips.fused[i, c])]]
  if clips.alpha is not None:
    rows.append([f"alpha_a ({clips.alpha_name})", _score(clips.alpha[i, c])])
  names = [clips.class_names[k] for k in np.flatnonzero(clips.labels[i] > 0.5)]
  parts = [f'<div class="clip" data-clip="{html.escape(clips.ids[i])}">',
           f"<div><code>{html.escape(clips.ids[i])}</code></div>",
           f'<div class="labels">labels: {html.escape(", ".join(names))}</div>']
  if found["frame"]:
    parts.append(f'<img class="frame" alt="frame of {html.escape(clips.ids[i])}" '
                 f'src="{found["frame"]}">')
  if found["audio"]:
    parts.append(f'<div><audio controls preload="metadata" src="{found["audio"]}">'
                 "</audio></div>")
  if source is not None:
    parts.append(f'<div class="labels">{html.escape(source["source_path"])}</div>')
  parts += [f'<div class="note">{html.escape(n)}</div>'
            for n in found["problems"] + found["notes"]]
  parts += [f"<div>scores for <b>{html.escape(clips.class_names[c])}</b>:</div>",
            _table(["", "score"], rows), "</div>"]
  return "\n".join(parts)


def _clip_sections(clips, gains, losses, clips_per_class, info, split, log):
  picked = [(c, True, pick_clips(clips, c, clips_per_class, True)) for c in gains]
  picked += [(c, False, pick_clips(clips, c, clips_per_class, False)) for c in losses]
  wanted = sorted({clips.ids[i] for _, _, idx in picked for i in idx})
  sources, problem = {}, ""
  try:
    sources = clip_sources(info, split, wanted) if wanted else {}
  except ValueError as e:
    problem = f"Clip media not shown: {e}."
    log(f"[report] {problem}")
  out = ["<h2>Clips of the classes with the largest gains and losses</h2>",
         f"<p>Per class, up to {clips_per_class} {split} clips that contain it, where "
         f"{html.escape(clips.fused_name)}'s score for the class moved most (up for a gain, "
         "down for a loss) against the better single model's. Scores are for the class "
         "named; alpha_a is the attention weight on audio (0: visual, 1: audio).</p>"]
  if problem:
    out.append(f'<p class="note">{html.escape(problem)}</p>')
  for c, gain, idx in picked:
    out.append(f"<details open><summary>{'gain' if gain else 'loss'}: "
               f"{html.escape(clips.class_names[c])}</summary>")
    out.append('<div class="clips">')
    for i in idx:
      source = sources.get(clips.ids[i])
      found = clip_media(source) if not problem else {"audio": None, "frame": None,
                                                      "problems": [], "notes": []}
      for reason in found["problems"]:
        log(f"[report] clip {clips.ids[i]}: {reason}")
      out.append(_clip_card(clips, i, c, source, found))
    if not idx:
      out.append("<p>(no clip of this class)</p>")
    out.append("</div></details>")
  if not picked:
    out.append("<p>(no class to show)</p>")
  return out


def render(sections, clips: Clips, gains, losses, clips_per_class, info, split,
           output_dir, log=print) -> str:
  """The page's HTML. `sections` are the report's (kind, ...) tuples: ("h1"/"h2"/"h3",
  text), ("p", text), ("table", header, rows), ("figure", png file name, caption)."""
  title = next((s[1] for s in sections if s[0] == "h1"), "Audiovisual fusion report")
  body = []
  for kind, *args in sections:
    if kind in ("h1", "h2", "h3"):
      body.append(f"<{kind}>{_inline(args[0])}</{kind}>")
    elif kind == "p":
      body.append(f"<p>{_inline(args[0])}</p>")
    elif kind == "table":
      body.append(_table(*args))
    elif kind == "figure":
      with tf.io.gfile.GFile(tf.io.gfile.join(output_dir, args[0]), "rb") as f:
        uri = _data_uri("image/png", f.read())
      body.append(f'<figure><img class="figure" alt="{html.escape(args[1])}" src="{uri}">'
                  f"<figcaption>{html.escape(args[1])}</figcaption></figure>")
  body += _clip_sections(clips, gains, losses, clips_per_class, info, split, log)
  return "\n".join(["<!doctype html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
                    f"<title>{html.escape(title)}</title>", f"<style>{_STYLE}</style>",
                    "</head>", "<body>"] + body + ["</body>", "</html>", ""])


def write_html(output_dir, sections, clips: Clips, gains, losses, clips_per_class,
               info: dataset_info.PredictionsInfo, split, log=print) -> str:
  """Writes ``<output_dir>/report.html`` (the figures' PNGs must be there); returns its
  path."""
  path = tf.io.gfile.join(output_dir, HTML_FILE)
  files.write_text(path, render(sections, clips, gains, losses, clips_per_class, info,
                                split, output_dir, log))
  return path
