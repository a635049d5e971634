"""How a stage tells its caller what it is doing: log lines and progress.

A stage never prints. It calls :func:`log` and :func:`progress`, which do what the caller
installed with :func:`install`: the command line shows rich logs and progress bars on
stderr (``cli/output.py``), ``tapvits run`` keeps its stages' log lines quiet unless ``-v``
and draws their progress as the current step's bar, and a worker process of another
executor may install its own. Until something is installed
both are silent, so calling ``stages.<name>.run(options)`` from Python prints nothing.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterator

Log = Callable[..., None]                                           # log(message, level=0)
Progress = Callable[[str, "int | None"], ContextManager[Callable[..., None]]]   # progress(description, total)


def no_log(message: str, level: int = 0) -> None:
    """A log that drops every line."""
    return None


@contextlib.contextmanager
def no_progress(description: str, total: int | None) -> Iterator[Callable[..., None]]:
    """Progress that shows nothing."""
    yield lambda n=1, status=None: None


_installed: dict[str, Callable] = {"log": no_log, "progress": no_progress}


def install(log: Log, progress: Progress) -> None:
    """Route stages' log lines to ``log(message, level)`` (level 1: only with ``-v``) and their
    progress to ``progress(description, total)``, a context manager yielding ``advance(n, status=None)``."""
    _installed.update(log=log, progress=progress)


def silence() -> None:
    """No log line and no progress (a non-main training process, a quiet run)."""
    install(no_log, no_progress)


@contextlib.contextmanager
def installed(log: Log | None = None, progress: Progress | None = None) -> Iterator[None]:
    """:func:`install` for the duration of a ``with`` block, then whatever was installed before;
    a ``log`` or ``progress`` left out stays as it is."""
    saved = dict(_installed)
    install(log or saved["log"], progress or saved["progress"])
    try:
        yield
    finally:
        _installed.update(saved)


def log(message: str, level: int = 0) -> None:
    _installed["log"](message, level)


def progress(description: str, total: int | None) -> ContextManager[Callable[..., None]]:
    return _installed["progress"](description, total)
