"""What every stage shares: its options' command line, and the lineage of its inputs.

An options object is a frozen dataclass whose fields are the subcommand's parameters,
named as click names them (``--min-keep`` → ``min_keep``), so the command line builds
one with ``Options(**params)``. Each field says how it is spelled on the command line
(:func:`argument`, :func:`option`); :func:`command_line` renders an options object back
into the arguments that make it, which is what ``commands.sh`` lists and what a step's
key hashes, so a recipe and the same subcommands typed in a shell cannot drift apart.
Fields a recipe may not set (inputs, outputs and what the run decides itself) say so
(``recipe=False``).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

from tapvits_cli.errors import UsageError

# Process-wide options every stage takes; rendered after its own, as the global options.
GLOBAL_FIELDS = ("seed", "device")


@dataclasses.dataclass(frozen=True)
class Written:
    """What a stage that writes one artifact returns: its path and what ``--json`` prints."""

    output: str
    document: dict[str, Any]


def argument(default: Any = dataclasses.MISSING) -> Any:
    """A positional argument (an input: the run names it, so a recipe does not); None is left out."""
    return dataclasses.field(default=default, metadata={"positional": True, "recipe": False})


def option(flag: str, default: Any = None, *, off: str | None = None, multiple: bool = False,
           render: Callable[[Any], str] = str, recipe: bool = True) -> Any:
    """An option spelled ``flag``; ``off`` is a boolean's negative spelling, ``multiple`` repeats
    the flag per item, ``render`` turns a value into the text the option parses back."""
    return dataclasses.field(default=default, metadata={"flag": flag, "off": off, "multiple": multiple,
                                                        "render": render, "recipe": recipe})


def comma_list(values) -> str:
    """``[2, 3, 4]`` → ``2,3,4``, as the list-valued options read it."""
    return ",".join(str(v) for v in values)


def positive_integers(flag: str, text: str, maximum: int) -> tuple[int, ...]:
    """``"1,32"`` → ``(1, 32)``: the value of a list option of positive integers (batch sizes, widths), each
    at most ``maximum``: a batch of 10^6 made ``eval`` allocate 2 GB of images before anything was timed."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    values = tuple(int(part) for part in parts) if all(part.isascii() and part.isdigit() for part in parts) else ()
    if not values or min(values) < 1 or max(values) > maximum:
        raise UsageError(f"{flag} must be integers from 1 to {maximum} separated by commas (e.g. 1,32), got '{text}'")
    return values


def command_tokens(options) -> list[Any]:
    """The subcommand's arguments that make ``options``: positional arguments, then every
    option a recipe may set (defaults included) and every other option that differs from
    its default, then the global options (``--seed``, ``--device``).

    Defaults are spelled out because the line is also what a step's key hashes and what
    ``commands.sh`` replays: a default that changes in a later version then changes the
    key (the step runs again instead of a stale result being reused) and leaves an old
    ``commands.sh`` meaning what it meant. Only what no flag can say is left out: None,
    and a default-off flag without a negative spelling.

    Values are rendered as text, except placeholders a caller put in place of a file or
    dataset (``tapvits run``'s inputs and outputs, which it names once it knows where),
    which stay as they are.
    """
    def text(value: Any, render: Callable[[Any], str] = str) -> Any:
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        return render(value) if isinstance(value, (str, int, float, list, tuple)) else value

    fields = [f for f in dataclasses.fields(options) if f.name not in GLOBAL_FIELDS]
    tokens = []
    for field in fields:
        value = getattr(options, field.name)
        if field.metadata.get("positional") and value is not None:
            tokens += [text(item) for item in value] if isinstance(value, tuple) else [text(value)]
    for field in fields:
        if field.metadata.get("positional"):
            continue
        value = getattr(options, field.name)
        if value is None or (value == field.default and not field.metadata["recipe"]):
            continue
        flag, render = field.metadata["flag"], field.metadata["render"]
        if isinstance(value, bool):
            if value or field.metadata["off"]:
                tokens.append(flag if value else field.metadata["off"])
        elif field.metadata["multiple"]:
            for item in value:
                tokens += [flag, text(item, render)]
        else:
            tokens += [flag, text(value, render)]
    return tokens + ["--seed", str(options.seed), "--device", options.device]


def command_line(options) -> list[str]:
    """:func:`command_tokens` of options that name every file: the arguments as text."""
    return [str(token) for token in command_tokens(options)]


def file_fields(options) -> dict[str, Any]:
    """The fields of ``options`` that hold a placeholder rather than a value (see :func:`command_tokens`)."""
    return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)
            if not isinstance(getattr(options, f.name), (str, int, float, list, tuple, type(None)))}


def recipe_keys(options_class) -> dict[str, str]:
    """The keys a recipe's section of this stage may hold (the long flag without dashes) → field name."""
    return {f.metadata["flag"].lstrip("-"): f.name for f in dataclasses.fields(options_class)
            if f.metadata.get("recipe") and not f.metadata.get("positional") and f.name not in GLOBAL_FIELDS}


def artifact_lineage(path: str | os.PathLike, kind: str):
    """The lineage entry of an input artifact file: its SHA-256, kind and file name."""
    from tapvits_cli.artifacts.files import sha256_file
    from tapvits_cli.artifacts.header import LineageEntry

    return LineageEntry(sha256_file(path), kind, Path(path).name)


def open_selected_pool(data: str | None, metric_set, metric_set_path: str | os.PathLike | None):
    """The pool a metric set selected from: ``data`` when the caller names one, else the reference it records.

    Ids only mean something in their own pool, so the pool must have the fingerprint the
    metric set records (exit 4 otherwise) and, having it, the sample count it records too:
    a metric set whose count contradicts its own fingerprint has been edited (exit 3). A
    recorded reference is the artifact's content, not the caller's words: one that does not
    parse or names no such split makes the metric set invalid (exit 3), not a usage error.
    With no metric set (``finetune`` on a whole dataset) this is ``open_dataset(data)``.
    """
    from tapvits_cli.data import open_dataset
    from tapvits_cli.errors import IncompatibleArtifactError, InvalidArtifactError

    if metric_set is None or data:
        dataset = open_dataset(data)
    else:
        try:
            dataset = open_dataset(metric_set.pool["reference"])
        except UsageError as exc:
            raise InvalidArtifactError(f"{metric_set_path}: its pool reference is unusable ({exc})") from None
    if metric_set is None:
        return dataset
    if dataset.fingerprint() != metric_set.pool["fingerprint"]:
        raise IncompatibleArtifactError(
            f"{metric_set_path} selects from '{metric_set.pool['reference']}' (fingerprint "
            f"{metric_set.pool['fingerprint'][:12]}), but '{dataset.ref}' has fingerprint {dataset.fingerprint()[:12]}: "
            f"pass --data {metric_set.pool['reference']}, or leave --data out")
    if metric_set.pool["samples"] != len(dataset):
        raise metric_set.artifact.fail(f"it records a pool of {metric_set.pool['samples']} samples, but the pool of "
                                       f"its fingerprint has {len(dataset)}")
    return dataset


def dataset_lineage(dataset, name: str | None = None):
    """The lineage entry of a dataset: its content fingerprint, under its reference (or ``name``)."""
    from tapvits_cli.artifacts.header import LineageEntry

    return LineageEntry(dataset.fingerprint(), "dataset", str(dataset.ref) if name is None else name)


def made_for(record_sha256: str, record_blocks, model) -> bool:
    """Whether scores or a plan that record a model (``weights_sha256`` and block widths) were made for ``model``
    (a read model artifact: ``artifacts.model.ModelFile`` or ``LoadedModel``).

    The rule ``allocate --model`` and ``prune`` apply alike: the same weights (by content,
    so a re-saved copy still matches) and the same widths per block.
    """
    return (model.artifact.metadata.get("model.weights_sha256") == record_sha256
            and tuple(model.spec.blocks) == tuple(record_blocks))
