"""`clara-generate` (also `python -m clara.generate`): load a base model and stream its answer to
one prompt to stdout; the load and speed lines go to stderr, so stdout holds only the answer.

With a Clara checkpoint as --model (a folder, or a hub checkpoint such as
apple/CLaRa-7B-Instruct:compression-16) the prompt is a question, answered from the --doc documents
compressed into memory tokens, as the checkpoint's stage was trained to.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from typing import Callable

import torch

from clara.checkpoint import names_clara_checkpoint
from clara.command import CommandParser, command_main, fail, parse_device
from clara.generate import generate, prompt_ids
from clara.model import QUERY, Clara
from clara.sources import ALIASES
from clara.stages import get_stage
from clara.tokenizer import StreamDecoder, Tokenizer
from clara.quant import QUANT_KINDS
from clara.weights import DTYPES, load_base


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(
        prog="clara-generate",
        description="Generate text with a base decoder, streaming tokens to stdout as they are produced.",
    )
    p.add_argument("--model", default=ALIASES[0],
                   help=f"base model: an embedded model ({', '.join(ALIASES)}), a Hugging Face folder, a hub repo id, "
                        "or a .gguf file; or a Clara checkpoint: a checkpoint or run folder, an official CLaRa "
                        "checkpoint folder, or a hub checkpoint 'org/name:subfolder' (e.g. "
                        "apple/CLaRa-7B-Instruct:compression-16, converted once and cached)")
    p.add_argument("--prompt", required=True, help="the prompt text (the user message when --chat is given; "
                                                   "the question for a Clara checkpoint)")
    p.add_argument("--doc", action="append", default=[], metavar="TEXT",
                   help="a document for a Clara checkpoint to answer from; repeat it for each document")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", default=None, help="system message for --chat (default: the template's own, if any)")
    p.add_argument("--max_new_tokens", type=int, default=128, help="stop after this many new tokens (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 means greedy (default 0)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass when temperature > 0 (default 1.0)")
    p.add_argument("--repetition_penalty", type=float, default=1.0,
                   help="above 1, tokens already in the prompt or the answer become less likely, as transformers' "
                        "repetition_penalty (default 1.0: none)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling (default: nondeterministic)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights and compute dtype (default fp32)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, mps (default cpu)")
    p.add_argument("--quantize", choices=QUANT_KINDS, default=None,
                   help="store the base's block weights nf4 or int8 (clara/quant.py): a 7B base in 4 or 8 GiB; "
                        "int8 decodes fastest on CPU (default: not quantized)")
    return p


def argument_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the numbers asked for, or None."""
    if not args.prompt.strip():
        return "--prompt is empty: give the text to answer or continue"
    for bad, message in ((args.max_new_tokens < 1, f"--max_new_tokens must be at least 1, got {args.max_new_tokens}"),
                         (args.temperature < 0, f"--temperature must be 0 (greedy) or positive, got {args.temperature}"),
                         (not 0.0 < args.top_p <= 1.0, f"--top_p must be in (0, 1], got {args.top_p}"),
                         (not args.repetition_penalty > 0,
                          f"--repetition_penalty must be positive (1.0: none), got {args.repetition_penalty}")):
        if bad:
            return message
    return None


def token_printer(tokenizer: Tokenizer) -> tuple[Callable[[torch.Tensor], None], StreamDecoder]:
    """(on_token for generate: prints each new token's text as it comes, the stream it feeds)."""
    stream = StreamDecoder(tokenizer)
    stop = tokenizer.stop_ids()

    def emit(token: torch.Tensor) -> None:
        tid = int(token[0])
        if tid not in stop:
            sys.stdout.write(stream.push(tid))
            sys.stdout.flush()

    return emit, stream


@command_main("clara-generate")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problem = argument_problem(args)
    if problem:
        return fail("clara-generate", problem)
    if names_clara_checkpoint(args.model):
        if not args.doc:
            return fail("clara-generate", f"--model {args.model} is a Clara checkpoint: give the documents it "
                        "answers from with --doc (once per document)")
        if args.chat or args.system is not None:
            return fail("clara-generate", "--chat and --system are for base models; a Clara checkpoint writes "
                        "the prompt its stage was trained on")
        return answer_from_documents(args, parse_device(args.device))
    if args.doc:
        return fail("clara-generate", f"--doc needs a Clara checkpoint as --model; {args.model} is a base model")
    return continue_prompt(args, parse_device(args.device))


def continue_prompt(args: argparse.Namespace, device) -> int:
    """A base model: stream its continuation of the prompt (or its chat reply)."""
    t0 = time.perf_counter()
    model, tokenizer = load_base(args.model, dtype=DTYPES[args.dtype], device=device, quantize=args.quantize)
    print(f"[clara.generate] loaded {args.model} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)

    ids = torch.tensor([prompt_ids(tokenizer, args.prompt, args.chat, args.system)], device=model.device)
    emit, stream = token_printer(tokenizer)
    generator = torch.Generator(device=model.device).manual_seed(args.seed) if args.seed is not None else None
    context = model.config.max_position_embeddings
    if ids.shape[1] >= context:
        return fail("clara-generate", f"--prompt is {ids.shape[1]} tokens but {args.model}'s context is {context}: "
                    "shorten it")
    t1 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        new = generate(model, ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       top_p=args.top_p, repetition_penalty=args.repetition_penalty, stop_ids=tokenizer.stop_ids(),
                       pad_id=tokenizer.pad_id, generator=generator, on_token=emit)
    for warning in caught:
        print(f"[clara.generate] warning: {warning.message}", file=sys.stderr)
    sys.stdout.write(stream.flush() + "\n")
    dt = time.perf_counter() - t1
    print(f"[clara.generate] {new.shape[1]} tokens in {dt:.2f}s ({new.shape[1] / dt:.1f} tokens/s, "
          f"prompt {ids.shape[1]} tokens)", file=sys.stderr)
    return 0


def answer_from_documents(args: argparse.Namespace, device) -> int:
    """A Clara checkpoint: stream its answer to the question from the compressed --doc documents."""
    t0 = time.perf_counter()
    model = Clara.from_pretrained(args.model, dtype=DTYPES[args.dtype], device=device, quantize=args.quantize)
    print(f"[clara.generate] loaded {args.model} ({model.config.training_stage}, base {model.base_name}) in "
          f"{time.perf_counter() - t0:.1f}s", file=sys.stderr)
    emit, stream = token_printer(model.tokenizer)
    settings = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    repetition_penalty=args.repetition_penalty, seed=args.seed, on_token=emit)
    t1 = time.perf_counter()
    question, docs = [args.prompt], [list(args.doc)]
    if get_stage(model.config.training_stage).typed_rows:  # compression pretraining, on paraphrase rows: it restates
        model.generate_from_paraphrase(question, docs, **settings)
    elif QUERY in model.adapter_names:  # a stage-2 model picks the documents it reads
        k = min(model.config.generation_top_k, len(args.doc))
        _, chosen = model.generate_from_questions(question, docs, top_k=k, **settings)
        print(f"[clara.generate] read --doc {', '.join(str(int(i) + 1) for i in chosen[0])} of {len(args.doc)}",
              file=sys.stderr)
    else:
        model.generate_from_text(question, docs, **settings)
    sys.stdout.write(stream.flush() + "\n")
    print(f"[clara.generate] {len(stream.ids)} tokens in {time.perf_counter() - t1:.2f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
