# Every target builds .venv itself: torch's CPU build first (so nothing pulls a
# CUDA build), then samkit with its extras, all under constraints.txt (torch pinned).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.samkit-installed

.PHONY: venv demo demo-rl demo-gan test test-slow bench lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[all]'
	$(BIN)/python -m pip install -q -c constraints.txt --no-deps curvlinops-for-pytorch==3.0.1  # see pyproject's bench extra
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/samkit compare --quick

demo-rl: $(STAMP)
	$(BIN)/samkit rl --quick

demo-gan: $(STAMP)
	$(BIN)/samkit gan --quick

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow tests

bench: $(STAMP)
	$(BIN)/python benchmarks/overhead.py

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples
	$(BIN)/python -m mypy  # strict on samkit/optim and samkit/functional.py ([tool.mypy])

clean:
	rm -rf $(VENV) build dist src/*.egg-info
