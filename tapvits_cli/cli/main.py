"""The ``tapvits`` command group and the process-level error handling.

Every failure a user can act on is a :class:`TapvitsError` and becomes one line on
stderr plus a documented exit code (README "Exit codes"); the traceback appears only
with ``--debug``. Subcommand modules import torch and friends inside their functions,
so ``tapvits --help`` stays instant.
"""

from __future__ import annotations

import sys
import traceback

import click

from tapvits_cli import __version__
from tapvits_cli.cli import (allocate, audit_gmm, create_model, dataset_cmd, eval_cmd, export, features, finetune, fit_gmm,
                             inspect_cmd, prune, run, score, select, validate_cmd)
from tapvits_cli.cli.options import CURRENT, global_options, reset_settings
from tapvits_cli.errors import ExitCode, TapvitsError


class PipelineOrderGroup(click.Group):
    """Lists subcommands in pipeline order (then tools), not alphabetically."""

    ORDER = ("fit-gmm", "audit-gmm", "features", "select", "score", "allocate", "prune", "finetune", "eval", "export", "run",
             "create-model", "dataset", "inspect", "validate")

    def list_commands(self, ctx: click.Context) -> list[str]:
        rank = {name: i for i, name in enumerate(self.ORDER)}
        return sorted(self.commands, key=lambda name: rank.get(name, len(rank)))


@click.group(cls=PipelineOrderGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="tapvits")
@global_options
def cli() -> None:
    """Task-adaptive pruning of Vision Transformers for edge devices.

    Each subcommand is one stage; stages exchange versioned artifacts (see protocol/),
    print the output path on stdout (or one JSON object with --json) and send logs and
    progress to stderr.
    """


for _module in (fit_gmm, audit_gmm, features, select, score, allocate, prune, finetune, eval_cmd, export, run,
                create_model, dataset_cmd, inspect_cmd, validate_cmd):
    cli.add_command(_module.command)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run the group and map failures to exit codes."""
    reset_settings()
    try:
        cli.main(args=argv, prog_name="tapvits", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("tapvits: interrupted", err=True)
        return ExitCode.INTERRUPTED
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except TapvitsError as exc:
        if CURRENT.debug:
            traceback.print_exc()
        click.echo(f"tapvits: error: {exc}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("tapvits: interrupted", err=True)
        return ExitCode.INTERRUPTED
    except Exception as exc:  # a bug: one line unless --debug
        if CURRENT.debug:
            traceback.print_exc()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        click.echo(f"tapvits: internal error: {type(exc).__name__}: {first} (run with --debug for the traceback)", err=True)
        return ExitCode.INTERNAL
    return ExitCode.OK


def entry_point() -> None:
    sys.exit(main())
