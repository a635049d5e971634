"""``dataset``: what a dataset reference selects (samples, classes, the fingerprint artifacts record)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tapvits_cli.stages.common import argument


@dataclass(frozen=True, kw_only=True)
class Options:
    reference: str = argument()
    seed: int = 0
    device: str = "auto"


@dataclass(frozen=True)
class Result:
    document: dict[str, Any]   # the dataset's provenance and its samples per class: what --json prints


def run(options: Options) -> Result:
    import numpy as np

    from tapvits_cli.data import open_dataset

    dataset = open_dataset(options.reference)
    counts = np.bincount(dataset.labels, minlength=dataset.num_classes)
    return Result({**dataset.provenance(),
                   "class_counts": {name: int(n) for name, n in zip(dataset.class_names, counts) if n}})
