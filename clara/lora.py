"""Low-rank adapters (LoRA, Hu et al. 2021) with several named adapters over one frozen base.

CLaRa runs one frozen decoder with three adapters: `encoder_adapter` (compression),
`decoder_adapter` (generation) and `query_reasoner_adapter` (query encoding in stage 2). A
converted linear layer holds all of them; which one a forward pass uses is chosen per call:

    names = apply_lora(model, ["encoder_adapter", "decoder_adapter"], r=16, alpha=32,
                       dropout=0.1, target_modules="all-linear")
    with use_adapter(model, "encoder_adapter"):
        memory = model(doc_ids).hidden_states
    with use_adapter(model, None):          # the base model alone
        ...

State-dict names: the base keeps `weight` / `bias` exactly where nn.Linear had them, so a base
checkpoint loads unchanged into a converted model, and each adapter adds
`<layer>.adapters.<adapter name>.lora_A` [r, in] and `.lora_B` [out, r].

Which adapter is active
-----------------------
Each model's LoRA layers share one `AdapterSelection`. It has a persistent default for every
thread (`set_active_adapter`, initially None = base only) and a per-thread override
(`use_adapter`), kept in a thread-local so that two threads serving the same model can use
different adapters at once. Nested `use_adapter` blocks restore the previous choice on exit.

Activation checkpointing re-runs the forward during backward, possibly after the `use_adapter`
block has closed (CLaRa stage 2 encodes the query with one adapter, generates with another and
calls backward once) and, on CUDA, on an autograd worker thread that never saw the override.
`checkpoint_context` is a `context_fn` for torch.utils.checkpoint that records the overrides at
forward time and reinstates them for the recomputation. The persistent default is not recorded:
do not call `set_active_adapter` between a forward pass and its backward.

Merging
-------
`merge_adapter` folds (alpha/r)·B·A into `weight` in place for inference; at most one adapter per
layer is merged at a time. Merging the adapter that is already merged (or unmerging one that is
not) is a no-op with a warning, so the calls are idempotent. While an adapter is merged, a forward
pass with that adapter active uses the merged weight alone, and a forward pass with any other
choice (another adapter, or None) raises instead of silently mixing two adapters. A merged
adapter's factors get no gradient, and `state_dict()` then holds the merged weights: merging is for
inference and export. Merge and unmerge compute in fp32; on bf16/fp16 weights unmerge restores the
base only up to that dtype's rounding.
"""

from __future__ import annotations

import contextlib
import math
import re
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.nn as nn

from clara.config import in_decoder_blocks
from clara.kernels import linear, lora_linear
from clara.kernels.reference import lora_delta
from clara.quant import QuantizedLinear

ALL_LINEAR = "all-linear"
_ADAPTER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


# ------------------------------------------------------------------------------------------------
# Which adapter is active
# ------------------------------------------------------------------------------------------------
class AdapterSelection:
    """The adapter choice shared by the LoRA layers of one model.

    `default` applies to every thread; `use_adapter` overrides it for the calling thread only.
    """

    def __init__(self, default: str | None = None):
        self.default = default

    def active(self) -> str | None:
        overrides = _thread_overrides()
        return overrides[self] if self in overrides else self.default


_thread_state = threading.local()


def _thread_overrides() -> dict[AdapterSelection, str | None]:
    overrides = getattr(_thread_state, "overrides", None)
    if overrides is None:
        overrides = _thread_state.overrides = {}
    return overrides


@contextlib.contextmanager
def _installed_overrides(overrides: dict[AdapterSelection, str | None]) -> Iterator[None]:
    previous = getattr(_thread_state, "overrides", None)
    _thread_state.overrides = overrides
    try:
        yield
    finally:
        _thread_state.overrides = previous


def checkpoint_context() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """`context_fn` for torch.utils.checkpoint(use_reentrant=False): recompute with the adapters
    that were active in the forward pass, whatever is active (and on whichever thread) at backward."""
    snapshot = dict(_thread_overrides())  # copied now: the live dict changes when use_adapter exits
    return contextlib.nullcontext(), _installed_overrides(snapshot)


# ------------------------------------------------------------------------------------------------
# The layer
# ------------------------------------------------------------------------------------------------
class LoRAAdapter(nn.Module):
    """One adapter's factors: lora_A [r, in] (Kaiming-uniform), lora_B [out, r] (zeros).

    Its forward is computed by the layer holding it (LoRALinear.forward, clara.kernels.lora_linear);
    dropout_p applies to the adapter's input while this module is in training mode.
    """

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float,
                 device=None, dtype=None):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.r, self.alpha, self.dropout_p = r, float(alpha), float(dropout)
        self.scaling = self.alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=dtype))
        # Same initialisation as nn.Linear's weight: with B = 0 the adapter starts as the identity
        # change, and A already has a useful scale when B starts to move.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def delta_weight(self) -> torch.Tensor:
        """(alpha/r) · B A in fp32: [out, in]."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, dropout={self.dropout_p:g}"


class LoRALinear(nn.Module):
    """A frozen linear layer plus named low-rank adapters, one of which is active per call.

        y = W x + b + (alpha/r) · B A dropout(x)

    W [out, in] and b [out] are the base layer's own parameters under their own names (`weight`,
    `bias`), so base state dicts load unchanged. A [r, in], B [out, r] belong to the active adapter;
    with no active adapter (None) the layer is exactly the base linear. A fused projection
    (qkv_proj, gate_up_proj) gets one adapter over its whole output.
    """

    def __init__(self, base: nn.Linear | QuantizedLinear, selection: AdapterSelection | None = None):
        """Wrap `base` without copying: this layer holds the very same weight/bias Parameters, or,
        for a quantized base, the QuantizedLinear itself as `quantized` (its buffers then sit under
        `<layer>.quantized.`)."""
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        if isinstance(base, QuantizedLinear):
            self.register_module("quantized", base)
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        else:
            self.register_module("quantized", None)
            self.weight = base.weight.requires_grad_(False)
            self.register_parameter("bias", None if base.bias is None else base.bias.requires_grad_(False))
        self.adapters = nn.ModuleDict()
        # Shared by all LoRA layers of a model (apply_lora passes the model-wide one).
        self.selection = selection if selection is not None else AdapterSelection()
        self.merged_adapter: str | None = None
        self.train(base.training)  # converting an eval-mode model must not switch dropout on

    # -- adapters ----------------------------------------------------------------------------------
    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0, dtype=None) -> LoRAAdapter:
        """Add adapter `name` (B = 0, so the output is unchanged). dtype defaults to the weight's."""
        check_adapter_name(name)
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists (adapters: {list(self.adapters)})")
        adapter = LoRAAdapter(self.in_features, self.out_features, r, alpha, dropout,
                              device=self.base_device, dtype=dtype or self.base_dtype)
        adapter.train(self.training)  # a new module defaults to training mode, with dropout on
        self.adapters[name] = adapter
        return adapter

    @property
    def base_device(self) -> torch.device:
        return self.quantized.codes.device if self.quantized is not None else self.weight.device

    @property
    def base_dtype(self) -> torch.dtype:
        """The base weight's dtype (for a quantized base, the dtype it was loaded in)."""
        return self.quantized.dtype if self.quantized is not None else self.weight.dtype

    def adapter(self, name: str) -> LoRAAdapter:
        if name not in self.adapters:
            raise KeyError(f"no adapter {name!r} in this layer (adapters: {list(self.adapters)})")
        return self.adapters[name]

    @torch.no_grad()
    def merge(self, name: str) -> None:
        """W <- W + (alpha/r)·B A. Merging the merged adapter again warns and does nothing."""
        adapter = self.adapter(name)
        self._require_float_base("merge")
        if self.merged_adapter == name:
            warnings.warn(f"adapter {name!r} is already merged; merge skipped", stacklevel=2)
            return
        if self.merged_adapter is not None:
            raise RuntimeError(f"cannot merge {name!r}: {self.merged_adapter!r} is merged; unmerge it first")
        self.weight.copy_((self.weight.float() + adapter.delta_weight()).to(self.weight.dtype))
        self.merged_adapter = name

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        """W <- W − (alpha/r)·B A. Unmerging an adapter that is not merged warns and does nothing."""
        adapter = self.adapter(name)
        if self.merged_adapter != name:
            warnings.warn(f"adapter {name!r} is not merged (merged: {self.merged_adapter!r}); unmerge skipped",
                          stacklevel=2)
            return
        self.weight.copy_((self.weight.float() - adapter.delta_weight()).to(self.weight.dtype))
        self.merged_adapter = None

    def _require_float_base(self, what: str) -> None:
        if self.quantized is not None:
            raise RuntimeError(f"cannot {what} an adapter into a {self.quantized.kind}-quantized base weight; "
                               "load the base unquantized to merge")

    # -- forward -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        active = self.selection.active()
        if self.merged_adapter is not None and active != self.merged_adapter:
            raise RuntimeError(
                f"adapter {self.merged_adapter!r} is merged into the weight, but {active!r} is active; "
                "unmerge it before using another adapter or the base model"
            )
        if self.quantized is not None:
            out = self.quantized(x)  # the weight dequantized for this multiply only: clara/quant.py
            if active is None:
                return out
            adapter = self.adapter(active)
            return out + lora_delta(x, adapter.lora_A, adapter.lora_B, adapter.scaling, adapter.dropout_p,
                                    adapter.training)
        if active is None or active == self.merged_adapter:
            return linear(x, self.weight, self.bias)
        adapter = self.adapter(active)
        # One autograd node (kernels/lora.py), or the composed ops of kernels/reference.py where the
        # dtypes call for them or the reference switch is on.
        return lora_linear(x, self.weight, self.bias, adapter.lora_A, adapter.lora_B, adapter.scaling,
                           adapter.dropout_p, adapter.training)

    def extra_repr(self) -> str:
        merged = f", merged={self.merged_adapter!r}" if self.merged_adapter else ""
        quantized = self.quantized is not None
        base = f", quantized={self.quantized.kind!r}" if quantized else f", bias={self.bias is not None}"
        return f"in_features={self.in_features}, out_features={self.out_features}{base}{merged}"


def check_adapter_name(name: str) -> None:
    # Names become state-dict path components: no dots, nothing empty.
    if not isinstance(name, str) or not _ADAPTER_NAME.fullmatch(name):
        raise ValueError(f"adapter name must be a Python identifier (letters, digits, _), got {name!r}")


# ------------------------------------------------------------------------------------------------
# Whole-model helpers
# ------------------------------------------------------------------------------------------------
def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear in `model`, by module name, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _require_lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers; call apply_lora first")
    return layers


def _require_adapter(layers: dict[str, LoRALinear], name: str) -> None:
    lacking = [n for n, layer in layers.items() if name not in layer.adapters]
    if lacking:
        present = sorted({a for layer in layers.values() for a in layer.adapters})
        raise KeyError(f"adapter {name!r} is missing from {len(lacking)} LoRA layer(s) (first: {lacking[0]}); "
                       f"adapters present: {present}")


def _selections(layers: dict[str, LoRALinear]) -> list[AdapterSelection]:
    return list({id(layer.selection): layer.selection for layer in layers.values()}.values())


def _is_target(module_name: str, targets: Sequence[str]) -> bool:
    if ALL_LINEAR in targets and in_decoder_blocks(module_name):
        return True
    return module_name.split(".")[-1] in targets


def apply_lora(model: nn.Module, adapter_names: Iterable[str], r: int, alpha: float, dropout: float = 0.0,
               target_modules: str | Sequence[str] = ALL_LINEAR, adapter_dtype: torch.dtype | None = None
               ) -> list[str]:
    """Convert the matching linear layers of `model` in place and give each the named adapters.

    target_modules: "all-linear" (every linear inside the transformer blocks, i.e. under `layers`;
        never lm_head) or last-component names such as ["q_proj", "v_proj"]. A name that matches no
        linear layer is an error, so a Llama target list does not silently half-apply to Phi-3's
        fused projections.
    adapter_dtype: the adapters' dtype (default: each base weight's).
    Base weights and biases of converted layers are frozen. Returns the converted module names.
    """
    names = list(adapter_names)
    for name in names:
        check_adapter_name(name)
    if len(set(names)) != len(names):
        raise ValueError(f"adapter names repeat: {names}")
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)

    if lora_layers(model):
        raise ValueError("model already has LoRA layers; use add_adapter to add another adapter")
    linears = {n: m for n, m in model.named_modules()
               if isinstance(m, (nn.Linear, QuantizedLinear)) and _is_target(n, targets)}
    unmatched = [t for t in targets if t != ALL_LINEAR and not any(n.split(".")[-1] == t for n in linears)]
    if unmatched:
        available = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"target modules {unmatched} match no linear layer; linear layers are named {available}")
    if not linears:
        raise ValueError(f"no linear layer matches target_modules={targets}")

    selection = AdapterSelection()  # one per model: use_adapter switches every layer at once
    for module_name, base in linears.items():
        parent_name, _, child = module_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = LoRALinear(base, selection)
        for name in names:
            layer.add_adapter(name, r, alpha, dropout, dtype=adapter_dtype)
        setattr(parent, child, layer)
    return list(linears)


def add_adapter(model: nn.Module, name: str, r: int, alpha: float, dropout: float = 0.0,
                adapter_dtype: torch.dtype | None = None) -> None:
    """Add adapter `name` (B = 0) to every LoRA layer of an already converted model."""
    layers = _require_lora_layers(model)
    present = sorted({a for layer in layers.values() for a in layer.adapters})
    if name in present:
        raise ValueError(f"adapter {name!r} already exists (adapters: {present})")
    for layer in layers.values():
        layer.add_adapter(name, r, alpha, dropout, dtype=adapter_dtype)


@torch.no_grad()
def copy_adapter(model: nn.Module, src: str, dst: str) -> None:
    """Make `dst` an exact copy of `src` (rank, alpha, dropout and values); creates `dst` if absent.

    CLaRa's stage 2 starts the query reasoner as a copy of the trained encoder adapter.
    """
    layers = _require_lora_layers(model)
    _require_adapter(layers, src)
    for module_name, layer in layers.items():
        source = layer.adapters[src]
        if dst not in layer.adapters:
            layer.add_adapter(dst, source.r, source.alpha, source.dropout_p, dtype=source.lora_A.dtype)
        elif layer.merged_adapter == dst:
            raise RuntimeError(f"cannot overwrite {dst!r} in {module_name}: it is merged; unmerge it first")
        elif layer.adapters[dst].r != source.r:
            raise ValueError(f"cannot copy {src!r} (r={source.r}) onto {dst!r} (r={layer.adapters[dst].r}) "
                             f"in {module_name}: ranks differ")
        # Copy into the existing Parameters, so an optimizer already holding them stays valid.
        target = layer.adapters[dst]
        target.lora_A.copy_(source.lora_A)
        target.lora_B.copy_(source.lora_B)
        target.alpha, target.scaling, target.dropout_p = source.alpha, source.scaling, source.dropout_p


def set_active_adapter(model: nn.Module, name: str | None) -> None:
    """Make `name` (None: base only) the model's adapter for every thread outside `use_adapter`."""
    layers = _require_lora_layers(model)
    if name is not None:
        _require_adapter(layers, name)
    for selection in _selections(layers):
        selection.default = name


def active_adapter(model: nn.Module) -> str | None:
    """The adapter the calling thread would use now."""
    return _selections(_require_lora_layers(model))[0].active()


@contextlib.contextmanager
def use_adapter(model: nn.Module, name: str | None) -> Iterator[None]:
    """Within the block, the calling thread runs `model` with adapter `name` (None: base only)."""
    layers = _require_lora_layers(model)
    if name is not None:
        _require_adapter(layers, name)
    overrides = _thread_overrides()
    unset = object()
    previous = {s: overrides.get(s, unset) for s in _selections(layers)}
    for selection in previous:
        overrides[selection] = name
    try:
        yield
    finally:
        overrides = _thread_overrides()
        for selection, before in previous.items():
            if before is unset:
                overrides.pop(selection, None)
            else:
                overrides[selection] = before


def merge_adapter(model: nn.Module, name: str) -> None:
    """Fold adapter `name` into every LoRA layer's weight (see the module docstring on guards)."""
    layers = _require_lora_layers(model)
    _require_adapter(layers, name)
    if all(layer.merged_adapter == name for layer in layers.values()):
        warnings.warn(f"adapter {name!r} is already merged; merge skipped", stacklevel=2)  # once, not per layer
        return
    for layer in layers.values():
        layer.merge(name)


def unmerge_adapter(model: nn.Module, name: str) -> None:
    """Take adapter `name` back out of every LoRA layer's weight."""
    layers = _require_lora_layers(model)
    _require_adapter(layers, name)
    if all(layer.merged_adapter != name for layer in layers.values()):
        warnings.warn(f"adapter {name!r} is not merged; unmerge skipped", stacklevel=2)  # once, not per layer
        return
    for layer in layers.values():
        layer.unmerge(name)


# ------------------------------------------------------------------------------------------------
# Per-adapter state dicts and trainability
# ------------------------------------------------------------------------------------------------
def adapter_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter `name` as {"<layer>.lora_A": [r, in], "<layer>.lora_B": [out, r]}: detached copies.

    The adapter's own name is left out of the keys, so it can be loaded under another name.
    """
    layers = _require_lora_layers(model)
    _require_adapter(layers, name)
    state = {}
    for module_name, layer in layers.items():
        adapter = layer.adapters[name]
        state[f"{module_name}.lora_A"] = adapter.lora_A.detach().clone()
        state[f"{module_name}.lora_B"] = adapter.lora_B.detach().clone()
    return state


@torch.no_grad()
def load_adapter_state_dict(model: nn.Module, name: str, state: dict[str, torch.Tensor],
                            strict: bool = True) -> tuple[list[str], list[str]]:
    """Load a state from `adapter_state_dict` into the existing adapter `name`.

    Shapes must match always (a different rank is an error, whatever `strict`); with strict, the
    keys must match exactly. Values are cast to the adapter's dtype and device. Returns
    (missing keys, unexpected keys), like nn.Module.load_state_dict.
    """
    layers = _require_lora_layers(model)
    _require_adapter(layers, name)
    merged = [n for n, layer in layers.items() if layer.merged_adapter == name]
    if merged:
        raise RuntimeError(f"cannot load adapter {name!r}: it is merged in {merged[0]}; unmerge it first")
    params = {}
    for module_name, layer in layers.items():
        adapter = layer.adapters[name]
        params[f"{module_name}.lora_A"] = adapter.lora_A
        params[f"{module_name}.lora_B"] = adapter.lora_B
    missing = [k for k in params if k not in state]
    unexpected = [k for k in state if k not in params]
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(p.shape)}"
                  for k, p in params.items() if k in state and state[k].shape != p.shape]
    problems = []
    if mismatched:
        problems.append(f"shape mismatch for {mismatched}")
    if strict and missing:
        problems.append(f"missing keys {missing}")
    if strict and unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if problems:
        raise ValueError(f"cannot load adapter {name!r}: " + "; ".join(problems))
    for key, param in params.items():
        if key in state:
            param.copy_(state[key])
    return missing, unexpected


def trainable_parameters(model: nn.Module, adapter_names: Iterable[str]) -> list[nn.Parameter]:
    """lora_A and lora_B of the named adapters in every LoRA layer, in model order."""
    layers = _require_lora_layers(model)
    names = list(adapter_names)
    for name in names:
        _require_adapter(layers, name)
    return [p for layer in layers.values() for name in names
            for p in (layer.adapters[name].lora_A, layer.adapters[name].lora_B)]


def mark_only_adapters_trainable(model: nn.Module, adapter_names: Iterable[str]) -> None:
    """requires_grad = True for the named adapters' factors, False for every other parameter."""
    keep = {id(p) for p in trainable_parameters(model, adapter_names)}
    for param in model.parameters():
        param.requires_grad_(id(param) in keep)
