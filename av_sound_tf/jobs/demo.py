"""The main job end to end on the embedded audiovisual data set (`make demo`).

Stages (each skipped when its output is complete, so a rerun resumes):
  1. generate   data_prep.synthetic_av: 906 mp4 clips with known per-class modality
  2. prepare    bin/prepare_data's pipeline: log-mel + color_layout frame embeddings
  3. audio      the Table-1 audio model at width 0.125 on 2.88 s crops
  4. visual     the visual DNN at width 0.25
  5. predict    both models' outputs on train / validation / eval
  6. fusion     average, regression, MLP, attention and the four Table-4 ablations
  7. report     tables, Figures 2-4, per-class CSV, plus the truth check below
  8. export     SavedModel (audio + visual + attention fusion) and TFLite taggers
  9. tag        the 6 held-out clips through the exported model

The truth check compares the report with the generator's ground truth: the best fusion
model against the better single modality, attention against average fusion, and the
Spearman rank correlation between each class's mean attention weight on audio and its
carrier (audio = 1, both = 0.5, visual = 0).

Frame embeddings come from the weight-free ``color_layout`` embedder (no ImageNet weights
can be downloaded here); the report says so.
"""

import json
import os
import time

import numpy as np

SPLITS = {"train": 600, "validation": 150, "eval": 150, "heldout": 6}
FUSIONS = (("average", "multimodal"), ("regression", "multimodal"), ("mlp", "multimodal"),
           ("attention", "multimodal"), ("attention", "self_unimodal"),
           ("attention", "cross_unimodal"), ("attention", "no_transform"),
           ("attention", "no_output_net"))


class _Stages:

  def __init__(self, log):
    self.t0 = time.time()
    self.log = log
    self.count = 0

  def run(self, name, marker, fn):
    self.count += 1
    if os.path.exists(marker):
      self.log(f"[demo {self.count}/9] {name}: complete, skipped ({marker})")
      return
    self.log(f"[demo {self.count}/9] {name} ... (elapsed {time.time() - self.t0:.0f} s)")
    start = time.time()
    fn()
    self.log(f"[demo {self.count}/9] {name} done in {time.time() - start:.0f} s")


def _fusion_name(fusion, variant):
  return fusion if fusion != "attention" or variant == "multimodal" else f"attention_{variant}"


def truth_check(out_dir, report_result, ground_truth):
  """Appends the truth check to report.md; returns its numbers."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  summaries = report_result["summaries"]
  audio, visual = summaries["Audio"]["mAP"], summaries["Visual"]["mAP"]
  fused = {k: v["mAP"] for k, v in summaries.items() if k not in ("Audio", "Visual")}
  best_name = max(fused, key=fused.get)
  carrier = {"audio": 1.0, "both": 0.5, "visual": 0.0}
  target = np.array([carrier[c["carrier"]] for c in ground_truth["classes"]])
  alpha = np.asarray(report_result["mean_alpha_audio"])
  ok = np.isfinite(alpha)
  rho = float(stats.spearmanr(alpha[ok], target[ok]).correlation)
  result = {
      "better_single_modality_mAP": max(audio, visual),
      "best_fusion": best_name, "best_fusion_mAP": fused[best_name],
      "fusion_beats_better_single": fused[best_name] > max(audio, visual),
      "attention_mAP": fused["Attention fusion (multimodal)"],
      "average_mAP": fused["Average fusion"],
      "attention_beats_average": fused["Attention fusion (multimodal)"] >
                                 fused["Average fusion"],
      "alpha_carrier_spearman": rho,
  }
  lines = [
      "", "## Truth check against the generator's ground truth", "",
      "Frame embeddings: the weight-free `color_layout` embedder (8 x 8 colour thumbnail + "
      "colour histogram), not ResNet-152: no ImageNet weights can be downloaded here.", "",
      "| check | result |", "|---|---|",
      f"| best fusion ({best_name}, {100 * fused[best_name]:.2f} mAP) beats the better single "
      f"modality ({100 * max(audio, visual):.2f}) | "
      f"{'yes' if result['fusion_beats_better_single'] else 'NO'} |",
      f"| attention fusion ({100 * result['attention_mAP']:.2f}) beats average fusion "
      f"({100 * result['average_mAP']:.2f}) | "
      f"{'yes' if result['attention_beats_average'] else 'NO'} |",
      f"| Spearman rank correlation of per-class mean alpha_a with the carrier modality "
      f"(audio 1, both 0.5, visual 0) | {rho:.3f} |", "",
      "| class | carrier | mean alpha_a |", "|---|---|---|",
  ]
  lines += [f"| {c['name']} | {c['carrier']} | {a:.3f} |"
            for c, a in zip(ground_truth["classes"], alpha)]
  with open(report_result["report"], "a") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(out_dir, "truth_check.json"), "w") as f:
    json.dump(result, f, indent=2)
  return result


def run_demo(out_dir, log=print) -> dict:
  """Runs (or resumes) every stage; returns {"report": path, "table": str, ...}."""
  from av_sound_tf.core import dataset_info  # pylint: disable=g-import-not-at-top
  from av_sound_tf.core import embedders
  from av_sound_tf.evaluate import predict
  from av_sound_tf.evaluate import report
  from av_sound_tf.serving import export
  from av_sound_tf.serving import tagging
  from av_sound_tf.serving import tflite
  from av_sound_tf.train import fit
  from av_sound_tf.train import fusion_training
  from av_sound_tf.train import training
  from data_prep import featurize
  from data_prep import inputs
  from data_prep import prepare
  from data_prep import synthetic_av

  out_dir = os.path.abspath(out_dir)
  p = lambda *parts: os.path.join(out_dir, *parts)
  stages = _Stages(log)
  stages.run("generate the embedded data set", p("data", "ground_truth.json"),
             lambda: synthetic_av.write_dataset(p("data"), SPLITS, seed=0, log=log))
  paths = {"labels": p("data", "labels.csv"),
           "class_labels": p("data", "class_labels_indices.csv")}

  def prepare_stage():
    from av_sound_tf.core import labels as labels_lib
    found = inputs.from_file_list(paths["labels"],
                                  labels_lib.LabelMap.from_csv(paths["class_labels"]),
                                  split_column="split")
    config = featurize.PrepareConfig(output_dir=p("prepared"), modalities=("audio", "visual"),
                                     embedder="color_layout", image_size=64)
    summary = prepare.prepare(found, config, num_workers=os.cpu_count() or 1,
                              overwrite=True, progress_every=10)
    log(summary.table())

  stages.run("prepare TFRecords", dataset_info.DatasetInfo.path(p("prepared")), prepare_stage)
  common = dict(data_dir=p("prepared"), train_splits=("train",),
                validation_splits=("validation",), batch_size=32, strategy="default",
                verbose=2)
  stages.run("train the audio model", p("audio", fit.VALIDATION_METRICS),
             lambda: training.train(training.TrainConfig(
                 kind="audio", model_dir=p("audio"), width=0.125, num_frames=288, epochs=15,
                 **common), overwrite=True))
  stages.run("train the visual model", p("visual", fit.VALIDATION_METRICS),
             lambda: training.train(training.TrainConfig(
                 kind="visual", model_dir=p("visual"), width=0.25, epochs=30, **common),
                 overwrite=True))
  stages.run("model outputs for fusion", dataset_info.PredictionsInfo.path(p("preds")),
             lambda: predict.write_predictions(p("audio", "model.keras"),
                                               p("visual", "model.keras"), p("prepared"),
                                               ["train", "validation", "eval"], p("preds"),
                                               log=log))

  def fusion_stage():
    for fusion, variant in FUSIONS:
      name = _fusion_name(fusion, variant)
      summary = fusion_training.train_fusion(fusion_training.FusionConfig(
          p("preds"), p("fusion", name), fusion=fusion, variant=variant, epochs=40,
          batch_size=32, learning_rate=3e-3, verbose=0), overwrite=True)
      log(f"  {name:<28} validation mAP {100 * summary['mAP']:.2f}")

  stages.run("train the fusion models", p("fusion", "attention_no_output_net",
                                          fit.VALIDATION_METRICS), fusion_stage)
  models = [p("fusion", _fusion_name(f, v), "model.keras") for f, v in FUSIONS]
  result = {}

  def report_stage():
    out = report.write_report(p("preds"), models, p("report"), "eval")
    with open(p("data", "ground_truth.json")) as f:
      truth = json.load(f)
    truth_check(out_dir, out, truth)

  stages.run("write the report", p("truth_check.json"), report_stage)

  def export_stage():
    export.export_saved_model(p("audio", "model.keras"), paths["class_labels"], p("serving"),
                              "av_sound", 1, p("visual", "model.keras"),
                              p("fusion", "attention", "model.keras"))
    tflite.convert(p("audio", "model.keras"), paths["class_labels"], p("tflite"),
                   data_dir=p("prepared"), split="train", calibration_windows=50)

  stages.run("export SavedModel and TFLite", p("tflite", "audio_tagger.json"), export_stage)

  def tag_stage():
    tagger = tagging.Tagger(p("serving", "av_sound", "1"), top_k=3,
                            embedder=embedders.build_embedder("color_layout", None, 64))
    results = []
    for i in range(SPLITS["heldout"]):
      r = tagger.tag_file(p("data", "media", f"heldout_{i:04d}.mp4"))
      results.append(r.to_dict())
      log(tagging.format_result(r, False))
    with open(p("tags.json"), "w") as f:
      json.dump(results, f, indent=2)

  stages.run("tag held-out clips", p("tags.json"), tag_stage)
  with open(p("truth_check.json")) as f:
    result["truth_check"] = json.load(f)
  result["report"] = p("report", "report.md")
  with open(result["report"]) as f:
    text = f.read()
  start = text.index("## Single-modal and fusion models")
  result["table"] = text[start:text.index("\n## ", start + 5)].strip()
  result["elapsed_seconds"] = time.time() - stages.t0
  return result
