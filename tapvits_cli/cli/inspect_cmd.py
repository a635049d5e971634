"""``tapvits inspect PATH...``: what any file or run directory tapvits wrote is, and its key figures.

Longer than a stage's subcommand because it renders every kind's text view itself; the
documents come from ``reporting/``.
"""

from __future__ import annotations

import click

from tapvits_cli.cli.options import CURRENT, global_options
from tapvits_cli.cli.output import console, emit


@click.command("inspect", short_help="Show any artifact, ONNX export or run directory: kind, lineage, key figures.")
@click.argument("paths", metavar="PATH...", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--units", is_flag=True,
              help="For scores artifacts (and run directories): a table per head and per MLP neuron with its score, "
                   "activity, redundancy, relevance and rank in its layer; with a plan made from those scores among "
                   "the PATHs (or in the run directory), whether it was kept.")
@click.option("--block", "blocks", type=click.IntRange(min=0), multiple=True, metavar="L",
              help="With --units: only block L (repeatable).")
@global_options
def command(paths: tuple[str, ...], units: bool, blocks: tuple[int, ...]) -> None:
    """Show what each PATH is: an artifact (header, lineage, figures, tables), an ONNX file
    from `tapvits export`, a run directory, or its run.json / summary.json.

    Fractions are shown as percentages (95.56%); a pruned model's widths as kept/built
    (3/4 heads). The human view is printed on stdout (it is the result); --json prints
    the document of one PATH, or {"inspected": [...]} for several.

    \b
    Examples:
      tapvits inspect runs/quickstart/devices/low/model.safetensors
      tapvits inspect scores.safetensors plan.safetensors --units --block 5
      tapvits inspect runs/quickstart
    """
    from tapvits_cli.reporting.inspection import inspect_paths

    if blocks and not units:
        raise click.UsageError("--block applies with --units")
    documents = inspect_paths(paths, units=units, blocks=list(blocks) or None)
    if CURRENT.json:
        emit(documents[0] if len(documents) == 1 else {"inspected": documents})
        return
    for index, document in enumerate(documents):
        if index:
            click.echo()
        _render(document)


def _cell(name: str, value) -> str:
    """A value as the text view shows it: fractions as percentages, floats to 4 significant digits."""
    from tapvits_cli.reporting.inspection import FRACTION_NAMES

    if isinstance(value, bool) or value is None:
        return "–" if value is None else str(value).lower()
    if isinstance(value, float):
        return f"{value:.2%}" if name in FRACTION_NAMES else f"{value:.4g}"
    if isinstance(value, (dict, list)):
        import json

        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _render(document: dict) -> None:
    import json

    from rich.table import Table

    out = console(stderr=False)
    head = Table(show_header=False, box=None, pad_edge=False)
    head.add_column(style="bold")
    head.add_column()
    for key in ("path", "kind", "version", "format", "producer", "producer_version", "created"):
        if document.get(key) is not None:
            head.add_row(key, str(document[key]))
    for role, entry in document["inputs"].items():
        head.add_row(f"input {role}", f"{entry['kind']} {entry['name']} sha256:{entry['sha256']}")
    if document["params"]:
        head.add_row("params", json.dumps(document["params"], sort_keys=True))
    for key, value in document["figures"].items():
        head.add_row(key, _cell(key, value))
    out.print(head, markup=False)
    for table in document["tables"]:
        view = Table(title=table["title"], title_justify="left")
        for column in table["columns"]:
            view.add_column(column, justify="right")
        for row in table["rows"]:
            view.add_row(*(_cell(column, v) for column, v in zip(table["columns"], row)))
        out.print(view, markup=False)
