"""Global options, accepted before or after the subcommand name.

``tapvits --seed 3 inspect F`` and ``tapvits inspect F --seed 3`` mean the same. A value
given on the subcommand wins over one given on the group; both win over the
``TAPVITS_*`` environment variable, which wins over the default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import click
from click.core import ParameterSource


@dataclass
class Settings:
    json: bool = False
    debug: bool = False
    verbosity: int = 0
    seed: int = 0
    device: str = "auto"
    progress: bool | None = None   # None: only when stderr is a terminal


# Module-level so that main() can honour --debug even when a command fails early.
CURRENT = Settings()


def restore_settings(snapshot: Settings) -> None:
    """Make ``CURRENT`` (the object every module holds) equal to ``snapshot`` again."""
    for name, value in vars(snapshot).items():
        setattr(CURRENT, name, value)


def reset_settings() -> None:
    """Back to the defaults; options then only record what was given (see ``_store``)."""
    restore_settings(Settings())


def _store(attribute: str) -> Callable:
    def callback(ctx: click.Context, param: click.Parameter, value):
        source = ctx.get_parameter_source(param.name)
        if source in (ParameterSource.DEFAULT, None):
            return value  # a default must not undo a choice made elsewhere (group level, -q vs -v, a run)
        if attribute == "verbosity" and param.name == "quiet":
            value = -1 if value else CURRENT.verbosity
        setattr(CURRENT, attribute, value)
        return value
    return callback


def global_options(func: Callable) -> Callable:
    """Attach the shared options; their values live in :data:`CURRENT`."""
    options = [
        click.option("--json", "json_", is_flag=True, envvar="TAPVITS_JSON", expose_value=False, is_eager=True,
                     callback=_store("json"), help="Print the result as one JSON object on stdout."),
        click.option("--debug", is_flag=True, envvar="TAPVITS_DEBUG", expose_value=False, is_eager=True,
                     callback=_store("debug"), help="Show the full traceback when a command fails."),
        click.option("-v", "--verbose", count=True, expose_value=False, callback=_store("verbosity"),
                     help="More log lines on stderr (repeatable)."),
        click.option("-q", "--quiet", is_flag=True, expose_value=False, callback=_store("verbosity"),
                     help="Only errors on stderr."),
        click.option("--seed", type=int, default=0, show_default=True, envvar="TAPVITS_SEED", expose_value=False,
                     callback=_store("seed"), help="Seed for torch, NumPy and scikit-learn (recorded in the artifact)."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                     envvar="TAPVITS_DEVICE", expose_value=False, callback=_store("device"),
                     help="Where tensors run; auto picks CUDA when available."),
        click.option("--progress/--no-progress", default=None, envvar="TAPVITS_PROGRESS", expose_value=False,
                     callback=_store("progress"), help="Force progress bars on or off (default: only on a terminal)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func
