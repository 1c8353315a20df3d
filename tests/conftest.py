"""Shared pytest setup: markers, and the fixtures many test files use.

Helper modules beside this file (tiny_models.py, hf_reference.py, tiny_base.py, cuda_helpers.py)
build tiny random models and GPU-test inputs; pytest puts this folder on sys.path (see `pythonpath` in pyproject.toml), so tests import
them by bare name. Tests never import other test modules.
"""

from __future__ import annotations

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: builds virtual environments or runs whole commands (still run by make test)")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; skipped without one (run them with `pytest -m cuda`)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """Run a test's small matrices on one thread: on a busy 2-core machine OpenMP's spinning
    threads made small-matrix files take minutes instead of seconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_base_dir(tmp_path_factory):
    """A 2-layer random Llama over SmolLM2's tokenizer, as a Hugging Face folder."""
    from tiny_base import write_tiny_base

    return write_tiny_base(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def stage_files(tmp_path_factory):
    """Small stage1 / stage1_2 / stage2 JSONL files: {stage: path}."""
    from tiny_base import write_stage_files

    return write_stage_files(tmp_path_factory.mktemp("data"))
