"""report.html (evaluate/report_html.py) checked in a real browser: headless Chromium, driven
through its DevTools protocol over --remote-debugging-pipe (no extra Python package). The
page must load with no script error, console error or failed resource, every figure and
frame must decode (naturalWidth > 0) and every audio player must hold decodable audio
(duration > 0 after loadedmetadata). The checker itself is shown to fail on pages with a
deliberate script error, a broken image and undecodable audio.

Skipped, with a message, where /usr/bin/chromium (or $CHROMIUM) is absent; .ci/run installs
it (`apt-get install -y chromium`).
"""

import base64
import fcntl
import io
import json
import os
import re
import select
import shutil
import subprocess
import tempfile
import time
import wave

import numpy as np
import pytest
import tensorflow as tf

from av_sound_tf.core import dataset_info
from av_sound_tf.core import media
from av_sound_tf.core import schema
from av_sound_tf.evaluate import report
from av_sound_tf.evaluate import report_html
from av_sound_tf.modeling import fusion
from data_prep import synthetic_av
from data_prep import synthetic_predictions
from tests.conftest import run_binary

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
C = synthetic_predictions.NUM_CLASSES
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1200,900", "--remote-debugging-pipe"]

# Runs in the page once it has loaded: waits for every image and every audio element's
# metadata (or error), then reports what the DOM shows.
CHECK_JS = """(async () => {
  const imgs = [...document.images];
  await Promise.all(imgs.map(i => i.decode().catch(() => null)));
  const audios = [...document.querySelectorAll('audio')];
  const durations = await Promise.all(audios.map(a => new Promise(done => {
    const finish = () => done(a.error ? -1 : a.duration);
    if (a.error || a.readyState >= 1) return finish();
    a.addEventListener('loadedmetadata', finish, {once: true});
    a.addEventListener('error', finish, {once: true});
    setTimeout(finish, 15000);
  })));
  const clips = [...document.querySelectorAll('.clip')].map(c => ({
    id: c.dataset.clip,
    frame: c.querySelector('img') ? c.querySelector('img').naturalWidth : null,
    audio: c.querySelector('audio') ? durations[audios.indexOf(c.querySelector('audio'))]
                                    : null,
    scores: Object.fromEntries([...c.querySelectorAll('tr')].slice(1).map(
        r => [r.cells[0].textContent, r.cells[1].textContent])),
    notes: [...c.querySelectorAll('.note')].map(n => n.textContent)}));
  return {
    images: imgs.map(i => ({cls: i.className, width: i.naturalWidth, alt: i.alt})),
    audio: durations, clips: clips,
    classes: [...document.querySelectorAll('summary')].map(s => s.textContent)};
})()"""


def _above_9(fd):
  high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
  os.close(fd)
  return high


class Chromium:
  """Headless Chromium and its DevTools protocol over a pipe (fd 3 in, fd 4 out; messages
  are JSON ended by a NUL byte)."""

  def __init__(self, binary=CHROMIUM, timeout=60.0):
    self.timeout = timeout
    self.profile = tempfile.mkdtemp(prefix="chromium_profile_")
    # bash puts the pipe ends on fds 3 and 4 and then becomes Chromium; it takes them
    # from fds above 9, so that neither is 3 or 4 already (which a redirection would clobber).
    to_chrome_r, self._w = os.pipe()
    self._r, from_chrome_w = os.pipe()
    to_chrome_r, from_chrome_w = _above_9(to_chrome_r), _above_9(from_chrome_w)
    self.proc = subprocess.Popen(
        ["/bin/bash", "-c", f'exec "$0" "$@" 3<&{to_chrome_r} 4>&{from_chrome_w}', binary,
         *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
        pass_fds=(to_chrome_r, from_chrome_w), stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(to_chrome_r)
    os.close(from_chrome_w)
    self._buffer, self._id, self.events = b"", 0, []

  def _read_message(self, deadline):
    while b"\0" not in self._buffer:
      ready, _, _ = select.select([self._r], [], [], max(0.0, deadline - time.time()))
      if not ready:
        raise TimeoutError("Chromium did not answer in time")
      chunk = os.read(self._r, 1 << 20)
      if not chunk:
        raise EOFError("Chromium closed its DevTools pipe")
      self._buffer += chunk
    message, self._buffer = self._buffer.split(b"\0", 1)
    return json.loads(message)

  def call(self, method, params=None, session=None):
    """Sends one command and returns its result; events that arrive meanwhile are kept."""
    self._id += 1
    message = {"id": self._id, "method": method, "params": params or {}}
    if session:
      message["sessionId"] = session
    os.write(self._w, json.dumps(message).encode() + b"\0")
    deadline = time.time() + self.timeout
    while True:
      reply = self._read_message(deadline)
      if reply.get("id") != self._id:
        self.events.append(reply)
        continue
      if "error" in reply:
        raise RuntimeError(f"{method}: {reply['error']}")
      return reply["result"]

  def wait_for(self, method, session):
    deadline = time.time() + self.timeout
    while not any(e.get("method") == method and e.get("sessionId") == session
                  for e in self.events):
      self.events.append(self._read_message(deadline))

  def close(self):
    try:
      self.call("Browser.close")
    except (OSError, EOFError, TimeoutError, RuntimeError):
      pass
    try:
      self.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait()
    os.close(self._w)
    os.close(self._r)
    shutil.rmtree(self.profile, ignore_errors=True)


def _problems(events, session):
  """Script exceptions, console errors and failed loads (Log errors) seen by the page."""
  out = []
  for e in events:
    if e.get("sessionId") != session:
      continue
    p = e.get("params", {})
    if e.get("method") == "Runtime.exceptionThrown":
      d = p["exceptionDetails"]
      out.append("exception: " + d.get("exception", {}).get("description", d.get("text")))
    elif e.get("method") == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
      out.append("console: " + " ".join(str(a.get("value", a.get("description")))
                                        for a in p["args"]))
    elif e.get("method") == "Log.entryAdded" and p["entry"]["level"] == "error":
      out.append(f"log: {p['entry']['text']} {p['entry'].get('url', '')[:80]}")
  return out


def check_page(browser, path, screenshot=None):
  """Loads `path` in a new tab; returns CHECK_JS's result plus "problems" (see _problems) and
  the DOM's broken images and undecodable audio. Writes a full-page PNG to `screenshot`."""
  target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
  session = browser.call("Target.attachToTarget", {"targetId": target,
                                                   "flatten": True})["sessionId"]
  try:
    for domain in ("Runtime", "Log", "Page"):
      browser.call(f"{domain}.enable", session=session)
    browser.call("Page.navigate", {"url": "file://" + os.path.abspath(path)}, session)
    browser.wait_for("Page.loadEventFired", session)
    result = browser.call("Runtime.evaluate", {"expression": CHECK_JS, "awaitPromise": True,
                                               "returnByValue": True}, session)
    if "exceptionDetails" in result:
      raise RuntimeError(f"the check failed in the page: {result['exceptionDetails']}")
    found = result["result"]["value"]
    if screenshot:
      size = browser.call("Page.getLayoutMetrics", session=session)["cssContentSize"]
      png = browser.call("Page.captureScreenshot", {
          "format": "png", "captureBeyondViewport": True,
          "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"],
                   "scale": 1}}, session)["data"]
      with open(screenshot, "wb") as f:
        f.write(base64.b64decode(png))
    browser.call("Runtime.evaluate", {"expression": "1"}, session)  # flush pending events
    found["problems"] = _problems(browser.events, session)
    found["problems"] += [f"broken image: {i['alt'] or i['cls']}" for i in found["images"]
                          if i["width"] <= 0]
    found["problems"] += [f"undecodable audio #{k}" for k, d in enumerate(found["audio"])
                          if not d or d <= 0 or d != d]
    return found
  finally:
    browser.call("Target.closeTarget", {"targetId": target})


@pytest.fixture(scope="module")
def browser():
  if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} not found: install Chromium (`apt-get install -y chromium` on "
                "Debian; BUILD.md) or set $CHROMIUM to run the report.html browser checks")
  chromium = Chromium()
  yield chromium
  chromium.close()


PNG_1PX = base64.b64encode(tf.io.encode_png(np.full([1, 1, 3], 200, np.uint8)).numpy()).decode()


def _wav_uri(seconds, rate=16000):
  t = np.arange(int(seconds * rate)) / rate
  data = report_html.wav_bytes(0.3 * np.sin(2 * np.pi * 440 * t), rate)
  return "data:audio/wav;base64," + base64.b64encode(data).decode()


def _page(tmp_path, name, body):
  path = tmp_path / name
  path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>t</title></head>"
                  f"<body>{body}</body></html>")
  return str(path)


def test_checker_passes_a_good_page_and_reads_wav_durations(browser, tmp_path):
  found = check_page(browser, _page(tmp_path, "ok.html", (
      f'<img alt="dot" src="data:image/png;base64,{PNG_1PX}">'
      f'<audio controls preload="metadata" src="{_wav_uri(0.75)}"></audio>')))
  assert found["problems"] == []
  assert [i["width"] for i in found["images"]] == [1]
  assert found["audio"] == [pytest.approx(0.75, abs=1e-3)]  # wav_bytes' WAV decodes


@pytest.mark.parametrize("body,expected", [
    ("<script>throw new Error('deliberate failure')</script>", "deliberate failure"),
    ("<script>console.error('deliberate console error')</script>", "deliberate console error"),
    ("<script>undefinedFunction()</script>", "undefinedFunction"),
    ('<img alt="corrupt" src="data:image/png;base64,iVBORw0KGgoAAAA">', "broken image: corrupt"),
    ('<img alt="absent" src="no_such_figure.png">', "broken image: absent"),
    ('<audio preload="metadata" src="data:audio/wav;base64,UklGRgAAAAA="></audio>',
     "undecodable audio"),
])
def test_checker_fails_on_a_broken_page(browser, tmp_path, body, expected):
  """The mutation check of the checker: each deliberate fault is reported."""
  found = check_page(browser, _page(tmp_path, "bad.html",
                                    f'<img alt="dot" src="data:image/png;base64,{PNG_1PX}">'
                                    + body))
  assert any(expected in p for p in found["problems"]), found["problems"]


# --- The report's page on synthetic predictions with real media ---------------------------


def _write_wav(path, seconds=1.0, rate=16000):
  t = np.arange(int(seconds * rate)) / rate
  with wave.open(path, "wb") as w:
    w.setnchannels(1)
    w.setsampwidth(2)
    w.setframerate(rate)
    w.writeframes((8000 * np.sin(2 * np.pi * 330 * t)).astype("<i2").tobytes())


@pytest.fixture(scope="module")
def report_inputs(tmp_path_factory):
  """Synthetic predictions whose info names a prepared folder; eval clip i's record points
  at one of 3 mp4 clips (i % 5 < 3), an audio-only WAV (i % 5 == 3) or a missing file
  (i % 5 == 4); clip eval/7 has no record. An average and an (untrained) attention fusion
  model."""
  root = tmp_path_factory.mktemp("report_html")
  preds = synthetic_predictions.write_synthetic_predictions(
      str(root / "preds"), sizes=(("train", 64), ("eval", 160)))
  rng = np.random.default_rng(0)
  mp4s = []
  for k in range(3):
    audio, video, _ = synthetic_av.make_clip(rng)
    mp4s.append(str(root / f"clip{k}.mp4"))
    synthetic_av.write_mp4(mp4s[-1], audio, video)
  wav = str(root / "audio_only.wav")
  _write_wav(wav)
  prepared = str(root / "prepared")
  os.makedirs(prepared)
  info = dataset_info.PredictionsInfo.read(preds)
  sources = {}
  with tf.io.TFRecordWriter(os.path.join(prepared, "eval-00000-of-00001.tfrecord")) as w:
    for i in range(info.num_examples("eval")):
      kind = i % 5
      path = mp4s[kind] if kind < 3 else wav if kind == 3 else str(root / f"gone{i}.mp4")
      if i == 7:
        continue
      sources[f"eval/{i}"] = path
      w.write(schema.make_example(
          f"eval/{i}", path, [], [], log_mel=np.zeros([10, 64]),
          embedding_mean=None if kind == 3 else np.zeros(4)).SerializeToString())
  dataset_info.DatasetInfo.write(prepared, {"num_classes": C, "splits": {
      "eval": {"num_examples": info.num_examples("eval") - 1, "num_shards": 1}}})
  dataset_info.PredictionsInfo.write(preds, dict(info.info, data_dir=prepared))
  stats = {f"{m}_{s}": np.full(C, v) for m, s, v in (
      ("audio", "mean", 0.4), ("audio", "variance", 0.05), ("visual", "mean", 0.4),
      ("visual", "variance", 0.05))}
  models = []
  tf.keras.utils.set_random_seed(0)  # the untrained attention model's weights: fixed
  for kind in ("average", "attention"):
    model = fusion.FusionModel(C, kind, **(stats if kind == "attention" else {}))
    models.append(str(root / f"{kind}.keras"))
    model.save(models[-1])
  return {"root": root, "preds": preds, "models": models, "sources": sources,
          "mp4s": mp4s, "wav": wav}


def _eval_predictions(preds):
  path = dataset_info.PredictionsInfo.read(preds).file("eval")
  rows = [schema.parse_prediction_example(r, C) for r in tf.data.TFRecordDataset(path)]
  return {k: np.stack([r[k].numpy() for r in rows]) for k in rows[0]}


def test_report_html_loads_in_chromium_with_every_figure_and_clip(browser, report_inputs,
                                                                  tmp_path):
  out = str(tmp_path / "report")
  result = report.write_report(report_inputs["preds"], report_inputs["models"], out,
                               html_classes=3, clips_per_class=2)
  page = open(result["html"], encoding="utf-8").read()
  # Self-contained: nothing is fetched from elsewhere, no script.
  assert not re.findall(r'(?:src|href)="(?!data:)', page)
  assert "<script" not in page and "http://" not in page and "https://" not in page
  shot = str(tmp_path / "report.png")
  found = check_page(browser, result["html"], screenshot=shot)
  assert found["problems"] == []
  assert open(shot, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  figures = [i for i in found["images"] if i["cls"] == "figure"]
  assert [f["alt"][:8] for f in figures] == ["Figure 2", "Figure 3", "Figure 4"]
  assert all(f["width"] > 300 for f in figures)
  # A browser shows a cut PNG as far as it goes, so the bytes are compared here.
  inline = re.findall(r'<img class="figure"[^>]* src="data:image/png;base64,([^"]+)"', page)
  for data, name in zip(inline, ("fig2_ap_bubbles.png", "fig3_ap_change_histogram.png",
                                 "fig4_attention_histogram.png"), strict=True):
    assert base64.b64decode(data) == open(os.path.join(out, name), "rb").read()

  # The classes and clips shown: the rule of pick_clips, recomputed here.
  ex = _eval_predictions(report_inputs["preds"])
  model = fusion.with_attention_weights(tf.keras.models.load_model(report_inputs["models"][1]))
  out_att = model({"h_audio": ex["h_audio"], "h_visual": ex["h_visual"],
                   "audio_present": ex["audio_present"],
                   "visual_present": ex["visual_present"]})
  fused, alpha = np.asarray(out_att["fused_scores"]), np.asarray(out_att["attention_weights"])
  change = result["change"]
  gains = [c for c in np.argsort(-change) if change[c] > 0][:3]
  losses = [c for c in np.argsort(change) if change[c] < 0][:3]
  names = [r["name"] for r in result["rows"]]
  assert found["classes"] == ([f"gain: {names[c]}" for c in gains] +
                              [f"loss: {names[c]}" for c in losses])
  expected_ids = []
  for c, sign in [(c, 1) for c in gains] + [(c, -1) for c in losses]:
    ap = [[float(r["AP Audio"]), float(r["AP Visual"])] for r in result["rows"]][c]
    single = ex["h_audio"] if ap[0] >= ap[1] else ex["h_visual"]
    pos = np.flatnonzero(ex["labels"][:, c] > 0.5)
    delta = fused[pos, c] - single[pos, c]
    expected_ids += [(f"eval/{i}", c) for i in pos[np.argsort(-sign * delta)[:2]]]
  assert [k["id"] for k in found["clips"]] == [i for i, _ in expected_ids]

  seen = set()
  for clip, (clip_id, c) in zip(found["clips"], expected_ids):
    i = int(clip_id.split("/")[1])
    for row, want in (("audio model", ex["h_audio"]), ("visual model", ex["h_visual"]),
                      ("Attention fusion (multimodal)", fused),
                      ("alpha_a (Attention fusion (multimodal))", alpha)):
      assert float(clip["scores"][row]) == pytest.approx(want[i, c], abs=6e-4), row
    kind = "absent" if i == 7 else ["mp4", "mp4", "mp4", "wav", "gone"][i % 5]
    seen.add(kind)
    if kind == "mp4":
      assert clip["frame"] == report_html.FRAME_SIZE and clip["notes"] == []
      seconds = media.decode_audio(report_inputs["mp4s"][i % 5]).shape[0] / 16000
      assert clip["audio"] == pytest.approx(seconds, abs=1e-3)
    elif kind == "wav":
      assert clip["frame"] is None and clip["notes"] == ["no video in this clip"]
      assert clip["audio"] == pytest.approx(1.0, abs=1e-3)
    elif kind == "gone":
      assert clip["frame"] is None and clip["audio"] is None
      assert len(clip["notes"]) == 2 and all("not reachable" in n and f"gone{i}.mp4" in n
                                             for n in clip["notes"])
    else:
      assert clip["notes"] == ["not found in the prepared data"]
  assert {"mp4", "wav", "gone"} <= seen, seen


def test_clip_media_round_trip(report_inputs):
  """The page's WAV and PNG hold what core.media decodes from the clip's file."""
  path = report_inputs["mp4s"][0]
  found = report_html.clip_media({"source_path": path, "start_seconds": 0.0,
                                  "end_seconds": 0.0, "has_audio": 1, "has_video": 1})
  wav_data = base64.b64decode(found["audio"].split(",", 1)[1])
  with wave.open(io.BytesIO(wav_data)) as w:
    assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 16000)
    got = np.frombuffer(w.readframes(w.getnframes()), "<i2") / 32767
  np.testing.assert_allclose(got, media.decode_audio(path), atol=1 / 32767 + 1e-7)
  png = base64.b64decode(found["frame"].split(",", 1)[1])
  np.testing.assert_array_equal(tf.io.decode_png(png).numpy(),
                                media.sample_video_frames(path, 1, report_html.FRAME_SIZE)[0])
  # Segments longer than MAX_CLIP_SECONDS are cut.
  long_wav = str(report_inputs["root"] / "long.wav")
  _write_wav(long_wav, seconds=report_html.MAX_CLIP_SECONDS + 2)
  found = report_html.clip_media({"source_path": long_wav, "start_seconds": 0.0,
                                  "end_seconds": 0.0, "has_audio": 1, "has_video": 0})
  with wave.open(io.BytesIO(base64.b64decode(found["audio"].split(",", 1)[1]))) as w:
    assert w.getnframes() == int(report_html.MAX_CLIP_SECONDS * 16000)


def test_clip_sources_and_a_clip_without_a_record(report_inputs):
  info = dataset_info.PredictionsInfo.read(report_inputs["preds"])
  found = report_html.clip_sources(info, "eval", ["eval/7", "eval/8", "eval/9"])
  assert sorted(found) == ["eval/8", "eval/9"]  # eval/7 has no record
  assert found["eval/8"]["source_path"] == report_inputs["sources"]["eval/8"]
  assert (found["eval/8"]["has_audio"], found["eval/8"]["has_video"]) == (1, 0)  # the WAV
  assert report_html.clip_media(None)["problems"] == ["not found in the prepared data"]
  with pytest.raises(ValueError, match="prepared data .* cannot be read"):
    report_html.clip_sources(dataset_info.PredictionsInfo(
        info.folder, dict(info.info, data_dir=str(report_inputs["root"] / "nowhere"))),
        "eval", ["eval/8"])


def test_page_without_prepared_data_says_so(report_inputs, tmp_path):
  """Predictions that name no prepared data (data_dir): the page is written, says why no
  media are shown and still lists the clips with their scores."""
  preds = synthetic_predictions.write_synthetic_predictions(
      str(tmp_path / "preds"), sizes=(("eval", 80),))
  result = report.write_report(preds, report_inputs["models"][:1], str(tmp_path / "r"),
                               html_classes=1, clips_per_class=1)
  page = open(result["html"], encoding="utf-8").read()
  assert "Clip media not shown" in page and "names no prepared data (data_dir)" in page
  assert page.count('class="clip"') == 2 and "<audio" not in page


def test_binary_flags_and_nohtml(report_inputs, tmp_path):
  res = run_binary("report", f"--predictions_dir={report_inputs['preds']}",
                   f"--models={','.join(report_inputs['models'])}",
                   f"--output_dir={tmp_path / 'r'}", "--html_classes=1", "--clips_per_class=1",
                   timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  assert f"page:   {tmp_path / 'r' / 'report.html'}" in res.stdout
  page = (tmp_path / "r" / "report.html").read_text()
  assert page.count('class="clip"') == 2  # one gain and one loss, one clip each
  assert "report.html" in (tmp_path / "r" / "report.md").read_text()
  result = report.write_report(report_inputs["preds"], report_inputs["models"][:1],
                               str(tmp_path / "n"), html=False)
  assert result["html"] is None and not (tmp_path / "n" / "report.html").exists()
  assert "report.html" not in (tmp_path / "n" / "report.md").read_text()
