"""The ``tapvits`` command group and the process-level error handling.

Every failure a user can act on is a :class:`TapvitsError` and becomes one line on
stderr plus a documented exit code (README "Exit codes"); the traceback appears only
with ``--debug``. Subcommand modules import torch and friends inside their functions,
so ``tapvits --help`` stays instant. Longer than a subcommand's module because the whole
mapping from failures to exit codes lives here.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import sys
import threading
import traceback

import click

from tapvits_cli import __version__
from tapvits_cli.cli import (allocate, audit_gmm, create_model, dataset_cmd, eval_cmd, export, features, finetune, fit_gmm,
                             inspect_cmd, profile, prune, report, run, score, select, validate_cmd)
from tapvits_cli.cli.options import CURRENT, global_options, reset_settings
from tapvits_cli.cli.output import error_line
from tapvits_cli.errors import ExitCode, TapvitsError, environment_failure


# The "kind" of a JSON error object, by exit code (README, "Exit codes").
EXIT_KINDS = {ExitCode.INTERNAL: "internal", ExitCode.USAGE: "usage", ExitCode.INVALID_ARTIFACT: "invalid-artifact",
              ExitCode.INCOMPATIBLE: "incompatible-artifact", ExitCode.UNSATISFIABLE_BUDGET: "unsatisfiable-budget",
              ExitCode.BELOW_THRESHOLD: "below-threshold", ExitCode.NOT_IMPLEMENTED: "not-implemented",
              ExitCode.DATA_UNAVAILABLE: "data-unavailable", ExitCode.ENVIRONMENT: "environment",
              ExitCode.INTERRUPTED: "interrupted"}

# What the cloud install adds to the device install (pyproject.toml, extra "cloud").
CLOUD_PACKAGES = ("torch", "timm", "torchvision")


class PipelineOrderGroup(click.Group):
    """Lists subcommands in pipeline order (then tools), not alphabetically."""

    ORDER = ("fit-gmm", "audit-gmm", "features", "select", "score", "allocate", "prune", "finetune", "eval", "export", "run",
             "report", "profile", "create-model", "dataset", "inspect", "validate")

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


def _global_option_names() -> frozenset[str]:
    """Names of the parameters :func:`global_options` attaches (asked of it, so the two cannot drift)."""
    def probe() -> None:
        """Only carries the options."""
    return frozenset(param.name for param in global_options(click.command()(probe)).params)


GLOBAL_OPTION_NAMES = _global_option_names()
GLOBAL_SECTION = "Global options (before or after the subcommand name)"


def format_grouped_options(command: click.Command, ctx: click.Context, formatter: click.HelpFormatter) -> None:
    """``--help`` with the command's own options first and the shared ones in one section after them.

    Every subcommand accepts the seven global options; listed among its own they buried
    what is specific to it, and looked like seven more things to learn per command.
    """
    own, shared = [], []
    for param in command.get_params(ctx):
        record = param.get_help_record(ctx)
        if record is not None:
            (shared if param.name in GLOBAL_OPTION_NAMES else own).append(record)
    if own:
        with formatter.section("Options"):
            formatter.write_dl(own)
    if shared:
        with formatter.section(GLOBAL_SECTION):
            formatter.write_dl(shared)
    if isinstance(command, click.Group):
        command.format_commands(ctx, formatter)


for _module in (fit_gmm, audit_gmm, features, select, score, allocate, prune, finetune, eval_cmd, export, run, report,
                profile, create_model, dataset_cmd, inspect_cmd, validate_cmd):
    cli.add_command(_module.command)
for _command in (cli, *cli.commands.values()):
    # per instance: the subcommands are plain click.Commands built in their own modules
    _command.format_options = functools.partial(format_grouped_options, _command)


def click_error_line(exc: click.ClickException) -> str:
    """click's own error (a missing argument, a bad option value) as one line, with the help hint.

    click prints usage, hint and message on three lines; the README promises one line,
    ``tapvits: error: …``, for every error, so the usage is left out (``--help`` shows it).
    """
    message = " ".join(exc.format_message().split())
    ctx = getattr(exc, "ctx", None)
    if isinstance(exc, click.UsageError) and ctx is not None and ctx.command.get_help_option(ctx) is not None:
        message += f" (see '{ctx.command_path} --help')"
    return message


def _wants_json(argv: list[str]) -> bool:
    """``--json`` was asked for, even when click failed before its callback ran (an unknown option)."""
    if CURRENT.json:
        return True
    options = argv[:argv.index("--")] if "--" in argv else argv
    return "--json" in options or os.environ.get("TAPVITS_JSON", "").lower() in ("1", "true", "yes", "on")


def _report_error(argv: list[str], message: str, code: int, internal: bool = False) -> int:
    """Say why the command failed, on stderr, and return its exit code.

    One line, ``tapvits: error: …`` (``internal error`` for a bug); under ``--json`` one
    JSON object instead, ``{"error", "exit_code", "kind"}``, so a program driving tapvits
    parses failures the way it parses results (README, "Exit codes").
    """
    if _wants_json(argv):
        kind = "internal" if internal else EXIT_KINDS.get(code, "error")
        click.echo(json.dumps({"error": message, "exit_code": int(code), "kind": kind}), err=True)
    elif code == ExitCode.INTERRUPTED:
        click.echo("tapvits: interrupted", err=True)
    else:
        click.echo(error_line(message, internal), err=True)
    return code


def _interrupt(signum, frame) -> None:
    """The first SIGTERM interrupts; a second one ends the process at once (Python runs a handler only
    between bytecodes, so one that arrives inside a long native call, a DDP rendezvous, waits for it)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise KeyboardInterrupt


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM (what Slurm, Kubernetes, systemd and ``timeout`` send) ends a command as Ctrl-C does.

    Killed outright, ``tapvits run`` would release its run directory's lock while its
    workers still write there, and leave them running; as an interrupt, it cancels its
    steps, stops its workers and exits 130 with one line, and a partial ``features``
    table is kept to resume.
    """
    if threading.current_thread() is not threading.main_thread():   # signals reach only the main thread
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run the group and map failures to exit codes."""
    reset_settings()
    args = list(argv) if argv is not None else sys.argv[1:]
    with _terminate_as_interrupt():
        return _run(argv, args)


def _run(argv: list[str] | None, args: list[str]) -> int:
    try:
        cli.main(args=argv, prog_name="tapvits", standalone_mode=False)
    except click.exceptions.Abort:
        return _report_error(args, "interrupted", ExitCode.INTERRUPTED)
    except click.exceptions.NoArgsIsHelpError as exc:   # bare `tapvits`: the help, not an error line
        exc.show()
        return exc.exit_code
    except click.ClickException as exc:
        return _report_error(args, click_error_line(exc), exc.exit_code)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        if CURRENT.debug:
            traceback.print_exc()
        if missing not in CLOUD_PACKAGES:
            return _report_error(args, f"ModuleNotFoundError: {exc} (run with --debug for the traceback)",
                                 ExitCode.INTERNAL, internal=True)
        command = next((arg for arg in args if arg in cli.commands), "this command")
        return _report_error(args, f"`tapvits {command}` needs {missing}, which the device install lacks: "
                                   f'pip install "tapvits[cloud]"', ExitCode.DATA_UNAVAILABLE)
    except TapvitsError as exc:
        if CURRENT.debug:
            traceback.print_exc()
        return _report_error(args, str(exc), exc.exit_code)
    except KeyboardInterrupt:
        return _report_error(args, "interrupted", ExitCode.INTERRUPTED)
    except OSError as exc:
        # Writes anywhere (artifacts, caches, run directories) can meet a full disk or a
        # read-only or forbidden path: the environment's fault, with its own exit code.
        if CURRENT.debug:
            traceback.print_exc()
        refused = environment_failure(exc, exc.filename or "writing")
        if refused is None:
            return _report_error(args, f"{type(exc).__name__}: {exc} (run with --debug for the traceback)",
                                 ExitCode.INTERNAL, internal=True)
        return _report_error(args, str(refused), refused.exit_code)
    except Exception as exc:  # a bug: one line unless --debug
        if CURRENT.debug:
            traceback.print_exc()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return _report_error(args, f"{type(exc).__name__}: {first} (run with --debug for the traceback)",
                             ExitCode.INTERNAL, internal=True)
    return ExitCode.OK


def entry_point() -> None:
    sys.exit(main())
