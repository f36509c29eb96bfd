"""A deterministic, embedded audiovisual data set where the truth of each modality is known.

Writes real media files (mp4: H.264 video, AAC audio), so they go through the same decoders
as a user's files, for a 12-class multi-label sound-event task with weak (clip-level)
labels, designed so that fusion matters (paper Sec. 1: the vacuum cleaner and the hair
dryer):

* 4 classes are told apart only by sound (``audio``): each has its own sound, but all four
  look the same (one grey disc).
* 4 classes are told apart mainly by sight (``visual``): each has its own picture, but all
  four make nearly the same sound, a hum with harmonics whose pitch differs by 4 Hz from
  class to class (56, 60, 64, 68 Hz): the paper's vacuum cleaner and hair dryer. The
  difference is in the audio (a third of a mel band at the 4th harmonic), but an audio
  model learns it only in part from the 600 labeled clips (eval AP 78-90 against 90-98
  fused), so this is where a teacher that sees the pictures can teach an audio-only
  student (bin/distill; docs/benchmarks.md).
* 4 classes have both their own sound and their own picture (``both``).

Each clip (3 s, 64 x 64 px at 8 fps, 16 kHz mono audio) holds 1-3 events of different
classes at random times and places over a faint background. Per clip one modality may be
degraded: loud noise over the audio (20 % of clips) or a black video (20 %), so the best
weighting is sample-specific as well as class-specific. ``ground_truth.json`` records each
class's carrier modality and each clip's events and degradations.

Everything derives from ``seed`` (NumPy's PCG64), and the encoders run single-threaded, so a
seed gives the same decoded audio and frames on every run.
"""

import dataclasses
import json
import os
from typing import Dict, List

import av
import numpy as np

from av_sound_tf.core import constants

FPS = 8
SIZE = 64
SECONDS = 3.0


@dataclasses.dataclass(frozen=True)
class DemoClass:
  name: str
  carrier: str  # audio, visual or both
  sound: str
  picture: str

  @property
  def mid(self):
    return "/demo/" + self.name.lower().replace(" ", "_")


CLASSES = (
    DemoClass("Beep", "audio", "beep", "grey_disc"),
    DemoClass("Buzz", "audio", "buzz", "grey_disc"),
    DemoClass("Chirp", "audio", "chirp", "grey_disc"),
    DemoClass("Knock", "audio", "knock", "grey_disc"),
    DemoClass("Red square", "visual", "hum_56", "red_square"),
    DemoClass("Green circle", "visual", "hum_60", "green_circle"),
    DemoClass("Blue bars", "visual", "hum_64", "blue_bars"),
    DemoClass("Yellow cross", "visual", "hum_68", "yellow_cross"),
    DemoClass("Whistle", "both", "whistle", "magenta_triangle"),
    DemoClass("Rumble", "both", "rumble", "cyan_ring"),
    DemoClass("Hiss", "both", "hiss", "white_bars"),
    DemoClass("Trill", "both", "trill", "orange_checker"),
)


def _sound(kind, n, rng):
  t = np.arange(n) / constants.SAMPLE_RATE
  if kind == "beep":
    return 0.5 * np.sin(2 * np.pi * 1000 * t) * ((t * 10) % 1 < 0.5)
  if kind == "buzz":
    return 0.3 * (2 * ((t * 150) % 1) - 1)
  if kind == "chirp":
    phase = (t % 0.3)
    return 0.4 * np.sin(2 * np.pi * (500 * phase + 0.5 * 8000 * phase ** 2))
  if kind == "knock":
    y = np.zeros(n)
    for start in range(0, n, constants.SAMPLE_RATE // 4):
      m = min(400, n - start)
      y[start:start + m] = np.sin(2 * np.pi * 300 * t[:m]) * np.exp(-t[:m] * 60)
    return 0.8 * y
  if kind.startswith("hum_"):
    f0 = float(kind[len("hum_"):])
    return 0.2 * sum(np.sin(2 * np.pi * f0 * k * t) / k for k in (1, 2, 3, 4))
  if kind == "whistle":
    return 0.4 * np.sin(2 * np.pi * 2500 * t + 3 * np.sin(2 * np.pi * 5 * t))
  if kind == "rumble":
    noise = rng.normal(size=n)
    spec = np.fft.rfft(noise)
    freqs = np.fft.rfftfreq(n, 1 / constants.SAMPLE_RATE)
    spec[(freqs < 60) | (freqs > 220)] = 0
    y = np.fft.irfft(spec, n)
    return 0.5 * y / (np.abs(y).max() + 1e-9)
  if kind == "hiss":
    noise = rng.normal(size=n)
    spec = np.fft.rfft(noise)
    spec[np.fft.rfftfreq(n, 1 / constants.SAMPLE_RATE) < 4000] = 0
    y = np.fft.irfft(spec, n)
    return 0.3 * y / (np.abs(y).max() + 1e-9)
  if kind == "trill":
    return 0.4 * np.sin(2 * np.pi * 700 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 12 * t))
  raise ValueError(f"Unknown sound {kind!r}")


def _draw(frame, picture, cx, cy, r=10):
  yy, xx = np.mgrid[:SIZE, :SIZE]
  dx, dy = xx - cx, yy - cy
  colors = {"grey_disc": (150, 150, 150), "red_square": (230, 30, 30),
            "green_circle": (30, 220, 30), "blue_bars": (40, 60, 240),
            "yellow_cross": (240, 230, 20), "magenta_triangle": (230, 30, 220),
            "cyan_ring": (20, 230, 230), "white_bars": (245, 245, 245),
            "orange_checker": (250, 140, 20)}
  masks = {
      "grey_disc": dx ** 2 + dy ** 2 <= r * r,
      "red_square": (abs(dx) <= r) & (abs(dy) <= r),
      "green_circle": dx ** 2 + dy ** 2 <= r * r,
      "blue_bars": (abs(dx) <= r) & (abs(dy) <= r) & ((yy // 3) % 2 == 0),
      "yellow_cross": ((abs(dx) <= 2) & (abs(dy) <= r)) | ((abs(dy) <= 2) & (abs(dx) <= r)),
      "magenta_triangle": (dy <= r) & (dy >= -r) & (abs(dx) <= (dy + r) / 2),
      "cyan_ring": (dx ** 2 + dy ** 2 <= r * r) & (dx ** 2 + dy ** 2 >= (r - 4) ** 2),
      "white_bars": (abs(dx) <= r) & (abs(dy) <= r) & ((xx // 3) % 2 == 0),
      "orange_checker": (abs(dx) <= r) & (abs(dy) <= r) & (((xx // 4) + (yy // 4)) % 2 == 0),
  }
  frame[masks[picture]] = colors[picture]


def make_clip(rng, classes=CLASSES, p_audio_degraded=0.2, p_video_degraded=0.2):
  """-> (audio float32 [samples], frames uint8 [n, 64, 64, 3], clip record)."""
  n = int(SECONDS * constants.SAMPLE_RATE)
  frames_n = int(SECONDS * FPS)
  chosen = sorted(rng.choice(len(classes), size=int(rng.integers(1, 4)), replace=False))
  audio = 0.01 * rng.normal(size=n)
  background = (rng.integers(10, 40, size=(SIZE, SIZE, 3))).astype(np.uint8)
  video = np.repeat(background[None], frames_n, axis=0)
  events = []
  for c in chosen:
    duration = float(rng.uniform(0.8, 2.0))
    start = float(rng.uniform(0, SECONDS - duration))
    a, b = int(start * constants.SAMPLE_RATE), int((start + duration) * constants.SAMPLE_RATE)
    audio[a:b] += _sound(classes[c].sound, b - a, rng)
    cx, cy = rng.integers(14, SIZE - 14, size=2)
    for f in range(int(start * FPS), min(frames_n, int(np.ceil((start + duration) * FPS)))):
      _draw(video[f], classes[c].picture, cx, cy)
    events.append({"class": classes[c].name, "start": round(start, 3),
                   "end": round(start + duration, 3)})
  degraded = rng.random()
  audio_degraded = bool(degraded < p_audio_degraded)
  video_degraded = bool(p_audio_degraded <= degraded < p_audio_degraded + p_video_degraded)
  if audio_degraded:
    audio += 0.6 * rng.normal(size=n)
  if video_degraded:
    video[:] = 0
  audio = np.clip(audio, -1, 1).astype(np.float32)
  record = {"labels": [classes[c].name for c in chosen], "events": events,
            "audio_degraded": audio_degraded, "video_degraded": video_degraded}
  return audio, video, record


def write_mp4(path, audio, video):
  """H.264 + AAC in an mp4, encoded single-threaded (deterministic)."""
  with av.open(path, "w") as out:
    vstream = out.add_stream("libx264", rate=FPS)
    vstream.width = vstream.height = SIZE
    vstream.pix_fmt = "yuv420p"
    vstream.options = {"threads": "1", "crf": "18"}
    vstream.codec_context.thread_count = 1
    astream = out.add_stream("aac", rate=constants.SAMPLE_RATE, layout="mono")
    for frame in video:
      for packet in vstream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
        out.mux(packet)
    for packet in vstream.encode(None):
      out.mux(packet)
    for i in range(0, len(audio), 1024):
      chunk = av.AudioFrame.from_ndarray(audio[None, i:i + 1024], format="flt",
                                         layout="mono")
      chunk.sample_rate = constants.SAMPLE_RATE
      for packet in astream.encode(chunk):
        out.mux(packet)
    for packet in astream.encode(None):
      out.mux(packet)


def write_dataset(out_dir: str, splits: Dict[str, int], seed: int = 0,
                  log=print) -> Dict[str, str]:
  """Writes the clips, ``labels.csv`` (path,labels,split), ``class_labels_indices.csv`` and
  ``ground_truth.json``; returns their paths. Existing complete output is kept."""
  os.makedirs(out_dir, exist_ok=True)
  done = os.path.join(out_dir, "ground_truth.json")
  paths = {"labels": os.path.join(out_dir, "labels.csv"),
           "class_labels": os.path.join(out_dir, "class_labels_indices.csv"),
           "ground_truth": done}
  rng = np.random.default_rng(seed)
  clips: List[dict] = []
  rows = ["path,labels,split"]
  total = sum(splits.values())
  for split, n in splits.items():
    for i in range(n):
      audio, video, record = make_clip(rng)
      name = f"{split}_{i:04d}.mp4"
      path = os.path.join(out_dir, "media", name)
      if not os.path.exists(done):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_mp4(path, audio, video)
      record.update(path=os.path.join("media", name), split=split)
      clips.append(record)
      rows.append(f'media/{name},"{";".join(record["labels"])}",{split}')
      if len(clips) % 100 == 0 and log:
        log(f"[generate] {len(clips)}/{total} clips")
  if os.path.exists(done):
    return paths
  with open(paths["labels"], "w") as f:
    f.write("\n".join(rows) + "\n")
  with open(paths["class_labels"], "w") as f:
    f.write("index,mid,display_name\n" + "".join(
        f"{i},{c.mid},{c.name}\n" for i, c in enumerate(CLASSES)))
  truth = {"seed": seed, "seconds": SECONDS, "fps": FPS, "size": SIZE,
           "sample_rate": constants.SAMPLE_RATE,
           "classes": [{"name": c.name, "mid": c.mid, "carrier": c.carrier} for c in CLASSES],
           "clips": clips}
  with open(done + ".incomplete", "w") as f:
    json.dump(truth, f, indent=1)
  os.replace(done + ".incomplete", done)
  return paths
