# `make install` is idempotent: it creates .venv once and reinstalls only when setup.py or
# requirements.txt change. `make test` and `make demo` start with it.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_FLAGS ?= -n 2 --dist loadfile

.PHONY: install test test-slow demo bench bench-esc10 clean

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

bench-esc10: install
	$(PY) bin/bench_esc10 --output_dir=out/esc10_bench

clean:
	rm -rf $(VENV) out .pytest_cache
