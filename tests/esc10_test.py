"""The ESC-10 benchmark's bookkeeping (the 5-fold run itself is `make bench-esc10`)."""

import json

import pytest

from av_sound_tf.jobs import esc10


def test_settings_are_checked_before_any_work(tmp_path):
  with pytest.raises(ValueError, match="Unknown ESC-10 settings"):
    esc10.run("unused", str(tmp_path / "a"), folds=(), epochs=1, dropout=0.5)
  out = tmp_path / "b"
  out.mkdir()
  (out / "settings.json").write_text(json.dumps(dict(esc10.DEFAULTS, epochs=5)))
  with pytest.raises(ValueError, match=r"other settings .*'epochs': \(5, 80\)"):
    esc10.run("unused", str(out), folds=())
