"""Run a stage from its subcommand: the parsed parameters become the stage's options.

Every pipeline subcommand is parse → :func:`run_stage` → render. The global ``--seed``
and ``--device`` join the subcommand's own parameters, and the stage's log lines and
progress go to stderr through ``cli/output.py``.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from tapvits_cli.cli.options import CURRENT


def stage_options(stage: ModuleType, params: dict[str, Any]):
    """``stage.Options`` from a subcommand's parsed parameters and the global options."""
    return stage.Options(**params, seed=CURRENT.seed, device=CURRENT.device)


def run_stage(stage: ModuleType):
    """``stage.run`` on the options the current subcommand's parameters make, reporting on stderr."""
    import click

    from tapvits_cli.cli.output import log, progress_bar
    from tapvits_cli.stages import feedback

    feedback.install(log, progress_bar)
    return stage.run(stage_options(stage, click.get_current_context().params))
