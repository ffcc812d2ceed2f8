"""Failures an operator can act on, and the one place they are turned into one line of text.

Every command-line tool of this package (and the shell scripts, through `python -m gpt2ops.serverctl`)
reports a failure as exactly one line on stderr:

    error: <what went wrong, naming the thing>; <what to do next>

`OpsError` carries the two halves; `one_line` formats any exception that way; `cli` wraps a `main`
so that an `OpsError` (or an OSError the library did not classify: network, files) never becomes a traceback.
"""

from __future__ import annotations

import functools
import re
import sys
from typing import Callable


class OpsError(RuntimeError):
    """What went wrong (`cause`) and what the operator should do about it (`next_step`)."""

    def __init__(self, cause: str, next_step: str | None = None):
        self.cause, self.next_step = cause, next_step
        super().__init__(f"{cause}; {next_step}" if next_step else cause)


def one_line(err: BaseException | str) -> str:
    """`error: ...` on a single line: newlines and runs of spaces of the message collapse to one space."""
    text = str(err) if str(err) else type(err).__name__
    return "error: " + re.sub(r"\s+", " ", text).strip()


def report(err: BaseException | str, file=None) -> None:
    print(one_line(err), file=file or sys.stderr, flush=True)


def cli(main: Callable[..., int]) -> Callable[..., int]:
    """Wrap a command's `main(argv) -> exit status`: an `OpsError` is printed as one line, status 1."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except OpsError as err:
            report(err)
            return 1
        except OSError as err:  # the network or the file system, not classified by the library (requests' too)
            report(f"{type(err).__name__}: {err}")
            return 1
        except KeyboardInterrupt:
            report("interrupted")
            return 130

    return wrapper
