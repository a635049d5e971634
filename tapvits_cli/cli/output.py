"""Where output goes: results on stdout, everything for humans on stderr.

stdout carries exactly one thing per successful command (the output path, or one
JSON object with ``--json``) so shell pipelines can consume it. Logs, tables and
progress bars go to a rich console on stderr; rich honours ``NO_COLOR`` itself.
"""

from __future__ import annotations

import json
import sys
from typing import Any

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
