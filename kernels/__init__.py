"""Hot paths of the library: attention (flash-attn or SDPA) and the small fused CPU ops."""

from clara.kernels.attention import AttentionMask, attention, backend_name, build_attention_mask
from clara.kernels.dropout import Dropout, dropout
from clara.kernels.lora import lora_linear
from clara.kernels.matmul import Linear, cpu_has_native_bf16, linear

__all__ = ["AttentionMask", "Dropout", "Linear", "attention", "backend_name", "build_attention_mask",
           "cpu_has_native_bf16", "dropout", "linear", "lora_linear"]
