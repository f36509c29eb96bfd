"""Decoding real audio files and video containers with PyAV."""

import os
import wave

import librosa
import numpy as np
import pytest

from av_sound_tf.core import audio_samples
from av_sound_tf.core import media
from tests.conftest import shared_path

VIDEOS = ["moviepy_big_buck_bunny_0_30.webm", "moviepy_chaplin.mp4", "moviepy_fire2.mp4",
          "openl3_bento.mp4", "moviepy_doc_medias_example2.mp4"]


def write_wav(path, channels_data, rate):
  """Writes int16 PCM; channels_data is float [channels, samples] in [-1, 1]."""
  data = np.asarray(channels_data)
  pcm = (np.clip(data.T, -1, 1) * 32767).astype("<i2")
  with wave.open(str(path), "wb") as w:
    w.setnchannels(data.shape[0])
    w.setsampwidth(2)
    w.setframerate(rate)
    w.writeframes(pcm.tobytes())


def test_ogg_matches_librosa_load():
  path = shared_path("esc10", "002 - Rain", "1-17367-A.ogg")
  ours = media.decode_audio(path)
  ref, _ = librosa.load(path, sr=16000, mono=True)
  assert ours.dtype == np.float32
  assert abs(len(ours) - len(ref)) <= 16  # two resamplers, one millisecond
  n = min(len(ours), len(ref))
  # Different resampling filters (swresample vs soxr): same signal to within -30 dB.
  err = np.sum((ours[:n] - ref[:n]) ** 2) / np.sum(ref[:n] ** 2)
  assert err < 1e-3


@pytest.mark.parametrize("rate", [44100, 48000, 8000])
def test_stereo_downmix_and_resample(tmp_path, rate):
  t = np.arange(rate) / rate
  tone = 0.5 * np.sin(2 * np.pi * 440 * t)
  path = tmp_path / f"stereo_{rate}.wav"
  write_wav(path, [tone, tone], rate)
  y = media.decode_audio(str(path))
  assert abs(len(y) - 16000) <= 2
  # A 440 Hz tone of amplitude 0.5 in both channels stays a 0.5 tone at 16 kHz.
  mid = y[2000:14000]
  np.testing.assert_allclose(np.sqrt(np.mean(mid ** 2)), 0.5 / np.sqrt(2), rtol=0.02)
  spectrum = np.abs(np.fft.rfft(mid))
  assert abs(np.argmax(spectrum) * 16000 / len(mid) - 440) < 3


def test_six_channels(tmp_path):
  rate = 48000
  data = np.zeros([6, rate])
  data[0] = 0.3 * np.sin(2 * np.pi * 1000 * np.arange(rate) / rate)
  path = tmp_path / "surround.wav"
  write_wav(path, data, rate)
  y = media.decode_audio(str(path))
  assert y.shape[0] == 16000 and np.max(np.abs(y)) > 0.05


@pytest.mark.parametrize("fmt,layout", [
    ("fltp", "mono"), ("fltp", "stereo"), ("fltp", "5.1"), ("flt", "stereo"), ("s16", "mono"),
    ("s16", "stereo"), ("s16", "5.1"), ("s16p", "stereo"), ("u8", "stereo"), ("s32", "stereo"),
    ("s32p", "5.1"), ("dbl", "stereo"), ("dblp", "mono")])
def test_frame_to_mono_is_the_channel_mean(fmt, layout):
  """The in-place plane reader gives NumPy's float32 channel mean of to_ndarray, bit for bit
  (the integer formats scaled to [-1, 1) first)."""
  import av  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(7)
  channels = {"mono": 1, "stereo": 2, "5.1": 6}[layout]
  n = 1031
  planar = fmt.endswith("p")
  base = fmt.rstrip("p")
  dtype = {"flt": np.float32, "dbl": np.float64, "s16": np.int16, "s32": np.int32,
           "u8": np.uint8}[base]
  if base in ("flt", "dbl"):
    values = rng.uniform(-1, 1, [channels, n]).astype(dtype)
  else:
    info = np.iinfo(dtype)
    values = rng.integers(info.min, info.max, [channels, n], endpoint=True).astype(dtype)
  array = values if planar else values.T.reshape(1, -1)
  frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(array), format=fmt, layout=layout)
  frame.sample_rate = 48000
  ref = frame.to_ndarray()
  if base in ("s16", "s32", "u8"):
    offset, scale = {"u8": (128.0, 128.0), "s16": (0.0, 32768.0),
                     "s32": (0.0, 2147483648.0)}[base]
    ref = (ref.astype(np.float32) - offset) / scale
  ref = ref if planar else ref.reshape(-1, channels).T
  want = ref.mean(axis=0).astype(np.float32)
  got = audio_samples.frame_to_mono(frame)
  assert got.dtype == np.float32 and got.shape == (n,)
  np.testing.assert_array_equal(got, want)
  got[:] = 0  # a copy: the frame's own samples are untouched
  assert np.array_equal(frame.to_ndarray(), np.ascontiguousarray(array))


def test_libsndfile_and_ffmpeg_decode_the_same_samples(tmp_path, monkeypatch):
  """WAV (8/16/24/32-bit, float, 1-6 channels), FLAC, AIFF and real Ogg Vorbis go through
  libsndfile, everything else through FFmpeg; both give the same waveform: bit for bit for
  PCM, within 5e-7 for Vorbis (two decoders), whole files and segments, the same length,
  the same truncation report."""
  import soundfile  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  made = []
  for name, subtype, channels, rate in [
      ("u8.wav", "PCM_U8", 2, 22050), ("s16.wav", "PCM_16", 1, 44100),
      ("s16_6ch.wav", "PCM_16", 6, 48000), ("s24.wav", "PCM_24", 2, 32000),
      ("s32.wav", "PCM_32", 2, 16000), ("float.wav", "FLOAT", 2, 44100),
      ("s16.flac", "PCM_16", 2, 44100), ("s24.aiff", "PCM_24", 2, 48000)]:
    data = np.clip(rng.normal(0, 0.3, [3 * rate, channels]), -1, 1)
    soundfile.write(str(tmp_path / name), data, rate, subtype=subtype)
    made.append((str(tmp_path / name), 0.0))
  made += [(shared_path("esc10", "001 - Dog bark", "1-100032-A.ogg"), 5e-7),
           (shared_path("esc10", "002 - Rain", "1-17367-A.ogg"), 5e-7),
           (_first_part(shared_path("esc10", "001 - Dog bark", "1-100032-A.ogg"),
                        tmp_path / "cut.ogg", 0.5), 5e-7)]
  for path, tolerance in made:
    handle = audio_samples.open_soundfile(path)
    assert handle is not None, path
    handle.close()
  video = shared_path("video", "moviepy_chaplin.mp4")
  disguised = tmp_path / "video_named.wav"  # libsndfile refuses it, FFmpeg reads it
  disguised.write_bytes(open(video, "rb").read())
  for path in [video, str(disguised)]:
    assert audio_samples.open_soundfile(path) is None, path
  assert media.read_audio(str(disguised)).waveform.shape == media.read_audio(
      video).waveform.shape
  segments = [(None, None), (0.7, 2.3), (1.3, None)]  # no start on half a sample
  ours = {(p, seg): media.read_audio(p, *seg) for p, _ in made for seg in segments}
  monkeypatch.setattr(audio_samples, "open_soundfile", lambda path: None)
  for path, tolerance in made:
    for seg in segments:
      a, b = ours[(path, seg)], media.read_audio(path, *seg)
      assert a.waveform.shape == b.waveform.shape, (path, seg)
      np.testing.assert_allclose(a.waveform, b.waveform, rtol=0, atol=tolerance,
                                 err_msg=f"{path} {seg}")
      assert a.truncation == b.truncation, (path, seg)
      if seg[1] is None:  # FFmpeg stops at the end of a frame, libsndfile at the sample
        assert abs(a.decoded_end_seconds - b.decoded_end_seconds) < 1e-3, (path, seg)
  assert "end-of-stream" in ours[(made[-1][0], (None, None))].truncation


@pytest.mark.parametrize("name", VIDEOS)
def test_video_containers(name):
  path = shared_path("video", name)
  info = media.probe(path)
  assert info.has_audio and info.has_video
  y = media.decode_audio(path)
  assert abs(len(y) / 16000 - info.duration_seconds) < 0.3
  frames = media.sample_video_frames(path, num_frames=8, image_size=64)
  assert frames.shape == (8, 64, 64, 3) and frames.dtype == np.uint8
  again = media.sample_video_frames(path, num_frames=8, image_size=64)
  np.testing.assert_array_equal(frames, again)
  assert frames.std() > 0  # real pictures, not blank


def test_frames_follow_time():
  """The 30 s Big Buck Bunny clip: frames sampled over it are not all the same picture,
  and sampling a 2 s segment gives frames from that segment."""
  path = shared_path("video", "moviepy_big_buck_bunny_0_30.webm")
  frames = media.sample_video_frames(path, num_frames=16, image_size=32).astype(float)
  diffs = np.abs(np.diff(frames, axis=0)).mean(axis=(1, 2, 3))
  assert np.count_nonzero(diffs > 1.0) >= 4
  seg = media.sample_video_frames(path, num_frames=4, image_size=32, start_seconds=20,
                                  end_seconds=22)
  assert seg.shape == (4, 32, 32, 3)
  assert not np.array_equal(seg[0], frames[0].astype(np.uint8))


def test_segment_cut_matches_full_decode():
  """Cutting [10 s, 12 s) seeks, then trims by decoded timestamps. Codecs that re-prime
  after a seek (Vorbis here) shift by a few ms: aligned to within one 10 ms hop."""
  path = shared_path("video", "moviepy_big_buck_bunny_0_30.webm")
  full = media.decode_audio(path)
  cut = media.decode_audio(path, start_seconds=10.0, end_seconds=12.0)
  assert abs(len(cut) - 32000) <= 2
  probe = cut[:8000]
  window = full[160000 - 160:160000 + 160 + 8000]
  corr = np.correlate(window, probe, "valid") / (
      np.linalg.norm(probe) * np.sqrt(np.convolve(window ** 2, np.ones(8000), "valid")))
  lag = int(np.argmax(corr)) - 160
  assert abs(lag) <= 160 and corr.max() > 0.99, (lag, corr.max())


def test_mp3_has_no_video():
  path = shared_path("video", "moviepy_crunching.mp3")
  assert len(media.decode_audio(path)) > 16000 * 8
  with pytest.raises(media.MediaError, match="no video track"):
    media.sample_video_frames(path)


def test_video_with_failing_audio():
  """This file's audio track breaks other readers; its second half decodes to zeros, which
  we detect and report instead of passing silence off as sound."""
  path = shared_path("video", "moviepy_video_with_failing_audio.mp4")
  y = media.decode_audio(path)
  assert len(y) > 16000 * 10
  assert audio_samples.digital_silence_fraction(y) > 0.4


def test_bad_files(tmp_path):
  with pytest.raises(media.MediaError, match="file not found"):
    media.decode_audio(str(tmp_path / "nope.wav"))
  text = tmp_path / "notes.wav"
  text.write_text("this is not audio\n" * 20)
  with pytest.raises(media.MediaError, match="notes.wav"):
    media.decode_audio(str(text))
  empty = tmp_path / "empty.mp4"
  empty.write_bytes(b"")
  with pytest.raises(media.MediaError):
    media.decode_audio(str(empty))
  src = shared_path("esc10", "001 - Dog bark", "1-100032-A.ogg")
  truncated = tmp_path / "truncated.ogg"
  truncated.write_bytes(open(src, "rb").read()[:300])
  with pytest.raises(media.MediaError):
    media.decode_audio(str(truncated))


def test_silence_fraction():
  assert audio_samples.digital_silence_fraction(np.zeros(16000, np.float32)) == 1.0
  y = np.ones(16000, np.float32)
  y[:8000] = 0
  assert audio_samples.digital_silence_fraction(y) == 0.5


# ---- Truncated files ---------------------------------------------------------------------

def _first_part(src, dst, fraction):
  data = open(src, "rb").read()
  dst.write_bytes(data[:int(len(data) * fraction)])
  return str(dst)


def test_truncated_files_are_reported(tmp_path):
  """Real files cut short: the container still declares the full length (WebM, an mp4 with
  its index first, WAV), or, for Ogg, the last page lacks its end-of-stream mark. What
  decodes is kept, and `truncation` says what is missing."""
  webm = _first_part(shared_path("video", "moviepy_big_buck_bunny_0_30.webm"),
                     tmp_path / "bunny.webm", 0.5)
  got = media.read_audio(webm)
  assert round(got.declared_end_seconds, 2) == 30.0
  assert round(got.decoded_end_seconds, 2) == 14.46
  assert got.truncation == "decoded 14.5 s of the 30.0 s the container declares (truncated?)"
  assert got.waveform.shape[0] == got.duration_seconds * 16000
  mp4 = _first_part(shared_path("video", "moviepy_fire2.mp4"), tmp_path / "fire.mp4", 0.5)
  assert media.read_audio(mp4).truncation == (
      "decoded 1.0 s of the 2.3 s the container declares (truncated?)")
  ogg = _first_part(shared_path("esc10", "001 - Dog bark", "1-100032-A.ogg"),
                    tmp_path / "dog.ogg", 0.5)
  got = media.read_audio(ogg)
  # FFmpeg takes an Ogg file's length from its last page: it "declares" what is there.
  assert round(got.declared_end_seconds, 2) == round(got.decoded_end_seconds, 2) == 2.03
  assert got.truncation == ("decoded 2.0 s; the Ogg stream ends without its end-of-stream "
                            "page (truncated?)")
  wav = tmp_path / "tone.wav"
  write_wav(wav, [0.3 * np.sin(np.arange(160000) / 5)], 16000)
  cut = _first_part(str(wav), tmp_path / "cut.wav", 0.4)
  assert media.read_audio(cut).truncation == (
      "decoded 4.0 s of the 10.0 s the container declares (truncated?)")


def test_segments_are_compared_with_their_own_end(tmp_path):
  """A segment that lies inside the part that decodes is complete; one that runs past the
  cut is reported against the segment's end, not the file's."""
  webm = _first_part(shared_path("video", "moviepy_big_buck_bunny_0_30.webm"),
                     tmp_path / "bunny.webm", 0.5)
  assert media.read_audio(webm, 2.0, 12.0).truncation == ""
  assert media.read_audio(webm, 10.0, 20.0).truncation == (
      "decoded 4.5 s of the 10.0 s the container declares for 10-20 s (truncated?)")
  # An untruncated file with a segment past its end: the wanted part stops at the end.
  full = shared_path("video", "moviepy_big_buck_bunny_0_30.webm")
  got = media.read_audio(full, 25.0, 40.0)
  assert got.truncation == "" and round(got.duration_seconds, 1) == 5.0
  # Losses under the tolerance are not reported: 0.5 s of 30 s.
  assert media.read_audio(full, 0.0, 30.0).truncation == ""


def test_real_files_are_not_reported_truncated():
  """No warning on complete real files; their decoded audio ends within 0.15 s of what the
  container declares (largest seen over all 453 real files: 0.118 s against the container,
  0.011 s against the audio stream; the tolerance is max(0.5 s, 5 %))."""
  import glob  # pylint: disable=g-import-not-at-top
  esc = shared_path("esc10")
  paths = [sorted(glob.glob(os.path.join(d, "*.ogg")))[i] for d in
           sorted(glob.glob(os.path.join(esc, "0*"))) for i in (0, -1)]
  paths += sorted(glob.glob(os.path.join(shared_path("video"), "*")))
  paths += sorted(glob.glob(os.path.join(shared_path("real_av", "clips"), "*.mp4")))
  paths += [shared_path("librosa", n) for n in ("sorohanro_-_solo-trumpet-06.ogg",)]
  assert len(paths) == 20 + 9 + 30 + 1
  shortfalls = {}
  for path in paths:
    got = media.read_audio(path)
    assert got.truncation == "", (path, got.truncation)
    shortfalls[path] = got.declared_end_seconds - got.decoded_end_seconds
  assert max(shortfalls.values()) < 0.15, max(shortfalls.items(), key=lambda kv: kv[1])


def test_wav_headers(tmp_path):
  """FFmpeg reports a cut WAV's length from the file size; its header still declares the
  full data chunk (after any other chunks). A streamed WAV declares no size: no warning."""
  wav = tmp_path / "tone.wav"
  write_wav(wav, [0.3 * np.sin(np.arange(32000) / 5)], 16000)  # 2 s
  riff = wav.read_bytes()
  listed = riff[:36] + b"LIST" + (5).to_bytes(4, "little") + b"INFOx\0" + riff[36:]
  (tmp_path / "listed.wav").write_bytes(listed[:len(listed) - 32000])  # 1 s cut
  assert media.read_audio(str(tmp_path / "listed.wav")).truncation == (
      "decoded 1.0 s of the 2.0 s the container declares (truncated?)")
  streamed = bytearray(riff[:len(riff) - 16000])
  streamed[4:8] = streamed[40:44] = b"\xff\xff\xff\xff"
  (tmp_path / "streamed.wav").write_bytes(bytes(streamed))
  assert media.read_audio(str(tmp_path / "streamed.wav")).truncation == ""
  # A cut within the tolerance (0.5 s) is not reported.
  (tmp_path / "short_cut.wav").write_bytes(riff[:len(riff) - 3200])
  assert media.read_audio(str(tmp_path / "short_cut.wav")).truncation == ""


# ---- Video frames: the paper's rule on real files, and decoding only what it needs -------

def _real_clips():
  import glob  # pylint: disable=g-import-not-at-top
  return sorted(glob.glob(os.path.join(shared_path("real_av", "clips", whole_set=True),
                                       "*.mp4")))


def _decode_every_frame(path, image_size):
  """Independent reference: PyAV's plain decode (no thread settings, no packet skipping),
  every frame's time, and every frame fitted to image_size."""
  import av  # pylint: disable=g-import-not-at-top
  from av_sound_tf.core import video_frames  # pylint: disable=g-import-not-at-top
  fit = video_frames.FrameFitter(image_size)
  with av.open(path) as container:
    duration = container.duration / 1e6
    times, frames = [], []
    for frame in container.decode(video=0):
      times.append(frame.time)
      frames.append(fit(frame))
  return duration, np.asarray(times), np.stack(frames)


def _expected(times, num_frames, start, end):
  """The paper's rule in numpy: targets at the middles of num_frames equal parts of
  [start, end); each takes the first frame at or after it, else the last frame."""
  targets = start + (np.arange(num_frames) + 0.5) * (end - start) / num_frames
  return targets, np.minimum(np.searchsorted(times, targets, side="left"), len(times) - 1)


def test_sampled_frames_on_all_real_clips(monkeypatch):
  """All 30 real H.264 clips: 64 frames spread over the clip, each the first decoded frame
  at or after its target (same time, same picture as a plain full decode), and the fast
  path (packets read first, unpicked non-reference frames skipped) serves every clip,
  with FFmpeg's decoder threads (every other clip) and on one thread."""
  from av_sound_tf.core import video_frames  # pylint: disable=g-import-not-at-top

  def no_fallback(*args):
    raise AssertionError("the fast path gave up on a well-formed real clip")

  monkeypatch.setattr(video_frames, "sample_frames_sequentially", no_fallback)
  paths = _real_clips()
  assert len(paths) == 30
  for path in paths:
    duration, times, frames = _decode_every_frame(path, 32)
    assert np.all(np.diff(times) > 0), path
    targets, index = _expected(times, 64, 0.0, duration)
    got = media.sample_video(path, 64, 32, decoder_threads=0 if path in paths[::2] else 1)
    assert got.frames.shape == (64, 32, 32, 3) and got.times.shape == (64,)
    np.testing.assert_allclose(got.targets, targets, rtol=0, atol=1e-9, err_msg=path)
    np.testing.assert_array_equal(got.times, times[index], err_msg=path)
    np.testing.assert_array_equal(got.frames, frames[index], err_msg=path)
    assert np.all(np.diff(got.times) >= 0) and 0 <= got.times[0]
    assert got.times[-1] <= duration
    late = got.times >= targets  # at or after the target, else the clip's last frame
    assert np.all(late | (index == len(times) - 1)), path
    earlier = times[np.maximum(index - 1, 0)]
    assert np.all((index == 0) | (earlier < targets)), path  # the first such frame
    assert len(set(got.times.tolist())) == 64  # 6-15 s at >= 15 fps: 64 distinct frames
    if path.endswith(("_54000_64000.mp4", "vas_cough_video_00331.mp4")):  # a segment
      start, end = 2.0, 5.5
      seg = media.sample_video(path, 16, 32, start, end)
      targets, index = _expected(times, 16, start, end)
      np.testing.assert_array_equal(seg.times, times[index], err_msg=path)
      np.testing.assert_array_equal(seg.frames, frames[index], err_msg=path)
      assert start <= seg.times[0] and seg.times[-1] < end


def test_non_reference_packets_are_what_ffmpeg_skips():
  """Our packet test (H.264 nal_ref_idc) against FFmpeg's own: decoding with
  skip_frame=NONREF outputs exactly the frames we must not skip."""
  import av  # pylint: disable=g-import-not-at-top
  from av_sound_tf.core import video_frames  # pylint: disable=g-import-not-at-top
  skipped = total = 0
  for path in _real_clips()[::5]:
    with av.open(path) as container:
      stream = container.streams.video[0]
      length_size = video_frames._avcc_length_size(stream)
      ours = {}
      for packet in container.demux(stream):
        if packet.size and not packet.is_discard:
          ours[packet.pts] = video_frames.is_non_reference(packet, length_size)
    with av.open(path) as container:
      container.streams.video[0].codec_context.skip_frame = "NONREF"
      reference = {frame.pts for frame in container.decode(video=0)}
    assert reference == {pts for pts, non_ref in ours.items() if not non_ref}, path
    skipped += sum(ours.values())
    total += len(ours)
  assert 0.3 < skipped / total < 0.6  # what the skipping can save


def _bt601_reference(frame, image_size, shift=0):
  """Independent of FFmpeg's scaler: BT.601 limited-range YUV 4:2:0 -> RGB in numpy, the
  center square of side shorter side * 224 / 256 (even pixels) cut out and resized to
  image_size by TensorFlow (bilinear with antialiasing). `shift` moves the cut right."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  h, w = frame.height, frame.width
  yuv = frame.to_ndarray().astype(np.float32)  # yuv420p: Y rows, then U and V
  y = (yuv[:h] - 16) * 255 / 219
  u = yuv[h:h + h // 4].reshape(h // 2, w // 2).repeat(2, 0).repeat(2, 1) - 128
  v = yuv[h + h // 4:].reshape(h // 2, w // 2).repeat(2, 0).repeat(2, 1) - 128
  k = 255 / 224
  rgb = np.stack([y + 1.402 * k * v, y - 0.344136 * k * u - 0.714136 * k * v,
                  y + 1.772 * k * u], axis=-1)
  side = 2 * round(min(w, h) * 224 / 256 / 2)
  top, left = (h - side) // 4 * 2, (w - side) // 4 * 2 + shift
  square = rgb[top:top + side, left:left + side]
  small = tf.image.resize(square, (image_size, image_size), method="bilinear",
                          antialias=True).numpy()
  return np.clip(small, 0, 255)


def test_frames_match_an_independent_resize():
  """The ImageNet transform (center crop 224/256 of the shorter side, to 224) against
  numpy + TensorFlow on real frames of every size in the set: within 0.5 grey levels on
  average (measured 0.24-0.39), while the same cut two source pixels to the right is
  measured 2.9-10.6 away."""
  import av  # pylint: disable=g-import-not-at-top
  from av_sound_tf.core import video_frames  # pylint: disable=g-import-not-at-top
  sizes = set()
  for path in _real_clips():
    with av.open(path) as container:
      stream = container.streams.video[0]
      if (stream.width, stream.height) in sizes:
        continue
      sizes.add((stream.width, stream.height))
      frame = next(f for i, f in enumerate(container.decode(stream)) if i == 20)
    assert frame.format.name == "yuv420p"
    ours = video_frames.FrameFitter(224)(frame)
    assert ours.shape == (224, 224, 3) and ours.dtype == np.uint8
    error = np.abs(ours - _bt601_reference(frame, 224))
    assert error.mean() < 0.5, (path, error.mean())
    assert np.percentile(error, 99) < 4, (path, np.percentile(error, 99))
    shifted = np.abs(ours - _bt601_reference(frame, 224, shift=2))
    assert shifted.mean() > 2 * 0.5, (path, shifted.mean())
  assert len(sizes) >= 10


@pytest.mark.parametrize("fmt", ["rgb24", "yuv420p", "yuvj420p", "yuv444p", "gray",
                                 "yuv420p10le", "nv12", "rgb8"])
def test_frames_of_any_format_and_shape_fit(fmt):
  """The crop-and-scale graph takes any pixel format FFmpeg decodes to and odd, tiny or very
  wide frames: the right size, the right colour (a flat orange frame stays orange)."""
  import av  # pylint: disable=g-import-not-at-top
  from av_sound_tf.core import video_frames  # pylint: disable=g-import-not-at-top
  orange = np.zeros([75, 101, 3], np.uint8) + np.array([200, 50, 10], np.uint8)
  source = av.VideoFrame.from_ndarray(orange, format="rgb24")
  fit = video_frames.FrameFitter(32)
  for width, height in [(101, 75), (64, 64), (3, 2), (2000, 30), (30, 2000)]:
    frame = source.reformat(format=fmt, width=width, height=height)
    rgb = fit(frame)
    assert rgb.shape == (32, 32, 3) and rgb.dtype == np.uint8, (fmt, width, height)
    want = [90, 90, 90] if fmt == "gray" else [200, 50, 10]
    tolerance = 25 if fmt == "rgb8" else 3  # rgb8: a 256-colour palette
    np.testing.assert_allclose(rgb.reshape(-1, 3).mean(axis=0), want, atol=tolerance,
                               err_msg=f"{fmt} {width}x{height}")


def test_frame_fitter_stacks_its_block_without_copying_only_when_it_may():
  """A clip's frames come back as the fitter's block when each was converted once, in
  order; repeated or reordered frames, or more than the block holds, come back copied,
  with the right pictures either way."""
  import av  # pylint: disable=g-import-not-at-top
  from av_sound_tf.core import video_frames  # pylint: disable=g-import-not-at-top
  sources = [av.VideoFrame.from_ndarray(np.full([48, 64, 3], level, np.uint8), format="rgb24")
             for level in (10, 120, 240)]
  fit = video_frames.FrameFitter(16, capacity=2)
  a, b, c = (fit(frame) for frame in sources)  # c is past the block's capacity
  levels = lambda stacked: [int(round(x.mean())) for x in stacked]
  block = fit.stack([a, b])
  assert levels(block) == [10, 120, 240][:2] and np.shares_memory(block, a)
  for frames, want in [([a, a], [10, 10]), ([b, a], [120, 10]), ([a, b, c], [10, 120, 240])]:
    stacked = fit.stack(frames)
    assert levels(stacked) == want and not np.shares_memory(stacked, a), want


def _write_vfr_mp4(path, gaps_90khz):
  """H.264 (B-frames, B-pyramid) at a variable frame rate; frame i is grey level 11*i%256."""
  import fractions  # pylint: disable=g-import-not-at-top
  import av  # pylint: disable=g-import-not-at-top
  pts = np.concatenate([[0], np.cumsum(gaps_90khz[:-1])])
  base = fractions.Fraction(1, 90000)
  with av.open(str(path), "w") as out:
    stream = out.add_stream("libx264", rate=25)
    stream.width = stream.height = 64
    stream.pix_fmt = "yuv420p"
    stream.time_base = stream.codec_context.time_base = base
    stream.options = {"threads": "1", "crf": "10",
                      "x264-params": "bframes=3:b-pyramid=normal:keyint=300"}
    for i, p in enumerate(pts):
      frame = av.VideoFrame.from_ndarray(np.full([64, 64, 3], 11 * i % 256, np.uint8),
                                         format="rgb24")
      frame.pts, frame.time_base = int(p), base
      for packet in stream.encode(frame):
        out.mux(packet)
    for packet in stream.encode(None):
      out.mux(packet)
  return pts / 90000


def test_variable_frame_rate(tmp_path):
  """Frames 10-80 ms apart (the real set has none): the picks follow the times written,
  and the picture is the one written at that time."""
  path = tmp_path / "vfr.mp4"
  written = _write_vfr_mp4(path, np.random.default_rng(0).integers(900, 7200, 90))
  got = media.sample_video(str(path), 24, 32)
  duration = media.probe(str(path)).duration_seconds
  targets, index = _expected(written, 24, 0.0, duration)
  np.testing.assert_allclose(got.times, written[index], atol=1e-9)
  grey = got.frames.astype(float).mean(axis=(1, 2, 3))
  np.testing.assert_allclose(grey, 11 * index % 256, atol=3)
  seg = media.sample_video(str(path), 8, 32, 1.0, 2.0)
  _, index = _expected(written, 8, 1.0, 2.0)
  np.testing.assert_allclose(seg.times, written[index], atol=1e-9)
  np.testing.assert_allclose(seg.frames.astype(float).mean(axis=(1, 2, 3)),
                             11 * index % 256, atol=3)


def test_one_thread_and_helper_threads_give_the_same_frames_and_errors(tmp_path,
                                                                        monkeypatch):
  """decoder_threads=1 (all on the calling thread) and 0 (helper threads) pick and convert
  the same frames; a frame that fails to convert is a MediaError naming the file either
  way, raised when the frames are collected, never a stack trace from the decoding loop."""
  from av_sound_tf.core import video_frames  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "vfr.mp4")
  _write_vfr_mp4(path, np.random.default_rng(1).integers(900, 7200, 60))
  one, helpers = (media.sample_video(path, 24, 32, decoder_threads=t) for t in (1, 0))
  np.testing.assert_array_equal(one.times, helpers.times)
  np.testing.assert_array_equal(one.frames, helpers.frames)
  fit = video_frames.FrameFitter.__call__
  calls = []

  def failing(self, frame):
    calls.append(frame.pts)
    if len(calls) == 5:
      raise ValueError("bad pixels")
    return fit(self, frame)

  monkeypatch.setattr(video_frames.FrameFitter, "__call__", failing)
  for threads in (1, 0):
    calls.clear()
    with pytest.raises(media.MediaError, match="vfr.mp4: video frames do not convert to RGB "
                       r"\(bad pixels\)"):
      media.sample_video(path, 24, 32, decoder_threads=threads)
    assert len(calls) > 5  # the fast path went on decoding; the error waited for result()


def test_fallback_decodes_frame_by_frame(tmp_path, monkeypatch):
  """When the fast path cannot vouch for its picks, every frame is decoded in order: the
  same frames on good files; a file cut in half gives the frames that decode."""
  from av_sound_tf.core import video_frames  # pylint: disable=g-import-not-at-top
  paths = [shared_path("video", "moviepy_big_buck_bunny_0_30.webm"),
           shared_path("video", "moviepy_chaplin.mp4")]
  paths += [_first_part(shared_path("video", "moviepy_fire2.mp4"), tmp_path / "cut.mp4", 0.5),
            _first_part(paths[0], tmp_path / "cut.webm", 0.5)]
  fast = [media.sample_video(p, 16, 32) for p in paths]
  fast.append(media.sample_video(paths[1], 8, 32, 1.0, 3.0))
  monkeypatch.setattr(video_frames, "sample_frames", lambda *args: None)
  slow = [media.sample_video(p, 16, 32) for p in paths]
  slow.append(media.sample_video(paths[1], 8, 32, 1.0, 3.0))
  for a, b in zip(fast, slow):
    np.testing.assert_array_equal(a.times, b.times)
    np.testing.assert_array_equal(a.frames, b.frames)
  # The cut files keep their first part's frames; targets past the cut take its last frame.
  assert fast[2].times[-1] < 1.2 and fast[3].times[-1] < 15 < fast[0].times[-1]
  assert fast[2].times[-1] == fast[2].times[-2]
