"""Training: 2-replica MirroredStrategy on CPU, exact resume from backup, SeCoST, binaries."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from av_sound_tf.train import distillation
from av_sound_tf.train import distribution
from av_sound_tf.train import training
from tests import synthetic
from tests.conftest import REPO, run_binary


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("prepared"))
  synthetic.write_prepared(out, splits=(("train", 32), ("validation", 16)),
                           num_frames=(120, 160))
  return out


def test_two_replica_mirrored_training_equals_one_replica(prepared, tmp_path):
  """Two logical CPU devices make a 2-replica MirroredStrategy: the multi-GPU code path,
  through training.train and the optimizer it builds (ReplicaMeanAdam). Two steps on 2
  replicas must leave the weights and Adam's moments where one replica leaves them: Keras
  3.6 sums the replicas' gradients, so plain Adam would hold 2x the first moment and 4x the
  second. Stated tolerance: 1e-5 (float32 sums in another order)."""
  script = textwrap.dedent("""
      import json, sys
      import keras, numpy as np
      from av_sound_tf.train import distribution
      from av_sound_tf.train import training
      distribution.configure_cpu_replicas(2)
      results = {}
      for strategy in ("mirrored", "default"):
        config = training.TrainConfig(
            kind="visual", model_dir=f"{sys.argv[2]}/{strategy}", data_dir=sys.argv[1],
            width=0.05, dropout=0.0, batch_size=8, epochs=1, steps_per_epoch=2,
            learning_rate=1e-3, seed=3, deterministic=True, strategy=strategy, verbose=0,
            model_selection="last")
        summary = training.train(config)
        model = keras.models.load_model(summary["model"])
        assert type(model.optimizer) is distribution.ReplicaMeanAdam, type(model.optimizer)
        replicas = json.load(open(f"{config.model_dir}/config.json"))["num_replicas"]
        results[strategy] = {
            "replicas": replicas,
            "weights": [w.tolist() for w in model.get_weights()],
            "optimizer": {v.path: np.asarray(v).tolist() for v in model.optimizer.variables}}
      print("RESULT", json.dumps(results))
  """)
  res = subprocess.run([sys.executable, "-c", script, prepared, str(tmp_path)],
                       capture_output=True, text=True, cwd=REPO, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  line = [l for l in res.stdout.splitlines() if l.startswith("RESULT ")][-1]
  results = json.loads(line[len("RESULT "):])
  two, one = results["mirrored"], results["default"]
  assert (two["replicas"], one["replicas"]) == (2, 1)
  for a, b in zip(two["weights"], one["weights"]):
    np.testing.assert_allclose(a, b, atol=1e-5)
  moments = [k for k in one["optimizer"] if "momentum" in k or "velocity" in k]
  assert len(moments) == 2 * len(one["weights"]) and two["optimizer"].keys() == one[
      "optimizer"].keys()
  for key in one["optimizer"]:
    expected = np.asarray(one["optimizer"][key])
    np.testing.assert_allclose(two["optimizer"][key], expected,
                               atol=1e-5 * max(1.0, float(np.abs(expected).max())),
                               err_msg=key)
    if key in moments:
      assert np.abs(expected).max() > 0, key  # a step was taken


class _Crash(keras.callbacks.Callback):
  """Simulates a killed process in the middle of an epoch."""

  def __init__(self, epoch, batch):
    super().__init__()
    self.epoch, self.batch, self.current = epoch, batch, -1

  def on_epoch_begin(self, epoch, logs=None):
    self.current = epoch

  def on_train_batch_end(self, batch, logs=None):
    if self.current == self.epoch and batch == self.batch:
      raise KeyboardInterrupt("simulated crash")


def _config(data_dir, model_dir, kind="visual", **kw):
  base = dict(kind=kind, model_dir=model_dir, data_dir=data_dir, train_splits=("train",),
              validation_splits=("validation",), width=0.05, batch_size=8, epochs=4,
              seed=3, deterministic=True, strategy="default", verbose=0, num_frames=128)
  base.update(kw)
  return training.TrainConfig(**base)


def _weights(path):
  return keras.models.load_model(path).get_weights()


def test_resume_after_crash_equals_uninterrupted(prepared, tmp_path):
  """Stated tolerance: 1e-6 absolute on every weight (deterministic ops on CPU)."""
  straight = training.train(_config(prepared, str(tmp_path / "straight")))
  crashed_dir = str(tmp_path / "crashed")
  with pytest.raises(KeyboardInterrupt):
    training.train(_config(prepared, crashed_dir), extra_callbacks=[_Crash(epoch=2, batch=1)])
  with open(os.path.join(crashed_dir, "backup", "training_metadata.json")) as f:
    assert json.load(f)["epoch"] == 2  # epochs 0 and 1 finished before the crash
  resumed = training.train(_config(prepared, crashed_dir))
  for a, b in zip(_weights(straight["model"]), _weights(resumed["model"])):
    np.testing.assert_allclose(a, b, atol=1e-6)
  assert resumed["mAP"] == pytest.approx(straight["mAP"], abs=1e-9)
  with open(os.path.join(crashed_dir, "history.csv")) as f:
    assert len(f.read().strip().splitlines()) == 1 + 4  # header + one row per epoch


def test_augmented_run_resumes_exactly(prepared, tmp_path):
  """The ESC-10 benchmark's augmentation (mixup, SpecAugment time and frequency masks, cosine
  learning rate) draws every mask and mixing weight from (seed, epoch, step): a run killed
  after an epoch and resumed ends with the uninterrupted run's weights (1e-6)."""
  augmented = dict(kind="audio", width=0.0625, epochs=3, mixup_alpha=0.2, time_mask=24,
                   freq_mask=8, lr_schedule="cosine", model_selection="last")
  straight = training.train(_config(prepared, str(tmp_path / "straight"), **augmented))
  crashed_dir = str(tmp_path / "crashed")
  with pytest.raises(KeyboardInterrupt):
    training.train(_config(prepared, crashed_dir, **augmented),
                   extra_callbacks=[_Crash(epoch=1, batch=1)])
  with open(os.path.join(crashed_dir, "backup", "training_metadata.json")) as f:
    assert json.load(f)["epoch"] == 1  # epoch 0 finished before the crash
  resumed = training.train(_config(prepared, crashed_dir, **augmented))
  for a, b in zip(_weights(straight["model"]), _weights(resumed["model"])):
    np.testing.assert_allclose(a, b, atol=1e-6)


class _StageProbe(keras.callbacks.Callback):
  """At the start of each SeCoST stage: the fitted model and the loss it computes for fixed
  inputs x, labels y and student scores p (scores away from 0.5, where the loss would hardly
  depend on the target)."""

  def __init__(self, x, y, p):
    super().__init__()
    self.x, self.y, self.p, self.stages = x, y, p, []

  def on_train_begin(self, logs=None):
    loss = float(self.model.compute_loss(self.x, self.y, self.p, training=False))
    self.stages.append({"model": self.model, "loss": loss})


def _bce(target, scores):
  scores = np.clip(scores, 1e-7, 1 - 1e-7)
  return float(np.mean(-(target * np.log(scores) + (1 - target) * np.log(1 - scores))))


def test_audio_training_outputs_and_secost(prepared, tmp_path):
  """SeCoST stage 1 trains a fresh student on alpha * y + (1 - alpha) * p_0(x), p_0 the
  selected stage-0 model: its loss on a batch equals binary cross-entropy against that
  target, computed here from the saved stage-0 model."""
  import tensorflow as tf
  from av_sound_tf.core import metrics
  from av_sound_tf.train import pipeline
  model_dir = str(tmp_path / "audio")
  rng = np.random.default_rng(0)
  x = rng.normal(-8, 1, [8, 128, 64]).astype(np.float32)
  y = np.eye(4, dtype=np.float32)[np.arange(8) % 4]
  p = rng.uniform(0.05, 0.95, [8, 4]).astype(np.float32)
  probe = _StageProbe(tf.constant(x), tf.constant(y), tf.constant(p))
  config = _config(prepared, model_dir, kind="audio", epochs=2, deterministic=False,
                   secost_stages=1, secost_alpha=0.25, width=0.0625)
  summary = training.train(config, extra_callbacks=[probe])
  assert [s["stage"] for s in summary["stages"]] == [0, 1]
  for name in ("model.keras", "config.json", "validation_metrics.json",
               "stage0/model.keras", "stage1/history.csv", "saved_model/saved_model.pb"):
    assert os.path.exists(os.path.join(model_dir, name)), name
  with open(os.path.join(model_dir, "config.json")) as f:
    saved = json.load(f)
  assert saved["secost_stages"] == 1 and saved["num_classes"] == 4
  assert saved["secost_alpha"] == 0.25

  stage0, stage1 = probe.stages
  assert not isinstance(stage0["model"], distillation.Distiller)
  assert stage0["loss"] == pytest.approx(_bce(y, p), rel=1e-5)  # the labels only
  distiller = stage1["model"]
  assert isinstance(distiller, distillation.Distiller) and distiller.alpha == 0.25
  teacher = keras.models.load_model(os.path.join(model_dir, "stage0", "model.keras"))
  for a, b in zip(distiller.teacher.get_weights(), teacher.get_weights()):
    np.testing.assert_array_equal(a, b)  # the teacher is stage 0's selected model
  q = np.asarray(teacher(x, training=False))
  target = 0.25 * y + 0.75 * q
  assert stage1["loss"] == pytest.approx(_bce(target, p), rel=1e-5)
  assert abs(stage1["loss"] - _bce(y, p)) > 1e-3  # the teacher term counts (100x the tolerance)
  # The student is freshly initialized, not a copy of its teacher.
  assert not np.allclose(distiller.student.get_weights()[0], teacher.get_weights()[0])

  # The reported mAP is the final (stage 1) model's on the validation split.
  final = keras.models.load_model(os.path.join(model_dir, "model.keras"))
  val = pipeline.eval_dataset(training.load_data(config).validation_files,
                              training.input_config(config, training.load_data(config)))
  labels, scores = metrics.predict_dataset(final, val)
  assert summary["mAP"] == pytest.approx(
      metrics.evaluate(labels, scores).mean_average_precision, abs=1e-6)
  import csv
  with open(os.path.join(model_dir, "stage1", "history.csv")) as f:
    val_maps = [float(r["val_mAP"]) for r in csv.DictReader(f)]
  assert len(val_maps) == 2 and summary["stages"][1]["val_mAP"] == max(val_maps)


def test_training_learns_the_synthetic_task(prepared, tmp_path):
  summary = training.train(_config(prepared, str(tmp_path / "v"), epochs=6, width=0.1,
                                   learning_rate=3e-3, deterministic=False))
  assert summary["mAP"] > 0.9 and summary["accuracy"] > 0.8


def test_config_errors(prepared, tmp_path):
  with pytest.raises(ValueError, match="Split 'nope'"):
    training.train(_config(prepared, str(tmp_path / "x"), train_splits=("nope",)))
  with pytest.raises(ValueError, match="Unknown strategy"):
    distribution.get_strategy("tpu_pod")


def test_train_and_evaluate_binaries(prepared, tmp_path):
  model_dir = str(tmp_path / "bin_audio")
  res = run_binary("train_audio", f"--data_dir={prepared}", "--train_splits=train",
             "--validation_splits=validation", f"--model_dir={model_dir}", "--width=0.0625",
             "--num_frames=128", "--epochs=1", "--batch_size=8", "--noverbose")
  assert res.returncode == 0, res.stderr[-3000:]
  assert "mAP=" in res.stdout
  eval_dir = str(tmp_path / "eval")
  res = run_binary("evaluate_model", f"--model={model_dir}/model.keras", f"--data_dir={prepared}",
             "--splits=validation", f"--output_dir={eval_dir}")
  assert res.returncode == 0, res.stderr[-3000:]
  with open(os.path.join(eval_dir, "summary.json")) as f:
    summary = json.load(f)
  assert summary["num_examples"] == 16 and "accuracy" in summary
  with open(os.path.join(eval_dir, "per_class.csv")) as f:
    lines = f.read().splitlines()
  assert lines[0] == "index,mid,name,num_positives,average_precision,roc_auc,d_prime"
  assert lines[1].startswith("0,/m/c0,Class 0,4,")


def test_binaries_fail_clearly(tmp_path):
  for binary in ("train_audio", "train_visual", "evaluate_model"):
    res = run_binary(binary, "--helpfull")
    assert "Traceback" not in res.stderr and "--" in res.stdout
  res = run_binary("train_visual", f"--model_dir={tmp_path}/m", f"--data_dir={tmp_path}/nothing")
  assert res.returncode == 2 and "Traceback" not in res.stderr
  assert "dataset_info.json" in res.stderr
  res = run_binary("train_audio", f"--data_dir={tmp_path}")
  assert res.returncode != 0 and "--model_dir is required" in res.stderr
  res = run_binary("evaluate_model", f"--model={tmp_path}/none.keras", f"--data_dir={tmp_path}",
             "--splits=x")
  assert res.returncode == 2 and "Model not found" in res.stderr


def test_trains_on_audioset_released_embeddings(tmp_path):
  """The MIL head trains on AudioSet-format VGGish feature records (--input=audioset_embeddings)."""
  import tensorflow as tf
  from tests.schema_test import _audioset_example
  rng = np.random.default_rng(0)
  for split, n in (("train", 24), ("eval", 12)):
    with tf.io.TFRecordWriter(str(tmp_path / f"{split}.tfrecord")) as w:
      for i in range(n):
        emb = rng.integers(0, 256, [10, 128])
        emb[:, i % 3] = 250  # the class shows in the features
        w.write(_audioset_example(f"{split}{i:08d}", 0.0, [i % 3], emb).SerializeToString())
  config = training.TrainConfig(
      kind="embedding", model_dir=str(tmp_path / "m"), train_pattern=str(tmp_path / "train*"),
      validation_pattern=str(tmp_path / "eval*"), num_classes=527, batch_size=8, epochs=2,
      steps_per_epoch=3, strategy="default", verbose=0)
  summary = training.train(config)
  assert summary["num_examples"] == 12 and summary["evaluated_classes"] == 3
  assert summary["excluded_classes"] == 524  # classes with no positives are counted


def test_finished_run_is_not_silently_retrained(prepared, tmp_path):
  config = _config(prepared, str(tmp_path / "done"), epochs=1, deterministic=False)
  training.train(config)
  with pytest.raises(ValueError, match="finished run"):
    training.train(config)
  assert training.train(config, overwrite=True)["num_examples"] == 16


# /proc/cpuinfo lines of the machines the bfloat16 advice is about.
_CPUINFO_AVX512_NO_BF16 = ("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma avx512f avx512dq "
                           "avx512cd avx512bw avx512vl avx512_vnni\n")
_CPUINFO_AVX512_BF16 = _CPUINFO_AVX512_NO_BF16.replace("avx512_vnni", "avx512_vnni avx512_bf16")
_CPUINFO_AMX = _CPUINFO_AVX512_NO_BF16.replace("avx512_vnni", "amx_tile amx_bf16 amx_int8")
_CPUINFO_ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes sha2 crc32 bf16 i8mm\n"


def test_bfloat16_warning_detects_cpus_without_native_bfloat16():
  assert distribution.cpu_flags(_CPUINFO_AVX512_BF16) >= {"avx512f", "avx512_bf16"}
  warn = lambda cpuinfo, gpus=(): distribution.bfloat16_warning(  # pylint: disable=unnecessary-lambda-assignment
      "mixed_bfloat16", cpuinfo, list(gpus))
  assert warn(_CPUINFO_AVX512_NO_BF16) == distribution.BFLOAT16_SLOW_WARNING
  assert "10x slower" in distribution.BFLOAT16_SLOW_WARNING
  assert "--precision=float32" in distribution.BFLOAT16_SLOW_WARNING
  assert warn("processor\t: 0\nflags\t\t: fpu sse2 avx2\n") == distribution.BFLOAT16_SLOW_WARNING
  for native in (_CPUINFO_AVX512_BF16, _CPUINFO_AMX, _CPUINFO_ARM):
    assert warn(native) is None, native
  assert warn("") is None  # nothing known (no /proc/cpuinfo): nothing said
  assert warn(_CPUINFO_AVX512_NO_BF16, [(9, 0)]) is None  # a bfloat16 GPU does the work
  assert warn(_CPUINFO_AVX512_NO_BF16, [None]) is None  # a GPU of unknown capability
  assert "compute capability 7.5" in warn(_CPUINFO_AVX512_NO_BF16, [(7, 5)])
  assert distribution.bfloat16_warning("float32", _CPUINFO_AVX512_NO_BF16, []) is None


def test_bfloat16_warning_is_logged_at_the_start_of_training(monkeypatch, caplog, tmp_path):
  monkeypatch.setattr(distribution, "_read_cpuinfo", lambda: _CPUINFO_AVX512_NO_BF16)
  monkeypatch.setattr(distribution, "_gpu_capabilities", lambda: [])
  config = _config(str(tmp_path / "no_data"), str(tmp_path / "m"), precision="mixed_bfloat16")
  with pytest.raises(FileNotFoundError):  # the warning comes first, before the data
    training.train(config)
  assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
      distribution.BFLOAT16_SLOW_WARNING]
  caplog.clear()
  with pytest.raises(FileNotFoundError):
    training.train(_config(str(tmp_path / "no_data"), str(tmp_path / "m")))  # float32
  assert not [r for r in caplog.records if "bfloat16" in r.getMessage()]
