"""What the two commands (``anonticket-client``, ``anonticket-admin``) share: argparse's output
on the command's own streams, running one command on the reactor to its exit code, and how
they print: server text made safe for a terminal, aligned fields."""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn, TextIO

from twisted.internet import task

EXIT_USAGE = 2  # argparse's own code for a usage error

Run = Callable[[Any, Sequence[str], TextIO, TextIO], Awaitable[int]]


def terminal_text(text: object, limit: int = 300) -> str:
    """Server text fit for a terminal: no escape sequences, bidi tricks or screenfuls."""
    return "".join(c if c.isprintable() else "?" for c in str(text)[:limit])


def print_fields(out: TextIO, fields: Sequence[tuple[str, str]]) -> None:
    """``label:  value`` lines, the values aligned."""
    width = max(len(label) for label, _ in fields) + 3
    for label, value in fields:
        print(f"{label + ':':<{width}}{value}", file=out)


def seconds(text: str) -> float:
    """An argparse type: a positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return value


def parse_arguments(
    parser: argparse.ArgumentParser, argv: Sequence[str], stdout: TextIO, stderr: TextIO
) -> argparse.Namespace | int:
    """The parsed arguments, or the exit code of ``--help`` or of a usage error (argparse has
    printed what it had to say, to *stdout* or *stderr*)."""
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            return parser.parse_args(list(argv))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE


def main(run: Run, argv: Sequence[str] | None = None) -> NoReturn:
    """Run *run* on the reactor with the process's arguments and streams; exit with its code."""
    arguments = list(sys.argv[1:] if argv is None else argv)

    async def command(reactor: Any) -> None:
        code = await run(reactor, arguments, sys.stdout, sys.stderr)
        if code:
            raise SystemExit(code)  # react() exits with SystemExit's code

    task.react(command)
