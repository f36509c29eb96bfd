#!/usr/bin/env python3
"""Distillation into the on-device student: accuracy against the teachers and against the
same student trained on labels only.

  # the demo's data and models (make demo first): audiovisual and audio-only teachers
  .venv/bin/python benchmarks/distill_benchmark.py --demo_dir=demo_out --out=out/distill
  # ESC-10 (make bench-esc10 first): the audio teacher of each fold
  .venv/bin/python benchmarks/distill_benchmark.py --esc10_dir=out/esc10_bench \
      --folds=1,2,3,4,5 --out=out/distill

Every student has the same architecture, width, epochs and seed; only the teacher (none,
audio, audiovisual) differs. Finished runs are kept when rerun. Prints markdown tables and
writes them to <out>/distill_report.md. Not a test.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top
import keras  # pylint: disable=g-import-not-at-top

from av_sound_tf import evaluation  # pylint: disable=g-import-not-at-top
from av_sound_tf import files  # pylint: disable=g-import-not-at-top
from av_sound_tf import models  # pylint: disable=g-import-not-at-top
from av_sound_tf import training  # pylint: disable=g-import-not-at-top

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
flags.DEFINE_integer("pool", 600, "Unlabeled demo clips (a new seed of the same generator) "
                     "that the teachers label for the student; 0 skips that part.")
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
  from av_sound_tf import labels as labels_lib  # pylint: disable=g-import-not-at-top
  from data_prep import inputs, prepare, synthetic_av  # pylint: disable=g-import-not-at-top
  data = os.path.join(out, "pooled_prepared")
  if os.path.exists(os.path.join(data, "dataset_info.json")):
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
  prepare.prepare(found, prepare.PrepareConfig(output_dir=data, modalities=("audio", "visual"),
                                               embedder="color_layout", image_size=64),
                  num_workers=os.cpu_count() or 1, overwrite=True, progress_every=30)
  return data


def demo(out):
  d = FLAGS.demo_dir
  data = os.path.join(d, "prepared")
  common = dict(data_dir=data, train_splits=("train",), validation_splits=("validation",),
                num_frames=288, epochs=FLAGS.demo_epochs)
  audio_t = os.path.join(d, "audio", "model.keras")
  av_teacher = dict(teacher_audio_model=audio_t,
                    teacher_visual_model=os.path.join(d, "visual", "model.keras"),
                    teacher_fusion_model=os.path.join(d, "fusion", FLAGS.fusion, "model.keras"))
  gated = dict(av_teacher, distill_gate=True)
  runs = {
      "student, labels only": _student("demo_labels", out, **common),
      "student, audio teacher": _student("demo_audio_teacher", out,
                                         dict(teacher_audio_model=audio_t), **common),
      f"student, audiovisual teacher ({FLAGS.fusion} fusion)": _student(
          "demo_av_teacher", out, av_teacher, **common),
      "student, audiovisual teacher gated by its attention on audio": _student(
          "demo_av_gated", out, gated, **common),
  }
  if FLAGS.pool:
    pooled = dict(common, data_dir=_pooled_data(out), unlabeled_splits=("pool",))
    runs[f"student, audio teacher + {FLAGS.pool} unlabeled clips"] = _student(
        "demo_audio_teacher_pool", out, dict(teacher_audio_model=audio_t), **pooled)
    runs[f"student, audiovisual teacher + {FLAGS.pool} unlabeled clips"] = _student(
        "demo_av_teacher_pool", out, av_teacher, **pooled)
    runs[f"student, gated audiovisual teacher + {FLAGS.pool} unlabeled clips"] = _student(
        "demo_av_gated_pool", out, gated, **pooled)
  rows = []
  teacher_audio = _eval(audio_t, data, "eval", os.path.join(out, "eval_demo_teacher_audio"))
  rows.append(("teacher: audio model (Table 1, width 0.125)", teacher_audio["mAP"],
               models.count_flops(keras.models.load_model(audio_t))))
  fused = os.path.join(d, "report", "report.md")
  for name, path in runs.items():
    s = _eval(path, data, "eval", os.path.join(out, "eval_" + os.path.basename(
        os.path.dirname(path))))
    rows.append((name, s["mAP"], models.count_flops(keras.models.load_model(path))))
  lines = ["| model (demo eval split, 150 clips) | eval mAP | parameters | GFLOP per 10 s |",
           "|---|---|---|---|"]
  lines += [f"| {n} | {100 * m:.2f} | {f['parameters']:,} | {f['flops'] / 1e9:.3f} |"
            for n, m, f in rows]
  lines.append(f"\nThe audiovisual teacher's own eval mAP is in {fused} "
               f"({FLAGS.fusion} fusion).")
  return "\n".join(lines)


def missing_labels_demo(out):
  """Teachers (audio, visual, attention fusion) and students trained on labels with
  missing positives; evaluated on the clean eval split."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from av_sound_tf import fusion_training, predict  # pylint: disable=g-import-not-at-top
  from av_sound_tf import labels as labels_lib  # pylint: disable=g-import-not-at-top
  from data_prep import inputs, prepare  # pylint: disable=g-import-not-at-top
  p = FLAGS.missing_labels
  root = os.path.join(out, f"missing{int(round(100 * p))}")
  data = os.path.join(root, "prepared")
  demo_data = os.path.abspath(os.path.join(FLAGS.demo_dir, "data"))
  dropped = kept = 0
  if not os.path.exists(os.path.join(data, "dataset_info.json")):
    os.makedirs(root, exist_ok=True)
    import csv  # pylint: disable=g-import-not-at-top
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
    prepare.prepare(found, prepare.PrepareConfig(output_dir=data, modalities=("audio", "visual"),
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
    for name, t in (("labels", None), ("audio_teacher", dict(teacher_audio_model=teacher))):
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
