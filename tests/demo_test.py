"""The demo's truth check, and (slow) the whole demo end to end."""

import json
import os

import numpy as np
import pytest

from av_sound_tf.jobs import demo
from data_prep import synthetic_av


def test_truth_check(tmp_path):
  report_path = tmp_path / "report.md"
  report_path.write_text("# report\n")
  classes = [{"name": c.name, "carrier": c.carrier} for c in synthetic_av.CLASSES]
  alpha = np.array([0.9, 0.95, 0.99, 0.8, 0.1, 0.05, 0.2, 0.3, 0.5, 0.4, 0.6, np.nan])
  result = demo.truth_check(str(tmp_path), {
      "report": str(report_path), "mean_alpha_audio": alpha,
      "summaries": {"Audio": {"mAP": 0.7}, "Visual": {"mAP": 0.6},
                    "Average fusion": {"mAP": 0.8}, "MLP fusion": {"mAP": 0.9},
                    "Attention fusion (multimodal)": {"mAP": 0.85}}}, {"classes": classes})
  assert result["best_fusion"] == "MLP fusion" and result["fusion_beats_better_single"]
  assert result["attention_beats_average"]
  assert 0.8 < result["alpha_carrier_spearman"] <= 1.0
  text = report_path.read_text()
  assert "Truth check" in text and "color_layout" in text and "| Beep | audio | 0.900 |" in text
  assert json.load(open(tmp_path / "truth_check.json"))["best_fusion"] == "MLP fusion"


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
  result = demo.run_demo(str(tmp_path / "demo"), log=lambda *_: None)
  check = result["truth_check"]
  assert check["fusion_beats_better_single"] and check["attention_beats_average"]
  assert check["alpha_carrier_spearman"] > 0.5
  assert os.path.exists(tmp_path / "demo" / "serving" / "av_sound" / "1" / "saved_model.pb")
  tags = json.load(open(tmp_path / "demo" / "tags.json"))
  assert len(tags) == 6 and all(t["status"] == "ok" for t in tags)
