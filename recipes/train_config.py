"""TrainConfig: the typed configuration the training loop runs on.

Its fields are the flags of `clara-train` (recipes/args.py), one to one and with the same names;
the parser holds each flag's default and help, and `parse_args` returns this dataclass. The
DeepSpeed, wandb and tensorboard flags that the official CLI has and that change nothing here are
accepted by the parser but have no field.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TrainConfig:
    # model and stage
    pretrain: str | None
    pretrain_checkpoint: str | None
    stage: str
    generation_top_k: int
    doc_max_length: int
    compress_rate: int
    qa_loss: bool
    freeze_decoder_adapter: bool
    mse_loss: bool
    do_eval_gen: bool
    stage2_mips: bool
    stage2_retrieval_top_n: int
    # LoRA
    lora_rank: int
    lora_alpha: float | None
    lora_dropout: float
    target_modules: list[str]
    prompt_texts: str
    # data
    dataset: str | None
    dataset_probs: str | None
    eval_dataset: str | None
    dataset_split: str
    eval_split: str
    max_samples: int
    max_len: int
    # optimisation
    max_epochs: int
    max_steps: int
    learning_rate: float
    lr_warmup_ratio: float
    lr_scheduler: str
    l2: float
    adam_betas: tuple[float, float]
    max_norm: float
    micro_train_batch_size: int
    train_batch_size: int
    seed: int
    # precision, devices, memory
    bf16: bool
    quantize: str | None
    gradient_checkpointing: bool
    flash_attn: bool
    zero_stage: int
    ds_tensor_parallel_size: int
    device: str
    dry_run: bool
    memory_budget_gb: float
    plan_for: str
    # run folder, checkpoints, logging
    save_path: str
    save_steps: int
    overwrite: bool
    ckpt_path: str | None
    load_checkpoint: bool
    max_ckpt_num: int
    logging_steps: int
    eval_steps: int

    @classmethod
    def from_namespace(cls, namespace: argparse.Namespace) -> "TrainConfig":
        values = vars(namespace)
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in values]
        if missing:
            raise ValueError(f"the parser has no flag for TrainConfig field(s) {', '.join(missing)}")
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
