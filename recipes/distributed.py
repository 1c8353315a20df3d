"""torch.distributed for the recipes: one process per device, started by torchrun.

Without torchrun (no WORLD_SIZE in the environment) everything here is a no-op for one process.
With several processes, `wrap_model` uses DDP, or FSDP2 (`fully_shard`, each decoder block and
then the whole model) when `--zero_stage` is 2 or 3: the frozen base and the adapters are sharded
across ranks instead of copied. NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dist.init_process_group(backend=backend)
    return DistInfo(rank, local_rank, world)


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(value: float | int, info: DistInfo, device: torch.device) -> float:
    """Sum a Python number over ranks (float64, so token counts stay exact)."""
    if not info.enabled:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def wrap_model(model: torch.nn.Module, info: DistInfo, zero_stage: int, device: torch.device):
    """-> (module to call, description). One process: the model itself."""
    if not info.enabled:
        return model, "single process"
    if zero_stage >= 2:
        from torch.distributed.fsdp import fully_shard

        for block in model.decoder.layers:
            fully_shard(block)
        fully_shard(model)
        return model, f"FSDP2 over {info.world_size} processes (--zero_stage {zero_stage})"
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return (DistributedDataParallel(model, device_ids=device_ids),
            f"DDP over {info.world_size} processes")


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def full_parameters(model: torch.nn.Module):
    """Within the block every parameter of an FSDP2 model is a whole tensor on every rank.

    A collective (all ranks must enter). Each sharded parameter is gathered and set on its module
    in place of the shard, which is put back on exit; FSDP's own unshard()/reshard() pair cannot be
    used for this on CPU, where gloo's gathered storage cannot be freed again.
    """
    from torch.distributed.tensor import DTensor

    swapped = []
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if isinstance(param, DTensor):
                module._parameters[name] = torch.nn.Parameter(param.full_tensor(), requires_grad=param.requires_grad)
                swapped.append((module, name, param))
    try:
        yield
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param


class FullStateOptimizer:
    """An optimizer over FSDP2 (DTensor) parameters seen with whole tensors in its state dict.

    state_dict() gathers each sharded state tensor (a collective); load_state_dict() cuts whole
    tensors back into this rank's shards. So checkpoints hold the same, unsharded optimizer state
    whatever the number of processes.
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.class_name = type(optimizer).__name__

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def state_dict(self) -> dict:
        from torch.distributed.tensor import DTensor

        sd = self.optimizer.state_dict()
        # state_dict() shares the per-parameter dicts with the live optimizer: copy before replacing.
        sd["state"] = {index: dict(entries) for index, entries in sd["state"].items()}
        for entries in sd["state"].values():
            for key, value in entries.items():
                if isinstance(value, DTensor):
                    entries[key] = value.full_tensor().cpu()
        return sd

    def load_state_dict(self, sd: dict) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor

        params = self._params()
        for index, entries in sd["state"].items():
            p = params[int(index)]
            if not isinstance(p, DTensor):
                continue
            for key, value in entries.items():
                if isinstance(value, torch.Tensor) and tuple(value.shape) == tuple(p.shape):
                    entries[key] = distribute_tensor(value.to(p.device), p.device_mesh, p.placements)
        self.optimizer.load_state_dict(sd)


def gather_objects(obj, info: DistInfo) -> list:
    """Every rank's `obj` on every rank (in-process values, never read from a file)."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out
