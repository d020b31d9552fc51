# medseg: `make demo` runs the main job, `make test` the test suite. Both set themselves up.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: setup test demo lint bench bundle clean

setup: $(STAMP)

# torch is pinned here (not in pyproject.toml) so pip takes the CPU wheel on disk
# instead of resolving a multi-GB CUDA build for a bare `torch` requirement.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,jpeg,monai,onnx,openvino,ray]'
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

demo: setup
	$(PY) pipelines/demo.py

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check medseg tests pipelines benchmarks

# The bundled model as a MONAI bundle, regenerated from models/hippocampus-mr (a test fails
# when the committed one is stale).
bundle: setup
	$(PY) -m medseg export --model models/hippocampus-mr --format bundle -o pipelines/bundles/hippocampus_mr --overwrite

bench: setup
	$(PY) benchmarks/inference.py

clean:
	rm -rf $(VENV) .demo build *.egg-info
