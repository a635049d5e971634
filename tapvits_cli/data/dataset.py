"""One dataset interface over every source: what the stages iterate over.

A :class:`Dataset` is the selection a :class:`DatasetRef` makes from one split of a
source. Its ``ids`` are row positions in that split: stable across runs and machines, so a
feature table, a metric set and a fine-tuning set key on them. Everything else takes
*positions*, 0..len-1 over the selection.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import numpy as np

from tapvits_cli.data.reference import DatasetRef
from tapvits_cli.data.selection import select_ids
from tapvits_cli.data.sources import Source, open_source
from tapvits_cli.errors import UsageError

_FINGERPRINT_CHUNK_BYTES = 64 << 20


class Dataset:
    def __init__(self, ref: DatasetRef, source: Source, ids: np.ndarray) -> None:
        self.ref = ref  # split resolved, so provenance names it
        self._source = source
        self.ids = ids
        self.labels = source.labels[ids]
        self.ids.flags.writeable = self.labels.flags.writeable = False
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"Dataset('{self.ref}', samples={len(self)})"

    @property
    def num_classes(self) -> int:
        """Classes of the source, not of the selection: labels keep their source values."""
        return len(self._source.class_names)

    @property
    def class_names(self) -> tuple[str, ...]:
        return self._source.class_names

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) as stored, before any model's preprocessing."""
        return self._source.image_shape

    def images(self, positions) -> np.ndarray:
        """Float32 images in [0, 1], shape (n, C, H, W), in the order of ``positions``.

        The source reads each row once, in increasing order (what HDF5 needs to be fast).
        """
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        if len(positions) == 0:
            return np.empty((0, *self.image_shape), dtype=np.float32)
        if positions.min() < 0 or positions.max() >= len(self):
            raise IndexError(f"positions must lie in 0..{len(self) - 1}")
        rows = self.ids[positions]
        if np.all(rows[1:] > rows[:-1]):
            return self._source.read(rows)
        unique, inverse = np.unique(rows, return_inverse=True)
        return self._source.read(unique)[inverse]

    def positions_of(self, ids) -> np.ndarray:
        """Positions of sample ``ids`` (e.g. a metric set's) in this dataset."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        positions = np.searchsorted(self.ids, ids)
        found = positions < len(self)
        found[found] = self.ids[positions[found]] == ids[found]
        if not found.all():
            raise ValueError(f"{int((~found).sum())} ids are not in dataset '{self.ref}' "
                             f"(first: {int(ids[~found][0])})")
        return positions

    def fingerprint(self) -> str:
        """SHA-256 over the source kind and split, the ids, the labels and the pixels.

        Content, not paths: the same pool copied to another machine keeps its fingerprint,
        and any change to a selected image or label changes it. Pixels are hashed as the
        float32 values the models see, in chunks, so a large pool never sits in memory.
        """
        if self._fingerprint is None:
            digest = hashlib.sha256()
            header = {"format": "tapvits-dataset/1", "kind": self._source.kind, "split": self._source.split,
                      "samples": len(self), "image_shape": list(self.image_shape),
                      "class_names": list(self.class_names)}
            digest.update(json.dumps(header, sort_keys=True).encode())
            digest.update(self.ids.astype("<i8").tobytes())
            digest.update(self.labels.astype("<i8").tobytes())
            chunk = max(1, _FINGERPRINT_CHUNK_BYTES // (4 * int(np.prod(self.image_shape))))
            for start in range(0, len(self), chunk):
                pixels = self.images(np.arange(start, min(start + chunk, len(self))))
                digest.update(np.ascontiguousarray(pixels, dtype="<f4"))
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def provenance(self) -> dict:
        """What an artifact records about the data it was made from (JSON-ready)."""
        return {"reference": str(self.ref), "samples": len(self), "fingerprint": self.fingerprint(),
                "image_shape": list(self.image_shape), "num_classes": self.num_classes}


def open_dataset(ref: DatasetRef | str) -> Dataset:
    """Open the selection ``ref`` names; it must select at least one sample."""
    if isinstance(ref, str):
        ref = DatasetRef.parse(ref)
    source = open_source(ref.source, ref.split)
    ref = replace(ref, split=source.split)
    ids = select_ids(ref, source.labels, len(source.class_names))
    if len(ids) == 0:
        raise UsageError(f"dataset reference '{ref}' selects no samples")
    return Dataset(ref, source, ids)
