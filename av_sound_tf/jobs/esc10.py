"""ESC-10 benchmark: the paper's audio model, trained from scratch, 5-fold cross-validation.

Prepares ``../shared/data/esc10`` (400 real 5 s clips, 10 classes, 5 predefined folds), then
for each fold k trains on the other four folds and tests on fold k. No model selection on
the test fold: the final weights of each run are evaluated (``model_selection="last"``).
Reports per-fold and mean accuracy and mAP next to the published ESC-10 figures (Piczak
2015): random forest 72.7 %, CNN about 80 %, human listeners 95.7 %.
"""

import json
import os
import time

from av_sound_tf.core import dataset_info
from av_sound_tf.train import fit
from av_sound_tf.train import training
from data_prep import featurize
from data_prep import inputs
from data_prep import prepare

PUBLISHED = (("k-NN (Piczak 2015)", 66.7), ("SVM (Piczak 2015)", 67.5),
             ("random forest (Piczak 2015)", 72.7), ("CNN (Piczak 2015)", 80.0),
             ("human listeners", 95.7))


# Training settings of the benchmark's defaults (bin/bench_esc10 flags override them).
DEFAULTS = dict(width=0.25, epochs=80, num_frames=512, batch_size=32, learning_rate=1e-3,
                lr_schedule="cosine", mixup_alpha=0.2, time_mask=48, freq_mask=8, seed=0)


def run(esc10_dir, out_dir, folds=(1, 2, 3, 4, 5), log=print, **settings) -> dict:
  """Runs (or resumes: finished folds are kept) the cross-validation; returns the summary.

  `settings` override DEFAULTS (TrainConfig fields). A rerun into the same out_dir with
  other settings is refused, so one table never mixes folds trained differently.
  """
  unknown = set(settings) - set(DEFAULTS)
  if unknown:
    raise ValueError(f"Unknown ESC-10 settings: {sorted(unknown)}")
  settings = {**DEFAULTS, **settings}
  out_dir = os.path.abspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  settings_path = os.path.join(out_dir, "settings.json")
  if os.path.exists(settings_path):
    with open(settings_path) as f:
      previous = json.load(f)
    if previous != settings:
      changed = {k: (previous.get(k), v) for k, v in settings.items() if previous.get(k) != v}
      raise ValueError(f"{out_dir} holds folds trained with other settings "
                       f"(old, new): {changed}; use another output directory.")
  else:
    with open(settings_path, "w") as f:
      json.dump(settings, f, indent=2)
  data = os.path.join(out_dir, "prepared")
  if not dataset_info.DatasetInfo.exists(data):
    found = inputs.from_file_list(os.path.join(esc10_dir, "labels.csv"), label_column="class",
                                  split_column="fold")
    summary = prepare.prepare(found, featurize.PrepareConfig(output_dir=data),
                              num_workers=os.cpu_count() or 1, overwrite=True)
    log(summary.table())
  results = []
  for k in folds:
    model_dir = os.path.join(out_dir, f"fold{k}")
    metrics_path = os.path.join(model_dir, fit.VALIDATION_METRICS)
    if not os.path.exists(metrics_path):
      start = time.time()
      training.train(training.TrainConfig(
          kind="audio", model_dir=model_dir, data_dir=data,
          train_splits=tuple(str(f) for f in (1, 2, 3, 4, 5) if f != k),
          validation_splits=(str(k),), model_selection="last", verbose=2, **settings))
      log(f"[esc10] fold {k} trained in {time.time() - start:.0f} s")
    with open(metrics_path) as f:
      m = json.load(f)
    results.append({"fold": k, "accuracy": m["accuracy"], "mAP": m["mAP"]})
    log(f"[esc10] fold {k}: accuracy {100 * m['accuracy']:.2f} %, mAP {100 * m['mAP']:.2f}")
  mean_acc = sum(r["accuracy"] for r in results) / len(results)
  mean_map = sum(r["mAP"] for r in results) / len(results)
  lines = ["| fold | accuracy | mAP |", "|---|---|---|"]
  lines += [f"| {r['fold']} | {100 * r['accuracy']:.2f} % | {100 * r['mAP']:.2f} |"
            for r in results]
  lines.append(f"| **mean** | **{100 * mean_acc:.2f} %** | **{100 * mean_map:.2f}** |")
  lines += ["", "| published (5-fold accuracy) | |", "|---|---|"]
  lines += [f"| {name} | {acc:.1f} % |" for name, acc in PUBLISHED]
  summary = {"folds": results, "mean_accuracy": mean_acc, "mean_mAP": mean_map,
             "settings": settings, "table": "\n".join(lines)}
  with open(os.path.join(out_dir, "esc10_summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  with open(os.path.join(out_dir, "esc10_report.md"), "w") as f:
    f.write("# ESC-10, 5-fold cross-validation, audio MIL ConvNet from scratch\n\n" +
            "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()) + "\n\n" +
            summary["table"] + "\n")
  return summary
