"""The `nutribot` command on a tiny checkpoint: ask (text and --json), --batch with one model load,
index, bad input as one line, and `python -m nutribot`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from nutribot import cli
from nutribot.retriever import ClaraRetriever
from nutribot_helpers import write_tiny_checkpoint
from tiny_base import require_embedded_tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    require_embedded_tokenizer()
    return write_tiny_checkpoint(tmp_path_factory.mktemp("cli"))


def flags(checkpoint, tmp_path):
    return ["--checkpoint", str(checkpoint), "--cache_dir", str(tmp_path / "cache"), "--max_new_tokens", "4"]


def test_ask_prints_warnings_first_then_answer_and_documents(checkpoint, tmp_path, capsys):
    assert cli.main(["ask", "Which greens should I eat more of?", "--patient", "on Coumadin",
                     "--top_k", "3", *flags(checkpoint, tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.index("Contraindications found: warfarin") < out.index("Answer")
    assert out.index("Answer") < out.index("Documents (built-in nutrition knowledge base, mode clara)")
    if "WARNINGS" in out:
        assert out.index("WARNINGS") < out.index("Answer")


def test_ask_json_is_exactly_the_documented_object(checkpoint, tmp_path, capsys):
    assert cli.main(["ask", "Is grapefruit safe?", "--patient", "takes Lipitor", "--json", "--mode", "text",
                     *flags(checkpoint, tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"answer", "warnings", "contraindications", "documents", "mode"}
    assert result["mode"] == "text" and len(result["documents"]) == 5
    assert result["contraindications"][0]["evidence"] == "Lipitor"
    assert "grapefruit" in result["contraindications"][0]["restricts"]


def test_dtype_quantize_and_repetition_penalty_reach_the_model(checkpoint, tmp_path, capsys, monkeypatch):
    seen = []
    original = ClaraRetriever.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        seen.append((self.model.memory_embeddings.dtype, type(self.model.decoder.layers[0].mlp.down_proj.quantized).__name__,
                     self.repetition_penalty))

    monkeypatch.setattr(ClaraRetriever, "__init__", spy)
    assert cli.main(["ask", "Is grapefruit safe?", "--patient", "takes Lipitor", "--json", "--dtype", "bf16",
                     "--quantize", "int8", "--repetition_penalty", "1.25", *flags(checkpoint, tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["contraindications"][0]["evidence"] == "Lipitor"
    assert seen == [(torch.bfloat16, "QuantizedLinear", 1.25)]
    with pytest.raises(SystemExit) as exit_:
        cli.main(["ask", "kale?", "--quantize", "int4", *flags(checkpoint, tmp_path)])
    assert exit_.value.code == 2 and "--quantize: invalid choice: 'int4'" in capsys.readouterr().err


def test_batch_loads_the_model_once_and_answers_every_line(checkpoint, tmp_path, capsys, monkeypatch):
    cases = [{"query": "Which greens are healthy?", "patient_context": "on warfarin"},
             {"query": "Can I eat cheese?", "patient_context": "takes Nardil"},
             {"query": "What about fish?", "patient_context": "pregnant"}]
    batch = tmp_path / "cases.jsonl"
    batch.write_text("".join(json.dumps(c) + "\n" for c in cases))
    loads = []
    real_init = ClaraRetriever.__init__
    monkeypatch.setattr(ClaraRetriever, "__init__", lambda self, *a, **k: (loads.append(1), real_init(self, *a, **k))[1])
    assert cli.main(["ask", "--batch", str(batch), "--json", *flags(checkpoint, tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(loads) == 1 and len(lines) == 3
    names = [[c["name"] for c in json.loads(line)["contraindications"]] for line in lines]
    assert names[0] == ["warfarin"] and names[1] and names[2]


@pytest.mark.parametrize("content, message", [
    ('{"query": "kale?"}\nnot json\n', "cases.jsonl:2: not JSON"),
    ('{"patient_context": "on warfarin"}\n', "cases.jsonl:1: needs a non-empty string field \"query\""),
    ('{"query": "kale?", "patient_context": 5}\n', "cases.jsonl:1: \"patient_context\" must be a string"),
    ("\n", "cases.jsonl: no cases"),
])
def test_bad_batch_files_are_one_line_errors(checkpoint, tmp_path, capsys, content, message):
    batch = tmp_path / "cases.jsonl"
    batch.write_text(content)
    assert cli.main(["ask", "--batch", str(batch), *flags(checkpoint, tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]


def test_question_and_batch_are_exclusive_and_kb_must_exist(checkpoint, tmp_path, capsys):
    assert cli.main(["ask", *flags(checkpoint, tmp_path)]) == 2
    assert "give a question or --batch FILE" in capsys.readouterr().err
    assert cli.main(["ask", "kale?", "--kb", str(tmp_path / "missing"), *flags(checkpoint, tmp_path)]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_index_then_python_dash_m(checkpoint, tmp_path, capsys):
    assert cli.main(["index", "--checkpoint", str(checkpoint), "--cache_dir", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    assert "built-in nutrition knowledge base: 182 passages indexed in" in out
    assert any(p.suffix == ".safetensors" for p in (tmp_path / "cache").iterdir())
    run = subprocess.run([sys.executable, "-m", "nutribot", "--help"], capture_output=True, text=True)
    assert run.returncode == 0 and "nutribot ask" in run.stdout
