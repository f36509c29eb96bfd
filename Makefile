# `make install` is idempotent: it creates .venv once and reinstalls only when setup.py or
# requirements.txt change. `make test` and `make demo` start with it.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_FLAGS ?= -n 2 --dist loadfile

.PHONY: install test test-slow demo bench bench-esc10 bench-distill bench-peers clean

install: $(STAMP)

$(STAMP): setup.py requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -e .
	@touch $(STAMP)

test: install
	$(PY) -m pytest $(PYTEST_FLAGS) -m "not slow" tests

test-slow: install
	$(PY) -m pytest $(PYTEST_FLAGS) -m slow tests

demo: install
	$(PY) bin/demo --output_dir=demo_out

bench: install
	$(PY) benchmarks/prepare_benchmark.py
	$(PY) benchmarks/train_benchmark.py
	$(PY) benchmarks/train_benchmark.py --precision=mixed_bfloat16
	$(PY) benchmarks/tflite_benchmark.py
	$(PY) benchmarks/tflite_benchmark.py --architecture=mobile_mil
	$(PY) benchmarks/shard_check_benchmark.py
	$(PY) benchmarks/scaling_benchmark.py

bench-esc10: install
	$(PY) bin/bench_esc10 --output_dir=out/esc10_bench

# The on-device student against its teachers (needs the demo's and the ESC-10 run's models).
bench-distill: demo bench-esc10
	$(PY) benchmarks/distill_benchmark.py --demo_dir=demo_out --seeds=0,1,2 \
	    --esc10_dir=out/esc10_bench --folds=1,2,3,4,5 --out=out/distill

# Peers side by side in one run (issue 18): the Table-1 network in PyTorch, librosa, YAMNet's
# TFLite. torch is a benchmark dependency only (requirements-bench.txt says why --no-deps).
BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): requirements-bench.txt $(STAMP)
	$(PY) -m pip install --quiet --no-deps -r requirements-bench.txt
	@touch $(BENCH_STAMP)

bench-peers: install $(BENCH_STAMP)
	$(PY) benchmarks/peers_benchmark.py

clean:
	rm -rf $(VENV) out .pytest_cache
