"""The text view of an inspection document (``tapvits inspect`` without ``--json``): rich tables.

Fractions are shown as percentages (95.56%), other floats to 4 significant digits.
"""

from __future__ import annotations

import json

from tapvits_cli.reporting.inspection import FRACTION_NAMES
from tapvits_cli.reporting.terminal import printable


def cell(name: str, value) -> str:
    """A value as the text view shows it: fractions as percentages, floats to 4 significant digits, one line."""
    if isinstance(value, bool) or value is None:
        return "–" if value is None else str(value).lower()
    if isinstance(value, float):
        return f"{value:.2%}" if name in FRACTION_NAMES else f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return printable(json.dumps(value, ensure_ascii=False), one_line=True)
    return printable(str(value), one_line=True)


def document_tables(document: dict) -> list:
    """The rich tables that show ``document``: the header, lineage, params and figures, then its tables."""
    from rich.table import Table

    head = Table(show_header=False, box=None, pad_edge=False)
    head.add_column(style="bold")
    head.add_column()
    for key in ("path", "kind", "version", "format", "producer", "producer_version", "created"):
        if document.get(key) is not None:
            head.add_row(key, cell(key, str(document[key])))
    for role, entry in document["inputs"].items():
        head.add_row(printable(f"input {role}", True), cell(role, f"{entry['kind']} {entry['name']} sha256:{entry['sha256']}"))
    if document["params"]:
        head.add_row("params", printable(json.dumps(document["params"], sort_keys=True), one_line=True))
    for key, value in document["figures"].items():
        head.add_row(printable(key, True), cell(key, value))
    tables = [head]
    for table in document["tables"]:
        view = Table(title=printable(table["title"], True), title_justify="left")
        for column in table["columns"]:
            view.add_column(printable(column, True), justify="right")
        for row in table["rows"]:
            view.add_row(*(cell(column, v) for column, v in zip(table["columns"], row)))
        tables.append(view)
    return tables
