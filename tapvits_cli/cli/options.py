"""Global options, and the checks every subcommand's own options share.

``tapvits --seed 3 inspect F`` and ``tapvits inspect F --seed 3`` mean the same. A value
given on the subcommand wins over one given on the group; both win over the
``TAPVITS_*`` environment variable, which wins over the default.

The shared checks live here so that a rule about options holds for every subcommand at
once: :class:`FiniteFloat` (no NaN or infinity in any float option),
:class:`RenamingCommand` (a renamed option's old spelling works for one more version)
and :class:`WritingCommand` (``-o`` never names an input or a directory). It is longer
than a subcommand's module because it holds those rules for all of them.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import click
from click.core import ParameterSource

from tapvits_cli.errors import UsageError
from tapvits_cli.vocabulary import SEED_RANGE


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
        click.option("--seed", type=click.IntRange(*SEED_RANGE), default=0, show_default=True, envvar="TAPVITS_SEED", expose_value=False,
                     callback=_store("seed"), help="Seed for torch, NumPy and scikit-learn (recorded in the artifact)."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                     envvar="TAPVITS_DEVICE", expose_value=False, callback=_store("device"),
                     help="Where tensors run; auto picks CUDA when available."),
        click.option("--progress/--no-progress", default=None, envvar="TAPVITS_PROGRESS", expose_value=False,
                     callback=_store("progress"), help="Force progress bars on or off (default: bars on a terminal, a plain line every 30 s elsewhere)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


class FiniteFloat(click.FloatRange):
    """A float option that refuses NaN and ±infinity, optionally bounded like ``click.FloatRange``.

    ``float()`` accepts ``nan`` and ``inf``, and NaN passes every range check (each
    comparison with it is false), so without this a NaN budget or threshold silently
    turns into an artifact that later stages reject, or a gate that never fails. Recipes
    check stage options with the same type, so they refuse the same values.
    """

    def __init__(self, min: float | None = None, max: float | None = None, min_open: bool = False,
                 max_open: bool = False) -> None:
        super().__init__(min=min, max=max, min_open=min_open, max_open=max_open)
        self.name = "float" if min is None and max is None else "float range"

    @classmethod
    def within(cls, interval) -> "FiniteFloat":
        """The range of a :class:`~tapvits_cli.vocabulary.Interval` (one definition for options and readers)."""
        return cls(interval.low, interval.high, interval.low_open, interval.high_open)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return super().convert(number, param, ctx)

    def _describe_range(self) -> str:
        return "" if self.min is None and self.max is None else super()._describe_range()


def checked_by(parse: Callable[[str], Any]) -> Callable:
    """A click callback that checks a text option with the stage's own parser when the option is
    parsed, and passes the text on unchanged: a bad value then fails on the command line, and in a
    recipe's ``--dry-run`` naming its key, not at its step after the earlier steps have run."""
    def check(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            parse(value)
        except UsageError as exc:
            raise click.BadParameter(str(exc)) from None
        return value
    return check


def integer_ranges(minimum: int, expected: str, maximum: int) -> Callable:
    """A click callback reading ``'2-10'``, ``'3'`` or ``'1,3,5-7'`` as sorted distinct integers from ``minimum``
    to ``maximum`` (None stays None); any other text is refused as "expected ``expected``". The bound
    is checked before a range is expanded: ``1-10000000000`` would otherwise fill memory."""
    def parse(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
        if value is None:
            return None
        found: set[int] = set()
        for item in value.split(","):
            match = re.fullmatch(r"\s*([0-9]+)\s*(?:-\s*([0-9]+)\s*)?", item)
            low, high = (int(match[1]), int(match[2] or match[1])) if match else (minimum, minimum - 1)
            if not match or low < minimum or high < low or high > maximum:
                raise click.BadParameter(f"expected {expected}, got {value!r}")
            found.update(range(low, high + 1))
        return sorted(found)
    return parse


def _named_files(value: Any) -> Iterator[str]:
    """Paths of existing files that a parameter value names: itself, or the source of a dataset reference."""
    if isinstance(value, (list, tuple)):
        for item in value:
            yield from _named_files(item)
        return
    if not isinstance(value, (str, os.PathLike)):
        return
    text = os.fspath(value)
    candidates = [text]
    if ":" in text:
        from tapvits_cli.data.reference import DatasetRef

        try:
            candidates.append(DatasetRef.parse(text).source)
        except UsageError:
            pass
    for candidate in candidates:
        if candidate and os.path.isfile(candidate):
            yield candidate


def check_output_path(output: str, inputs: dict[str, Any]) -> None:
    """Refuse an ``-o`` that names a directory or any file given in ``inputs`` (option name → value).

    Writing first and failing later would destroy the input (``eval m.safetensors -o
    m.safetensors`` turned the model into a report) or leave a file where a directory was
    meant (``-o runs/x/`` wrote a file ``x``); an existing path that is not a regular file
    (``-o /dev/null``, a FIFO) is refused too, since the rename would replace it. Files are compared by identity
    (``os.path.samefile``), so a symlink or hard link to an input counts as that input.
    """
    if output.endswith(("/", os.sep)) or os.path.isdir(output):
        folder = output.rstrip("/" + os.sep) or "."
        raise UsageError(f"-o/--output {output!r} names a directory: give the file to write, e.g. {folder}/NAME")
    if not os.path.exists(output):
        return
    if not os.path.isfile(output):   # the output replaces the path: a FIFO or /dev/null would become a file
        raise UsageError(f"-o/--output {output!r} exists and is not a regular file (a FIFO, socket or device): "
                         "an artifact is written to a temporary file and renamed onto the path, which would "
                         "replace it; choose a file path")
    for name, value in inputs.items():
        for path in _named_files(value):
            if os.path.samefile(path, output):
                raise UsageError(f"-o/--output {output!r} is the input {name} ({path}); writing it would destroy "
                                 "the input: choose another output path")


def deprecation_line(where: str, old: str, new: str) -> str:
    """The one line on stderr that a deprecated spelling was used (a command line's, or a recipe key's)."""
    return f"{where}: {old} is deprecated and will be removed in the next version; use {new}"


def modernize(args: list[str], renamed: Mapping[str, str], positional: str | None,
              value_options: Mapping[str, int]) -> tuple[list[str], list[tuple[str, str]]]:
    """``args`` with every old spelling replaced by its new one, and the (old, new) pairs that were used.

    ``renamed`` maps an old option spelling to its new one; ``positional`` is the option a
    former positional argument became (the first bare token is then passed to it);
    ``value_options`` says how many values each option takes, so that a value is never
    mistaken for an option or a positional argument. Nothing after ``--`` changes.
    """
    out: list[str] = []
    used: list[tuple[str, str]] = []
    index = 0
    while index < len(args):
        token = args[index]
        index += 1
        if token == "--":
            out += args[index - 1:]
            break
        if token.startswith("-") and len(token) > 1:
            name, equals, value = token.partition("=") if token.startswith("--") else (token[:2], "", token[2:])
            if name in renamed:
                used.append((name, renamed[name]))
                name = renamed[name]
            out.append(name + equals + value)
            if not equals and not value and name in value_options:   # its values follow as tokens
                out += args[index:index + value_options[name]]
                index += value_options[name]
        elif positional is not None and not any(old == "a positional argument" for old, _ in used):
            used.append(("a positional argument", f"{positional} {shlex.quote(token)}"))
            out += [positional, token]
        else:
            out.append(token)
    for old, new in used:
        flag = new.split()[0]
        if sum(token.partition("=")[0] == flag for token in out) > 1:
            raise click.UsageError(f"{flag} is given twice (once as its deprecated spelling, {old}): give it once")
    return out, used


class RenamingCommand(click.Command):
    """A subcommand that still reads the spellings an option had before it was renamed, for one version.

    ``renamed`` maps an old option spelling to its new one (``{"--warmup": "--warmup-runs"}``);
    ``positional`` is the option a former positional argument became (``"--data"``). The
    old spellings are not declared, so ``--help`` does not show them; each use prints one
    deprecation line on stderr (not with ``-q``) and then means exactly the new spelling.
    ``tapvits run`` reads a recipe's old keys through ``renamed`` the same way.
    """

    def __init__(self, *args: Any, renamed: Mapping[str, str] | None = None, positional: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.renamed = dict(renamed or {})
        self.positional = positional

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        value_options = {name: param.nargs for param in self.params
                         if isinstance(param, click.Option) and not param.is_flag and not param.count
                         for name in param.opts}
        args, used = modernize(args, self.renamed, self.positional, value_options)
        rest = super().parse_args(ctx, args)
        if CURRENT.verbosity >= 0:
            for old, new in used:
                sys.stderr.write(deprecation_line(ctx.command_path, old, new) + "\n")
        return rest


class WritingCommand(RenamingCommand):
    """A subcommand that writes ``-o/--output``: the output is checked against every other
    parameter (by :func:`check_output_path`) after parsing, before any work starts."""

    def invoke(self, ctx: click.Context) -> Any:
        output = ctx.params.get("output")
        if output is not None:
            shown = {param.name: param.human_readable_name if isinstance(param, click.Argument)
                     else max(param.opts, key=len) for param in self.params}
            check_output_path(output, {shown.get(name, name): value for name, value in ctx.params.items()
                                       if name != "output" and value is not None})
        return super().invoke(ctx)
