"""The decoder-only transformer shared by every supported family.

    tokens (or inputs_embeds) -> [block] x N -> final norm -> lm head -> logits

    block (sequential, Llama/Mistral/Qwen2/Phi-3):  x = x + attn(norm1(x));  x = x + mlp(norm2(x))
    block (parallel, Phi-2):                         h = norm(x);  x = x + attn(h) + mlp(h)

Notation: B batch, L query length, T key length (past + current), H query heads, G key/value heads,
D head dim, R rotary dims (D * partial_rotary_factor), E hidden size.

Which family is built is decided by `DecoderConfig` switches only; the module names are the same
for all of them (Llama's), and `weights.py` maps each family's checkpoint names onto them.

RMSNorm, the rotary embedding and SwiGLU's gate call clara.kernels' fused autograd nodes;
`clara.kernels.use_reference_kernels()` (or CLARA_REFERENCE_KERNELS=1) makes them call the plain
composed versions in kernels/reference.py instead, which compute the same values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from clara.config import DecoderConfig, rope_attention_factor
from clara.lora import checkpoint_context
from clara.kernels import AttentionMask, Linear, attention, build_attention_mask, linear
from clara.kernels.norm import rms_norm
from clara.kernels.rope import apply_rotary  # rotate-half layout
from clara.kernels.swiglu import swiglu


# ------------------------------------------------------------------------------------------------
# Normalisation
# ------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in fp32 and cast back (as the reference does)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)  # kernels/norm.py (reference: kernels/reference.py)


def make_norm(cfg: DecoderConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.hidden_size, cfg.norm_eps)
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)


# ------------------------------------------------------------------------------------------------
# Rotary position embedding (rotate-half layout, as in Hugging Face checkpoints)
# ------------------------------------------------------------------------------------------------
def rope_inverse_frequencies(cfg: DecoderConfig, seq_len: int, device) -> torch.Tensor:
    """inv_freq[i] = theta^(-2i/R), then adjusted by the configured context-extension scheme. [R/2]"""
    r = cfg.rotary_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, r, 2, device=device, dtype=torch.float32) / r))
    kind, rs = cfg.rope_type, cfg.rope_scaling or {}
    if kind == "linear":
        inv_freq = inv_freq / rs["factor"]
    elif kind == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between
        # interpolated smoothly.
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old_len = rs["original_max_position_embeddings"]
        wavelen = 2 * torch.pi / inv_freq
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        inv_freq = torch.where(is_medium, blended, scaled)
    elif kind == "longrope":
        # Phi-3 / Phi-4-mini: per-frequency rescaling, "long" factors once past the original context.
        long_ctx = seq_len > rs["original_max_position_embeddings"]
        ext = torch.tensor(rs["long_factor" if long_ctx else "short_factor"], dtype=torch.float32, device=device)
        inv_freq = inv_freq / ext
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Computes cos/sin for given positions; inv_freq is recomputed per device, never stored."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.attention_factor = rope_attention_factor(cfg)
        self._cache: dict[tuple, torch.Tensor] = {}

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids: [B, L] -> cos, sin: [B, 1, L, R]
        long_ctx = self.cfg.rope_type == "longrope" and int(position_ids.max()) + 1 > (
            self.cfg.rope_scaling["original_max_position_embeddings"]
        )
        key = (position_ids.device, long_ctx)
        if key not in self._cache:
            seq_len = int(position_ids.max()) + 1
            self._cache[key] = rope_inverse_frequencies(self.cfg, seq_len, position_ids.device)
        inv_freq = self._cache[key]
        freqs = position_ids.float()[..., None] * inv_freq  # [B, L, R/2]
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, L, R]
        cos = angles.cos() * self.attention_factor
        sin = angles.sin() * self.attention_factor
        return cos.to(dtype), sin.to(dtype)


# ------------------------------------------------------------------------------------------------
# KV cache
# ------------------------------------------------------------------------------------------------
class KVCache:
    """Preallocated keys/values for every layer: [N, B, G, max_len, D] each.

    All rows of a batch share one time axis; left padding is expressed through the attention mask,
    so a padded batch and one-by-one generation see the same keys.
    """

    def __init__(self, cfg: DecoderConfig, batch_size: int, max_len: int, dtype, device):
        shape = (cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0  # positions filled so far (advanced by the decoder after all layers ran)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} positions needed, {self.max_len} allocated")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


# ------------------------------------------------------------------------------------------------
# Attention and MLP
# ------------------------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        e, q_out, kv_out = cfg.hidden_size, self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.fused = cfg.fused_qkv
        if self.fused:
            self.qkv_proj = Linear(e, q_out + 2 * kv_out, bias=cfg.attention_bias)
        else:
            self.q_proj = Linear(e, q_out, bias=cfg.attention_bias)
            self.k_proj = Linear(e, kv_out, bias=cfg.attention_bias)
            self.v_proj = Linear(e, kv_out, bias=cfg.attention_bias)
        self.o_proj = Linear(q_out, e, bias=cfg.attention_out_bias)

    def forward(self, x, cos, sin, mask: AttentionMask, cache: KVCache | None, layer: int, queries: int = 0):
        """queries > 0: only the last `queries` positions attend and are returned ([B, queries, E]);
        keys and values still cover every position (the last block of a prefill that keeps only
        the last logits)."""
        b, l, _ = x.shape  # x: [B, L, E]
        lq = queries or l
        if self.fused:
            q, k, v = self.qkv_proj(x).split(
                [self.n_heads * self.head_dim, self.n_kv * self.head_dim, self.n_kv * self.head_dim], dim=-1
            )
            q = q[:, l - lq:]
        else:
            q, k, v = self.q_proj(x[:, l - lq:]), self.k_proj(x), self.v_proj(x)
        q = q.view(b, lq, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, Lq, D]
        k = k.view(b, l, self.n_kv, self.head_dim).transpose(1, 2)  # [B, G, L, D]
        v = v.view(b, l, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos[:, :, l - lq:], sin[:, :, l - lq:]), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # [B, G, T, D]
        out = attention(q, k, v, mask)  # [B, H, Lq, D]
        return self.o_proj(out.transpose(1, 2).reshape(b, lq, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        e, f = cfg.hidden_size, cfg.intermediate_size
        self.kind = cfg.mlp
        self.fused = cfg.fused_gate_up
        if self.kind == "gelu":
            self.up_proj = Linear(e, f, bias=cfg.mlp_bias)
        elif self.fused:
            self.gate_up_proj = Linear(e, 2 * f, bias=cfg.mlp_bias)
        else:
            self.gate_proj = Linear(e, f, bias=cfg.mlp_bias)
            self.up_proj = Linear(e, f, bias=cfg.mlp_bias)
        self.down_proj = Linear(f, e, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "gelu":
            return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        if torch.is_grad_enabled():
            return self.down_proj(swiglu(gate, up))  # one node keeping gate and up only
        # Inference: gate is ours alone, so overwrite it instead of allocating two [.., F] tensors.
        return self.down_proj(F.silu(gate, inplace=True).mul_(up))


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.parallel = cfg.parallel_residual
        self.input_norm = make_norm(cfg)
        self.attn = Attention(cfg)
        self.post_attention_norm = None if self.parallel else make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache, layer, queries: int = 0):
        # queries > 0: the output covers only the last `queries` positions (see Attention.forward)
        last = x if not queries else x[:, -queries:]
        if self.parallel:
            h = self.input_norm(x)
            return last + self.attn(h, cos, sin, mask, cache, layer, queries) + self.mlp(h[:, -queries:] if queries else h)
        x = last + self.attn(self.input_norm(x), cos, sin, mask, cache, layer, queries)
        return x + self.mlp(self.post_attention_norm(x))


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------
@dataclass
class DecoderOutput:
    logits: torch.Tensor | None  # [B, L_kept, V]
    hidden_states: torch.Tensor | None  # [B, L, E] after the final norm (what CLaRa reads)


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = make_norm(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, bias=cfg.lm_head_bias)
        self.rotary = RotaryEmbedding(cfg)
        self.gradient_checkpointing = False

    # -- helpers ---------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        self.gradient_checkpointing = enabled

    def output_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            return linear(hidden, self.embed_tokens.weight)
        return self.lm_head(hidden)

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        return KVCache(self.config, batch_size, max_len, self.dtype, self.device)

    # -- forward ---------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        logits_to_keep: int = 0,
        compute_logits: bool = True,
    ) -> DecoderOutput:
        """
        input_ids [B, L] or inputs_embeds [B, L, E] (CLaRa writes memory vectors into the embeddings).
        attention_mask [B, T]: 1 for real tokens, 0 for padding, over past + current positions.
        position_ids [B, L]: defaults to the count of real tokens before each position, so left
            padding does not shift positions.
        logits_to_keep: 0 keeps all positions, n > 0 only the last n (prefill needs only the last).
            With n > 0 and logits computed, the last block runs its queries, attention output and
            MLP for those n positions only (keys and values still for all, into the cache too):
            hidden_states then covers the last n positions.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [B, L, E]
        b, l = x.shape[:2]
        past = cache.length if cache is not None else 0
        t = past + l
        if attention_mask is not None and attention_mask.shape != (b, t):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(b, t)}")

        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(past, t, device=x.device).expand(b, l)
            else:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        cos, sin = self.rotary(position_ids, x.dtype)  # [B, 1, L, R]
        mask = build_attention_mask(l, t, attention_mask, self.config.sliding_window, device=x.device)

        # Nothing after the last block reads the other positions: let it compute only the kept ones.
        last_queries = logits_to_keep if compute_logits and 0 < logits_to_keep < l else 0
        last_mask = build_attention_mask(last_queries, t, attention_mask, self.config.sliding_window,
                                         device=x.device) if last_queries else None
        use_ckpt = self.gradient_checkpointing and torch.is_grad_enabled() and cache is None
        for i, block in enumerate(self.layers):
            queries = last_queries if i == len(self.layers) - 1 else 0
            layer_mask = last_mask if queries else mask
            if use_ckpt:
                # The recomputation in backward must see the adapter that was active in forward.
                x = checkpoint(block, x, cos, sin, layer_mask, None, i, queries, use_reentrant=False,
                               context_fn=checkpoint_context)
            else:
                x = block(x, cos, sin, layer_mask, cache, i, queries)
        if cache is not None:
            cache.length = t

        hidden = self.norm(x)
        logits = None
        if compute_logits:
            kept = hidden if logits_to_keep <= 0 else hidden[:, -logits_to_keep:]
            logits = self.compute_logits(kept)
        return DecoderOutput(logits=logits, hidden_states=hidden)

    # -- vocabulary growth -----------------------------------------------------------------------
    @torch.no_grad()
    def resize_token_embeddings(self, new_size: int) -> None:
        """Grow (or shrink) the vocabulary; new rows start at the mean of the existing ones.

        The mean keeps new tokens' logits ordinary instead of random, so adding CLaRa's special
        tokens does not change what the base model generates.
        """
        old = self.embed_tokens.weight
        old_size = old.shape[0]
        if new_size == old_size:
            return
        emb = nn.Embedding(new_size, old.shape[1], device=old.device, dtype=old.dtype)
        keep = min(old_size, new_size)
        emb.weight[:keep] = old[:keep]
        if new_size > old_size:
            emb.weight[old_size:] = old.mean(0, keepdim=True)
        emb.weight.requires_grad_(old.requires_grad)
        self.embed_tokens = emb
        if self.lm_head is not None:
            head_old = self.lm_head
            head = Linear(old.shape[1], new_size, bias=head_old.bias is not None, device=old.device, dtype=old.dtype)
            head.weight[:keep] = head_old.weight[:keep]
            if new_size > old_size:
                head.weight[old_size:] = head_old.weight.mean(0, keepdim=True)
            if head.bias is not None:
                head.bias[:keep] = head_old.bias[:keep]
                if new_size > old_size:
                    head.bias[old_size:] = head_old.bias.mean()
            head.weight.requires_grad_(head_old.weight.requires_grad)
            self.lm_head = head
        self.config.vocab_size = new_size
