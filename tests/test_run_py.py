"""run.py, the guide's way to start the server: `nutribot serve` with the same flags, reading PDFs
from ./data/pdfs first when that folder holds any."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_run_py():
    spec = importlib.util.spec_from_file_location("guide_run", ROOT / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_guide_pdfs_it_is_nutribot_serve(tmp_path):
    run = load_run_py()
    assert run.serve_arguments(["--port", "9000"], tmp_path) == ["serve", "--port", "9000"]
    (tmp_path / "data" / "pdfs").mkdir(parents=True)  # an empty folder is not a knowledge base
    assert run.serve_arguments([], tmp_path) == ["serve"]


def test_pdfs_in_data_pdfs_are_read_first_unless_kb_is_given(tmp_path, capsys):
    run = load_run_py()
    folder = tmp_path / "data" / "pdfs" / "renal"
    folder.mkdir(parents=True)
    (folder / "diet.pdf").write_bytes(b"%PDF-1.4\n")
    assert run.serve_arguments(["--port", "9000"], tmp_path) == [
        "serve", "--port", "9000", "--kb", str(tmp_path / "data" / "pdfs")]
    assert "data/pdfs" in capsys.readouterr().err
    assert run.serve_arguments(["--kb", "mine"], tmp_path) == ["serve", "--kb", "mine"]
    assert run.serve_arguments(["--kb=mine"], tmp_path) == ["serve", "--kb=mine"]


def test_help_lists_the_serve_flags():
    result = subprocess.run([sys.executable, "run.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage: nutribot serve" in result.stdout
    for flag in ("--host", "--port", "--kb", "--checkpoint", "--mode"):
        assert flag in result.stdout
