"""One attention entry point for the whole library.

    attention(q, k, v, mask) -> out
    q: [B, Hq, Lq, D]   k, v: [B, Hkv, Lk, D]   out: [B, Hq, Lq, D]   (Hq a multiple of Hkv: GQA)

Backends, chosen per call:
  * flash-attn 2 (`flash_attn_func` / `flash_attn_varlen_func` for padded batches) when the package is
    installed, the tensors are fp16/bf16 on a CUDA GPU of compute capability 8.0 or newer;
  * torch's scaled_dot_product_attention otherwise (CPU, MPS, T4, fp32).

The queries are always the *last* Lq positions of the Lk keys (prefill: Lq == Lk; decoding with a
KV cache: Lq < Lk), so "causal" means bottom-right aligned. SDPA's own `is_causal=True` is aligned
top-left when Lq != Lk, which is why `AttentionMask` builds an explicit mask for that case.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clara.kernels.matmul import widen_on_this_cpu


@dataclass
class AttentionMask:
    """Which keys each query may attend to; built once per forward pass and shared by all layers.

    key_valid: [B, Lk] bool (False for padding) or None when no position is padding.
    dense:     [B or 1, 1, Lq, Lk] bool for SDPA, or None when `sdpa_is_causal` or no mask is needed.
    """

    q_len: int
    k_len: int
    key_valid: torch.Tensor | None
    sliding_window: int | None
    dense: torch.Tensor | None
    sdpa_is_causal: bool

    @property
    def q_offset(self) -> int:
        return self.k_len - self.q_len


def build_attention_mask(
    q_len: int,
    k_len: int,
    key_valid: torch.Tensor | None = None,
    sliding_window: int | None = None,
    device: torch.device | str = "cpu",
) -> AttentionMask:
    """Causal (bottom-right) mask with optional key padding and sliding window.

    A query on a padding position would see no key at all and SDPA would return NaN for it; we let
    every query see its own position so such rows stay finite (their outputs are ignored anyway).
    """
    if key_valid is not None:
        if key_valid.shape[-1] != k_len:
            raise ValueError(f"attention_mask covers {key_valid.shape[-1]} positions, expected {k_len}")
        key_valid = key_valid.to(device=device, dtype=torch.bool)
        if bool(key_valid.all()):
            key_valid = None
    window_binds = sliding_window is not None and k_len > sliding_window

    if key_valid is None and not window_binds:
        if q_len == k_len:
            return AttentionMask(q_len, k_len, None, sliding_window, None, sdpa_is_causal=q_len > 1)
        if q_len == 1:
            return AttentionMask(q_len, k_len, None, sliding_window, None, sdpa_is_causal=False)

    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]  # [Lq, 1] absolute positions
    k_pos = torch.arange(k_len, device=device)[None, :]  # [1, Lk]
    allowed = k_pos <= q_pos
    if window_binds:
        allowed = allowed & (k_pos > q_pos - sliding_window)
    dense = allowed[None, None]  # [1, 1, Lq, Lk]
    if key_valid is not None:
        dense = (dense & key_valid[:, None, None, :]) | (k_pos == q_pos)[None, None]
    return AttentionMask(q_len, k_len, key_valid, sliding_window, dense, sdpa_is_causal=False)


@functools.lru_cache(maxsize=None)
def _flash_attn_module():
    try:
        import flash_attn  # noqa: F401  (optional extra: pip install clara-rag[gpu])

        return flash_attn
    except Exception:
        return None


def flash_attention_available(t: torch.Tensor) -> bool:
    """True when flash-attn can run on tensors like `t`."""
    if not t.is_cuda or t.dtype not in (torch.float16, torch.bfloat16):
        return False
    if torch.cuda.get_device_capability(t.device)[0] < 8:
        return False
    return _flash_attn_module() is not None


def backend_name(t: torch.Tensor) -> str:
    return "flash-attn" if flash_attention_available(t) else "sdpa"


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: AttentionMask,
    scale: float | None = None,
    force_sdpa: bool = False,
) -> torch.Tensor:
    if not force_sdpa and flash_attention_available(q):
        return _flash(q, k, v, mask, scale)
    return _sdpa(q, k, v, mask, scale)


def _sdpa(q, k, v, mask: AttentionMask, scale):
    gqa = q.shape[1] != k.shape[1]
    if widen_on_this_cpu(q):
        # The bf16 SDPA backward on CPUs without bf16 instructions is several times slower than
        # fp32 (bench/matmul.py); fp32 accumulates the same products, so widen and narrow back.
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(
                q.float(), k.float(), v.float(), attn_mask=mask.dense, is_causal=mask.sdpa_is_causal,
                scale=scale, enable_gqa=gqa,
            )
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask.dense, is_causal=mask.sdpa_is_causal, scale=scale, enable_gqa=gqa
    )


def _flash(q, k, v, mask: AttentionMask, scale):
    fa = _flash_attn_module()
    window = (mask.sliding_window - 1, 0) if mask.sliding_window else (-1, -1)
    causal = mask.q_len > 1
    # flash-attn wants [B, L, H, D]; it handles GQA and bottom-right causal alignment natively.
    q_, k_, v_ = (t.transpose(1, 2) for t in (q, k, v))
    if mask.key_valid is None:
        out = fa.flash_attn_func(q_, k_, v_, softmax_scale=scale, causal=causal, window_size=window)
        return out.transpose(1, 2)
    # Padded batch: pack the valid tokens of every row and run the varlen kernel.
    b, lq = q_.shape[:2]
    q_valid = mask.key_valid[:, -lq:]
    k_idx = mask.key_valid.flatten().nonzero().squeeze(1)
    q_idx = q_valid.flatten().nonzero().squeeze(1)
    cu_k = F.pad(mask.key_valid.sum(1).cumsum(0), (1, 0)).to(torch.int32)
    cu_q = F.pad(q_valid.sum(1).cumsum(0), (1, 0)).to(torch.int32)
    q_packed = q_.reshape(b * lq, *q_.shape[2:])[q_idx]
    k_packed = k_.reshape(-1, *k_.shape[2:])[k_idx]
    v_packed = v_.reshape(-1, *v_.shape[2:])[k_idx]
    out_packed = fa.flash_attn_varlen_func(
        q_packed, k_packed, v_packed, cu_q, cu_k,
        int(q_valid.sum(1).max()), int(mask.key_valid.sum(1).max()),
        softmax_scale=scale, causal=causal, window_size=window,
    )
    out = q_.new_zeros(b * lq, *q_.shape[2:])
    out[q_idx] = out_packed
    return out.view(b, lq, *q_.shape[2:]).transpose(1, 2)
