"""The training loop every stage shares, written out: no Trainer, no callbacks.

One optimizer step = one global batch of `train_batch_size` examples, split over the processes and
then into micro-batches of `micro_train_batch_size` (gradient accumulation). The LM loss of a step
is the sum of its answer-token cross-entropies divided by the answer tokens of the whole global
batch (counted before the first backward and summed over processes), so 4 micro-batches of 1 give
the same gradient as 1 micro-batch of 4. The MSE alignment loss (`--mse_loss`) and the InfoNCE
loss (stage2_pretrain_retrieval) are means over micro-batches. The model defines the terms and
their weights (`Clara.forward`'s `LossTerm`s); the loop only supplies the global normalisers.

A run directory (`--save_path`) holds metrics.jsonl, loss_curve.png, the final model in `final/`
and, unless `--ckpt_path` points elsewhere, the resumable checkpoints `checkpoints/step_N/`. Each
checkpoint records the run's identity (stage, base, dataset fingerprint, shapes), and a run
resumes only a checkpoint of its own identity. A checkpoint is
written after an optimizer step (every `--save_steps`, each epoch with -2, and on Ctrl-C), holds
the trainable weights, optimizer, scheduler, loss scaler, RNG states and the data position, and
resuming from it (`--load_checkpoint`) continues the loss curve exactly.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import os
import random
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from clara.data.metrics import answer_scores
from clara.checkpoint import (
    CheckpointError,
    find_clara_checkpoint,
    load_trained_weights,
    names_clara_checkpoint,
    read_checkpoint_config,
    resolve_checkpoint,
)
from clara.config import ClaraConfig
from clara.files import read_json
from clara.stages import get_stage
from clara.lora import mark_only_adapters_trainable
from clara.memory_cache import DocumentMemoryCache
from clara.model import DECODER, Clara, LossTerm, combine_loss_terms
from clara.prompts import PROMPT_TEXTS
from clara.recipes import dataset as ds
from clara.recipes.mips import CorpusSearch
from clara.recipes.nll import answer_nll
from clara.recipes.distributed import (DistInfo, FullStateOptimizer, all_reduce_sum, barrier, full_parameters, gather_objects,
                                 init_distributed, is_sharded, shutdown, wrap_model)
from clara.recipes.precision import choose_precision, flash_attention_note, pick_device
from clara.recipes.run_identity import check_same_run, run_identity
from clara.recipes.plot import write_loss_curve_png
from clara.recipes.schedule import OFFICIAL_MIN_LR_RATIO, lr_at
from clara.recipes.train_config import TrainConfig
from clara.recipes.run_folder import RUN_FILE, check_run_folder, clear_run_outputs, read_run_file, write_run_file
from clara.recipes.train_state import (STATE_FILE, capture_rng, find_latest_checkpoint, find_resumable_checkpoint,
                                       load_train_state, prune_checkpoints, restore_rng, save_rng, save_train_state,
                                       write_checkpoint_atomically)

log = logging.getLogger("clara.recipes.train")


@dataclass
class Position:
    """Where the run is: the next optimizer step to take."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0  # optimizer steps done


@dataclass
class StepResult:
    step: int
    loss: float
    lm_loss: float | None
    mse_loss: float | None
    lr: float
    grad_norm: float
    tokens: int  # answer tokens the loss counted
    seconds: float
    input_tokens: int = 0  # every real token the step ran through the model (documents, queries, prompts)


@dataclass
class TrainResult:
    steps: list[StepResult] = field(default_factory=list)
    interrupted: bool = False
    final_dir: Path | None = None

    @property
    def losses(self) -> list[float]:
        return [s.loss for s in self.steps]


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------
def run_switches(args: TrainConfig) -> dict[str, Any]:
    """ClaraConfig fields that belong to a run, not to a model: a loaded checkpoint takes them
    from this run's flags; every other field comes from the checkpoint."""
    return {"generation_top_k": args.generation_top_k, "mse_loss": args.mse_loss, "qa_loss": args.qa_loss,
            "lora_dropout": args.lora_dropout}


def lora_targets(args: TrainConfig) -> str | tuple[str, ...]:
    """--target_modules as ClaraConfig.lora_target_modules holds it."""
    return "all-linear" if args.target_modules == ["all-linear"] else tuple(args.target_modules)


def start_checkpoint(args: TrainConfig) -> Path | None:
    """The Clara checkpoint the run starts from (--pretrain_checkpoint, or --pretrain naming one):
    a checkpoint or run folder, or an official CLaRa checkpoint, local or on the hub
    ("apple/CLaRa-7B-Instruct:compression-16"), converted once into the cache (clara.checkpoint)."""
    checkpoint = find_clara_checkpoint(args.pretrain_checkpoint) or find_clara_checkpoint(args.pretrain)
    if args.pretrain_checkpoint and checkpoint is None:
        raise CheckpointError(f"--pretrain_checkpoint {args.pretrain_checkpoint}: not a Clara checkpoint "
                              "(no clara.json in it or in its final/)")
    if checkpoint is None and names_clara_checkpoint(args.pretrain):
        # Converted in bf16 (the official files' own precision) on a quantized base when the run
        # asks for one: a 7B conversion then fits where the run fits.
        checkpoint = resolve_checkpoint(args.pretrain, model_class=Clara, base=None, base_model=None,
                                        dtype=torch.bfloat16, device="cpu", quantize=args.quantize)
    return checkpoint


def check_flags_match_checkpoint(args: TrainConfig, checkpoint: Path | None) -> None:
    """A checkpoint to start from (start_checkpoint's) fixes the shapes of what it holds; a flag asking
    for another shape is refused, where loading would silently keep the checkpoint's (and the run
    identity would lie)."""
    if checkpoint is None:
        return
    config = read_checkpoint_config(checkpoint)
    pairs = {"compress_rate": (config.compress_rate, args.compress_rate),
             "doc_max_length": (config.doc_max_length, args.doc_max_length),
             "lora_rank": (config.lora_r, args.lora_rank),
             "lora_alpha": (config.lora_alpha, args.lora_alpha if args.lora_alpha is not None else 2 * args.lora_rank),
             "target_modules": (config.lora_target_modules, lora_targets(args))}
    differences = [f"--{flag} {mine} (the checkpoint has {theirs})" for flag, (theirs, mine) in pairs.items()
                   if theirs != mine]
    if differences:
        fix = " ".join(f"--{flag} {' '.join(theirs) if isinstance(theirs, tuple) else theirs}"
                       for flag, (theirs, mine) in pairs.items() if theirs != mine)
        raise CheckpointError(f"{checkpoint}: this run asks for {', '.join(differences)}; a checkpoint keeps the "
                              f"shapes it was trained with: pass {fix}")


def check_prompts_fit(model: Clara, examples, max_len: int, source: str, n_longest: int = 16) -> None:
    """The rows with the longest questions and answers must leave room for an answer within
    --max_len: found here, before the run folder is touched, not at the step that reaches them."""
    def text_length(index: int) -> int:
        example = examples[index]
        parts = [getattr(example, "question", ""), *getattr(example, "questions", ()), getattr(example, "answer", ""),
                 *getattr(example, "answers", ())]
        return sum(len(part) for part in parts)

    for index in sorted(range(len(examples)), key=text_length, reverse=True)[:n_longest]:
        try:
            model.collate([examples[index]], max_len=max_len)
        except ValueError as error:
            reason = str(error).removeprefix("example 0: ")
            raise ValueError(f"{source}: row {index + 1}: {reason}") from None


def build_model(args: TrainConfig, precision, device, checkpoint: Path | None) -> Clara:
    """The run's model: from `checkpoint` (start_checkpoint's) where there is one, else fresh on the base."""
    stage = args.stage
    if checkpoint is not None:
        base = args.pretrain if args.pretrain_checkpoint and not find_clara_checkpoint(args.pretrain) else None
        model = Clara.from_pretrained(checkpoint, base=base, training_stage=stage, dtype=precision.weight_dtype,
                                      device=device, settings=run_switches(args), quantize=args.quantize)
        if model.texts != PROMPT_TEXTS[args.prompt_texts]:
            log.warning("%s was trained with other prompt wording than --prompt_texts %s; the run keeps the "
                        "checkpoint's", checkpoint, args.prompt_texts)
    else:
        config = ClaraConfig(compress_rate=args.compress_rate, doc_max_length=args.doc_max_length,
                             training_stage=stage, lora_r=args.lora_rank, lora_alpha=args.lora_alpha,
                             lora_target_modules=lora_targets(args), **run_switches(args))
        model = Clara.from_base(args.pretrain, config, dtype=precision.weight_dtype, device=device,
                                texts=PROMPT_TEXTS[args.prompt_texts], quantize=args.quantize)
    if args.freeze_decoder_adapter:
        mark_only_adapters_trainable(model.decoder, tuple(a for a in get_stage(stage).trained_adapters if a != DECODER))
    model.rng.seed(args.seed)
    with torch.no_grad():
        for _, p in model.trainable_named_parameters():
            p.data = p.data.float()  # fp32 master weights; autocast casts them per multiply
    model.decoder.set_gradient_checkpointing(args.gradient_checkpointing)
    return model


def make_optimizer(model: Clara, args: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.trainable_named_parameters():
        # Weight decay pulls LoRA factors toward the base; it should not shrink token embeddings.
        (no_decay if name == "memory_embeddings" else decay).append(p)
    groups = [{"params": decay, "weight_decay": args.l2}, {"params": no_decay, "weight_decay": 0.0}]
    params = decay + no_decay
    # CUDA: the fused kernel updates every tensor in one launch. Not on CPU, where torch's fused
    # AdamW was far slower on some steps (docs/performance.md). FSDP2's sharded DTensors keep the
    # default implementation.
    fused = all(type(p.data) is torch.Tensor and p.device.type == "cuda" for p in params)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=args.learning_rate,
                             betas=tuple(args.adam_betas), eps=1e-8, fused=fused or None)


# ---------------------------------------------------------------------------------------------
# One optimizer step
# ---------------------------------------------------------------------------------------------
def train_step(module, model: Clara, batches, optimizer, scaler, precision, device, dist: DistInfo,
               max_norm: float) -> tuple[float, float | None, float | None, float, int]:
    """Forward/backward over this rank's micro-batches, then one optimizer step.

    Returns (loss, lm_loss, mse_loss, grad_norm, answer tokens of the global batch).
    """
    n_micro_local = len(batches)
    n_micro = all_reduce_sum(n_micro_local, dist, device)
    tokens = int(all_reduce_sum(sum(b.n_target_tokens for b in batches), dist, device))
    names = get_stage(model.config.training_stage).losses  # the same names in the same order on every rank
    shares = dict.fromkeys(names, 0.0)  # each term's part of its global-batch value
    present = dict.fromkeys(names, 0)  # micro-batches that computed the term ("mse" only with --mse_loss)
    loss_sum = 0.0
    for i, batch in enumerate(batches):
        last = i == n_micro_local - 1
        sync = contextlib.nullcontext() if last or not hasattr(module, "no_sync") else module.no_sync()
        with sync:
            with precision.autocast(device):
                _, aux = module(batch)
            # The model's terms as this micro-batch's share of the global batch.
            loss = combine_loss_terms(aux["loss_terms"], tokens, n_micro)
            loss_sum += float(loss.detach())
            for term in aux["loss_terms"]:
                shares[term.name] += float(term.share(tokens, n_micro).detach())
                present[term.name] += 1
            # DDP and FSDP average gradients over processes; the factor world_size undoes that.
            loss = loss * dist.world_size
            (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    terms = {}
    for name in names:
        value, count = all_reduce_sum(shares[name], dist, device), all_reduce_sum(present[name], dist, device)
        terms[name] = value if count else None
    return all_reduce_sum(loss_sum, dist, device), terms.get("lm"), terms.get("mse"), grad_norm, tokens


def _input_tokens(batch) -> int:
    n = int(batch.documents.attention_mask.sum())
    for part in (batch.decoder, batch.query):
        if part is not None:
            n += int(part.attention_mask.sum())
    return n


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
def checkpoint_root(args: TrainConfig) -> Path:
    """Where the run's step checkpoints live: --ckpt_path, else inside the run's own --save_path."""
    return Path(args.ckpt_path) if args.ckpt_path else Path(args.save_path) / "checkpoints"


def load_run_data(args: TrainConfig) -> tuple[list, list | None]:
    """The training (and evaluation) examples, read and validated before any model is loaded, so a
    mistake in the data costs no model load."""
    stage = get_stage(args.stage)
    # The document counts are checked against --generation_top_k except on stage1's typed rows.
    top_k = None if stage.typed_rows else args.generation_top_k

    def read(source: str) -> list:
        examples = ds.load_examples(source, stage.data_format, max_samples=args.max_samples, top_k=top_k)
        return ds.select_stage1_rows(examples, args.qa_loss) if stage.typed_rows else examples

    return read(args.dataset), read(args.eval_dataset) if args.eval_dataset else None


class StopRequest:
    """Ctrl-C asks the run to stop after the optimizer step it is in: that step completes, a step
    checkpoint is saved, and the run exits, so the saved RNG states and data position are the ones
    the next step would have used. A second Ctrl-C stops at once, saving nothing (the newest step
    checkpoint stays the one to resume)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("Ctrl-C: finishing this step, then saving a checkpoint and stopping "
                    "(Ctrl-C again stops at once without saving)")


def train(args: TrainConfig) -> TrainResult:
    dist = init_distributed()
    logging.basicConfig(level=logging.INFO if dist.is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s")
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    device = pick_device(args.device, dist.local_rank)
    precision = choose_precision(device, args.bf16)

    # Everything a user can get wrong is checked before the model loads: the data, the run folder,
    # the checkpoint to resume, the flags against a checkpoint to start from.
    examples, eval_examples = load_run_data(args)
    log.info("%d training examples%s", len(examples),
             f", {len(eval_examples)} evaluation examples" if eval_examples else "")
    save_path, root = Path(args.save_path), checkpoint_root(args)
    identity = run_identity(args, examples)
    latest = saved_identity = None
    if args.load_checkpoint:
        latest = find_resumable_checkpoint(root, warn=log.warning if dist.is_main else lambda message: None)
        if latest is None:
            log.info("--load_checkpoint: no checkpoint in %s; starting afresh", root)
        else:
            saved_identity = read_run_identity(latest)
            check_same_run(saved_identity, identity, str(latest))
    if latest is not None and (recorded := read_run_file(save_path)) is not None:
        check_same_run(recorded, identity, str(save_path / RUN_FILE))
    doomed = check_run_folder(save_path, root, resuming=latest is not None, overwrite=args.overwrite,
                              resume_requested=args.load_checkpoint)
    # Resolved once: for a hub checkpoint that is a download check (and, the first time, a conversion).
    checkpoint = start_checkpoint(args)
    check_flags_match_checkpoint(args, checkpoint)

    log.info("device %s, %s", device, precision.note)
    if args.flash_attn:
        log.info(flash_attention_note(device, precision.autocast_dtype))
    model = build_model(args, precision, device, checkpoint)
    if not get_stage(args.stage).compressor_trained:
        model.memory_cache = DocumentMemoryCache()
        log.info("%s keeps the compressor frozen: each distinct document is compressed once (without "
                 "dropout) and its memory reused for the rest of the run", args.stage)
    corpus_search = None
    if args.stage2_mips:
        if dist.world_size > 1 and args.zero_stage >= 2:
            raise ValueError("--stage2_mips searches with the whole model on each process: use --zero_stage 0 or 1")
        corpus_search = CorpusSearch(model, examples, args.stage2_retrieval_top_n)
        log.info("--stage2_mips: %d distinct documents in the search index; each question's %d candidates "
                 "come from it", len(corpus_search.corpus), args.stage2_retrieval_top_n)
    n_trainable = sum(p.numel() for _, p in model.trainable_named_parameters())
    log.info("stage %s: %d trainable parameters (%s)", args.stage, n_trainable,
             ", ".join(sorted({n.split(".adapters.")[-1].split(".")[0] if ".adapters." in n else n
                               for n, _ in model.trainable_named_parameters()})))
    check_prompts_fit(model, examples, args.max_len, args.dataset)
    if eval_examples:
        check_prompts_fit(model, eval_examples, args.max_len, args.eval_dataset)
    identity = run_identity(args, examples, model.base_fingerprint)
    if latest is not None:
        check_same_run(saved_identity, identity, str(latest))  # the base, now that it is loaded

    global_batch = args.train_batch_size
    per_epoch = ds.steps_per_epoch(len(examples), global_batch)
    # The run's real length: --max_steps shortens it, and the schedule, the log and the bar follow.
    total_steps = per_epoch * args.max_epochs
    if args.max_steps > 0:
        total_steps = min(total_steps, args.max_steps)
    position = Position()
    if latest is not None:
        restore_weights(latest, model)  # before sharding: the files hold whole tensors
    module, how = wrap_model(model, dist, args.zero_stage, device)
    log.info("%s; %d steps (%d per epoch, %d epochs%s), global batch %d, micro-batch %d", how, total_steps,
             per_epoch, args.max_epochs, f", capped by --max_steps {args.max_steps}" if args.max_steps > 0 else "",
             global_batch, args.micro_train_batch_size)
    optimizer = make_optimizer(model, args)  # after wrapping: FSDP2 replaces the parameters
    scaler = torch.amp.GradScaler(device.type) if precision.loss_scaling else None
    if latest is not None:
        position = restore_training_state(latest, model, optimizer, scaler, dist)
        log.info("resumed from %s at step %d", latest, position.global_step)

    if dist.is_main:
        if doomed:
            log.warning("--overwrite: removing the previous run's %s", ", ".join(str(p) for p in doomed))
            clear_run_outputs(doomed)
        save_path.mkdir(parents=True, exist_ok=True)
        write_run_file(save_path, identity, args.to_dict())
    barrier(dist)
    result = TrainResult()
    history = _read_history(save_path / "metrics.jsonl", position.global_step) if dist.is_main else []
    model.train()
    evaluated_at = None
    bar = tqdm(total=total_steps, initial=position.global_step, disable=not dist.is_main,
               desc=f"{args.stage}", unit="step", dynamic_ncols=True)
    with StopRequest() as stop:
        try:
            while position.global_step < total_steps:
                order = ds.epoch_order(len(examples), args.seed, position.epoch)
                indices = ds.global_batch_indices(order, position.step_in_epoch, global_batch)
                mine = ds.rank_slice(indices, dist.rank, dist.world_size)
                lr = lr_at(position.global_step, total_steps, args.learning_rate, warmup_ratio=args.lr_warmup_ratio,
                           min_lr_ratio=OFFICIAL_MIN_LR_RATIO, kind=args.lr_scheduler)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                started = time.perf_counter()
                rows = [[examples[i] for i in chunk] for chunk in ds.micro_batches(mine, args.micro_train_batch_size)]
                if corpus_search is not None:
                    rows = [corpus_search.candidates(model, chunk) for chunk in rows]
                batches = [model.collate(chunk, max_len=args.max_len) for chunk in rows]
                loss, lm, mse, grad_norm, tokens = train_step(module, model, batches, optimizer, scaler, precision,
                                                               device, dist, args.max_norm)
                seconds = time.perf_counter() - started
                input_tokens = int(all_reduce_sum(sum(_input_tokens(b) for b in batches), dist, device))
                if not math.isfinite(loss):
                    raise FloatingPointError(f"step {position.global_step + 1}: loss is {loss}; stopping "
                                             "(lower --learning_rate, or check the data)")
                epoch = position.epoch  # the epoch this step belongs to, for the log
                position.global_step += 1
                position.step_in_epoch += 1
                end_of_epoch = position.step_in_epoch >= per_epoch
                if end_of_epoch:
                    position.epoch += 1
                    position.step_in_epoch = 0
                step = StepResult(position.global_step, loss, lm, mse, lr, grad_norm, tokens, seconds, input_tokens)
                result.steps.append(step)
                history.append(step)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{input_tokens / max(seconds, 1e-9):.0f}")
                if dist.is_main and (position.global_step % max(args.logging_steps, 1) == 0
                                     or position.global_step == total_steps):
                    _append_metrics(save_path / "metrics.jsonl", step, epoch)
                if eval_examples and ((args.eval_steps > 0 and position.global_step % args.eval_steps == 0)
                                      or (args.eval_steps == -1 and end_of_epoch)):
                    _evaluate(model, module, eval_examples, args, precision, device, dist, save_path, position)
                    evaluated_at = position.global_step
                # The last step is a step checkpoint too (when the run saves any), so a run can be extended.
                saved = (args.save_steps > 0 and position.global_step % args.save_steps == 0) or (
                    args.save_steps == -2 and end_of_epoch) or (args.save_steps != -1
                                                                and position.global_step == total_steps)
                if saved:
                    save_checkpoint(root, model, optimizer, scaler, position, args, dist, identity)
                if all_reduce_sum(int(stop.requested), dist, device) and position.global_step < total_steps:
                    result.interrupted = True
                    bar.close()
                    log.warning("interrupted: %s step %d before exiting",
                                "saved a checkpoint at" if saved else "saving a checkpoint at", position.global_step)
                    if not saved:
                        save_checkpoint(root, model, optimizer, scaler, position, args, dist, identity)
                    shutdown(dist)
                    return result
        except KeyboardInterrupt:  # a second Ctrl-C: the step in progress is lost, nothing is saved
            result.interrupted = True
            bar.close()
            newest = find_latest_checkpoint(root)
            log.warning("stopped at once during step %d; nothing saved%s", position.global_step + 1,
                        f" (the newest checkpoint is {newest})" if newest else "")
            shutdown(dist)
            return result
    bar.close()
    if model.memory_cache is not None:
        cache = model.memory_cache
        log.info("document memories: %d compressed, %d reused from the cache", cache.misses, cache.hits)

    final = save_path / "final"
    with full_parameters(model):
        if dist.is_main:
            model.save_pretrained(final)
            result.final_dir = final
            log.info("saved the trained model to %s", final)
    if dist.is_main:
        if history:
            # A moving average shows the trend of a long run through the noise of small batches.
            write_loss_curve_png(save_path / "loss_curve.png", [s.step for s in history], [s.loss for s in history],
                                 title=f"{args.stage} training loss", smooth=20 if len(history) >= 100 else 0)
    if eval_examples and evaluated_at != position.global_step:
        _evaluate(model, module, eval_examples, args, precision, device, dist, save_path, position)
    barrier(dist)
    shutdown(dist)
    return result


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------
def save_checkpoint(root: Path, model: Clara, optimizer, scaler, position: Position, args, dist: DistInfo,
                    identity: dict[str, Any]) -> None:
    """Every rank takes part (sharded weights and optimizer state are gathered); rank 0 writes."""
    rngs = gather_objects(capture_rng(), dist)
    optimizer_state = _OptimizerSnapshot(
        (FullStateOptimizer(optimizer) if is_sharded(model) else optimizer).state_dict(), type(optimizer).__name__)

    def write(directory: Path) -> None:
        model.save_pretrained(directory / "model")
        save_train_state(directory, optimizer=optimizer_state, scheduler_state={},
                         scaler_state=scaler.state_dict() if scaler is not None else None,
                         rng=rngs[0], data_position=asdict(position),
                         extra={"model_rng": _jsonable_random_state(model.rng.getstate()),
                                "world_size": dist.world_size, "run": identity,
                                "args": args.to_dict()})
        for rank, rng in enumerate(rngs[1:], start=1):
            save_rng(directory, rng, rank)

    with full_parameters(model):
        if dist.is_main:
            write_checkpoint_atomically(root, position.global_step, write)
            prune_checkpoints(root, args.max_ckpt_num)
            log.info("checkpoint: step %d saved in %s", position.global_step, root)
    barrier(dist)


class _OptimizerSnapshot:
    """An optimizer state dict taken once (gathering it is a collective) and written by rank 0."""

    def __init__(self, state: dict, class_name: str):
        self._state, self.class_name = state, class_name

    def state_dict(self) -> dict:
        return self._state


def restore_weights(directory: Path, model: Clara) -> None:
    """Adapters and memory embeddings of a step checkpoint, into a model not yet sharded."""
    load_trained_weights(directory / "model", model)


def read_run_identity(directory: Path) -> dict[str, Any] | None:
    """The run identity a step checkpoint recorded (None if it recorded none)."""
    state = read_json(directory / STATE_FILE, CheckpointError)
    extra = state.get("extra")
    return extra.get("run") if isinstance(extra, dict) else None


def restore_training_state(directory: Path, model: Clara, optimizer, scaler, dist: DistInfo) -> Position:
    view = FullStateOptimizer(optimizer) if is_sharded(model) else optimizer
    state = load_train_state(directory, view, rank=dist.rank)
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    restore_rng(state["rng"])
    model.rng.setstate(_random_state_from_json(state["extra"]["model_rng"]))
    return Position(**state["data_position"])


def _jsonable_random_state(s):
    return [s[0], list(s[1]), s[2]]


def _random_state_from_json(s):
    return (s[0], tuple(s[1]), s[2])


# ---------------------------------------------------------------------------------------------
# Metrics and evaluation
# ---------------------------------------------------------------------------------------------
def _append_metrics(path: Path, step: StepResult, epoch: int) -> None:
    row = {"step": step.step, "epoch": epoch, "loss": step.loss, "lm_loss": step.lm_loss,
           "mse_loss": step.mse_loss, "lr": step.lr, "grad_norm": step.grad_norm, "tokens": step.tokens,
           "seconds": round(step.seconds, 4), "input_tokens": step.input_tokens,
           "tokens_per_s": round(step.input_tokens / max(step.seconds, 1e-9), 2), "time": round(time.time(), 1)}
    with open(path, "a") as f:  # one short line per write: appends are atomic enough for a log
        f.write(json.dumps(row) + "\n")


def _read_history(path: Path, up_to_step: int) -> list[StepResult]:
    """Earlier steps' metrics (a resumed run), dropping any logged after the checkpoint."""
    if not path.exists():
        return []
    out, kept_lines = [], []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", 0) <= up_to_step:
            kept_lines.append(line)
            if "loss" not in row:  # an evaluation row
                continue
            out.append(StepResult(row["step"], row["loss"], row.get("lm_loss"), row.get("mse_loss"), row["lr"],
                                  row.get("grad_norm", 0.0), row.get("tokens", 0), row.get("seconds", 0.0)))
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept_lines))
    os.replace(tmp, path)
    return out


def _memory_gap(model: Clara, examples, n: int = 64) -> dict[str, float]:
    """The compressor's diagnostic: the answer's NLL with its own documents' memory against a
    neighbour row's, on up to `n` evaluation rows. Near 0, the generator ignores the memory."""
    rows = [e for e in examples if getattr(e, "data_type", "qa") == "qa"]
    if not rows:
        return {}
    # answer_nll needs one document count: keep the rows of the most common one.
    common = collections.Counter(len(e.docs) for e in rows).most_common(1)[0][0]
    rows = [e for e in rows if len(e.docs) == common][:n]
    if len(rows) < 2:
        return {}
    means = answer_nll(model, rows, progress=False, conditions=("compressed", "shuffled")).means()
    return {"eval_nll_own": means["nll_compressed"], "eval_nll_shuffled": means["nll_shuffled"],
            "eval_own_vs_shuffled": means["own_vs_shuffled"]}


@torch.no_grad()
def _evaluate(model: Clara, module, examples, args, precision, device, dist: DistInfo, save_path: Path,
              position: Position) -> None:
    """The training loss over the whole evaluation set, as if it were one global batch; with
    --do_eval_gen, a few generations and their F1."""
    with model.eval_mode():
        stage = get_stage(args.stage)
        totals = dict.fromkeys(stage.losses, 0.0)  # the same names in the same order on every rank
        kinds: dict[str, LossTerm] = {}  # each term's weight and normaliser, as the model gives them
        tokens, n = 0, 0
        for chunk in ds.micro_batches(ds.rank_slice(list(range(len(examples))), dist.rank, dist.world_size),
                                      args.micro_train_batch_size):
            batch = model.collate([examples[i] for i in chunk], max_len=args.max_len)
            with precision.autocast(device):
                _, aux = model(batch)
            for term in aux["loss_terms"]:
                totals[term.name] += float(term.value)
                kinds[term.name] = term
            tokens += batch.n_target_tokens
            n += 1
        tokens, n = all_reduce_sum(tokens, dist, device), all_reduce_sum(n, dist, device)
        totals = {name: all_reduce_sum(value, dist, device) for name, value in totals.items()}
        # A process given no evaluation example saw no terms; only the main process reports.
        eval_loss = float(combine_loss_terms([replace(term, value=torch.tensor(totals[name]))
                                              for name, term in kinds.items()], int(tokens), int(n))) if kinds else None
        row: dict[str, Any] = {"step": position.global_step, "eval_loss": eval_loss}
        if dist.is_main and not is_sharded(model) and stage.generates and not stage.retrieves:
            row.update(_memory_gap(model, examples))
        if args.do_eval_gen and is_sharded(model) and dist.is_main:
            log.info("--do_eval_gen: sample generations are skipped under FSDP2 (rank 0 alone cannot run a "
                     "sharded model); run clara.recipes.evaluate on the saved checkpoint instead")
        elif args.do_eval_gen and dist.is_main and stage.generates and not stage.typed_rows:
            # stage-1 rows hold no single question to answer
            sample = examples[: min(4, len(examples))]
            questions = [e.question for e in sample]
            docs = [list(e.docs) for e in sample]
            if stage.retrieves:
                answers, _ = model.generate_from_questions(questions, docs, max_new_tokens=64)
            else:
                answers = model.generate_from_text(questions, docs, max_new_tokens=64)
            scores = answer_scores(answers, [list(e.gold_answers) or [e.answer] for e in sample])
            row.update({f"eval_gen_{k}": v for k, v in scores.items()})
            for e, a in zip(sample, answers):
                tqdm.write(f"[eval gen] question: {e.question}\n           prediction: {a}\n"
                           f"           gold: {e.answer}")
        if dist.is_main:
            log.info("eval at step %d: %s", position.global_step,
                     ", ".join(f"{k}={v:.4f}" for k, v in row.items() if k != "step"))
            with open(save_path / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
