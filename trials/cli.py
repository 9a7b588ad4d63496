"""What every command line of the project shares: user errors are one line on stderr with exit status 2.

Every error a user can fix (a bad config, space, flag, data folder or checkpoint) is a `UserError` whose
message is that line, naming what is wrong and where; the entries (tune.py, train.py, python -m ...) catch
`UserError` alone. Failures of a model (a diverged run, an ODE that cannot be solved) are not user errors.
"""

from __future__ import annotations

import argparse
import re

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM, as a shell reports a SIGINT-killed command; the run can continue


class UserError(Exception):
    """Bad input the user can fix; str() is one line that names the field, file or flag."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's first line of text (at most `limit` characters), or its type's name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse prints its usage block above an error; our commands promise one line on stderr."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def device_name(text: str) -> str:
    """A --device value: 'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N'."""
    if not (text in ("auto", "cpu") or re.fullmatch(r"cuda(:\d+)?", text)):
        raise argparse.ArgumentTypeError(f"must be 'auto', 'cpu' or 'cuda[:N]', got {text!r}")
    return text


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return value
