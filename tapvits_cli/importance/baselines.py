"""Baseline criteria in the same per-unit format: ``magnitude``, ``taylor``, ``random``.

- ``magnitude``: L1 norm of every weight the unit owns (its rows/columns and biases).
- ``taylor``: Σ |w ⊙ ∂L/∂w| over the unit's weights, L the mean cross-entropy of the
  model on the metric set against its public labels. Gradients of per-batch sums divided
  by the sample count add up to the exact full-set gradient, so the batch size does not
  matter.
- ``random``: uniform [0, 1) per unit from a generator seeded with the stage's seed.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from tapvits_cli.importance.samples import SampleSet
from tapvits_cli.models.units import UnitLayer


def _per_unit_l1(layer: UnitLayer, values: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray:
    total = sum(owned.per_unit(values(owned.parameter)).abs().sum(1, dtype=torch.float64) for owned in layer.owned)
    return total.float().cpu().numpy()


def magnitude_scores(layers: Sequence[UnitLayer]) -> list[np.ndarray]:
    with torch.no_grad():
        return [_per_unit_l1(layer, lambda p: p.detach()) for layer in layers]


def taylor_scores(model, layers: Sequence[UnitLayer], samples: SampleSet, batch_size: int,
                  on_progress: Callable[[int], None] | None = None) -> tuple[list[np.ndarray], torch.Tensor]:
    """Scores per layer and the logits of the pass (the KL probes' reference)."""
    if samples.labels is None:
        raise ValueError("the taylor criterion needs the metric set's labels")
    labels = torch.from_numpy(np.array(samples.labels, dtype=np.int64))
    for parameter in model.parameters():
        parameter.grad = None
    logits = []
    with torch.enable_grad():
        for indices in samples.chunks(batch_size):
            batch_logits = model(samples.load(indices))
            target = labels[indices].to(batch_logits.device)
            (F.cross_entropy(batch_logits.float(), target, reduction="sum") / samples.count).backward()
            logits.append(batch_logits.detach().double())
            if on_progress:
                on_progress(1)
    with torch.no_grad():
        scores = [_per_unit_l1(layer, lambda p: p.detach() * p.grad) for layer in layers]
    for parameter in model.parameters():
        parameter.grad = None
    return scores, torch.cat(logits)


def random_scores(layers: Sequence[UnitLayer], seed: int) -> list[np.ndarray]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(layer.units, generator=generator).numpy() for layer in layers]
