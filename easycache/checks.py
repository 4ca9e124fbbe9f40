"""Early checks the sample scripts share, and how a refused input ends: one `error: ...` line, exit status 2
for usage errors (a flag to change), 1 for bad files. Standard library only, so that a script can run every
check here before it imports torch or loads a model; a new flag of any script (multi-GPU layouts, --image,
cache methods) should reuse these rather than write its own.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

USAGE, BAD_FILE = 2, 1  # exit statuses (argparse also exits 2 on a usage error)
T = TypeVar("T")
SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes a 64-bit seed; we keep to the non-negative half


class BadFile(ValueError):
    """A file that exists but cannot be used (garbled JSON, a config out of range): exit status 1."""


class Refused(SystemExit):
    """A refused input: `str()` is the `error: ...` line (already printed to stderr), `code` the status."""

    def __init__(self, line: str, status: int):
        super().__init__(status)
        self.line = line

    def __str__(self) -> str:
        return self.line


class ArgumentParser(argparse.ArgumentParser):
    """argparse that refuses a bad flag like every other check: one `error: ...` line and exit status 2,
    instead of the whole usage text first (the sample scripts have ~60 flags; --help lists them)."""

    def error(self, message: str):
        raise refuse(f"{message} (see {self.prog} --help)", USAGE)


def one_line(message: object) -> str:
    """A multi-line message (a strict-loading report, a download hint) joined into one line."""
    return "; ".join(part.strip() for part in str(message).splitlines() if part.strip())


def refuse(message: object, status: int) -> Refused:
    """Print `error: <message>` on one line to stderr and return the SystemExit to raise."""
    line = f"error: {one_line(message)}"
    print(line, file=sys.stderr)
    return Refused(line, status)


@contextmanager
def refuse_errors(value_error_status: int = USAGE) -> Iterator[None]:
    """Turn the errors of a checking (or loading) phase into one `error:` line: a missing or unreadable
    file exits 1; a ValueError exits `value_error_status` (2 while checking flags, 1 while reading files)."""
    try:
        yield
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, BadFile) as e:
        raise refuse(e, BAD_FILE) from None
    except ValueError as e:
        raise refuse(e, value_error_status) from None
    except FloatingPointError as e:  # check_dit_output: NaN/inf weights are a bad file
        raise refuse(e, BAD_FILE) from None


@contextmanager
def refuse_run_errors() -> Iterator[None]:
    """While sampling and writing: NaN/inf in the DiT output and a full or vanished disk end in one line
    (exit 1); any other exception keeps its traceback (it is a bug, not a bad input)."""
    try:
        yield
    except (FloatingPointError, OSError) as e:
        raise refuse(e, BAD_FILE) from None


def check_finite(flags: dict[str, float | None]) -> None:
    """Float flags ({"--flag": value}) must be finite numbers (argparse's float() takes 'nan' and 'inf')."""
    for flag, value in flags.items():
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{flag} must be a finite number, got {value}")


def check_seed(seed: int, flag: str, *, count: int = 1, draw: str = "-1 to draw one") -> None:
    """A seed the generator takes (0 .. 2**63 - 1), for every one of `count` consecutive seeds; `draw` says
    how the script draws one instead."""
    if not 0 <= seed <= SEED_MAX - (count - 1):
        extra = f" (and {flag} + --num-seeds - 1 too)" if count > 1 else ""
        raise ValueError(f"{flag} must be in 0..{SEED_MAX}{extra}, or {draw}; got {seed}")


def check_file_name(name: str, flag: str) -> None:
    """A bare file name (no folder part, not '.' or '..'), so the output stays inside its folder."""
    if not name or os.path.basename(name) != name or name in (".", "..") or "\0" in name:
        raise ValueError(f"{flag} must be a file name without a folder part, got {name!r}")


def check_writable(path: str, flag: str) -> None:
    """`path` can be created: no parent is a file, the nearest existing folder takes new files (tried with a
    temporary file that is removed at once), and `path` is not a folder. Nothing is left behind."""
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a folder; give a file name")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{flag} {path}: {parent} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot write in {parent} ({e.strerror or e})") from None


def check_dit_output(v: object, step: int) -> None:
    """Stop at the step where the DiT first returns NaN or inf (broken weights, an fp16 overflow), instead of
    sampling on and writing a black video. `v`: a tensor or a dict of named branches. One host sync."""
    branches = v.items() if isinstance(v, dict) else [("output", v)]
    for name, t in branches:
        if not bool(t.isfinite().all()):
            raise FloatingPointError(
                f"the DiT's {name} output holds NaN or inf at sampling step {step}: check the weights "
                "(a damaged checkpoint?) and the dtype (fp16 can overflow; try bf16 or fp32)"
            )


def exit_cleanly_on_sigterm() -> None:
    """Make SIGTERM (a scheduler's kill, `timeout`) unwind like Ctrl-C, so the `finally` blocks that remove
    half-written files run; by default Python dies on SIGTERM without running them."""

    def _raise(signum, frame):
        raise SystemExit(128 + signum)

    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, _raise)


def gather(calls: dict[str, Callable[[], T]]) -> dict[str, T]:
    """Run every call and return {name: result}; if any raises FileNotFoundError (a missing checkpoint),
    raise one FileNotFoundError naming all of them, so a user fetches every missing repository at once."""
    results, missing = {}, []
    for name, call in calls.items():
        try:
            results[name] = call()
        except FileNotFoundError as e:
            missing.append(one_line(e))
    if missing:
        head = f"{len(missing)} checkpoints are missing: " if len(missing) > 1 else ""
        raise FileNotFoundError(head + " || ".join(missing))
    return results
