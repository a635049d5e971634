"""Where output goes: results on stdout, everything for humans on stderr.

stdout carries exactly one thing per successful command (the output path, or one
JSON object with ``--json``) so shell pipelines can consume it. Logs, tables and
progress bars go to a rich console on stderr; rich honours ``NO_COLOR`` itself.
"""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Any, Callable, Iterator

from tapvits_cli.cli.options import CURRENT


def stderr_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def log(message: str, level: int = 0) -> None:
    """A log line on stderr: level 0 shows unless ``-q``; level 1 needs ``-v``."""
    if CURRENT.verbosity >= level:
        stderr_console().print(message)


def show_progress() -> bool:
    return CURRENT.progress if CURRENT.progress is not None else sys.stderr.isatty()


def emit(result: Any, text: str | None = None) -> None:
    """Print the command's result: JSON with ``--json``, else ``text`` (default: str(result))."""
    if CURRENT.json:
        sys.stdout.write(json.dumps(result, default=str) + "\n")
    else:
        sys.stdout.write((text if text is not None else str(result)) + "\n")
    sys.stdout.flush()


@contextlib.contextmanager
def progress_bar(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr; yields ``advance(n, status=None)`` for stage logic to call.

    Stage logic never prints: it takes an ``on_progress(n)`` callback and the CLI passes
    the callable yielded here. ``status`` (e.g. the latest loss), when given, replaces the
    text shown after the bar. When progress is off (not a terminal, ``-q`` or
    ``--no-progress``) the callable does nothing.
    """
    if not show_progress() or CURRENT.verbosity < 0:
        yield lambda n=1, status=None: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[status]}"))
    with Progress(*columns, console=stderr_console(), transient=False) as progress:
        task = progress.add_task(description, total=total, status="")

        def advance(n: int = 1, status: str | None = None) -> None:
            progress.update(task, advance=n, **({} if status is None else {"status": status}))

        yield advance
