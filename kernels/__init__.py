"""Hot paths of the library: attention (flash-attn or SDPA) and the small fused CPU ops."""

from kernels.attention import AttentionMask, attention, backend_name, build_attention_mask

__all__ = ["AttentionMask", "attention", "backend_name", "build_attention_mask"]
