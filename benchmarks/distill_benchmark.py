#!/usr/bin/env python3
"""Distillation into the on-device student: accuracy against the teachers and against the
same student trained on labels only.

  # the demo's data and models (make demo first): audiovisual and audio-only teachers,
  # with and without 1,200 unlabeled clips, three student seeds (about 50 min here)
  .venv/bin/python benchmarks/distill_benchmark.py --demo_dir=demo_out --seeds=0,1,2 \
      --out=out/distill
  # ESC-10 (make bench-esc10 first): the audio teacher of each fold
  .venv/bin/python benchmarks/distill_benchmark.py --esc10_dir=out/esc10_bench \
      --folds=1,2,3,4,5 --out=out/distill

Every student has the same architecture, width, epochs and seeds; only the teacher (none,
audio, audiovisual; calibrated on the validation split unless said otherwise) and the
training clips (with or without the unlabeled pool) differ. Finished runs are kept when
rerun. Prints markdown tables (demo: mAP per class group too) and writes them to
<out>/distill_report.md, the demo rows to distill_demo.json and a bar chart to
distill_demo.png. Not a test.
"""

import csv
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from av_sound_tf.evaluate import evaluation  # pylint: disable=g-import-not-at-top
from av_sound_tf.core import dataset_info  # pylint: disable=g-import-not-at-top
from av_sound_tf.core import files  # pylint: disable=g-import-not-at-top
from av_sound_tf.core import model_files  # pylint: disable=g-import-not-at-top
from av_sound_tf.modeling import models  # pylint: disable=g-import-not-at-top
from av_sound_tf.train import training  # pylint: disable=g-import-not-at-top

flags.DEFINE_string("demo_dir", "", "Output folder of make demo (prepared/, audio/, visual/, "
                    "fusion/).")
flags.DEFINE_string("esc10_dir", "", "Output folder of make bench-esc10 (prepared/, foldK/).")
flags.DEFINE_list("folds", ["5"], "ESC-10 test folds.")
flags.DEFINE_string("out", "out/distill", "Where students and the report go.")
flags.DEFINE_float("width", 0.5, "Student width.")
flags.DEFINE_integer("demo_epochs", 40, "Student epochs on the demo data.")
flags.DEFINE_integer("esc10_epochs", 80, "Student epochs on ESC-10.")
flags.DEFINE_float("alpha", 0.5, "Weight of the labels against the teacher.")
flags.DEFINE_float("temperature", 2.0, "Distillation temperature.")
flags.DEFINE_string("fusion", "attention", "The demo fusion model that teaches (fusion/<name>).")
flags.DEFINE_float("missing_labels", 0.0, "Also run the demo with AudioSet-like missing "
                   "labels: each training positive is dropped with this probability (at least "
                   "one label kept per clip); teachers and students are all retrained on "
                   "them, evaluation uses the clean eval labels. 0 skips it.")
flags.DEFINE_integer("pool", 1200, "Unlabeled demo clips (a new seed of the same generator) "
                     "that the teachers label for the student; 0 skips that part.")
flags.DEFINE_bool("gated", False, "Also train the students of the audiovisual teacher gated by "
                  "its attention on audio (bin/distill --gate_by_attention).")
flags.DEFINE_list("seeds", ["0"], "Student seeds on the demo data (mean and std reported).")
FLAGS = flags.FLAGS


def _student(name, out, teacher=None, **kw):
  model_dir = os.path.join(out, name)
  if not os.path.exists(os.path.join(model_dir, "validation_metrics.json")):
    teacher = teacher or {}
    training.train(training.TrainConfig(
        kind="audio", architecture="mobile_mil", model_dir=model_dir, width=FLAGS.width,
        strategy="default", verbose=2, distill_alpha=FLAGS.alpha,
        distill_temperature=FLAGS.temperature, **teacher, **kw))
  return os.path.join(model_dir, "model.keras")


def _eval(model_path, data_dir, split, out):
  return evaluation.evaluate_model(model_path, data_dir, [split], out)


def _pooled_data(out):
  """The demo's labeled clips plus an unlabeled pool, prepared together."""
  from av_sound_tf.core import labels as labels_lib  # pylint: disable=g-import-not-at-top
  from data_prep import featurize, inputs, prepare, synthetic_av  # pylint: disable=g-import-not-at-top
  data = os.path.join(out, "pooled_prepared")
  if dataset_info.DatasetInfo.exists(data):
    return data
  pool = os.path.join(out, "pool_media")
  synthetic_av.write_dataset(pool, {"pool": FLAGS.pool}, seed=1)  # new clips, same design
  demo_data = os.path.join(FLAGS.demo_dir, "data")
  rows = ["path,labels,split"]
  with open(os.path.join(demo_data, "labels.csv")) as f:
    for line in f.read().splitlines()[1:]:
      rows.append(os.path.join(os.path.abspath(demo_data), line))
  for i in range(FLAGS.pool):  # their labels are withheld: an unlabeled pool
    rows.append(f"{os.path.abspath(pool)}/media/pool_{i:04d}.mp4,,pool")
  list_path = os.path.join(out, "pooled_list.csv")
  files.write_text(list_path, "\n".join(rows) + "\n")
  found = inputs.from_file_list(
      list_path, labels_lib.LabelMap.from_csv(os.path.join(demo_data,
                                                           "class_labels_indices.csv")),
      split_column="split", allow_unlabeled=True)
  prepare.prepare(found, featurize.PrepareConfig(output_dir=data, modalities=("audio", "visual"),
                                                 embedder="color_layout", image_size=64),
                  num_workers=os.cpu_count() or 1, overwrite=True, progress_every=30)
  return data


def _class_ap(per_class_csv, column):
  """{class name: AP} from a per_class.csv (bin/evaluate_model's or the demo report's)."""
  with open(per_class_csv) as f:
    return {row["name"]: float(row[column]) for row in csv.DictReader(f)}


def _group_ap(class_ap, carriers):
  """Mean AP (in %) per carrier group of the demo's classes."""
  groups = {}
  for name, ap in class_ap.items():
    groups.setdefault(carriers[name], []).append(ap)
  return {k: 100 * float(np.mean(v)) for k, v in groups.items()}


def _plot(rows, teachers, path):
  """Horizontal bars (mean eval mAP, std over seeds) with the teachers as dashed lines."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(10, 0.5 * len(rows) + 1.5))
  names = [r["name"] for r in rows][::-1]
  means = [r["mAP"] for r in rows][::-1]
  errs = [r["std"] for r in rows][::-1]
  ax.barh(names, means, xerr=errs, color="#4477aa", capsize=3)
  for i, (m, e) in enumerate(zip(means, errs)):
    ax.text(m + e + 0.2, i, f"{m:.2f}", va="center", fontsize=8)
  for (name, value), color in zip(teachers, ("#cc6677", "#228833")):
    ax.axvline(value, color=color, linestyle="--", label=f"{name}: {value:.2f}")
  ax.set_xlim(min(means + [v for _, v in teachers]) - 3, 100)
  ax.set_xlabel("eval mAP (%), mean and std over seeds")
  ax.set_title("On-device student (demo data): what each teacher adds")
  ax.legend(loc="upper right", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def demo(out):
  d = FLAGS.demo_dir
  data = os.path.join(d, "prepared")
  with open(os.path.join(d, "data", "ground_truth.json")) as f:
    carriers = {c["name"]: c["carrier"] for c in json.load(f)["classes"]}
  common = dict(data_dir=data, train_splits=("train",), validation_splits=("validation",),
                num_frames=288, epochs=FLAGS.demo_epochs)
  audio_t = os.path.join(d, "audio", "model.keras")
  audio_teacher = dict(teacher_audio_model=audio_t)
  av_teacher = dict(teacher_audio_model=audio_t,
                    teacher_visual_model=os.path.join(d, "visual", "model.keras"),
                    teacher_fusion_model=os.path.join(d, "fusion", FLAGS.fusion, "model.keras"))
  specs = [("student, labels only", "demo_labels", None, common),
           ("student, audio teacher", "demo_audio_teacher", audio_teacher, common),
           (f"student, audiovisual teacher ({FLAGS.fusion} fusion)", "demo_av_teacher",
            av_teacher, common),
           ("student, audiovisual teacher, not calibrated", "demo_av_uncalibrated",
            dict(av_teacher, distill_calibrate=False), common)]
  if FLAGS.gated:
    specs.append(("student, audiovisual teacher gated by its attention on audio",
                  "demo_av_gated", dict(av_teacher, distill_gate=True), common))
  if FLAGS.pool:
    pooled = dict(common, data_dir=_pooled_data(out), unlabeled_splits=("pool",))
    specs += [(f"student, audio teacher + {FLAGS.pool} unlabeled clips",
               "demo_audio_teacher_pool", audio_teacher, pooled),
              (f"student, audiovisual teacher + {FLAGS.pool} unlabeled clips",
               "demo_av_teacher_pool", av_teacher, pooled)]
  seeds = [int(s) for s in FLAGS.seeds]
  teacher_eval = _eval(audio_t, data, "eval", os.path.join(out, "eval_demo_teacher_audio"))
  report_csv = os.path.join(d, "report", "per_class.csv")
  rows = [dict(name="teacher: audio model (Table 1, width 0.125)", mAP=100 * teacher_eval["mAP"],
               std=0.0, groups=_group_ap(_class_ap(os.path.join(
                   out, "eval_demo_teacher_audio", "per_class.csv"), "average_precision"),
                                         carriers),
               flops=models.count_flops(model_files.load_keras_model(audio_t)))]
  if FLAGS.fusion == "attention" and os.path.exists(report_csv):
    fused = _class_ap(report_csv, "AP Attention fusion (multimodal)")
    rows.append(dict(name="teacher: audiovisual (attention fusion; audio + visual input)",
                     mAP=100 * float(np.mean(list(fused.values()))), std=0.0,
                     groups=_group_ap(fused, carriers), flops=None))
  for name, run_dir, teacher, kw in specs:
    maps, groups, path = [], [], None
    for seed in seeds:
      suffix = "" if seed == 0 else f"_seed{seed}"
      path = _student(run_dir + suffix, out, teacher, seed=seed, **kw)
      eval_dir = os.path.join(out, f"eval_{run_dir}{suffix}")
      maps.append(100 * _eval(path, data, "eval", eval_dir)["mAP"])
      groups.append(_group_ap(_class_ap(os.path.join(eval_dir, "per_class.csv"),
                                        "average_precision"), carriers))
    rows.append(dict(name=name, mAP=float(np.mean(maps)), std=float(np.std(maps)),
                     runs=maps, groups={k: float(np.mean([g[k] for g in groups]))
                                        for k in groups[0]},
                     flops=models.count_flops(model_files.load_keras_model(path))))
  lines = [f"Demo eval split (150 clips); students: mean (std) over seeds {FLAGS.seeds}. "
           "AP per class group: classes told apart by sound (audio), mainly by sight "
           "(visual), by both.", "",
           "| model | eval mAP | audio | visual | both | parameters | GFLOP per 10 s |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    g = r["groups"]
    spread = f" ({r['std']:.2f})" if len(seeds) > 1 and "runs" in r else ""
    cost = (f"{r['flops']['parameters']:,} | {r['flops']['flops'] / 1e9:.3f}" if r["flops"]
            else "- | -")
    lines.append(f"| {r['name']} | {r['mAP']:.2f}{spread} | {g['audio']:.2f} | "
                 f"{g['visual']:.2f} | {g['both']:.2f} | {cost} |")
  plot = os.path.join(out, "distill_demo.png")
  _plot([r for r in rows if "runs" in r],
        [(r["name"].split(" (")[0], r["mAP"]) for r in rows if "runs" not in r], plot)
  files.write_json(os.path.join(out, "distill_demo.json"), rows)
  lines.append(f"\nPlot: {plot}")
  return "\n".join(lines)


def missing_labels_demo(out):
  """Teachers (audio, visual, attention fusion) and students trained on labels with
  missing positives; evaluated on the clean eval split."""
  from av_sound_tf.evaluate import predict  # pylint: disable=g-import-not-at-top
  from av_sound_tf.train import fusion_training  # pylint: disable=g-import-not-at-top
  from av_sound_tf.core import labels as labels_lib  # pylint: disable=g-import-not-at-top
  from data_prep import featurize, inputs, prepare  # pylint: disable=g-import-not-at-top
  p = FLAGS.missing_labels
  root = os.path.join(out, f"missing{int(round(100 * p))}")
  data = os.path.join(root, "prepared")
  demo_data = os.path.abspath(os.path.join(FLAGS.demo_dir, "data"))
  dropped = kept = 0
  if not dataset_info.DatasetInfo.exists(data):
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = ["path,labels,split"]
    with open(os.path.join(demo_data, "labels.csv")) as f:
      for r in csv.DictReader(f):
        labels = r["labels"].split(";")
        if r["split"] == "train":
          keep = [l for l in labels if rng.random() >= p] or [labels[rng.integers(len(labels))]]
          dropped, kept = dropped + len(labels) - len(keep), kept + len(keep)
          labels = keep
        rows.append(f'{os.path.join(demo_data, r["path"])},"{";".join(labels)}",{r["split"]}')
    list_path = os.path.join(root, "list.csv")
    files.write_text(list_path, "\n".join(rows) + "\n")
    files.write_json(os.path.join(root, "label_noise.json"), {"dropped": dropped, "kept": kept})
    found = inputs.from_file_list(list_path, labels_lib.LabelMap.from_csv(
        os.path.join(demo_data, "class_labels_indices.csv")), split_column="split")
    prepare.prepare(found, featurize.PrepareConfig(output_dir=data,
                                                   modalities=("audio", "visual"),
                                                   embedder="color_layout", image_size=64),
                    num_workers=os.cpu_count() or 1, overwrite=True, progress_every=30)
  common = dict(data_dir=data, train_splits=("train",), validation_splits=("validation",),
                batch_size=32, strategy="default", verbose=2)
  m = lambda *a: os.path.join(root, *a)  # pylint: disable=unnecessary-lambda-assignment
  if not os.path.exists(m("audio", "validation_metrics.json")):
    training.train(training.TrainConfig(kind="audio", model_dir=m("audio"), width=0.125,
                                        num_frames=288, epochs=15, **common), overwrite=True)
  if not os.path.exists(m("visual", "validation_metrics.json")):
    training.train(training.TrainConfig(kind="visual", model_dir=m("visual"), width=0.25,
                                        epochs=30, **common), overwrite=True)
  if not os.path.exists(m("preds", "predictions_info.json")):
    predict.write_predictions(m("audio", "model.keras"), m("visual", "model.keras"), data,
                              ["train", "validation", "eval"], m("preds"))
  if not os.path.exists(m("fusion", "validation_metrics.json")):
    fusion_training.train_fusion(fusion_training.FusionConfig(
        m("preds"), m("fusion"), fusion="attention", epochs=40, batch_size=32,
        learning_rate=3e-3, verbose=0), overwrite=True)
  student = dict(data_dir=data, train_splits=("train",), validation_splits=("validation",),
                 num_frames=288, epochs=FLAGS.demo_epochs)
  audio_t = dict(teacher_audio_model=m("audio", "model.keras"))
  av_t = dict(audio_t, teacher_visual_model=m("visual", "model.keras"),
              teacher_fusion_model=m("fusion", "model.keras"))
  runs = {"teacher: audio model (Table 1, width 0.125)": m("audio", "model.keras"),
          "student, labels only": _student("labels", root, **student),
          "student, audio teacher": _student("audio_teacher", root, audio_t, **student),
          "student, audiovisual teacher (attention fusion)": _student("av_teacher", root, av_t,
                                                                       **student)}
  with open(os.path.join(root, "label_noise.json")) as f:
    noise = json.load(f)
  lines = [f"Demo with missing labels: {noise['dropped']} of {noise['dropped'] + noise['kept']} "
           f"training positives dropped (p = {p}); clean eval labels.", "",
           "| model | eval mAP |", "|---|---|"]
  for i, (name, path) in enumerate(runs.items()):
    s = _eval(path, data, "eval", os.path.join(root, f"eval_{i}"))
    lines.append(f"| {name} | {100 * s['mAP']:.2f} |")
  return "\n".join(lines)


def esc10(out):
  d = FLAGS.esc10_dir
  data = os.path.join(d, "prepared")
  with open(os.path.join(d, "settings.json")) as f:
    settings = json.load(f)
  lines = ["| fold | teacher accuracy / mAP | student, labels only | student, audio teacher |",
           "|---|---|---|---|"]
  for k in FLAGS.folds:
    teacher = os.path.join(d, f"fold{k}", "model.keras")
    common = dict(data_dir=data, validation_splits=(k,), model_selection="last",
                  train_splits=tuple(str(f) for f in range(1, 6) if str(f) != k),
                  num_frames=settings["num_frames"], epochs=FLAGS.esc10_epochs,
                  lr_schedule=settings.get("lr_schedule", "constant"),
                  mixup_alpha=settings.get("mixup_alpha", 0.0),
                  time_mask=settings.get("time_mask", 0), freq_mask=settings.get("freq_mask", 0))
    results = [_eval(teacher, data, k, os.path.join(out, f"eval_esc_teacher{k}"))]
    # The validation split is the test fold here: the teacher is not calibrated on it.
    for name, t in (("labels", None), ("audio_teacher", dict(teacher_audio_model=teacher,
                                                              distill_calibrate=False))):
      path = _student(f"esc10_fold{k}_{name}", out, t, **common)
      results.append(_eval(path, data, k, os.path.join(out, f"eval_esc_{name}{k}")))
    lines.append(f"| {k} | " + " | ".join(
        f"{100 * r['accuracy']:.2f} % / {100 * r['mAP']:.2f}" for r in results) + " |")
  return "\n".join(lines)


def main(_):
  if not (FLAGS.demo_dir or FLAGS.esc10_dir):
    raise app.UsageError("Give --demo_dir and/or --esc10_dir.")
  os.makedirs(FLAGS.out, exist_ok=True)
  parts = [f"Students: mobile_mil width {FLAGS.width}, alpha {FLAGS.alpha}, temperature "
           f"{FLAGS.temperature}."]
  if FLAGS.demo_dir and FLAGS.missing_labels:
    parts.append(missing_labels_demo(FLAGS.out))
  elif FLAGS.demo_dir:
    parts.append(demo(FLAGS.out))
  if FLAGS.esc10_dir:
    parts.append(esc10(FLAGS.out))
  report = "\n\n".join(parts)
  files.write_text(os.path.join(FLAGS.out, "distill_report.md"), report + "\n")
  print(report)


if __name__ == "__main__":
  app.run(main)
