# make repro : set up .venv (first time or when the lock changes) and run the pipeline
# make test  : set up .venv and run the test suite
# make gpu-check : on a GPU machine, the one check to run: doctor, every GPU test, the GPU benchmark, one table
# make setup-gpu : .venv with the CUDA 13 GPU stack (constraints-gpu.txt, the gpu extra), then `blipdiff doctor`
# make serve : Prefect server + deployments + a worker + MLflow server on 127.0.0.1 (Ctrl-C stops)
# make system-deps : Debian packages for the browser and PostgreSQL tests (root; they skip without)
# make samples : copy train_subject's sample grid (reports/samples/grid.png) to docs/img/samples_grid.png
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: setup repro test serve system-deps screenshots bench gpu-check samples clean-venv
SAMPLES_GRID := reports/samples/grid.png
.DEFAULT_GOAL := repro

$(BIN)/blipdiff: pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# constraints.txt pins every package; torch 2.13.0 is the CPU build on this machine's disk.
	# onnxruntime-gpu replaced onnxruntime. Both install the module `onnxruntime` (the CPU
	# package hides the GPU providers), so a venv that has the old one drops both, and the
	# install below puts onnxruntime-gpu back whole.
	if $(BIN)/python -m pip show -q onnxruntime >/dev/null 2>&1; then \
		$(BIN)/python -m pip uninstall -q -y onnxruntime onnxruntime-gpu; fi
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

setup: $(BIN)/blipdiff

# The GPU stack on a CUDA 13 machine (driver R580+): torch's CUDA build from PyTorch's cu130
# index (constraints-gpu.txt refuses a +cpu wheel, installed or offered), cuDNN 9, TensorRT 10
# whose libraries come from NVIDIA's index. Replaces an existing .venv's CPU torch in place.
# docs/serving.md#dependencies
.PHONY: setup-gpu
setup-gpu:
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	if $(BIN)/python -m pip show -q onnxruntime >/dev/null 2>&1; then \
		$(BIN)/python -m pip uninstall -q -y onnxruntime onnxruntime-gpu; fi
	$(BIN)/python -m pip install -c constraints.txt -c constraints-gpu.txt \
		--extra-index-url https://download.pytorch.org/whl/cu130 --extra-index-url https://pypi.nvidia.com \
		-e '.[dev,gpu]'
	touch $(BIN)/blipdiff
	$(BIN)/blipdiff doctor

repro: setup
	. $(BIN)/activate && dvc repro

test: setup
	. $(BIN)/activate && pytest

serve: setup
	. $(BIN)/activate && python -m flows.servers up

# headless Chromium (the MLflow UI test, screenshots) and PostgreSQL (the MLflow server's
# multi-user backend test); the tests that need them skip when they are missing
system-deps:
	@if command -v chromium >/dev/null && { command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; }; then \
		echo "chromium and postgresql are installed"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium postgresql; \
	else \
		echo "install chromium and postgresql (Debian: sudo apt-get install chromium postgresql); without them their tests skip"; \
	fi

screenshots: setup
	. $(BIN)/activate && python scripts/mlflow_screenshot.py

gpu-check: setup
	. $(BIN)/activate && python benchmarks/gpu_check.py

bench: setup
	. $(BIN)/activate && python benchmarks/context_bench.py && python benchmarks/generate_bench.py && python benchmarks/train_bench.py && python benchmarks/stream_bench.py && python benchmarks/eval_bench.py && python benchmarks/export_bench.py && python benchmarks/edit_bench.py && OMP_NUM_THREADS=1 python benchmarks/batch_bench.py

# the grid of the last `make repro` (train_subject writes it), for the docs; no venv needed
samples:
	@if [ ! -f $(SAMPLES_GRID) ]; then \
		echo "make samples: $(SAMPLES_GRID) is missing: run \`make repro\` first (the train_subject stage writes it)" >&2; \
		exit 1; \
	fi
	mkdir -p docs/images
	cp $(SAMPLES_GRID) docs/img/samples_grid.png
	@echo "copied $(SAMPLES_GRID) to docs/img/samples_grid.png"

clean-venv:
	rm -rf $(VENV)
