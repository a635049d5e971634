"""Layer importance: how far the outputs move when a layer loses its lowest-scoring units.

For block l and unit type t, the lowest-scoring ``fraction`` of that layer's units
(round half up, ties broken by unit index) are removed (their gate channels zeroed, which
equals physical removal) and the metric set is replayed; the importance is the mean over
samples of KL(p_intact ‖ p_probed) in nats. The input entering block l is cached for every
sample, so a probe recomputes only blocks l..L and the head; after the probes of block l
the cache is advanced through the intact block l. With two unit types that is
Σ_l [2·(L − l) + 1] = L·(L + 2) block passes, i.e. about L + 2 forward passes in all.
Per-sample KLs are summed, so the value does not depend on how samples are chunked.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from tapvits_cli.importance.samples import SampleSet
from tapvits_cli.models.units import BlockSequence, UnitLayer, removing


def lowest_units(scores: np.ndarray, fraction: float) -> np.ndarray:
    """Boolean mask of the ⌊fraction·units + ½⌋ lowest-scoring units (ties: lower index first)."""
    units = len(scores)
    count = min(units, int(np.floor(fraction * units + 0.5)))
    order = np.lexsort((np.arange(units), scores))
    removed = np.zeros(units, dtype=bool)
    removed[order[:count]] = True
    return removed


def mean_kl(reference_log_probs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Σ over samples of KL(p_ref ‖ softmax(logits)), float64."""
    log_q = torch.log_softmax(logits.double(), dim=-1)
    return (reference_log_probs.exp() * (reference_log_probs - log_q)).sum()


def replay(sequence: BlockSequence, start: int, hidden: torch.Tensor) -> torch.Tensor:
    for block in sequence.blocks[start:]:
        hidden = block(hidden)
    return sequence.tail(hidden)


def probe_kl(sequence: BlockSequence, layer: UnitLayer, removed: np.ndarray, cache: Sequence[torch.Tensor],
             reference_log_probs: Sequence[torch.Tensor]) -> float:
    """Mean KL over samples when ``layer`` loses the units in ``removed``; ``cache`` holds its block's inputs."""
    total, count = 0.0, 0
    with torch.inference_mode(), removing(layer, ~removed):
        for hidden, reference in zip(cache, reference_log_probs):
            total += float(mean_kl(reference, replay(sequence, layer.block, hidden)))
            count += len(hidden)
    return max(0.0, total / count)   # KL ≥ 0; rounding may leave −1e-17 when nothing changes


def layer_importance(sequence: BlockSequence, layers: Sequence[UnitLayer], scores: Sequence[np.ndarray],
                     samples: SampleSet, reference_logits: torch.Tensor, fraction: float, batch_size: int,
                     on_progress: Callable[[int], None] | None = None) -> Mapping[str, np.ndarray]:
    """KL importance per unit type: ``{kind: (blocks,) float64}`` (0 where nothing is removed)."""
    chunks = samples.chunks(batch_size)
    log_probs = torch.log_softmax(reference_logits.double(), dim=-1)
    reference = [log_probs[torch.as_tensor(c, device=log_probs.device)] for c in chunks]
    importance = {layer.kind: np.zeros(len(sequence.blocks)) for layer in layers}
    with torch.inference_mode():
        cache = [sequence.stem(samples.load(c)) for c in chunks]
    for index, block in enumerate(sequence.blocks):
        for layer, layer_scores in zip(layers, scores):
            if layer.block != index:
                continue
            removed = lowest_units(layer_scores, fraction)
            if removed.any():
                importance[layer.kind][index] = probe_kl(sequence, layer, removed, cache, reference)
        with torch.inference_mode():
            for position, hidden in enumerate(cache):
                cache[position] = block(hidden)
        if on_progress:
            on_progress(1)
    return importance
