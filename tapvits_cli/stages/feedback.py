"""How a stage tells its caller what it is doing: log lines and progress.

A stage never prints. It calls :func:`log` and :func:`progress`, which do what the caller
installed with :func:`install`: the command line shows rich logs and progress bars on
stderr (``cli/output.py``), ``tapvits run`` keeps its stages quiet unless ``-v``, and a
worker process of another executor may install its own. Until something is installed
both are silent, so calling ``stages.<name>.run(options)`` from Python prints nothing.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterator

Log = Callable[..., None]                                           # log(message, level=0)
Progress = Callable[[str, "int | None"], ContextManager[Callable[..., None]]]   # progress(description, total)


def _no_log(message: str, level: int = 0) -> None:
    return None


@contextlib.contextmanager
def _no_progress(description: str, total: int | None) -> Iterator[Callable[..., None]]:
    yield lambda n=1, status=None: None


_installed: dict[str, Callable] = {"log": _no_log, "progress": _no_progress}


def install(log: Log, progress: Progress) -> None:
    """Route stages' log lines to ``log(message, level)`` (level 1: only with ``-v``) and their
    progress to ``progress(description, total)``, a context manager yielding ``advance(n, status=None)``."""
    _installed.update(log=log, progress=progress)


def silence() -> None:
    """No log line and no progress (a non-main training process, a quiet run)."""
    install(_no_log, _no_progress)


@contextlib.contextmanager
def installed(log: Log, progress: Progress) -> Iterator[None]:
    """:func:`install` for the duration of a ``with`` block, then whatever was installed before."""
    saved = dict(_installed)
    install(log, progress)
    try:
        yield
    finally:
        _installed.update(saved)


def silenced() -> ContextManager[None]:
    """:func:`silence` for the duration of a ``with`` block."""
    return installed(_no_log, _no_progress)


def log(message: str, level: int = 0) -> None:
    _installed["log"](message, level)


def progress(description: str, total: int | None) -> ContextManager[Callable[..., None]]:
    return _installed["progress"](description, total)
