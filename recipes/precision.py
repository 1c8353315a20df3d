"""Which device and number formats a run uses, decided from the hardware and `--bf16`.

| hardware                      | --bf16                                   | without           |
|-------------------------------|------------------------------------------|-------------------|
| CUDA sm80+ (A100, H100, L4..) | bf16 autocast, bf16 base weights         | fp32              |
| CUDA below sm80 (T4 = sm75)   | fp16 autocast + dynamic loss scaling     | fp32              |
| CPU                           | bf16 autocast, bf16 base weights (*)     | fp32              |
| Apple MPS                     | bf16 autocast                            | fp32              |

Trainable parameters (adapters, memory embeddings) are always kept in fp32 ("master weights");
autocast casts them for each multiply. (*) On CPUs without AVX512-BF16/AMX the bf16 multiplies are
widened to fp32 by kernels/matmul.py, so bf16 saves memory there but not time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clara.kernels.matmul import cpu_has_native_bf16


@dataclass(frozen=True)
class Precision:
    name: str  # "fp32", "bf16" or "fp16"
    autocast_dtype: torch.dtype | None  # None: no autocast
    weight_dtype: torch.dtype  # dtype of the frozen base weights
    loss_scaling: bool  # dynamic loss scaling (fp16 only)
    note: str  # what was chosen and why, for the log

    def autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return torch.autocast(device.type, enabled=False)
        return torch.autocast(device.type, dtype=self.autocast_dtype)


def pick_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    """auto: the process's CUDA device when there is one, else MPS, else CPU."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: this torch sees no CUDA device; use --device cpu or auto")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if requested == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps: MPS is not available on this machine; use --device cpu or auto")
    return torch.device(requested)


def choose_precision(device: torch.device, bf16: bool) -> Precision:
    fp32 = Precision("fp32", None, torch.float32, False, "fp32 (pass --bf16 for mixed precision)")
    if not bf16:
        return fp32
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major >= 8:
            return Precision("bf16", torch.bfloat16, torch.bfloat16, False, f"bf16 autocast (sm{major}{minor})")
        return Precision("fp16", torch.float16, torch.float16, True,
                         f"--bf16: this GPU (sm{major}{minor}) has no bf16 support; running fp16 autocast "
                         "with dynamic loss scaling instead")
    if device.type == "cpu":
        note = "bf16 autocast on CPU"
        if not cpu_has_native_bf16():
            note += (" (this CPU has no AVX512-BF16/AMX: bf16 multiplies are widened to fp32, so bf16 "
                     "saves memory, not time; fp32 is as fast or faster here)")
        return Precision("bf16", torch.bfloat16, torch.bfloat16, False, note)
    return Precision("bf16", torch.bfloat16, torch.float32, False, f"bf16 autocast on {device.type}")


# Devices a --dry_run can plan for, wherever it runs (recipes/planner.py plan_from_args).
PLAN_TARGETS = ("auto", "cpu", "t4", "sm80")


def planned_precision(target: str, bf16: bool) -> tuple[str, Precision]:
    """("cuda" | "cpu", Precision) that a run with --bf16 `bf16` gets on a `target` device (not "auto")."""
    if target == "cpu":
        return "cpu", choose_precision(torch.device("cpu"), bf16)
    if target not in ("t4", "sm80"):
        raise ValueError(f"plan target must be one of {', '.join(PLAN_TARGETS[1:])}, got {target!r}")
    if not bf16:
        return "cuda", Precision("fp32", None, torch.float32, False, f"planned for {target}: fp32")
    if target == "t4":
        return "cuda", Precision("fp16", torch.float16, torch.float16, True,
                                 "planned for a T4 (sm75): fp16 autocast with dynamic loss scaling")
    return "cuda", Precision("bf16", torch.bfloat16, torch.bfloat16, False, "planned for sm80+: bf16 autocast")


def flash_attention_note(device: torch.device, dtype: torch.dtype | None) -> str:
    """What `--flash_attn` ends up using, for the log."""
    from clara.kernels.attention import _flash_attn_module

    if device.type == "cuda" and _flash_attn_module() is not None:
        major, _ = torch.cuda.get_device_capability(device)
        if major >= 8 and dtype in (torch.bfloat16, torch.float16):
            return "--flash_attn: using flash-attn (varlen kernels)"
        return (f"--flash_attn: flash-attn needs an sm80+ GPU and fp16/bf16 (have sm{major}x, "
                f"{dtype or torch.float32}); using torch SDPA")
    return f"--flash_attn: flash-attn is not available on {device.type}; using torch SDPA"
