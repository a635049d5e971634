"""``tapvits inspect PATH...``: what any file or run directory tapvits wrote is, and its key figures.

The documents and their text view come from ``reporting/``.
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
    from tapvits_cli.reporting.text import document_tables

    out = console(stderr=False)
    for index, document in enumerate(documents):
        if index:
            click.echo()
        for table in document_tables(document):
            out.print(table)
