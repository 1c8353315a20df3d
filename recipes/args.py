"""Command-line flags of `python -m clara.recipes.train_sft`.

The flags are those of the official CLaRa training CLI (ml-clara `openrlhf/cli/train_sft.py`),
with the same names and defaults, so the published command lines run as written. Flags that only
configure DeepSpeed, wandb, TensorBoard or ModelScope are accepted and ignored, and their help
says so. Flags of our own (precision/device choice, the memory planner, LoRA shape, a step cap)
are grouped at the end.

`parse_args(argv)` parses and then checks the values that argparse cannot check alone (batch
sizes that must divide, a document length that must be a multiple of the compression rate); an
error names the flags involved and exits with status 2, like any argparse error.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from clara.recipes.train_config import TrainConfig
from clara.command import CommandParser
from clara.config import MAX_COMPRESS_RATE
from clara.model import DECODER
from clara.quant import QUANT_KINDS
from clara.recipes.precision import PLAN_TARGETS
from clara.stages import STAGE_NAMES, get_stage

# Learning-rate schedules recipes/schedule.py implements (names as transformers' get_scheduler).
LR_SCHEDULERS = ("cosine_with_min_lr", "cosine", "linear", "constant", "constant_with_warmup")
DEVICES = ("auto", "cpu", "cuda", "mps")
IGNORED = "Accepted for compatibility with the official CLI and ignored"


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help of flags that take a value; a switch's own help says what it does."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.nargs == 0:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="clara-train",
        description="Train CLaRa (compressor + generator adapters over one frozen decoder) for one stage. "
                    "Flags follow the official ml-clara train_sft.py; DeepSpeed-only flags are accepted and ignored.",
        formatter_class=_DefaultsFormatter,
    )

    model = parser.add_argument_group("model")
    model.add_argument("--pretrain", type=str, required=True,
                       help="Base decoder: a Hugging Face model directory, a hub id (e.g. microsoft/phi-2), the "
                            "embedded 'smollm2-135m', or a Clara checkpoint directory (base + adapters load from it)")
    model.add_argument("--pretrain_checkpoint", type=str, default=None,
                       help="Clara checkpoint to continue from (e.g. the stage1 result for stage1_2/stage2); "
                            "its adapters are loaded on top of --pretrain")
    model.add_argument("--stage", type=str, default="stage1", choices=STAGE_NAMES,
                       help="Training stage: stage1 (compression pretraining: QA + paraphrase, optional MSE), "
                            "stage1_2 (instruction tuning), stage2 (end-to-end retrieval + generation), "
                            "stage2_pretrain_retrieval (retrieval warm-up)")
    model.add_argument("--generation_top_k", type=int, default=1,
                       help="Documents (memory slots) in each generator prompt; stage2 selects this many "
                            "of the candidates with the differentiable top-k")
    model.add_argument("--pure_inference", action="store_true", default=False,
                       help=f"{IGNORED}: it switches the official model into inference mode, which a training "
                            "run never uses")

    clara = parser.add_argument_group("CLaRa")
    clara.add_argument("--doc_max_length", type=int, default=256,
                       help="Document tokens kept per document (longer ones are truncated); must be a multiple "
                            "of --compress_rate")
    clara.add_argument("--compress_rate", type=int, default=32,
                       help=f"Document tokens per memory vector (1..{MAX_COMPRESS_RATE}); a document becomes "
                            "doc_max_length / compress_rate memory vectors")
    clara.add_argument("--qa_loss", dest="qa_loss", action="store_true", default=True,
                       help="stage1: train on the QA rows (on by default, as in the official CLI, where the "
                            "flag cannot be switched off)")
    clara.add_argument("--no_qa_loss", dest="qa_loss", action="store_false",
                       help="stage1: skip the QA rows and train on paraphrase rows only")
    clara.add_argument("--stage2_mips", action="store_true", default=False,
                       help="stage2 stages: each question's candidates are the query reasoner's top "
                            "--stage2_retrieval_top_n over every distinct document of the file (a MemoryIndex "
                            "search in process, where the official code asks a retrieval server it does not "
                            "ship); without it they are the row's own docs")
    clara.add_argument("--stage2_retrieval_top_n", type=int, default=1,
                       help="With --stage2_mips: candidates per question, at least --generation_top_k "
                            "(2 or more for stage2_pretrain_retrieval)")
    clara.add_argument("--mse_loss", action="store_true", default=False,
                       help="Add the compressor's MSE alignment loss (mean memory state vs. mean document "
                            "state), weighted 0.1")
    clara.add_argument("--do_eval_gen", action="store_true", default=False,
                       help="At each evaluation, generate answers for a few eval examples, print them and "
                            "report exact match / F1")

    ckpt = parser.add_argument_group("checkpoints")
    ckpt.add_argument("--save_path", type=str, default="./ckpt",
                      help="The run folder, owned by one run: run.json (what the run is), metrics.jsonl, "
                           "loss_curve.png, the final model in final/ and the step checkpoints in "
                           "checkpoints/step_N/. A folder holding another run is refused unless --overwrite "
                           "or --load_checkpoint")
    ckpt.add_argument("--save_steps", type=int, default=-1,
                      help="Save a resumable checkpoint every N optimizer steps; -1 never (final model only), "
                           "-2 at the end of every epoch")
    ckpt.add_argument("--save_hf_ckpt", action="store_true", default=False,
                      help=f"{IGNORED}: our checkpoints are always safetensors + JSON")
    ckpt.add_argument("--disable_ds_ckpt", action="store_true", default=False,
                      help=f"{IGNORED}: there is no DeepSpeed checkpoint to disable")
    ckpt.add_argument("--ckpt_path", type=str, default=None,
                      help="Folder holding the step_N/ checkpoints that --load_checkpoint resumes from "
                           "(the newest complete one is used); default <save_path>/checkpoints, so each run "
                           "keeps its own (the official default, ./ckpt/checkpoints_sft, was shared by every "
                           "run started from one folder)")
    ckpt.add_argument("--overwrite", action="store_true", default=False,
                      help="Start afresh in a --save_path that already holds a run: its run.json, metrics.jsonl, "
                           "loss_curve.png, final/ and checkpoints/ are removed first (other files are left)")
    ckpt.add_argument("--load_checkpoint", action="store_true", default=False,
                      help="Resume from the newest checkpoint in --ckpt_path when there is one: adapters, "
                           "optimizer, scheduler, loss scaler, RNG states and the data position. A checkpoint "
                           "of another stage, base model, dataset or shape is refused")
    ckpt.add_argument("--max_ckpt_num", type=int, default=3,
                      help="Keep only the newest N step_N/ checkpoints")
    ckpt.add_argument("--max_ckpt_mem", type=int, default=int(1e8),
                      help=f"{IGNORED}: the official DeepSpeed size cap; use --max_ckpt_num")

    train = parser.add_argument_group("optimisation")
    train.add_argument("--max_epochs", type=int, default=2, help="Passes over the training set")
    train.add_argument("--learning_rate", type=float, default=5e-6, help="Peak learning rate of AdamW")
    train.add_argument("--lr_warmup_ratio", type=float, default=0.03,
                       help="Fraction of the optimizer steps spent warming the learning rate up linearly from 0")
    train.add_argument("--lr_scheduler", type=str, default="cosine_with_min_lr", choices=LR_SCHEDULERS,
                       help="Learning-rate schedule after warmup; cosine_with_min_lr ends at 0.1 x learning_rate")
    train.add_argument("--l2", type=float, default=0.0, help="AdamW weight decay")
    train.add_argument("--adam_betas", type=float, nargs=2, default=(0.9, 0.95), metavar=("BETA1", "BETA2"),
                       help="AdamW betas")
    train.add_argument("--max_norm", type=float, default=1.0,
                       help="Clip the global gradient norm to this value (0 disables clipping)")
    train.add_argument("--pretrain_mode", action="store_true", default=False,
                       help=f"{IGNORED}: the official CLaRa model computes its own loss and never reads it")

    dist = parser.add_argument_group("batching, precision and parallelism")
    dist.add_argument("--micro_train_batch_size", type=int, default=8,
                      help="Examples per forward/backward pass on each process")
    dist.add_argument("--train_batch_size", type=int, default=128,
                      help="Examples per optimizer step over all processes; gradients are accumulated over "
                           "train_batch_size / (micro_train_batch_size x processes) passes")
    dist.add_argument("--local_rank", type=int, default=-1,
                      help=f"{IGNORED}: set by the deepspeed launcher; torchrun's LOCAL_RANK is read instead")
    dist.add_argument("--zero_stage", type=int, default=2, choices=(0, 1, 2, 3),
                      help="With several processes: 0-1 replicate the model (DDP), 2-3 shard parameters, "
                           "gradients and optimizer states (FSDP2); no effect in a single process")
    dist.add_argument("--bf16", action="store_true", default=False,
                      help="Mixed precision: bf16 autocast where the hardware has bf16 (sm80+ GPUs, CPUs with "
                           "AVX512-BF16/AMX); fp16 autocast with dynamic loss scaling on GPUs without bf16 (T4); "
                           "trainable parameters stay fp32")
    dist.add_argument("--quantize", choices=QUANT_KINDS, default=None,
                      help="Store the frozen base's block weights quantized: nf4 (QLoRA's 4-bit NormalFloat, "
                           "double-quantized scales) or int8 (per row); dequantized one layer at a time in forward "
                           "and backward. Adapters, memory rows, embeddings and norms are not quantized")
    dist.add_argument("--gradient_checkpointing", action="store_true", default=False,
                      help="Recompute each decoder block in the backward pass instead of storing its activations")
    dist.add_argument("--flash_attn", action="store_true", default=False,
                      help="Use flash-attn 2 where it runs (fp16/bf16 on sm80+ GPUs with flash-attn installed); "
                           "the run says which attention it uses otherwise (PyTorch SDPA)")
    dist.add_argument("--ds_tensor_parallel_size", type=int, default=1,
                      help="DeepSpeed tensor parallelism; only 1 (none) is supported")
    dist.add_argument("--adam_offload", action="store_true", default=False,
                      help=f"{IGNORED}: DeepSpeed CPU offload of the optimizer states")
    dist.add_argument("--zpg", type=int, default=1, help=f"{IGNORED}: DeepSpeed ZeRO++ partition group size")
    dist.add_argument("--overlap_comm", action="store_true", default=False,
                      help=f"{IGNORED}: DeepSpeed communication overlap")
    dist.add_argument("--grad_accum_dtype", type=str, default=None,
                      help=f"{IGNORED}: DeepSpeed gradient accumulation dtype (gradients of trainable "
                           "parameters are always fp32 here)")
    dist.add_argument("--use_ds_universal_ckpt", action="store_true", default=False,
                      help=f"{IGNORED}: DeepSpeed universal checkpoints")
    dist.add_argument("--deepcompile", action="store_true", default=False, help=f"{IGNORED}: DeepSpeed compile")

    data = parser.add_argument_group("data")
    data.add_argument("--dataset", type=str, required=True,
                      help="Training data: a stage JSONL file, or a Hugging Face dataset name; several "
                           "comma-separated sources are mixed by --dataset_probs")
    data.add_argument("--dataset_probs", type=str, default=None,
                      help="Comma-separated sampling probabilities, one per --dataset source")
    data.add_argument("--eval_dataset", type=str, default=None, help="Evaluation data, same forms as --dataset")
    data.add_argument("--dataset_split", type=str, default="train",
                      help="Split to read when --dataset is a Hugging Face dataset")
    data.add_argument("--eval_split", type=str, default="train",
                      help="Split to read when --eval_dataset is a Hugging Face dataset")
    data.add_argument("--max_samples", type=int, default=1000000,
                      help="Use at most this many training examples")
    data.add_argument("--max_len", type=int, default=2048,
                      help="Maximum generator sequence length (prompt + answer tokens); longer ones are truncated")

    logging = parser.add_argument_group("logging")
    logging.add_argument("--logging_steps", type=int, default=1,
                         help="Append metrics to <save_path>/metrics.jsonl every N optimizer steps")
    logging.add_argument("--eval_steps", type=int, default=-1,
                         help="Evaluate every N optimizer steps; -1 at the end of every epoch")
    logging.add_argument("--use_wandb", type=str, default=None, help=f"{IGNORED}: no wandb here")
    logging.add_argument("--wandb_org", type=str, default=None, help=f"{IGNORED}: no wandb here")
    logging.add_argument("--wandb_group", type=str, default=None, help=f"{IGNORED}: no wandb here")
    logging.add_argument("--wandb_project", type=str, default="CLaRa", help=f"{IGNORED}: no wandb here")
    logging.add_argument("--wandb_run_name", type=str, default=None, help=f"{IGNORED}: no wandb here")
    logging.add_argument("--use_tensorboard", type=str, default=None,
                         help=f"{IGNORED}: metrics go to <save_path>/metrics.jsonl")

    misc = parser.add_argument_group("miscellaneous")
    misc.add_argument("--seed", type=int, default=42, help="Seed of every random number generator")
    misc.add_argument("--disable_fast_tokenizer", action="store_true", default=False,
                      help=f"{IGNORED}: there is one tokenizer implementation")
    misc.add_argument("--use_ms", action="store_true", default=False, help=f"{IGNORED}: no ModelScope hub")

    ours = parser.add_argument_group("ours (not in the official CLI)")
    ours.add_argument("--lora_rank", type=int, default=16,
                      help="LoRA rank r of every adapter (the official release fixes r=16)")
    ours.add_argument("--lora_alpha", type=float, default=None,
                      help="LoRA alpha; the update is scaled by alpha / r (default: 2 x lora_rank)")
    ours.add_argument("--lora_dropout", type=float, default=0.1, help="Dropout on the LoRA input")
    ours.add_argument("--target_modules", type=str, nargs="+", default=["all-linear"],
                      help="Linear layers that get adapters: all-linear, or names such as q_proj v_proj")
    ours.add_argument("--freeze_decoder_adapter", action="store_true", default=False,
                      help="Keep the decoder adapter at its start (no update) where the stage trains it, so "
                           "only the compressor learns (encoder adapter, memory rows): the decoder cannot learn "
                           "to answer without reading the memory. The compressor pretraining that opened the "
                           "own-vs-shuffled gap on CPU (docs/results.md)")
    ours.add_argument("--prompt_texts", type=str, default="official", choices=("official", "plain"),
                      help="Wording of the stage prompts for a fresh model: official (the official release's "
                           "texts, word for word) or plain (this project's earlier wording). A run that starts "
                           "from a checkpoint keeps the wording recorded in it")
    ours.add_argument("--device", type=str, default="auto", choices=DEVICES,
                      help="Where to train; auto picks cuda (LOCAL_RANK's GPU under torchrun), then mps, then cpu")
    ours.add_argument("--max_steps", type=int, default=-1,
                      help="Train at most this many optimizer steps (-1: all --max_epochs); the lr schedule "
                           "(warmup and decay) is laid over the run's real length")
    ours.add_argument("--dry_run", action="store_true", default=False,
                      help="Print the memory plan of this configuration and the largest micro-batch that fits "
                           "--memory_budget_gb, then exit without training")
    ours.add_argument("--memory_budget_gb", type=float, default=15.0,
                      help="Accelerator memory budget for the planner in GiB (15 fits a 16 GB T4)")
    ours.add_argument("--plan_for", type=str, default="auto", choices=PLAN_TARGETS,
                      help="The device --dry_run plans for: auto (the one this run would use), cpu, t4 (a CUDA "
                           "GPU without bf16: fp16 autocast under --bf16) or sm80 (bf16 GPUs: A100, L4, H100), "
                           "so that a run meant for a Colab T4 can be planned on any machine")
    return parser


def check_args(args: argparse.Namespace) -> list[str]:
    """Problems argparse cannot see on its own, each naming the flags involved."""
    problems = []

    def positive(flag: str) -> None:
        if getattr(args, flag) < 1:
            problems.append(f"--{flag} must be at least 1, got {getattr(args, flag)}")

    for flag in ("micro_train_batch_size", "train_batch_size", "max_len", "max_epochs", "doc_max_length",
                 "generation_top_k", "max_ckpt_num", "lora_rank", "max_samples", "logging_steps"):
        positive(flag)
    if args.train_batch_size >= 1 and args.micro_train_batch_size >= 1 \
            and args.train_batch_size % args.micro_train_batch_size:
        problems.append(f"--train_batch_size {args.train_batch_size} is not a multiple of "
                        f"--micro_train_batch_size {args.micro_train_batch_size}")
    if not 1 <= args.compress_rate <= MAX_COMPRESS_RATE:
        problems.append(f"--compress_rate must be from 1 to {MAX_COMPRESS_RATE}, got {args.compress_rate}")
    elif args.doc_max_length >= 1 and args.doc_max_length % args.compress_rate:
        lower = args.doc_max_length - args.doc_max_length % args.compress_rate
        hint = f"{lower} or {lower + args.compress_rate}" if lower else f"{lower + args.compress_rate}"
        problems.append(f"--doc_max_length {args.doc_max_length} is not a multiple of --compress_rate "
                        f"{args.compress_rate} (try --doc_max_length {hint})")
    if args.stage2_mips:
        stage = get_stage(args.stage)
        if not stage.retrieves:
            problems.append(f"--stage2_mips searches candidates for the stage2 stages, not --stage {args.stage}")
        least = max(args.generation_top_k, 2 if "retrieval" in stage.losses else 1)  # InfoNCE needs a negative
        if args.stage2_retrieval_top_n < least:
            problems.append(f"--stage2_retrieval_top_n {args.stage2_retrieval_top_n} is below {least} "
                            f"(--generation_top_k {args.generation_top_k}); give it the candidates per question")
    if not args.learning_rate > 0:
        problems.append(f"--learning_rate must be positive, got {args.learning_rate}")
    if not 0.0 <= args.lr_warmup_ratio <= 1.0:
        problems.append(f"--lr_warmup_ratio must be in [0, 1], got {args.lr_warmup_ratio}")
    if args.l2 < 0:
        problems.append(f"--l2 must be zero or positive, got {args.l2}")
    if not all(0.0 <= b < 1.0 for b in args.adam_betas):
        problems.append(f"--adam_betas must both be in [0, 1), got {list(args.adam_betas)}")
    if args.max_norm < 0:
        problems.append(f"--max_norm must be zero (no clipping) or positive, got {args.max_norm}")
    if args.save_steps == 0 or args.save_steps < -2:
        problems.append(f"--save_steps must be positive, -1 (never) or -2 (each epoch), got {args.save_steps}")
    if args.eval_steps == 0 or args.eval_steps < -1:
        problems.append(f"--eval_steps must be positive or -1 (each epoch), got {args.eval_steps}")
    if args.ds_tensor_parallel_size != 1:
        problems.append(f"--ds_tensor_parallel_size {args.ds_tensor_parallel_size}: tensor parallelism is not "
                        "supported; use 1 and several processes (data parallel / FSDP2) instead")
    if args.freeze_decoder_adapter and DECODER not in get_stage(args.stage).trained_adapters:
        problems.append(f"--freeze_decoder_adapter: stage {args.stage} does not train the decoder adapter")
    if args.lora_alpha is not None and not args.lora_alpha > 0:
        problems.append(f"--lora_alpha must be positive, got {args.lora_alpha}")
    if not 0.0 <= args.lora_dropout < 1.0:
        problems.append(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}")
    if "all-linear" in args.target_modules and len(args.target_modules) > 1:
        problems.append(f"--target_modules: all-linear cannot be combined with names, got {args.target_modules}")
    if args.max_steps == 0 or args.max_steps < -1:
        problems.append(f"--max_steps must be positive or -1 (no cap), got {args.max_steps}")
    if not args.memory_budget_gb > 0:
        problems.append(f"--memory_budget_gb must be positive, got {args.memory_budget_gb}")
    if args.dataset_probs is not None:
        sources = args.dataset.split(",")
        try:
            probs = [float(p) for p in args.dataset_probs.split(",")]
        except ValueError:
            problems.append(f"--dataset_probs must be comma-separated numbers, got {args.dataset_probs!r}")
        else:
            if len(probs) != len(sources):
                problems.append(f"--dataset_probs has {len(probs)} values but --dataset names "
                                f"{len(sources)} source(s)")
            elif any(p < 0 for p in probs) or sum(probs) <= 0:
                problems.append(f"--dataset_probs must be non-negative with a positive sum, got {args.dataset_probs!r}")
    return problems


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Parse and check; a problem prints every message found and exits with status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.adam_betas = tuple(args.adam_betas)
    problems = check_args(args)
    if problems:
        parser.error("; ".join(problems))
    return TrainConfig.from_namespace(args)
