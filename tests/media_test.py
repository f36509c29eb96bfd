"""Decoding real audio files and video containers with PyAV."""

import os
import wave

import librosa
import numpy as np
import pytest

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
