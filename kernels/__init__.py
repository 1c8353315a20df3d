"""Hot paths of the library: attention (flash-attn or SDPA), the widened low-precision linear, and
the small fused CPU ops (RMSNorm, RoPE, SwiGLU, dropout, the LoRA linear), each one autograd node
with a hand-written backward.

The reference path
------------------
kernels/reference.py holds each fused op as plain composed PyTorch (autograd derives its
backward): the readable definition, which tests/test_reference_path.py holds the fused nodes to in
values and gradients. One switch routes the library (the decoder's norms, rotary embedding and MLP
gate, the LoRA layers and their dropout) through it, to read, debug or change the math:

    import clara.kernels as K
    K.use_reference_kernels(True)              # every op, for the rest of the process
    K.use_reference_kernels(False)             # back to the fused nodes
    with K.use_reference_kernels():            # every op, inside the block only
        ...
    with K.use_reference_kernels(["lora"]):    # only the named ops (K.REFERENCE_OPS), inside the block
        ...
    K.reference_kernels_enabled()              # is any op on the reference path?

    CLARA_REFERENCE_KERNELS=1 python ...       # every op from import on; or a comma-separated list
                                               # of op names, e.g. CLARA_REFERENCE_KERNELS=rms_norm,rotary

The switch is process-wide (the backward and checkpointing's recomputation can run on other
threads). On CPU both paths draw dropout masks the same way, so a seed gives the same masks on
either. The reference path keeps more tensors for the backward and runs more ops: the memory
planner (clara.recipes.planner) models the fused path. Attention and the widened linear have no
separate reference: they call torch's own ops already.
"""

from clara.kernels.attention import AttentionMask, attention, backend_name, build_attention_mask
from clara.kernels.dropout import Dropout, dropout
from clara.kernels.lora import lora_linear
from clara.kernels.matmul import Linear, cpu_has_native_bf16, linear
from clara.kernels.reference import OPS as REFERENCE_OPS
from clara.kernels.reference import active_reference_kernels, reference_kernels_enabled, use_reference_kernels

__all__ = ["AttentionMask", "Dropout", "Linear", "REFERENCE_OPS", "active_reference_kernels", "attention",
           "backend_name", "build_attention_mask", "cpu_has_native_bf16", "dropout", "linear", "lora_linear",
           "reference_kernels_enabled", "use_reference_kernels"]
