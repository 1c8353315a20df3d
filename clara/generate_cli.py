"""`clara-generate` (also `python -m clara.generate`): load a base model and stream its answer to
one prompt to stdout; the load and speed lines go to stderr, so stdout holds only the answer."""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch

from clara.command import CommandParser, command_main, fail, parse_device
from clara.generate import generate, prompt_ids
from clara.sources import ALIASES
from clara.tokenizer import StreamDecoder
from clara.weights import DTYPES, load_base


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(
        prog="clara-generate",
        description="Generate text with a base decoder, streaming tokens to stdout as they are produced.",
    )
    p.add_argument("--model", default=ALIASES[0],
                   help=f"base model: an embedded model ({', '.join(ALIASES)}), a Hugging Face folder, a hub repo id, "
                        "or a .gguf file")
    p.add_argument("--prompt", required=True, help="the prompt text (the user message when --chat is given)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", default=None, help="system message for --chat (default: the template's own, if any)")
    p.add_argument("--max_new_tokens", type=int, default=128, help="stop after this many new tokens (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 means greedy (default 0)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass when temperature > 0 (default 1.0)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling (default: nondeterministic)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights and compute dtype (default fp32)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, mps (default cpu)")
    return p


@command_main("clara-generate")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.prompt.strip():
        return fail("clara-generate", "--prompt is empty: give the text to answer or continue")
    for bad, message in ((args.max_new_tokens < 1, f"--max_new_tokens must be at least 1, got {args.max_new_tokens}"),
                         (args.temperature < 0, f"--temperature must be 0 (greedy) or positive, got {args.temperature}"),
                         (not 0.0 < args.top_p <= 1.0, f"--top_p must be in (0, 1], got {args.top_p}")):
        if bad:
            return fail("clara-generate", message)
    device = parse_device(args.device)
    t0 = time.perf_counter()
    model, tokenizer = load_base(args.model, dtype=DTYPES[args.dtype], device=device)
    print(f"[clara.generate] loaded {args.model} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)

    ids = torch.tensor([prompt_ids(tokenizer, args.prompt, args.chat, args.system)], device=model.device)
    stream = StreamDecoder(tokenizer)
    stop = tokenizer.stop_ids()

    def emit(token: torch.Tensor) -> None:
        tid = int(token[0])
        if tid not in stop:
            sys.stdout.write(stream.push(tid))
            sys.stdout.flush()

    generator = torch.Generator(device=model.device).manual_seed(args.seed) if args.seed is not None else None
    context = model.config.max_position_embeddings
    if ids.shape[1] >= context:
        return fail("clara-generate", f"--prompt is {ids.shape[1]} tokens but {args.model}'s context is {context}: "
                    "shorten it")
    t1 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        new = generate(model, ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       top_p=args.top_p, stop_ids=stop, pad_id=tokenizer.pad_id, generator=generator, on_token=emit)
    for warning in caught:
        print(f"[clara.generate] warning: {warning.message}", file=sys.stderr)
    sys.stdout.write(stream.flush() + "\n")
    dt = time.perf_counter() - t1
    print(f"[clara.generate] {new.shape[1]} tokens in {dt:.2f}s ({new.shape[1] / dt:.1f} tokens/s, "
          f"prompt {ids.shape[1]} tokens)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
