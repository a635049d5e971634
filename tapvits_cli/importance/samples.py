"""The metric set as scoring sees it: preprocessed images by sample index, in a fixed order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np


@dataclass(frozen=True)
class SampleSet:
    """``load(indices)`` gives the preprocessed images (n, C, H, W) of samples ``indices`` ⊂ 0..count-1.

    Scoring only ever asks for consecutive index ranges in increasing order, so a source
    backed by files reads sequentially. ``labels`` (public labels) are needed by ``taylor``.
    """

    count: int
    load: Callable[[np.ndarray], Any]
    labels: np.ndarray | None = None

    def chunks(self, size: int) -> list[np.ndarray]:
        """Consecutive index ranges of at most ``size`` samples covering 0..count-1."""
        if size < 1:
            raise ValueError(f"batch size must be >= 1, got {size}")
        return [np.arange(start, min(start + size, self.count)) for start in range(0, self.count, size)]
