# Each target makes .venv and installs the package (with its dev extras) when the venv is
# missing or older than pyproject.toml; a fresh machine needs nothing but python3.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: train test bench lint docs clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/resnetlab train -c digits_resnet20

test: $(STAMP)
	$(BIN)/python -m pytest tests

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

# docs/lesson.ipynb executed (full settings, a few minutes on 2 CPU cores) and rendered to
# docs/_build/lesson.html for reading offline; its runs go to docs/_build/runs/. RESNETLAB_FAST=1 shortens it.
docs: $(STAMP)
	$(BIN)/python -m ipykernel install --prefix $(VENV) --name python3 --display-name "Python 3 (resnetlab)" > /dev/null
	RESNETLAB_LESSON_RUNS=$(CURDIR)/docs/_build/runs $(BIN)/python -m nbconvert --to html --execute \
		--ExecutePreprocessor.kernel_name=python3 --ExecutePreprocessor.timeout=1200 \
		--output-dir docs/_build docs/lesson.ipynb

clean:
	rm -rf $(VENV) runs .pytest_cache docs/_build
