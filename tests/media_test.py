"""Decoding real audio files and video containers with PyAV."""

import wave

import librosa
import numpy as np
import pytest

from av_sound_tf import media
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
  assert media.digital_silence_fraction(y) > 0.4


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
  assert media.digital_silence_fraction(np.zeros(16000, np.float32)) == 1.0
  y = np.ones(16000, np.float32)
  y[:8000] = 0
  assert media.digital_silence_fraction(y) == 0.5
