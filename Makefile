# Set-up is part of every target: a fresh machine needs only python3 (3.10+) and this file.
VENV      ?= .venv
PY        := $(VENV)/bin/python
DATA_DIR  ?= ../shared/data
DEMO_RUN  ?= runs/demo-mrpc-adamw
export HF_HUB_OFFLINE = 1

.PHONY: setup demo test lint clean

# torch==2.13.0 first (a CPU build on disk here); the project's range admits it, so nothing larger is fetched.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.installed

# The main job: fine-tune the offline MiniLM on real MRPC with AdamW and print dev metrics; a rerun resumes.
demo: setup
	$(VENV)/bin/landscape train --task mrpc --model minilm --data-dir $(DATA_DIR) --epochs 3 \
		--out $(DEMO_RUN) $(if $(wildcard $(DEMO_RUN)/run.json),--resume,)

test: setup
	$(VENV)/bin/python -m pytest -q

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) runs .pytest_cache
