"""The Colab notebook notebooks/train_nutribot_t4.ipynb, run end to end on a CPU at a tiny size.

The notebook's code cells run in order in one namespace, as Colab would run them, after its
parameters cell is replaced by a tiny setting: the tiny random base of tests/tiny_base.py, a
ten-record PubMedQA file, one step per stage and config overrides that fit that base. Its commands
are the real ones (clara-data, clara-plan, the three stage scripts, clara-eval, the export), run as
subprocesses. What they leave behind is checked: each stage's final model, the evaluation metrics
and an exported checkpoint whose manifest hashes match its files.
"""

from __future__ import annotations

import ast
import json
import shutil
import time
from pathlib import Path

import pytest

from clara.files import sha256_file

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "train_nutribot_t4.ipynb"

TOPICS = [
    ("Does kale raise vitamin K intake?", "Kale is rich in vitamin K, which affects blood clotting.", "yes"),
    ("Does grapefruit change statin levels?", "Grapefruit juice blocks an enzyme that breaks down some statins.", "yes"),
    ("Does salt lower blood pressure?", "Salt intake raises blood pressure in salt-sensitive adults.", "no"),
    ("Is lactose found in milk?", "Milk contains lactose, a sugar that some adults digest poorly.", "yes"),
    ("Does spinach hold oxalate?", "Spinach holds oxalate, which binds calcium in the gut.", "yes"),
    ("Is mercury absent from all fish?", "Large predatory fish may carry mercury in their flesh.", "no"),
    ("Do oats give soluble fibre?", "Oats give beta-glucan, a soluble fibre that lowers cholesterol.", "yes"),
    ("Are beans poor in protein?", "Beans provide protein and fibre at low cost.", "no"),
    ("Is liver high in retinol?", "Liver is high in retinol, so pregnant women should limit it.", "maybe"),
    ("Do bananas hold potassium?", "Bananas hold potassium, which matters for kidney patients.", "yes"),
]


def notebook() -> dict:
    return json.loads(NOTEBOOK.read_text())


def code_cells(nb: dict) -> list[dict]:
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def source(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def write_pqal(path: Path) -> Path:
    records = {}
    for i, (question, text, decision) in enumerate(TOPICS):
        records[str(1000 + i)] = {
            "QUESTION": question, "CONTEXTS": [text, f"Background {i}: diet and medicine interact."],
            "LABELS": ["RESULTS", "BACKGROUND"], "MESHES": ["Diet"],
            "LONG_ANSWER": text, "final_decision": decision}
    path.write_text(json.dumps(records))
    return path


def test_notebook_structure():
    nb = notebook()
    assert nb["nbformat"] == 4
    cells = code_cells(nb)
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1 and tagged[0] is cells[0], "the first code cell is the one tagged 'parameters'"
    names = {t.id for node in ast.parse(source(tagged[0])).body if isinstance(node, ast.Assign) for t in node.targets}
    assert {"BASE_MODEL", "CONFIG", "DATA_OPTION", "WORK", "MAX_STEPS", "REPO", "INSTALL", "EXTRA_FLAGS",
            "CONFIG_OVERRIDES", "PUBMEDQA_FILE", "PDF_FOLDER"} <= names
    for cell in cells:
        compile(source(cell), "<cell>", "exec")
        assert not any(line.lstrip().startswith(("!", "%")) for line in source(cell).splitlines()), \
            "cells are plain Python (no shell or magic lines), so they run outside Jupyter too"
    assert any(c["cell_type"] == "markdown" for c in nb["cells"])


@pytest.mark.slow
def test_notebook_runs_on_cpu(tiny_base_dir, tmp_path, capsys):
    nb = notebook()
    cells = code_cells(nb)
    work = tmp_path / "work"
    params = f"""
BASE_MODEL = {str(tiny_base_dir)!r}
CONFIG = "phi2-t4"
CONFIG_OVERRIDES = {{"compress_rate": 16, "doc_max_length": 32, "lora_rank": 4, "max_len": 256,
                    "train_batch_size": 2, "micro_train_batch_size": 2, "generation_top_k": 2,
                    "bf16": False, "gradient_checkpointing": False, "logging_steps": 1}}
EXTRA_FLAGS = ["--device", "cpu"]
DATA_OPTION = "A"
PUBMEDQA_FILE = {str(write_pqal(tmp_path / "pqal.json"))!r}
PUBMEDQA_HF = "unused"
PUBMEDQA_FLAGS = ["--num_candidates", "4", "--dev_fraction", "0.2"]
PDF_FOLDER = None
PDF_GENERATOR = None
PDF_LLM_MODEL = None
PDF_FLAGS = []
WORK = {str(work)!r}
MAX_STEPS = 1
SAVE_STEPS = None
USE_PLANNER = True
MEMORY_BUDGET_GB = 15.0
EVAL_MAX_SAMPLES = 2
EVAL_DTYPE = None
EVAL_FLAGS = ["--max_new_tokens", "4", "--batch_size", "2"]
EXPORT_DTYPE = "bf16"
REPO = "unused"
INSTALL = False
REQUIRE_GPU = False
"""
    namespace: dict = {"__name__": "__notebook__"}
    started = time.perf_counter()
    exec(compile(params, "<parameters>", "exec"), namespace)
    for i, cell in enumerate(cells[1:], start=1):
        exec(compile(source(cell), f"<code cell {i}>", "exec"), namespace)
    elapsed = time.perf_counter() - started
    out = capsys.readouterr().out

    import torch
    if not torch.cuda.is_available():
        assert "No GPU is attached" in out

    # the planner ran for every stage and its figure was read
    assert out.count("largest micro-batch within the budget:") == 3
    assert all(f"==> {stage}: micro-batch 2" in out for stage in ("stage1", "stage1_2", "stage2"))
    # every stage trained its one step and left a final model
    for stage in ("stage1", "stage1_2", "stage2"):
        run = work / "runs" / stage
        assert (run / "final" / "clara.json").is_file(), stage
        steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        assert sum("loss" in r for r in steps) == 1, stage
        assert json.loads((run / "run.json").read_text())["identity"]["stage"] == stage
    # the evaluation wrote its metrics
    for name in ("stage2_dev", "stage1_2_dev", "stage1_2_dev_nll"):
        assert isinstance(json.loads((work / "eval" / f"{name}.metrics.json").read_text()), dict), name
    # the export holds the stage2 model, and its manifest's hashes match the files
    export = work / "nutribot-checkpoint"
    manifest = json.loads((export / "manifest.json").read_text())
    assert [s["stage"] for s in manifest["stages"]] == ["stage1", "stage1_2", "stage2"]
    assert set(manifest["metrics"]) == {"stage2_dev.metrics.json", "stage1_2_dev.metrics.json",
                                        "stage1_2_dev_nll.metrics.json"}
    assert manifest["files"] and all(sha256_file(export / name) == digest for name, digest in manifest["files"].items())

    # Re-running the training cell, as after a Colab disconnect: finished stages are skipped; a
    # stage with a step checkpoint but no final model resumes from it; a stage cut off before its
    # first checkpoint (run.json and metrics.jsonl only) starts again.
    train_cell = next(source(c) for c in cells if "clara.recipes.{stage}" in source(c))
    exec(compile(train_cell, "<training cell>", "exec"), namespace)
    assert capsys.readouterr().out.count("already trained") == 3
    shutil.rmtree(work / "runs" / "stage2" / "final")
    exec(compile(train_cell, "<training cell>", "exec"), namespace)
    assert "resumed from" in capsys.readouterr().out
    shutil.rmtree(work / "runs" / "stage1_2" / "final")
    shutil.rmtree(work / "runs" / "stage1_2" / "checkpoints")
    exec(compile(train_cell, "<training cell>", "exec"), namespace)
    out = capsys.readouterr().out
    assert "no checkpoint" in out and out.count("already trained") == 2
    assert all((work / "runs" / s / "final" / "clara.json").is_file() for s in ("stage1", "stage1_2", "stage2"))
    print(f"notebook ran in {elapsed:.0f} s")


def test_micro_batch_choice():
    """The planner cell's rule: keep the config's micro-batch when it fits, else the largest
    micro-batch that fits and divides the batch."""
    cell = next(c for c in code_cells(notebook()) if "def choose_micro_batch" in source(c))
    tree = ast.parse(source(cell))
    funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "choose_micro_batch"]
    namespace = {"MEMORY_BUDGET_GB": 15.0}
    exec(compile(ast.Module(body=funcs, type_ignores=[]), "<cell>", "exec"), namespace)
    choose = namespace["choose_micro_batch"]
    assert choose(3, 2, 16)[0] == 2
    assert choose(2, 2, 16)[0] == 2
    assert choose(1, 2, 16)[0] == 1
    assert choose(3, 4, 8)[0] == 2      # 3 fits but does not divide 8
    assert choose(7, 4, 8)[0] == 4
    assert choose(0, 2, 16)[0] == 1
    assert choose(None, 2, 16)[0] == 2


def write_text_pdf(path: Path, pages: list[list[str]]) -> Path:
    """A plain PDF with one Helvetica text line per entry of each page, written by hand."""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", None,
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    kids = []
    for lines in pages:
        text = " ".join(f"({line}) Tj 0 -16 Td" for line in lines)
        stream = f"BT /F1 11 Tf 72 720 Td {text} ET".encode()
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
        objects.append(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> "
                       b"/Contents %d 0 R >>" % len(objects))
        kids.append(len(objects))
    objects[1] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (b" ".join(b"%d 0 R" % k for k in kids), len(kids))
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    path.write_bytes(bytes(out))
    return path


def test_notebook_pdf_data(tiny_base_dir, tmp_path, capsys):
    """Option B's data cell: PDFs -> chunks -> restate rows, plus the knowledge base's QA files."""
    pdfs = tmp_path / "pdfs"
    pdfs.mkdir()
    write_text_pdf(pdfs / "guide.pdf", [[text for _, text, _ in TOPICS[:5]], [text for _, text, _ in TOPICS[5:]]])
    namespace: dict = {}
    params = f"""
BASE_MODEL = {str(tiny_base_dir)!r}
CONFIG = "phi2-t4"
CONFIG_OVERRIDES = {{"doc_max_length": 32, "generation_top_k": 2}}
EXTRA_FLAGS = []
DATA_OPTION = "B"
PDF_FOLDER = {str(pdfs)!r}
PDF_GENERATOR = None
PDF_LLM_MODEL = None
PDF_FLAGS = ["--overlap", "4"]
WORK = {str(tmp_path / "work")!r}
INSTALL = False
REQUIRE_GPU = False
"""
    exec(compile(params, "<parameters>", "exec"), namespace)
    for cell in code_cells(notebook())[1:]:
        exec(compile(source(cell), "<code cell>", "exec"), namespace)
        if "DATA = {" in source(cell):
            break
    data = namespace["DATA"]
    from clara.data.formats import read_stage_file

    rows = read_stage_file(data["stage1"], "stage1")
    assert len(rows) == len(set(rows)), "each restate row once"
    chunks = [json.loads(line)["text"] for line in
              (tmp_path / "work" / "data" / "pdfs" / "chunks.jsonl").read_text().splitlines() if line.strip()]
    assert chunks and "kale" in " ".join(chunks).lower()
    restated = {r.docs[0] for r in rows if r.data_type == "paraphrase"}
    assert set(chunks) <= restated
    assert len(read_stage_file(data["stage1_2"], "stage1_2", top_k=2)) > 0
    assert len(read_stage_file(data["stage2_dev"], "stage2")) > 0
