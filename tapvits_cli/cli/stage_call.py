"""Run a stage from its subcommand: the parsed parameters become the stage's options.

Every pipeline subcommand is parse → :func:`run_stage` → render. The global ``--seed``
and ``--device`` join the subcommand's own parameters, the stage's log lines and
progress go to stderr through ``cli/output.py``, and a parameter the stage logic refuses
is named by its flag (:func:`flag_names`).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Callable

from tapvits_cli.cli.options import CURRENT
from tapvits_cli.errors import ParameterError


def stage_options(stage: ModuleType, params: dict[str, Any]):
    """``stage.Options`` from a subcommand's parsed parameters and the global options."""
    return stage.Options(**params, seed=CURRENT.seed, device=CURRENT.device)


def run_stage(stage: ModuleType):
    """``stage.run`` on the options the current subcommand's parameters make, reporting on stderr."""
    import click

    from tapvits_cli.cli.output import log, progress_bar
    from tapvits_cli.stages import feedback

    context = click.get_current_context()
    feedback.install(log, progress_bar)
    try:
        return stage.run(stage_options(stage, context.params))
    except ParameterError as exc:
        raise exc.naming(flag_names(context.command)) from None


def flag_names(command) -> Callable[[str], str]:
    """``name`` → how ``command`` spells that parameter (``pca_dim`` → ``--pca-dim``; unknown names stay)."""
    flags = {param.name: max(param.opts, key=len) for param in command.params}
    return lambda name: flags.get(name, name)
