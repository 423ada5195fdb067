# selfsup — set-up, demo and tests. `make demo` and `make test` work on a fresh machine.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FMNIST  := /usr/share/datasets/fashion-mnist
DEMO    ?= runs/demo

.PHONY: setup dataset demo test test-fast bench clean chromium

setup: $(VENV)/.installed dataset

# Exact versions from constraints.txt (torch/torchvision: this machine's pip caps them at these releases, which
# lie on its disk); the package itself declares ranges (pyproject.toml).
# PyTorch 2.14.1 on x86_64 is a CUDA build: the environment takes about 6 GB, so say so before pip runs out of disk.
$(VENV)/.installed: pyproject.toml constraints.txt
	@free_kb=$$(df -Pk . | awk 'NR == 2 {print $$4}'); [ "$$free_kb" -ge 6500000 ] || { \
	  echo "set-up needs about 6.5 GB free on this disk for the Python environment (PyTorch alone is ~5.6 GB);" \
	       "$$((free_kb / 1000000)) GB free here. Free some space and run make again." >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch torchvision
	$(PY) -m pip install -q -c constraints.txt -e '.[test,heif,onnx,track,video]'
	touch $@

# Optional: headless Chromium, for the report screenshot test (tests/test_report.py skips it without Chromium).
chromium:
	@command -v chromium >/dev/null || { \
	  echo "installing headless Chromium (Debian package chromium)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; }

dataset:
	@test -f $(FMNIST)/train-images-idx3-ubyte.gz || { \
	  echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; }

# Pretrain the default recipe (E-SSL: SimCLR + rotation prediction, small CNN, Fashion-MNIST; issue #20),
# then evaluate it beside the baselines.
DEMO_CONFIG ?= configs/essl_fashion_mnist.yaml
demo: setup
	$(VENV)/bin/selfsup pretrain --config $(DEMO_CONFIG) --out $(DEMO)
	$(VENV)/bin/selfsup evaluate $(DEMO) --protocol knn,linear

# Two workers (one per core on CI's 2-core machine); a file's tests stay on one worker (shared fixtures).
test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile

bench: setup
	$(PY) benchmarks/bench_vs_lightly.py

clean:
	rm -rf $(VENV) runs .pytest_cache
