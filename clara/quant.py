"""A quantized frozen base: NF4 (QLoRA) and int8 weights for the linear layers of the blocks.

    decoder, tokenizer = load_base("mistralai/Mistral-7B-Instruct-v0.2", dtype=torch.bfloat16,
                                   quantize="nf4")   # or "int8"

Only the linear layers inside the transformer blocks are quantized (q/k/v/o, gate/up/down and the
fused forms): they hold nearly all of a decoder's weights. Embeddings, the LM head and the norms
keep the load dtype, and so do the LoRA adapters and CLaRa's memory-token rows, which train.

NF4 (Dettmers et al., QLoRA, 2023). The flattened weight is cut into blocks of 64; each block is
divided by its absolute maximum, and each value becomes the index (4 bits, two per byte) of the
nearest of 16 levels: the quantiles of a standard normal, scaled to [-1, 1], with an exact zero.
The 64-value absmaxes are quantized again ("double quantization"): the tensor-wide mean is
subtracted and each group of 256 becomes int8 under its own fp32 scale. Storage is 4 + 8/64 +
64/(64·256) ≈ 4.13 bits a weight. The values are normalised by the *reconstructed* absmax, so
that the error of a value is at most half the widest gap between levels times its block's absmax
(plus, for a clipped block maximum, the absmax's own rounding error, at most half its group's scale).

int8: one scale per output row (absmax / 127), symmetric, round to nearest: error ≤ scale / 2.

A QuantizedLinear stores only the codes and scales; its forward dequantizes the weight for this
one multiply (clara.kernels.dequant_linear), and its backward dequantizes it again for the input
gradient instead of keeping it: at most one layer's dequantized weight is alive at a time.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from clara.config import in_decoder_blocks
from clara.kernels.dequant_linear import dequant_linear, int8_linear_without_grad

QUANT_KINDS = ("nf4", "int8")
NF4_BLOCK = 64  # values per absmax
NF4_SCALE_GROUP = 256  # absmaxes per fp32 scale in the double quantization

# The 16 NF4 levels of the QLoRA paper (Appendix E): normal quantiles scaled to [-1, 1], exact 0.
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])
# Half the widest gap between neighbouring levels (between -1 and -0.696): the worst relative error.
NF4_MAX_HALF_GAP = float((NF4_LEVELS[1:] - NF4_LEVELS[:-1]).max() / 2)
_NF4_MIDPOINTS = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2

# Quantizing and dequantizing are done this many values at a time, so that a large matrix needs
# only a few chunk-sized temporaries rather than several copies of itself.
CHUNK_VALUES = 1 << 22


class QuantizationError(ValueError):
    """A quantize= value or a tensor that cannot be quantized; the message names it."""


def check_quant_kind(kind: str | None) -> str | None:
    if kind is not None and kind not in QUANT_KINDS:
        raise QuantizationError(f"quantize={kind!r}: expected one of {', '.join(QUANT_KINDS)} (or None)")
    return kind


def _ceil_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# ------------------------------------------------------------------------------------------------
# NF4
# ------------------------------------------------------------------------------------------------
@dataclass
class NF4Tensor:
    """An NF4-quantized weight: shape [out, in], codes packed two per byte, double-quantized absmaxes."""

    shape: tuple[int, int]
    codes: torch.Tensor  # uint8 [padded numel / 2]: first value of a pair in the high nibble
    absmax_codes: torch.Tensor  # int8 [blocks]
    absmax_scales: torch.Tensor  # fp32 [groups]: one per NF4_SCALE_GROUP blocks
    absmax_offset: torch.Tensor  # fp32 []: the mean absmax, subtracted before the int8 rounding

    def absmax(self) -> torch.Tensor:
        """The reconstructed per-block absmax, fp32 [blocks]."""
        scales = self.absmax_scales.repeat_interleave(NF4_SCALE_GROUP)[: self.absmax_codes.numel()]
        return self.absmax_codes.float() * scales + self.absmax_offset


def _double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    offset = absmax.mean()
    centred = absmax - offset
    padded = torch.zeros(_ceil_to(centred.numel(), NF4_SCALE_GROUP), dtype=torch.float32, device=absmax.device)
    padded[: centred.numel()] = centred
    scales = padded.view(-1, NF4_SCALE_GROUP).abs().amax(1) / 127
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = (padded.view(-1, NF4_SCALE_GROUP) / scales[:, None]).round_().clamp_(-127, 127)
    return codes.view(-1)[: absmax.numel()].to(torch.int8), scales, offset


def quantize_nf4(weight: torch.Tensor) -> NF4Tensor:
    """[out, in] float weight -> NF4Tensor (on the weight's device)."""
    if weight.dim() != 2:
        raise QuantizationError(f"NF4 quantizes 2-d weights; got shape {tuple(weight.shape)}")
    flat = weight.detach().reshape(-1)
    n_padded = _ceil_to(flat.numel(), NF4_BLOCK)
    blocks = n_padded // NF4_BLOCK
    absmax = torch.empty(blocks, dtype=torch.float32, device=weight.device)
    rows_per_chunk = max(1, CHUNK_VALUES // NF4_BLOCK)
    for start in range(0, blocks, rows_per_chunk):
        absmax[start:start + rows_per_chunk] = _blocks(flat, start, rows_per_chunk, blocks).abs().amax(1)
    absmax_codes, absmax_scales, absmax_offset = _double_quantize(absmax)
    packed = NF4Tensor(tuple(weight.shape), torch.empty(0), absmax_codes, absmax_scales, absmax_offset)
    scale = packed.absmax()
    midpoints = _NF4_MIDPOINTS.to(weight.device)
    codes = torch.empty(n_padded // 2, dtype=torch.uint8, device=weight.device)
    for start in range(0, blocks, rows_per_chunk):
        chunk = _blocks(flat, start, rows_per_chunk, blocks)
        block_scale = scale[start:start + chunk.shape[0], None]
        normalised = chunk / torch.where(block_scale > 0, block_scale, torch.ones_like(block_scale))
        index = torch.bucketize(normalised.clamp_(-1, 1), midpoints).to(torch.uint8).view(-1, 2)
        codes[start * NF4_BLOCK // 2:(start + chunk.shape[0]) * NF4_BLOCK // 2] = (index[:, 0] << 4) | index[:, 1]
    packed.codes = codes
    return packed


def _blocks(flat: torch.Tensor, start_block: int, count: int, blocks: int) -> torch.Tensor:
    """Blocks [start, start + count) of the zero-padded flat weight as fp32 [count, NF4_BLOCK]."""
    stop = min(start_block + count, blocks)
    values = flat[start_block * NF4_BLOCK: stop * NF4_BLOCK].float()
    missing = (stop - start_block) * NF4_BLOCK - values.numel()
    if missing:
        values = torch.cat([values, values.new_zeros(missing)])
    return values.view(-1, NF4_BLOCK)


@functools.lru_cache(maxsize=None)
def _nf4_pair_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Every byte's two levels, [256, 2]: one lookup decodes two values.
    byte = torch.arange(256, device=device)
    levels = NF4_LEVELS.to(device)
    return torch.stack([levels[byte >> 4], levels[byte & 15]], dim=1).to(dtype)


def dequantize_nf4(q: NF4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """NF4Tensor -> [out, in] tensor of `dtype`, decoded a chunk at a time into the result, so the
    only temporaries besides it are one chunk's indices and values."""
    out_features, in_features = q.shape
    device = q.codes.device
    table = _nf4_pair_table(dtype, device)
    absmax = q.absmax().to(dtype)
    out = torch.empty(q.codes.numel() * 2, dtype=dtype, device=device)
    step = CHUNK_VALUES // 2  # codes per chunk: a whole number of blocks
    for start in range(0, q.codes.numel(), step):
        codes = q.codes[start:start + step]
        values = F.embedding(codes.int(), table).view(-1, NF4_BLOCK)  # embedding: the fastest lookup on CPU
        first = start * 2 // NF4_BLOCK
        torch.mul(values, absmax[first:first + values.shape[0], None],
                  out=out[start * 2:(start + codes.numel()) * 2].view(-1, NF4_BLOCK))
    return out[: out_features * in_features].view(out_features, in_features)


def nf4_error_bound(q: NF4Tensor) -> torch.Tensor:
    """Per-block bound on |weight - dequantized|, fp32 [blocks] (see the module docstring)."""
    scale_error = q.absmax_scales.repeat_interleave(NF4_SCALE_GROUP)[: q.absmax_codes.numel()] / 2
    return q.absmax().abs() * NF4_MAX_HALF_GAP + scale_error


# ------------------------------------------------------------------------------------------------
# int8
# ------------------------------------------------------------------------------------------------
@dataclass
class Int8Tensor:
    """An int8 weight with one fp32 scale per output row."""

    codes: torch.Tensor  # int8 [out, in]
    scales: torch.Tensor  # fp32 [out]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)


def quantize_int8(weight: torch.Tensor) -> Int8Tensor:
    if weight.dim() != 2:
        raise QuantizationError(f"int8 quantizes 2-d weights; got shape {tuple(weight.shape)}")
    out_features = weight.shape[0]
    codes = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(out_features, dtype=torch.float32, device=weight.device)
    rows = max(1, CHUNK_VALUES // max(1, weight.shape[1]))
    for start in range(0, out_features, rows):
        chunk = weight[start:start + rows].detach().float()
        scale = chunk.abs().amax(1) / 127
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes[start:start + rows] = (chunk / scale[:, None]).round_().clamp_(-127, 127).to(torch.int8)
        scales[start:start + rows] = scale
    return Int8Tensor(codes, scales)


def dequantize_int8(q: Int8Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return q.codes.to(dtype).mul_(q.scales.to(dtype)[:, None])


# ------------------------------------------------------------------------------------------------
# The module
# ------------------------------------------------------------------------------------------------
class QuantizedLinear(nn.Module):
    """A frozen linear layer whose weight is stored NF4- or int8-quantized.

    Buffers (state-dict names): NF4 `codes`, `absmax_codes`, `absmax_scales`, `absmax_offset`;
    int8 `codes`, `scales`; and `bias` in the load dtype where the layer has one. The weight is
    dequantized to the input's dtype (autocast's, under autocast) for each multiply. `dtype` is
    the dtype the model was loaded in (the unquantized weight's), which adapters default to.
    """

    def __init__(self, in_features: int, out_features: int, kind: str, bias: bool = False,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        check_quant_kind(kind)
        if kind is None:
            raise QuantizationError("QuantizedLinear needs kind 'nf4' or 'int8'")
        self.in_features, self.out_features, self.kind = in_features, out_features, kind
        # The dtype the model was loaded in: what adapters on this layer default to.
        self.dtype = dtype
        numel = in_features * out_features
        if kind == "nf4":
            blocks = _ceil_to(numel, NF4_BLOCK) // NF4_BLOCK
            groups = _ceil_to(blocks, NF4_SCALE_GROUP) // NF4_SCALE_GROUP
            self.register_buffer("codes", torch.zeros(blocks * NF4_BLOCK // 2, dtype=torch.uint8, device=device))
            self.register_buffer("absmax_codes", torch.zeros(blocks, dtype=torch.int8, device=device))
            self.register_buffer("absmax_scales", torch.ones(groups, dtype=torch.float32, device=device))
            self.register_buffer("absmax_offset", torch.zeros((), dtype=torch.float32, device=device))
        else:
            self.register_buffer("codes", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, kind: str) -> "QuantizedLinear":
        return cls.from_weight(linear.weight, linear.bias, kind)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, kind: str) -> "QuantizedLinear":
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, kind, bias=bias is not None, dtype=weight.dtype, device="meta")
        layer.load_quantized(quantize_state(weight, kind), bias)
        return layer

    def load_quantized(self, state: dict[str, torch.Tensor], bias: torch.Tensor | None = None) -> None:
        """Take the tensors of quantize_state (and the bias) as this layer's buffers, without copying."""
        for name, tensor in state.items():
            setattr(self, name, tensor)
        if bias is not None:
            self.bias = bias.detach()

    def quantized_tensor(self) -> NF4Tensor | Int8Tensor:
        if self.kind == "nf4":
            return NF4Tensor((self.out_features, self.in_features), self.codes, self.absmax_codes,
                             self.absmax_scales, self.absmax_offset)
        return Int8Tensor(self.codes, self.scales)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [out, in] in `dtype` (a new tensor each call)."""
        q = self.quantized_tensor()
        return dequantize_nf4(q, dtype) if self.kind == "nf4" else dequantize_int8(q, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "int8":
            out = int8_linear_without_grad(x, self.codes, self.scales, self.bias)
            if out is not None:
                return out
        return dequant_linear(x, self.dequantize, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}, "
                f"bias={self.bias is not None}")


def quantize_state(weight: torch.Tensor, kind: str) -> dict[str, torch.Tensor]:
    """A weight's quantized buffers by QuantizedLinear's names."""
    if check_quant_kind(kind) == "nf4":
        q = quantize_nf4(weight)
        return {"codes": q.codes, "absmax_codes": q.absmax_codes, "absmax_scales": q.absmax_scales,
                "absmax_offset": q.absmax_offset}
    q = quantize_int8(weight)
    return {"codes": q.codes, "scales": q.scales}


def quantized_bytes(in_features: int, out_features: int, kind: str) -> int:
    """Bytes a QuantizedLinear's quantized weight takes (the bias not included)."""
    numel = in_features * out_features
    if kind == "int8":
        return numel + 4 * out_features
    blocks = math.ceil(numel / NF4_BLOCK)
    return blocks * NF4_BLOCK // 2 + blocks + 4 * math.ceil(blocks / NF4_SCALE_GROUP) + 4


# ------------------------------------------------------------------------------------------------
# Whole models
# ------------------------------------------------------------------------------------------------
def quantize_linear_layers(model: nn.Module, kind: str, dtype: torch.dtype | None = None) -> list[str]:
    """Replace every nn.Linear inside the blocks of `model` by a QuantizedLinear, in place.

    On a model built on the meta device the layers become empty shells of the right shapes, to be
    filled by load_state_dict(assign=True) with quantize_state's tensors (how load_base streams a
    checkpoint without ever holding it unquantized); `dtype` is then the dtype of the load (default:
    each weight's). Returns the replaced module names.
    """
    check_quant_kind(kind)
    replaced = []
    for name, module in list(model.named_modules()):
        if not (isinstance(module, nn.Linear) and in_decoder_blocks(name)):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if module.weight.is_meta:
            layer = QuantizedLinear(module.in_features, module.out_features, kind, bias=module.bias is not None,
                                    dtype=dtype or module.weight.dtype, device="meta")
        else:
            layer = QuantizedLinear.from_linear(module, kind)
        layer.train(module.training)
        setattr(parent, child, layer)
        replaced.append(name)
    return replaced


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
