"""Apple's released models by name: a hub checkpoint (repo id + subfolder) downloaded, converted
once into our format, cached, and loaded by Clara.from_pretrained and the commands.

No network: a Hugging Face hub cache is laid out in a tmp dir as huggingface_hub leaves one after a
download (refs/main holding the commit hash, blobs named by their hash, snapshots/<commit>/... as
relative symlinks to the blobs), with HF_HUB_OFFLINE=1. It holds a tiny random Mistral base
"tiny/mistral" and, in the subfolder compression-16 of "tiny/clara", an official-format checkpoint
whose config.json names that base, as apple/CLaRa-7B-Instruct/compression-16 names
mistralai/Mistral-7B-Instruct-v0.2.
"""

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from clara import official_format
from clara.checkpoint import CheckpointError, names_clara_checkpoint
from clara.generate_cli import main as generate_main
from clara.lora import adapter_state_dict
from clara.model import Clara
from clara.official import import_official_checkpoint
from clara.recipes.evaluate import load_model as eval_load_model
from nutribot.retriever import load_model as nutribot_load_model
from official_files import DOCS, random_adapter, write_base, write_official

BASE_REPO, CLARA_REPO, SUBFOLDER = "tiny/mistral", "tiny/clara", "compression-16"
QUESTION = "Where is Vitamin C found ?"
EOS_ID = 2  # official_files' tokenizer: <unk>, <s>, </s>, then words


# ---------------------------------------------------------------------------------------------
# A hub cache, as huggingface_hub writes one
# ---------------------------------------------------------------------------------------------
def commit_hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def blob_name(path: str, content: bytes) -> str:
    """The hub names a blob by its LFS sha256 (weights), or by git's blob sha1 (small text files)."""
    if path.endswith((".safetensors", ".pth")):
        return hashlib.sha256(content).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def add_snapshot(cache: Path, repo_id: str, files: dict[str, Path], commit: str) -> Path:
    """Put `files` (path in the repo -> local file) into the cache as commit `commit` of `repo_id`,
    the branch main pointing at it; returns the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for path, source in files.items():
        content = source.read_bytes()
        blob = repo / "blobs" / blob_name(path, content)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(content)
        link = snapshot / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def never_stop(base: Path) -> None:
    """Zero the lm head's row of </s>: the random base would often end its answer at once, and an
    answer of six greedy tokens compares two models better than an empty one."""
    state = load_file(str(base / "model.safetensors"))
    state["lm_head.weight"][EOS_ID] = 0.0
    save_file(state, str(base / "model.safetensors"))


def files_of(folder: Path, prefix: str = "") -> dict[str, Path]:
    return {prefix + p.name: p for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def hub(tmp_path, monkeypatch, one_thread):
    """The offline hub cache with tiny/mistral and tiny/clara; $CLARA_CACHE in tmp_path too.
    Returns a dict: cache, the official folder as written (source), its snapshot folder, the
    clara cache, the commit."""
    import huggingface_hub.constants as hc

    cache, clara_cache, work = tmp_path / "hub", tmp_path / "clara-cache", tmp_path / "cwd"
    work.mkdir()
    for name, value in (("HF_HUB_CACHE", str(cache)), ("HF_HUB_OFFLINE", "1"), ("CLARA_CACHE", str(clara_cache))):
        monkeypatch.setenv(name, value)
    # huggingface_hub reads its environment once, at import
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(work)  # so that no relative folder named tiny/... can be taken for the repo

    base = write_base(tmp_path / "src" / "mistral", tied=False, model_type="mistral")
    never_stop(base)
    add_snapshot(cache, BASE_REPO, files_of(base), commit_hash("base v1"))
    source = tmp_path / "src" / "clara"
    write_official(source, base, {"encoder_adapter": random_adapter(80)[0], "decoder_adapter": random_adapter(81)[0]},
                   decoder_model_name=BASE_REPO)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the official save_pretrained writes these too
        shutil.copy(base / name, source / name)
    commit = commit_hash("clara v1")
    snapshot = add_snapshot(cache, CLARA_REPO, files_of(source, f"{SUBFOLDER}/"), commit)
    return {"cache": cache, "source": source, "snapshot": snapshot, "clara_cache": clara_cache, "commit": commit}


def greedy(model: Clara) -> tuple[list[str], list[int], torch.Tensor]:
    """(answers, generated ids, memory vectors) for a fixed question and DOCS, greedy."""
    ids: list[int] = []
    answers = model.generate_from_text([QUESTION], [DOCS], max_new_tokens=6,
                                       on_token=lambda token: ids.append(int(token[0])))
    return answers, ids, model.compress_documents(DOCS)


def assert_same_model(ours: Clara, direct: Clara) -> None:
    assert ours.adapter_names == direct.adapter_names == ["decoder_adapter", "encoder_adapter"]
    for name in ours.adapter_names:
        a, b = adapter_state_dict(ours.decoder, name), adapter_state_dict(direct.decoder, name)
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), name
    assert torch.equal(ours.memory_embeddings, direct.memory_embeddings)
    answers, ids, memory = greedy(ours)
    direct_answers, direct_ids, direct_memory = greedy(direct)
    assert len(ids) == 6 and ids == direct_ids and answers == direct_answers
    assert torch.equal(memory, direct_memory)


def count_conversions(monkeypatch) -> list[Path]:
    """The official folders converted from now on (the conversion, which import_official_checkpoint
    runs too, still runs)."""
    calls: list[Path] = []
    original = official_format.convert_official_checkpoint

    def counting(path, model_class, **kwargs):
        calls.append(Path(path))
        return original(path, model_class, **kwargs)

    monkeypatch.setattr(official_format, "convert_official_checkpoint", counting)
    return calls


# ---------------------------------------------------------------------------------------------
def test_repo_and_subfolder_load_and_answer_as_the_direct_import(hub, monkeypatch):
    conversions = count_conversions(monkeypatch)
    model = Clara.from_pretrained(CLARA_REPO, subfolder=SUBFOLDER)
    assert conversions == [hub["snapshot"] / SUBFOLDER]
    assert model.base_name == BASE_REPO and model.config.training_stage == "stage1_2"
    assert (model.config.compress_rate, model.config.doc_max_length) == (4, 16)

    converted = hub["clara_cache"] / "converted" / "tiny--clara" / SUBFOLDER / hub["commit"] / "float32"
    assert (converted / "clara.json").is_file()
    assert not [p.name for p in converted.parent.iterdir() if p.name.startswith(".")]  # no temporary left

    # import_official_checkpoint on the same files, its base loaded from the same hub cache
    direct = import_official_checkpoint(hub["snapshot"] / SUBFOLDER)
    assert_same_model(model, direct)


def test_string_form_loads_the_cached_conversion_until_the_hub_commit_changes(hub, monkeypatch):
    first = Clara.from_pretrained(f"{CLARA_REPO}:{SUBFOLDER}")
    conversions = count_conversions(monkeypatch)
    again = Clara.from_pretrained(f"{CLARA_REPO}:{SUBFOLDER}")
    assert conversions == []  # read from $CLARA_CACHE, not converted again
    assert_same_model(again, first)

    # A new commit on the hub (here: the same files) is a new conversion, in its own folder.
    new_commit = commit_hash("clara v2")
    add_snapshot(hub["cache"], CLARA_REPO, files_of(hub["source"], f"{SUBFOLDER}/"), new_commit)
    Clara.from_pretrained(CLARA_REPO, subfolder=SUBFOLDER)
    assert conversions == [hub["cache"] / "models--tiny--clara" / "snapshots" / new_commit / SUBFOLDER]
    converted = hub["clara_cache"] / "converted" / "tiny--clara" / SUBFOLDER
    assert sorted(p.name for p in converted.iterdir()) == sorted([hub["commit"], new_commit])


def test_local_official_folder_is_converted_once_too(hub, monkeypatch):
    conversions = count_conversions(monkeypatch)
    model = Clara.from_pretrained(hub["source"])
    Clara.from_pretrained(hub["source"])
    assert conversions == [hub["source"]]
    assert list((hub["clara_cache"] / "converted" / "local").glob("*/float32/clara.json"))
    assert_same_model(model, import_official_checkpoint(hub["source"]))


def test_the_first_load_reads_the_base_once_and_equals_later_loads(hub, monkeypatch):
    from clara import checkpoint as checkpoint_module
    from clara.weights import load_base

    reads = []

    def counting_load_base(name, **kwargs):
        reads.append(name)
        return load_base(name, **kwargs)

    monkeypatch.setattr(checkpoint_module, "load_base", counting_load_base)
    monkeypatch.setattr(official_format, "load_base", counting_load_base)
    first = Clara.from_pretrained(f"{CLARA_REPO}:{SUBFOLDER}")
    assert reads == [BASE_REPO]  # the conversion's base is the model's base: no second read
    later = Clara.from_pretrained(f"{CLARA_REPO}:{SUBFOLDER}")
    assert reads == [BASE_REPO, BASE_REPO]  # from the cached conversion: one read
    assert_same_model(first, later)
    assert first.config == later.config and first.adapter_names == later.adapter_names
    # Another stage than the saved one builds other adapters: the conversion is loaded, not reused.
    Clara.from_pretrained(f"{CLARA_REPO}:{SUBFOLDER}", training_stage="stage2")
    assert reads == [BASE_REPO] * 3


def test_names_that_mean_a_clara_checkpoint(hub):
    # No download: commands use this to choose between from_pretrained and from_base.
    assert names_clara_checkpoint(f"{CLARA_REPO}:{SUBFOLDER}") and names_clara_checkpoint(hub["source"])
    assert names_clara_checkpoint("apple/CLaRa-7B-Instruct:compression-16")
    for base in (BASE_REPO, "smollm2-135m", str(hub["clara_cache"].parent / "nowhere"), ""):
        assert not names_clara_checkpoint(base), base


def load_error(name: str, **kwargs) -> str:
    """The CheckpointError Clara.from_pretrained(name, **kwargs) raises; it must be one line."""
    with pytest.raises(CheckpointError) as error:
        Clara.from_pretrained(name, **kwargs)
    assert "\n" not in str(error.value)
    return str(error.value)


def test_bad_names_are_one_line_errors_naming_them(hub):
    assert load_error(CLARA_REPO, subfolder="compression-99") == (
        f"{CLARA_REPO}:compression-99: the hub repo {CLARA_REPO} has no subfolder 'compression-99' "
        f"(commit {hub['commit']})")
    assert load_error("nobody/nothing:compression-16").startswith(
        "nobody/nothing:compression-16: not a local path, and the hub download failed: ")
    at_root = load_error(CLARA_REPO)  # the checkpoint is in a subfolder
    assert at_root.startswith(f"{CLARA_REPO}: holds neither clara.json (a Clara checkpoint) nor config.json")
    assert at_root.endswith(f"name the subfolder that holds it, as '{CLARA_REPO}:SUBFOLDER'")
    assert "names subfolder 'compression-16' and subfolder='compression-128'" in load_error(
        f"{CLARA_REPO}:{SUBFOLDER}", subfolder="compression-128")
    assert "subfolder '../x' must be a folder path inside the repo" in load_error(f"{CLARA_REPO}:../x")
    # neither a local path nor a repo id
    assert load_error("no-such-checkpoint") == "no-such-checkpoint: not a checkpoint directory"


def test_clara_generate_answers_from_documents_with_a_hub_checkpoint(hub, capsys):
    argv = ["--model", f"{CLARA_REPO}:{SUBFOLDER}", "--prompt", QUESTION, "--max_new_tokens", "6"]
    assert generate_main(argv + ["--doc", DOCS[0], "--doc", DOCS[1]]) == 0
    out = capsys.readouterr().out
    answers, _, _ = greedy(Clara.from_pretrained(f"{CLARA_REPO}:{SUBFOLDER}"))
    assert out.strip() == answers[0]

    assert generate_main(argv) == 2
    assert "is a Clara checkpoint: give the documents it answers from with --doc" in capsys.readouterr().err
    assert generate_main(argv + ["--doc", DOCS[0], "--chat"]) == 2
    assert "--chat and --system are for base models" in capsys.readouterr().err
    assert generate_main(["--model", BASE_REPO, "--prompt", QUESTION, "--doc", DOCS[0]]) == 2
    assert f"--doc needs a Clara checkpoint as --model; {BASE_REPO} is a base model" in capsys.readouterr().err


def test_clara_eval_and_nutribot_load_the_hub_checkpoint(hub, monkeypatch):
    name = f"{CLARA_REPO}:{SUBFOLDER}"
    model, untrained = eval_load_model(name, "stage1_2", None)
    assert not untrained and model.adapter_names == ["decoder_adapter", "encoder_adapter"]
    conversions = count_conversions(monkeypatch)
    assert nutribot_load_model(name).config.training_stage == "stage1_2"
    assert conversions == []


def test_a_hub_checkpoint_answers_on_an_int8_base_as_on_the_unquantized_one(hub, capsys):
    from clara.quant import quantized_layers

    plain = Clara.from_pretrained(f"{CLARA_REPO}:{SUBFOLDER}")
    quantized = Clara.from_pretrained(f"{CLARA_REPO}:{SUBFOLDER}", quantize="int8")
    assert not quantized_layers(plain.decoder) and len(quantized_layers(quantized.decoder)) == 2 * 7
    # The conversion does not depend on how the base is stored: one converted folder serves both.
    assert [p.name for p in (hub["clara_cache"] / "converted" / "tiny--clara" / SUBFOLDER / hub["commit"]).iterdir()] \
        == ["float32"]
    answers, ids, memory = greedy(quantized)
    plain_answers, plain_ids, plain_memory = greedy(plain)
    assert len(ids) == 6 and ids == plain_ids  # int8's error (under 1 % of the logits) leaves greedy choices alone
    assert ((memory - plain_memory).norm() / plain_memory.norm()).item() < 0.05  # measured 0.019
    argv = ["--model", f"{CLARA_REPO}:{SUBFOLDER}", "--prompt", QUESTION, "--max_new_tokens", "6", "--doc", DOCS[0],
            "--doc", DOCS[1], "--quantize", "int8"]
    assert generate_main(argv) == 0
    assert capsys.readouterr().out.strip() == answers[0]


def test_training_starts_from_a_hub_checkpoint(hub, stage_files, tmp_path):
    from clara.recipes import stage1_2

    released = Clara.from_pretrained(f"{CLARA_REPO}:{SUBFOLDER}").config  # the shapes the run must keep
    config = tmp_path / "stage1_2.toml"
    config.write_text("\n".join([
        f'pretrain = "{CLARA_REPO}:{SUBFOLDER}"', f'dataset = "{stage_files["stage1_2"]}"',
        f"compress_rate = {released.compress_rate}", f"doc_max_length = {released.doc_max_length}",
        f"lora_rank = {released.lora_r}", "generation_top_k = 2", "max_len = 256", "train_batch_size = 2",
        "micro_train_batch_size = 2", "max_steps = 1", "learning_rate = 1e-3", f'save_path = "{tmp_path / "run"}"',
        'quantize = "int8"', ""]))
    assert stage1_2.main([str(config)]) == 0
    trained = Clara.from_pretrained(tmp_path / "run")
    assert trained.base_name == BASE_REPO and trained.config.training_stage == "stage1_2"
