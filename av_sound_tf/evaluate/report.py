"""The fusion analysis report: Table 2 / Table 4 comparisons and Figures 2-4 for your data.

`write_report` evaluates the audio and visual models' scores (from bin/predict) and every
given fusion model on one split, and writes to the output folder:

* ``report.md``: Table-2-style comparison (mAP, mAUC, d'), Table-4-style ablation of the
  attention variants present, counts of classes improved / deteriorated by the main fusion
  model over the better single modality (and by more than 10 and 5 AP points), and the
  classes with the largest gains and losses by name.
* ``fig2_ap_bubbles.png``: per-class audio AP (x) against visual AP (y); bubble size = |AP
  change| of the fusion model over the better single modality, colour = its sign.
* ``fig3_ap_change_histogram.png``: histogram of those changes.
* ``fig4_attention_histogram.png``: histogram over classes of the mean attention weight on
  audio, alpha_a, over the clips that contain the class (attention fusion only).
* ``per_class.csv``: every number behind the figures.
* ``report.html`` (`report_html`): the same sections in one self-contained page, with a few
  eval clips (audio, a frame, both models' scores, alpha_a) of the classes with the largest
  gains and losses.

report.md and report.html render one list of sections, ``(kind, ...)`` tuples: ("h1" /
"h2" / "h3", text), ("p", text with Markdown ``**bold**`` and ```code```), ("table", header,
rows), ("figure", PNG file name, caption).

The "main" fusion model is the multimodal attention model when present, else the best one.
"""

import collections

import numpy as np
import tensorflow as tf

from av_sound_tf.core import dataset_info
from av_sound_tf.core import files
from av_sound_tf.core import metrics as metrics_lib
from av_sound_tf.core import model_files
from av_sound_tf.train import fusion_training
from av_sound_tf.train import pipeline


_Result = collections.namedtuple("_Result", "name ev scores alpha model")


def _plt():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _integer_ticks():
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  return ticker.MaxNLocator(integer=True)


def _load_single_modal(path, num_classes):
  ids, labels, h_a, h_v, present = [], [], [], [], []
  for inputs, y, clip_ids in pipeline.prediction_dataset(path, num_classes, 1024,
                                                         with_ids=True):
    ids.extend(i.decode("utf-8", "replace") for i in clip_ids.numpy())
    labels.append(y.numpy())
    h_a.append(inputs["h_audio"].numpy())
    h_v.append(inputs["h_visual"].numpy())
    present.append(np.concatenate([inputs["audio_present"], inputs["visual_present"]], 1))
  return (ids, np.concatenate(labels), np.concatenate(h_a), np.concatenate(h_v),
          np.concatenate(present))


def _fmt(x, scale=100.0):
  return "n/a" if x is None or not np.isfinite(x) else f"{scale * x:.2f}"


def _markdown(sections):
  """The report's sections (see `write_report`) as Markdown."""
  md = []
  for kind, *args in sections:
    if kind in ("h1", "h2", "h3"):
      md += ["#" * int(kind[1]) + " " + args[0], ""]
    elif kind == "p":
      md += [args[0], ""]
    elif kind == "table":
      header, rows = args
      md += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
      md += ["| " + " | ".join(row) + " |" for row in rows]
      md.append("")
    elif kind == "figure":
      md += [f"![{args[1]}]({args[0]})", "", f"*{args[1]}*", ""]
  return "\n".join(md)


def write_report(predictions_dir, model_paths, output_dir, split="eval", top_k=10,
                 html=True, html_classes=5, clips_per_class=3) -> dict:
  """Evaluates and writes the report; returns {"report": path, "html": path or None,
  "rows": [...], ...}.

  With `html`, also writes ``report.html`` (`report_html`): the same tables and figures
  in one self-contained page, plus up to `clips_per_class` clips of each of the
  `html_classes` classes with the largest gains and losses, with their audio, a frame,
  both models' scores, the fusion score and the attention weight.
  """
  info = dataset_info.PredictionsInfo.read(predictions_dir)
  num_classes = info.num_classes
  label_map = info.label_map()
  path = info.file(split)
  clip_ids, labels, h_a, h_v, present = _load_single_modal(path, num_classes)
  results = [_Result("Audio", metrics_lib.evaluate(labels, h_a), h_a, None, None),
             _Result("Visual", metrics_lib.evaluate(labels, h_v), h_v, None, None)]
  for model_path in model_paths:
    model = model_files.load_keras_model(model_path, "Fusion model")
    y, scores, alpha, _ = fusion_training.predict_fusion(model, path, num_classes)
    results.append(_Result(model.display_name, metrics_lib.evaluate(y, scores), scores,
                           alpha, model))
  fused = results[2:]
  if not fused:
    raise ValueError("Give at least one fusion model.")
  main = next((r for r in fused
               if r.model.fusion == "attention" and r.model.variant == "multimodal"),
              max(fused, key=lambda r: r.ev.mean_average_precision))
  ap_a, ap_v, ap_av = results[0].ev.average_precision, results[1].ev.average_precision, \
      main.ev.average_precision
  change = ap_av - np.maximum(ap_a, ap_v)
  valid = np.isfinite(change)
  mean_alpha = np.full(num_classes, np.nan)
  attention_model = main if main.alpha is not None else next(
      (r for r in fused if r.alpha is not None), None)
  if attention_model is not None:
    both = (present[:, 0] * present[:, 1]) > 0
    for c in range(num_classes):
      clips = (labels[:, c] > 0.5) & both
      if clips.any():
        mean_alpha[c] = float(attention_model.alpha[clips, c].mean())

  tf.io.gfile.makedirs(output_dir)
  rows = []
  for c in range(num_classes):
    row = {"index": c, "mid": label_map.mids[c], "name": label_map.names[c],
           "num_positives": int(labels[:, c].sum())}
    for r in results:
      row[f"AP {r.name}"] = "" if np.isnan(r.ev.average_precision[c]) else \
          f"{r.ev.average_precision[c]:.6f}"
    row["AP change (main fusion - best single)"] = "" if not valid[c] else f"{change[c]:.6f}"
    row["mean alpha_audio"] = "" if np.isnan(mean_alpha[c]) else f"{mean_alpha[c]:.6f}"
    rows.append(row)
  files.write_csv(tf.io.gfile.join(output_dir, "per_class.csv"), rows)

  names = np.asarray(label_map.names)
  figures = _figures(output_dir, ap_a, ap_v, change, valid, mean_alpha, names, main.name,
                     attention_model.name if attention_model else None)
  order = np.argsort(np.where(valid, change, 0.0))
  gains = [c for c in order[::-1] if valid[c] and change[c] > 0][:top_k]
  losses = [c for c in order if valid[c] and change[c] < 0][:top_k]

  def model_rows(models):
    return [[r.name, _fmt(r.ev.mean_average_precision), _fmt(r.ev.mean_auc),
             _fmt(r.ev.d_prime, 1.0)] for r in models]

  header = ["Model", "mAP", "mAUC", "d'"]
  sections = [
      ("h1", f"Audiovisual fusion report ({split} split)"),
      ("p", f"Predictions: `{predictions_dir}` ({labels.shape[0]} clips, {num_classes} "
            f"classes; {int((present[:, 0] == 0).sum())} without audio, "
            f"{int((present[:, 1] == 0).sum())} without video). Classes without a positive "
            "(or negative) clip in this split are excluded from the means: "
            f"{results[0].ev.excluded_classes} of {num_classes}."),
      ("h2", "Single-modal and fusion models (Table 2)"),
      ("table", header, model_rows(results))]
  variants = [r for r in fused if r.model.fusion == "attention"]
  if len(variants) > 1:
    sections += [("h2", "Attention fusion ablations (Table 4)"),
                 ("table", header, model_rows(variants))]
  n, ch = int(valid.sum()), change[valid]
  sections += [
      ("h2", f"{main.name} against the better single modality, per class"),
      ("p", f"Of {n} evaluated classes: **{int((ch > 0).sum())} improved**, "
            f"{int((ch < 0).sum())} deteriorated, {int((ch == 0).sum())} unchanged."),
      ("table", ["change in AP", "classes improved", "classes deteriorated"],
       [["any", str(int((ch > 0).sum())), str(int((ch < 0).sum()))],
        ["more than 5 points", str(int((ch > 0.05).sum())), str(int((ch < -0.05).sum()))],
        ["more than 10 points", str(int((ch > 0.10).sum())), str(int((ch < -0.10).sum()))]])]
  for title, picked in (("Largest gains", gains), ("Largest losses", losses)):
    sections += [("h3", title),
                 ("table", ["class", "audio AP", "visual AP", "fusion AP", "change"],
                  [[names[c], _fmt(ap_a[c]), _fmt(ap_v[c]), _fmt(ap_av[c]),
                    f"{100 * change[c]:+.2f}"] for c in picked] or [["(none)", "", "", "", ""]])]
  sections += [("h2", "Figures")] + [("figure", fig, caption) for fig, caption in figures]
  sections += [("p", "Every number behind the figures is in `per_class.csv`.")]
  report_path = tf.io.gfile.join(output_dir, "report.md")
  html_path = None
  if html:
    from av_sound_tf.evaluate import report_html  # pylint: disable=g-import-not-at-top
    clips = report_html.Clips(
        ids=clip_ids, labels=labels, h_audio=h_a, h_visual=h_v, fused=main.scores,
        fused_name=main.name, alpha=None if attention_model is None else attention_model.alpha,
        alpha_name=None if attention_model is None else attention_model.name,
        present=present, class_names=list(names),
        audio_is_better=ap_a >= np.where(np.isnan(ap_v), -np.inf, ap_v))
    html_path = report_html.write_html(
        output_dir, sections, clips, gains[:html_classes], losses[:html_classes],
        clips_per_class, info, split)
    sections.append(("p", f"`{report_html.HTML_FILE}` holds these tables and figures in one "
                          "page, with clips of the classes with the largest gains and losses."))
  files.write_text(report_path, _markdown(sections))
  return {"report": report_path, "html": html_path, "rows": rows, "main": main.name,
          "summaries": {r.name: r.ev.summary() for r in results},
          "mean_alpha_audio": mean_alpha, "change": change}


def _figures(output_dir, ap_a, ap_v, change, valid, mean_alpha, names, main_name,
             attention_name):
  plt = _plt()
  out = []
  # Figure 2.
  fig, ax = plt.subplots(figsize=(8, 7))
  idx = np.flatnonzero(valid)
  size = 20 + 2000 * np.abs(change[idx])
  colors = np.where(change[idx] >= 0, "tab:blue", "tab:red")
  ax.scatter(100 * ap_a[idx], 100 * ap_v[idx], s=size, c=colors, alpha=0.55, edgecolors="k",
             linewidths=0.4)
  notable = list(idx[np.argsort(change[idx])[:4]]) + list(idx[np.argsort(change[idx])[-4:]])
  for c in dict.fromkeys(notable):
    ax.annotate(names[c], (100 * ap_a[c], 100 * ap_v[c]), fontsize=8,
                xytext=(4, 4), textcoords="offset points")
  ax.plot([0, 100], [0, 100], color="grey", lw=0.8, ls="--")
  ax.set_xlim(0, 102)
  ax.set_ylim(0, 102)
  ax.set_xlabel("Audio model AP (%)")
  ax.set_ylabel("Visual model AP (%)")
  ax.set_title(f"Per-class AP; bubble size = |AP change| of {main_name}\n"
               "over the better single modality (blue: improved, red: deteriorated)")
  handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=l, alpha=0.6)
             for c, l in (("tab:blue", "improved"), ("tab:red", "deteriorated"))]
  ax.legend(handles=handles, loc="lower right")
  fig.tight_layout()
  name = "fig2_ap_bubbles.png"
  files.save_figure(fig, tf.io.gfile.join(output_dir, name))
  out.append((name, f"Figure 2: audio vs visual AP per class; bubble = change of {main_name}"))
  # Figure 3.
  fig, ax = plt.subplots(figsize=(7, 4.5))
  ax.hist(100 * change[valid], bins=30, color="tab:blue", edgecolor="k")
  ax.axvline(0, color="k", lw=1)
  ax.set_xlabel(f"AP change of {main_name} over the better single modality (points)")
  ax.set_ylabel("classes")
  ax.yaxis.set_major_locator(_integer_ticks())
  ax.set_title("Figure 3: distribution of per-class AP changes")
  fig.tight_layout()
  name = "fig3_ap_change_histogram.png"
  files.save_figure(fig, tf.io.gfile.join(output_dir, name))
  out.append((name, "Figure 3: histogram of per-class AP changes"))
  # Figure 4.
  if attention_name is not None and np.isfinite(mean_alpha).any():
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.hist(mean_alpha[np.isfinite(mean_alpha)], bins=20, range=(0, 1), color="tab:green",
            edgecolor="k")
    ax.set_xlabel("mean attention weight on audio, alpha_a (0: visual, 1: audio)")
    ax.set_ylabel("classes")
    ax.yaxis.set_major_locator(_integer_ticks())
    ax.set_title(f"Figure 4: per-class mean alpha_a of {attention_name}\n"
                 "over the clips that contain the class")
    fig.tight_layout()
    name = "fig4_attention_histogram.png"
    files.save_figure(fig, tf.io.gfile.join(output_dir, name))
    out.append((name, "Figure 4: histogram of per-class mean attention weight on audio"))
  return out
