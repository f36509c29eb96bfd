"""MultiWorkerMirroredStrategy through TF_CONFIG: two local worker processes on 127.0.0.1.

With one training file and two workers, each worker's input pipeline reads every second
record (the fallback when there are fewer files than workers, which is logged). Without
shuffling, crops or dropout, the union of the two workers' per-replica batches at step k is
exactly the single-worker global batch k, and the all-reduced gradient is the global
batch's gradient: the final weights must equal a single-worker run's.
Stated tolerance: 1e-5 absolute on every weight (float32 sums in another order).
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from tests import synthetic
from tests.conftest import REPO

SCRIPT = textwrap.dedent("""
    import json, sys
    from absl import logging
    from av_sound_tf.train import training
    logging.set_verbosity(logging.INFO)
    config = training.TrainConfig(
        kind="visual", model_dir=sys.argv[1], data_dir=sys.argv[2], width=0.02, dropout=0.0,
        batch_size=8, epochs=3, learning_rate=3e-3, shuffle_buffer=1, verbose=0,
        deterministic=True, strategy=sys.argv[3])
    summary = training.train(config)
    print("RESULT", json.dumps({"mAP": summary["mAP"], "model": summary["model"]}))
""")


def _free_ports(n):
  socks = [socket.socket() for _ in range(n)]
  for s in socks:
    s.bind(("127.0.0.1", 0))
  ports = [s.getsockname()[1] for s in socks]
  for s in socks:
    s.close()
  return ports


def _env(tf_config=None):
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2")
  env.pop("TF_CONFIG", None)
  if tf_config:
    env["TF_CONFIG"] = json.dumps(tf_config)
  return env


def _result(stdout):
  line = [l for l in stdout.splitlines() if l.startswith("RESULT ")]
  assert line, stdout[-2000:]
  return json.loads(line[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("mw") / "data")
  synthetic.write_prepared(out, splits=(("train", 48), ("validation", 16)), shards=1)
  return out


def test_two_workers_equal_one(data, tmp_path):
  single = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "single"), data,
                           "mirrored"], capture_output=True, text=True, env=_env(),
                          timeout=600)
  assert single.returncode == 0, single.stderr[-3000:]
  reference = _result(single.stdout)

  ports = _free_ports(2)
  cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
  model_dir = str(tmp_path / "multi")
  procs = [subprocess.Popen(
      [sys.executable, "-c", SCRIPT, model_dir, data, "multi_worker_mirrored"],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env=_env({"cluster": cluster, "task": {"type": "worker", "index": i}}))
           for i in range(2)]
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=600))
  finally:
    for p in procs:  # bounded: never leave a worker waiting for its peer
      if p.poll() is None:
        p.kill()
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  chief, other = _result(outputs[0][0]), _result(outputs[1][0])
  assert chief["model"] == os.path.join(model_dir, "model.keras")
  assert other["model"].startswith(os.path.join(model_dir, ".workers", "worker1"))
  for err in (outputs[0][1], outputs[1][1]):
    assert "sharding by record instead of by file" in err  # 1 file, 2 workers: logged
  assert "Input pipeline 0 of 2" in outputs[0][1] and "Input pipeline 1 of 2" in outputs[1][1]

  expected = keras.models.load_model(reference["model"]).get_weights()
  for path in (chief["model"], other["model"]):
    got = keras.models.load_model(path).get_weights()
    for a, b in zip(expected, got):
      np.testing.assert_allclose(a, b, atol=1e-5)
  assert chief["mAP"] == pytest.approx(reference["mAP"], abs=1e-6)
