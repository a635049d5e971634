"""``tapvits inspect FILE``: kind, version, lineage, shapes and key figures of any artifact."""

from __future__ import annotations

import click

from tapvits_cli.cli.options import CURRENT, global_options
from tapvits_cli.cli.output import emit


@click.command("inspect", short_help="Show any artifact: kind, version, lineage, shapes, key figures.")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@global_options
def command(path: str) -> None:
    """Show what an artifact is: header, lineage, key figures and tables.

    The human view is printed on stdout (it is the result); --json prints one object.
    """
    from tapvits_cli.artifacts.kinds import summarize_artifact

    artifact, summary = summarize_artifact(path)
    document = {
        "path": str(artifact.path),
        "format": artifact.format,
        **artifact.header.to_dict(),
        "figures": summary.figures,
        "tables": [t.to_dict() for t in summary.tables],
        "tensors": {n: {"dtype": t.dtype, "shape": list(t.shape)} for n, t in artifact.tensors.items()},
    }
    if CURRENT.json:
        emit(document)
    else:
        _render(document)


def _render(document: dict) -> None:
    import json

    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    head = Table(show_header=False, box=None, pad_edge=False)
    head.add_column(style="bold")
    head.add_column()
    for key in ("path", "kind", "version", "format", "producer", "producer_version", "created"):
        head.add_row(key, str(document[key]))
    for role, entry in document["inputs"].items():
        head.add_row(f"input {role}", f"{entry['kind']} {entry['name']} sha256:{entry['sha256'][:16]}…")
    if document["params"]:
        head.add_row("params", json.dumps(document["params"], sort_keys=True))
    for key, value in document["figures"].items():
        head.add_row(key, value if isinstance(value, str) else json.dumps(value))
    console.print(head)
    for table in document["tables"]:
        view = Table(title=table["title"], title_justify="left")
        for column in table["columns"]:
            view.add_column(column, justify="right")
        for row in table["rows"]:
            view.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row))
        console.print(view)
