"""`clara-generate` (also `python -m clara.generate`): load a base model and stream its answer to
one prompt to stdout; the load and speed lines go to stderr, so stdout holds only the answer."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from clara.generate import generate, prompt_ids
from clara.sources import ALIASES
from clara.tokenizer import StreamDecoder
from clara.weights import DTYPES, WeightsError, load_base


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_new_tokens < 1:
        print("error: --max_new_tokens must be at least 1", file=sys.stderr)
        return 2
    if not 0.0 < args.top_p <= 1.0:
        print("error: --top_p must be in (0, 1]", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        model, tokenizer = load_base(args.model, dtype=DTYPES[args.dtype], device=args.device)
    except WeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
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
    t1 = time.perf_counter()
    new = generate(model, ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   stop_ids=stop, pad_id=tokenizer.pad_id, generator=generator, on_token=emit)
    sys.stdout.write(stream.flush() + "\n")
    dt = time.perf_counter() - t1
    print(f"[clara.generate] {new.shape[1]} tokens in {dt:.2f}s ({new.shape[1] / dt:.1f} tokens/s, "
          f"prompt {ids.shape[1]} tokens)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
