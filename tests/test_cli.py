"""Every console script, and the `python -m` forms the README shows, run as a user runs them: from
a folder of their own that holds folders named data/, recipes/ and kernels/.

Those three names are the folders of our source tree, and names users give their own folders;
`kernels` is also Hugging Face's package, which transformers imports. Installed, ours are
clara.data, clara.recipes and clara.kernels, so nothing should import a bare `data`, `recipes` or
`kernels`. Here each of the three folders is a trap: its __init__.py notes that it was imported
and raises. A command passes only if it exits 0 and no trap went off (the note catches an import
whose ImportError something swallowed).

`--help` of each script and each `clara-data` subcommand must name the command, and one real
`clara-train` step on a tiny random base must write the final checkpoint. The scripts are looked
up in the bin folder next to the running Python (the venv's), not on PATH.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # not resolved: a venv's python is a link to the base interpreter
SCRIPTS = sorted(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])
TRAPS = ("data", "recipes", "kernels")
TRAP_LOG = "imported-traps.log"

TRAP_INIT = '''\
import os
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "{log}"), "a") as f:
    f.write("{name}\\n")
raise ImportError("the working directory's {name}/ folder was imported: the library imports a bare "
                  "`{name}` instead of its own package")
'''


def _data_subcommands() -> list[str]:
    from clara.data.cli import SUBCOMMANDS

    return sorted(SUBCOMMANDS)


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory) -> Path:
    """A working folder with trap packages data/, recipes/ and kernels/ (each with a submodule
    too, in case something imports e.g. `data.formats`)."""
    cwd = tmp_path_factory.mktemp("user")
    for name in TRAPS:
        (cwd / name).mkdir()
        (cwd / name / "__init__.py").write_text(TRAP_INIT.format(name=name, log=TRAP_LOG))
        (cwd / name / "formats.py").write_text(f"raise ImportError('{name}.formats from the working directory')\n")
    return cwd


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # as a user's shell: only what the venv installed
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run(cwd: Path, *cmd: str, timeout: float = 300) -> subprocess.CompletedProcess:
    log = cwd / TRAP_LOG
    log.unlink(missing_ok=True)
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, env=_env(), capture_output=True, text=True,
                            timeout=timeout, stdin=subprocess.DEVNULL, check=False)
    shown = " ".join(str(c) for c in cmd)
    assert not log.exists(), f"{shown} imported the working directory's {log.read_text().split()}:\n{result.stderr}"
    assert result.returncode == 0, f"{shown} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def script(name: str) -> Path:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{path} is missing: the venv was installed before pyproject named {name}; reinstall "
                    "(pip install --no-deps -e .)")
    return path


def test_the_traps_go_off(user_dir):
    # Without this the tests below could pass with traps that never fire.
    for name in TRAPS:
        (user_dir / TRAP_LOG).unlink(missing_ok=True)
        result = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=user_dir, env=_env(),
                                capture_output=True, text=True, check=False)
        assert result.returncode != 0 and "ImportError" in result.stderr, result.stderr
        assert (user_dir / TRAP_LOG).read_text().split() == [name]
    (user_dir / TRAP_LOG).unlink()


@pytest.mark.parametrize("name", SCRIPTS)
def test_console_script_help(user_dir, name):
    out = run(user_dir, script(name), "--help").stdout
    assert f"usage: {name}" in out, out


@pytest.mark.parametrize("sub", _data_subcommands())
def test_clara_data_subcommand_help(user_dir, sub):
    out = run(user_dir, script("clara-data"), sub, "--help").stdout
    assert f"usage: clara-data {sub}" in out, out


def test_clara_data_lists_its_subcommands(user_dir):
    out = run(user_dir, script("clara-data"), "--help").stdout
    for sub in _data_subcommands():
        assert f"  {sub} " in out, out


# `python -m` puts the working directory first on sys.path: the traps sit right in the way.
@pytest.mark.parametrize("module,name", [
    ("clara.recipes.train_sft", "clara-train"),
    ("clara.generate", "clara-generate"),
    ("clara.data.validate", "clara-data validate"),
])
def test_python_m_help(user_dir, module, name):
    out = run(user_dir, sys.executable, "-m", module, "--help").stdout
    assert f"usage: {name}" in out, out


@pytest.mark.slow
def test_clara_train_one_step_writes_the_final_checkpoint(user_dir, tiny_base_dir, stage_files, tmp_path):
    # The flags of tests/test_recipes.py's argv() that keep the tiny base cheap.
    result = run(user_dir, script("clara-train"),
                 "--pretrain", tiny_base_dir, "--dataset", stage_files["stage1"], "--stage", "stage1",
                 "--compress_rate", "16", "--doc_max_length", "32", "--max_len", "256", "--generation_top_k", "2",
                 "--lora_dropout", "0", "--lora_rank", "4", "--train_batch_size", "2", "--micro_train_batch_size", "2",
                 "--max_steps", "1", "--learning_rate", "1e-3", "--lr_scheduler", "constant", "--logging_steps", "1",
                 "--seed", "3", "--save_path", tmp_path / "run", "--ckpt_path", tmp_path / "ckpt")
    final = tmp_path / "run" / "final"
    assert (final / "clara.json").is_file(), (sorted(p.name for p in (tmp_path / "run").iterdir()), result.stdout)
    assert any(p.suffix == ".safetensors" for p in final.iterdir()), sorted(p.name for p in final.iterdir())
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1


def test_clara_data_validate_loads_without_torch(user_dir):
    # clara/__init__.py resolves its names lazily so that the data commands start without torch.
    code = ("import sys, clara.data.cli, clara.data.validate; "
            "loaded = sorted(m for m in ('torch', 'transformers') if m in sys.modules); "
            "assert not loaded, loaded")
    run(user_dir, sys.executable, "-c", code)
