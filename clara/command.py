"""What every console script shares: one-line errors, exit codes and `--debug`.

A command's `main(argv)` is wrapped by `@command_main`. Bad input (the library's own error types,
which are ValueErrors or name the file they failed on, and OS errors such as a missing file) ends
the command with one line on stderr, `PROG: error: WHAT`, and exit status 2; a usage error from
the parser does the same, pointing at `--help` instead of printing the whole usage. `--debug` (or
CLARA_DEBUG=1 in the environment) lets the traceback through instead. Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Callable, NoReturn, Sequence

from clara.errors import InputError

BAD_INPUT = 2
INTERRUPTED = 130
DEBUG_ENV = "CLARA_DEBUG"


# The exception types that mean bad input, not a bug, and end a command in one line: the library's own
# errors (ValueErrors or InputErrors), OS errors naming their file, and a loss that stopped being
# finite (the loop says which step and what to try).
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, InputError, FloatingPointError)


def one_line(error: BaseException) -> str:
    """An error as one line: an OS error names its file first, as the library's own errors do."""
    summary = getattr(error, "summary", None)  # errors listing many problems offer a one-line form
    if isinstance(summary, str):
        message = summary
    elif isinstance(error, OSError) and error.filename is not None:
        reason = error.strerror or str(error)
        message = f"{error.filename}: {reason[0].lower() + reason[1:] if reason else type(error).__name__}"
    else:
        message = str(error) or type(error).__name__
    return " ".join(message.split())


def debug_requested(argv: Sequence[str]) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


class CommandParser(argparse.ArgumentParser):
    """argparse with a `--debug` flag and usage errors in one line (`PROG: error: ...; see --help`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", default=False,
                          help=f"on an error, show the full Python traceback instead of one line "
                               f"(also {DEBUG_ENV}=1 in the environment)")

    def error(self, message: str) -> NoReturn:
        self.exit(BAD_INPUT, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def fail(prog: str, message: str) -> int:
    """Print one error line for `prog` and return the bad-input exit status."""
    print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr)
    return BAD_INPUT


def command_main(prog: str) -> Callable[[Callable[[list[str]], int]], Callable[[Sequence[str] | None], int]]:
    """Decorate `main(argv) -> int` so bad input ends in one line and exit status 2."""

    def decorate(main: Callable[[list[str]], int]) -> Callable[[Sequence[str] | None], int]:
        @functools.wraps(main)
        def run(argv: Sequence[str] | None = None) -> int:
            args = list(sys.argv[1:] if argv is None else argv)
            if debug_requested(args):
                return main(args)
            try:
                return main(args)
            except KeyboardInterrupt:
                print(f"{prog}: interrupted", file=sys.stderr)
                return INTERRUPTED
            except USER_ERRORS as error:
                return fail(prog, one_line(error))

        return run

    return decorate


def parse_device(name: str):
    """`--device NAME` as a torch.device, refusing names torch does not know and devices this
    machine lacks, so the error comes before any model is loaded."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: this torch sees no CUDA device; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    return device
