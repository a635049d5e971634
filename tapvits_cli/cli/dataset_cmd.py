"""``tapvits dataset REF``: what a dataset reference selects, before any stage uses it."""

from __future__ import annotations

import click

from tapvits_cli.cli.options import CURRENT, global_options
from tapvits_cli.cli.output import emit


@click.command("dataset", short_help="Show what a dataset reference selects: samples, classes, fingerprint.")
@click.argument("reference")
@global_options
def command(reference: str) -> None:
    """Resolve a dataset REFERENCE (see protocol/datasets.md) and describe the selection.

    Example: tapvits dataset "fashion-mnist:split=test:classes=0,1:fold=1/2"
    """
    import numpy as np

    from tapvits_cli.data import open_dataset

    dataset = open_dataset(reference)
    counts = np.bincount(dataset.labels, minlength=dataset.num_classes)
    document = {
        **dataset.provenance(),
        "class_counts": {name: int(n) for name, n in zip(dataset.class_names, counts) if n},
    }
    if CURRENT.json:
        emit(document)
        return
    lines = [f"{key}: {document[key]}" for key in ("reference", "samples", "image_shape", "num_classes", "fingerprint")]
    lines += [f"  class {name}: {n}" for name, n in document["class_counts"].items()]
    emit(document, "\n".join(lines))
