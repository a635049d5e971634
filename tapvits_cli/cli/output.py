"""Where output goes: results on stdout, everything for humans on stderr.

stdout carries exactly one thing per successful command (the output path, or one
JSON object with ``--json``) so shell pipelines can consume it. Logs, tables and
progress bars go to a rich console on stderr; rich honours ``NO_COLOR`` itself.

Output that is not a terminal (a pipe, a CI log, a file) is read by programs and pasted
into shells, so there consoles never wrap or truncate (a hash stays whole, a logged
command line stays one line) and no line ends in spaces. Longer than a subcommand's
module because it holds the consoles, progress and results of all of them.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time
from typing import Any, Callable, Iterator, TextIO

from tapvits_cli.cli.options import CURRENT
from tapvits_cli.reporting.terminal import printable


# Wide enough that no table column is squeezed (rich truncates cells with "…" to fit its width).
UNBOUNDED_WIDTH = 10_000


class _TrimmedLines(io.TextIOBase):
    """A text stream that writes each line to ``target`` without its trailing spaces.

    rich pads every table cell to its column's width, so the last column of a table ends
    in spaces; programs reading a pipe should not have to strip them.
    """

    def __init__(self, target: TextIO) -> None:
        super().__init__()
        self._target = target
        self._pending = ""

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        *lines, self._pending = (self._pending + text).split("\n")
        for line in lines:
            self._target.write(line.rstrip() + "\n")
        return len(text)

    def flush(self) -> None:
        if self._pending:
            self._target.write(self._pending.rstrip())
            self._pending = ""
        self._target.flush()


def console(stderr: bool = True):
    """A rich console on stderr (logs, tables) or stdout (``inspect``'s view, which is its result).

    On a terminal it behaves as rich does; anywhere else it neither wraps nor truncates and
    trims trailing spaces (module docstring). The stream is looked up when called, so a
    redirected ``sys.stdout``/``sys.stderr`` (tests, ``run``'s nested stages) is honoured.
    """
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # No markup: tables and lines carry class names, dataset references and paths, whose
    # brackets ("cat [wild]", "[/x]", "[link=file:///…]") are text, not styles or links.
    if stream.isatty():
        return Console(file=stream, highlight=False, markup=False)
    return Console(file=_TrimmedLines(stream), highlight=False, markup=False, width=UNBOUNDED_WIDTH, soft_wrap=True)


def stderr_console():
    return console(stderr=True)


def log(message: str, level: int = 0) -> None:
    """A log line on stderr: level 0 shows unless ``-q``; level 1 needs ``-v``.

    Printed as plain text: log lines carry paths, dataset references and command lines,
    whose brackets (``-a depths=[2,2,6]``, a folder ``[/data]``) must not be read as rich
    markup (a stray closing tag would even abort the command), and whose control
    characters are shown as escapes (:func:`~tapvits_cli.reporting.terminal.printable`).
    """
    if CURRENT.verbosity >= level:
        stderr_console().print(printable(message))


def error_line(message: str, internal: bool = False) -> str:
    """A failure as its one stderr line, ``tapvits: error: …``: messages quote artifacts' strings,
    so newlines and escape sequences in them are shown as escapes, never passed to the terminal."""
    return f"tapvits: {'internal error' if internal else 'error'}: {printable(message, one_line=True)}"


def show_progress() -> bool:
    return CURRENT.progress if CURRENT.progress is not None else sys.stderr.isatty()


def emit(result: Any, text: str | None = None) -> None:
    """Print the command's result: JSON with ``--json``, else ``text`` (default: str(result)) with its
    control characters shown as escapes."""
    if CURRENT.json:
        sys.stdout.write(json.dumps(_standard_json(result), default=str, allow_nan=False) + "\n")
    else:
        sys.stdout.write(printable(text if text is not None else str(result)) + "\n")
    sys.stdout.flush()


def _standard_json(value: Any) -> Any:
    """``value`` with every float that is not finite replaced by None: Python writes NaN and
    Infinity, which strict JSON readers (jq, browsers, most languages) refuse, so one −inf
    figure would make a whole ``--json`` result unreadable to them."""
    import math

    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _standard_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_standard_json(item) for item in value]
    if hasattr(value, "dtype") and getattr(value, "ndim", None) == 0:   # a NumPy scalar
        return _standard_json(value.item())
    return value


# How often a pipe gets a plain progress line (seconds): often enough to show a long
# training is alive, rarely enough that a CI log stays readable.
PLAIN_PROGRESS_SECONDS = 30.0


@contextlib.contextmanager
def progress_bar(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """Progress on stderr; yields ``advance(n, status=None)`` for stage logic to call.

    Stage logic never prints: it takes an ``on_progress(n)`` callback and the CLI passes
    the callable yielded here. ``status`` (e.g. the latest loss), when given, replaces the
    text shown after the bar. A terminal (or ``--progress``) gets a rich bar with rate and
    ETA; anything else gets a plain line every :data:`PLAIN_PROGRESS_SECONDS` (see
    :func:`plain_progress`); ``-q`` and ``--no-progress`` silence both.
    """
    if CURRENT.verbosity < 0 or CURRENT.progress is False:
        yield lambda n=1, status=None: None
        return
    if not show_progress():
        with plain_progress(description, total) as advance:
            yield advance
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[status]}"))
    with Progress(*columns, console=stderr_console(), transient=False) as progress:
        task = progress.add_task(description, total=total, status="")

        def advance(n: int = 1, status: str | None = None) -> None:
            progress.update(task, advance=n, **({} if status is None else {"status": status}))

        yield advance


def format_duration(seconds: float) -> str:
    """``75`` → ``1:15``, ``3725`` → ``1:02:05``."""
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}" if minutes >= 60 else f"{minutes}:{seconds:02d}"


@contextlib.contextmanager
def plain_progress(description: str, total: int | None,
                   interval: float | None = None) -> Iterator[Callable[..., None]]:
    """Progress for a pipe or a log file: one plain line per ``interval`` seconds, then a closing line.

    ``finetune 120/400 (30%), 4.1/s, 0:29 elapsed, ETA 1:08, epoch 2/5 loss 0.4120``:
    whole lines a log keeps and a person can grep, instead of a bar's redraws. Work that
    ends within one interval prints nothing (a short command stays quiet); work that
    printed a line also prints how it ended (done, or stopped at n of total).
    """
    every = PLAIN_PROGRESS_SECONDS if interval is None else interval
    start = last = time.monotonic()
    state: dict[str, Any] = {"done": 0, "status": None, "printed": False}

    def line(now: float) -> str:
        done, elapsed = state["done"], now - start
        rate = done / elapsed if elapsed > 0 else 0.0
        parts = [f"{description} {done}/{total}" + (f" ({done / total:.0%})" if total else "") if total is not None
                 else f"{description} {done}", f"{rate:.3g}/s", f"{format_duration(elapsed)} elapsed"]
        if total and rate > 0 and done < total:
            parts.append(f"ETA {format_duration((total - done) / rate)}")
        if state["status"]:
            parts.append(str(state["status"]))
        return ", ".join(parts)

    def write(text: str) -> None:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def advance(n: int = 1, status: str | None = None) -> None:
        nonlocal last
        state["done"] += n
        if status is not None:
            state["status"] = status
        now = time.monotonic()
        if now - last >= every:
            write(line(now))
            last, state["printed"] = now, True

    finished = False
    try:
        yield advance
        finished = True
    finally:
        if state["printed"]:
            now = time.monotonic()
            ending = "done" if finished else "stopped"
            write(f"{line(now).split(', ')[0]} {ending} in {format_duration(now - start)}"
                  + (f", {state['status']}" if state["status"] else ""))
