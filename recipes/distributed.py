"""torch.distributed for the recipes: one process per device, started by torchrun.

Without torchrun (no WORLD_SIZE in the environment) everything here is a no-op for one process.
With several processes, `wrap_model` uses DDP, or FSDP2 (`fully_shard`, each decoder block and
then the whole model) when `--zero_stage` is 2 or 3: the frozen base and the adapters are sharded
across ranks instead of copied. NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

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
