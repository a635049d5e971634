"""What a reference selects, computed from labels alone (no pixels, no files).

Everything here is a pure function of the split's labels and the reference, so the same
reference selects the same ids on a device and in the cloud. The random streams come from
NumPy's ``SeedSequence``; each use has its own stream tag so that, say, ``fold`` and
``sample`` with the same seed are independent.
"""

from __future__ import annotations

import numpy as np

from tapvits_cli.data.reference import DatasetRef, Ranges, format_ranges
from tapvits_cli.errors import UsageError

_FOLD_STREAM = 1
_SAMPLE_STREAM = 2
_DIRICHLET_STREAM = 5      # the class proportions of every part
_DIRICHLET_ORDER_STREAM = 6  # the order in which a class's samples are dealt to the parts


def fold_assignment(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """The fold (0..folds-1) of every sample: per class a seeded shuffle, dealt round-robin.

    Random keys are drawn for every sample of the split, so a sample's fold does not depend
    on which other classes a reference keeps: ``classes=0,1:fold=0/2`` is a subset of
    ``fold=0/2``. Within a class, fold sizes differ by at most one (lower folds first).
    """
    keys = np.random.default_rng([seed, _FOLD_STREAM]).random(len(labels))
    order = np.lexsort((keys, labels))
    sorted_labels = labels[order]
    rank = np.arange(len(labels)) - np.searchsorted(sorted_labels, sorted_labels, side="left")
    assignment = np.empty(len(labels), dtype=np.int64)
    assignment[order] = rank % folds
    return assignment


def dirichlet_assignment(labels: np.ndarray, selected: np.ndarray, num_classes: int, alpha: float, parts: int,
                         seed: int) -> np.ndarray:
    """The part (0..parts-1) of every ``selected`` position: a non-IID split, as federated splitters do.

    For every class of the source (0..num_classes-1, whether selected or not, so a part's
    proportions do not depend on ``classes``), the shares of the parts are drawn from
    Dirichlet(α, …, α) (``default_rng([seed, 5]).dirichlet([α] * parts, num_classes)``);
    the class's selected samples, ordered by a seeded key per sample of the split
    (``default_rng([seed, 6]).random(len(labels))``), are cut into consecutive runs at
    ``floor(cumsum(shares)[:-1] · n_class)``, run k going to part k. Small α gives parts
    dominated by few classes; large α approaches an IID split.
    """
    rng = np.random.default_rng([seed, _DIRICHLET_STREAM])
    shares = rng.dirichlet(np.full(parts, alpha), num_classes)
    keys = np.random.default_rng([seed, _DIRICHLET_ORDER_STREAM]).random(len(labels))
    selected_labels = labels[selected]
    order = np.lexsort((keys[selected], selected_labels))
    counts = np.bincount(selected_labels, minlength=num_classes)
    # run k of class c holds its ranks [edges[c, k], edges[c, k + 1]); the sorted selection is
    # class 0's runs 0..parts-1, then class 1's: memory grows with classes × parts, not samples × parts
    cuts = np.floor(np.cumsum(shares, axis=1)[:, :-1] * counts[:, None]).astype(np.int64)
    edges = np.concatenate([np.zeros((num_classes, 1), np.int64), cuts, counts[:, None]], axis=1)
    part_sorted = np.repeat(np.tile(np.arange(parts, dtype=np.int64), num_classes), np.diff(edges, axis=1).ravel())
    assignment = np.empty(len(selected), dtype=np.int64)
    assignment[order] = part_sorted
    return assignment


def expand_ranges(ranges: Ranges) -> np.ndarray:
    return np.concatenate([np.arange(low, high + 1, dtype=np.int64) for low, high in ranges])


def select_ids(ref: DatasetRef, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Sorted positions in the split that ``ref`` keeps: classes → dirichlet part → fold → indices → sample."""
    ids = np.arange(len(labels), dtype=np.int64)
    if ref.classes is not None:
        if ref.classes[-1][1] >= num_classes:  # checked before expanding: 0-3000000000 is three billion labels
            raise UsageError(f"dataset reference {str(ref)!r}: classes: the source has {num_classes} classes "
                             f"(0-{num_classes - 1})")
        ids = ids[np.isin(labels, expand_ranges(ref.classes))]
    if ref.part is not None:
        k, n = ref.part
        if n > len(ids):  # checked before drawing shares for every class and part
            raise UsageError(f"dataset reference {str(ref)!r}: part={k}/{n} asks for more parts than the "
                             f"{len(ids)} samples selected before it")
        ids = ids[dirichlet_assignment(labels, ids, num_classes, ref.dirichlet, n, ref.seed) == k]
    if ref.fold is not None:
        k, n = ref.fold
        ids = ids[fold_assignment(labels, n, ref.seed)[ids] == k]
    if ref.indices is not None:
        last = ref.indices[-1][1]
        if last >= len(ids):
            raise UsageError(f"dataset reference {str(ref)!r}: indices={format_ranges(ref.indices)} reaches "
                             f"position {last}, but the selection before it has {len(ids)} samples")
        ids = ids[expand_ranges(ref.indices)]
    if ref.sample is not None:
        if ref.sample > len(ids):
            raise UsageError(f"dataset reference {str(ref)!r}: sample={ref.sample} is more than the "
                             f"{len(ids)} samples selected before it")
        picked = np.random.default_rng([ref.seed, _SAMPLE_STREAM]).choice(len(ids), ref.sample, replace=False)
        ids = ids[np.sort(picked)]
    return ids
