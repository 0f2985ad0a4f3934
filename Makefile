# Set-up is part of every target: a fresh machine needs only python3 (3.10+) and this file.
VENV      ?= .venv
PY        := $(VENV)/bin/python
DATA_DIR  ?= ../shared/data
DEMO_OUT  ?= runs/demo
export HF_HUB_OFFLINE = 1

.PHONY: setup demo test lint clean

# torch==2.13.0 first (a CPU build on disk here); the project's range admits it, so nothing larger is fetched.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.installed

# The main job: AdamW, SAM, FSAM and δ-SAM fine-tuned on real SST-2, every analysis, figures and report.html.
# A rerun skips what is done (and resumes a stage that was interrupted).
demo: setup
	$(VENV)/bin/landscape demo --data-dir $(DATA_DIR) --out $(DEMO_OUT)

test: setup
	$(VENV)/bin/python -m pytest -q

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) runs .pytest_cache
