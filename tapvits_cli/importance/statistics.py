"""One forward pass over the metric set, keeping what the composite criterion needs, exactly.

Per unit layer the pass accumulates sufficient statistics over every (sample, token)
observation of the gate's channels: the sum of |x|, the sum of x and the Gram matrix
Σ x xᵀ, its upper block triangle only (float64 accumulators; each batch's products run in
the activations' dtype). Sums
do not care how samples are batched, so activity and redundancy are the same for any
batch size. Per sample it also keeps each channel's mean over tokens (the unit's
per-sample representation for HSIC), and the model's logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from tapvits_cli.importance.samples import SampleSet
from tapvits_cli.models.units import UnitLayer, observing

_GRAM_BLOCK = 256   # wide layers (1,536 neurons) need ~58% of the multiply-adds of a full Gram


@dataclass
class LayerStatistics:
    """Accumulated gate statistics of one unit layer (C = units × channels)."""

    layer: UnitLayer
    abs_sum: torch.Tensor | None = None      # (C,) Σ|x|
    total: torch.Tensor | None = None        # (C,) Σx
    gram: torch.Tensor | None = None         # (C, C) Σ x xᵀ
    observations: int = 0                    # (sample, token) pairs seen
    pooled: list[torch.Tensor] = field(default_factory=list)  # per batch: (n, C) means over tokens

    def update(self, activations: torch.Tensor) -> None:
        flat = activations.reshape(-1, activations.shape[-1])
        if self.gram is None:
            channels = flat.shape[1]
            zeros = dict(dtype=torch.float64, device=flat.device)
            self.abs_sum, self.total = torch.zeros(channels, **zeros), torch.zeros(channels, **zeros)
            self.gram = torch.zeros(channels, channels, **zeros)
        ones = torch.ones(flat.shape[0], dtype=flat.dtype, device=flat.device)
        self.abs_sum += (ones @ flat.abs()).double()     # column sums as products: several times faster
        self.total += (ones @ flat).double()             # than sum(0) on CPU
        for start in range(0, flat.shape[1], _GRAM_BLOCK):   # upper block triangle: the Gram is symmetric
            rows = flat[:, start:start + _GRAM_BLOCK]
            self.gram[start:start + _GRAM_BLOCK, start:] += (rows.T @ flat[:, start:]).double()
        self.observations += flat.shape[0]
        self.pooled.append(activations.mean(1).double())

    def symmetric_gram(self) -> torch.Tensor:
        """Σ x xᵀ in full (``update`` fills only the upper block triangle)."""
        upper = self.gram.triu()
        return upper + upper.triu(1).T

    def activity(self) -> torch.Tensor:
        """Mean |activation| of each unit over samples, tokens and its channels: (units,)."""
        layer = self.layer
        return (self.abs_sum / self.observations).reshape(layer.units, layer.channels).mean(1)

    def correlation(self, constant_tolerance: float = 1e-6) -> torch.Tensor:
        """Channel correlation matrix over all observations, float64 (C, C).

        A channel whose variance is below ``constant_tolerance`` × its mean square
        (a dead unit, up to float32 rounding of the Gram) correlates with nothing.
        """
        mean, gram = self.total / self.observations, self.symmetric_gram()
        covariance = gram / self.observations - torch.outer(mean, mean)
        variance = covariance.diagonal().clamp_min(0)
        constant = variance <= constant_tolerance * (gram.diagonal() / self.observations)
        std = torch.where(constant, torch.ones_like(variance), variance.sqrt())
        correlation = covariance / torch.outer(std, std)
        correlation[constant, :] = 0
        correlation[:, constant] = 0
        correlation.fill_diagonal_(1.0)
        return correlation.clamp(-1.0, 1.0)

    def representations(self) -> torch.Tensor:
        """Per-sample representation of each unit, (samples, units, channels): its outputs averaged over tokens."""
        return torch.cat(self.pooled).reshape(-1, self.layer.units, self.layer.channels)


def collect_statistics(model, layers: Sequence[UnitLayer], samples: SampleSet, batch_size: int,
                       on_progress: Callable[[int], None] | None = None,
                       ) -> tuple[torch.Tensor, list[LayerStatistics]]:
    """Run the metric set once; returns its logits (samples, classes) and per-layer statistics."""
    statistics = {layer.name: LayerStatistics(layer) for layer in layers}
    with observing(layers, lambda layer, x: statistics[layer.name].update(x)):
        logits = model_logits(model, samples, batch_size, on_progress)
    return logits, [statistics[layer.name] for layer in layers]


def model_logits(model, samples: SampleSet, batch_size: int,
                 on_progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Logits of the intact model over the metric set (the KL probes' reference), float64."""
    logits = []
    with torch.inference_mode():
        for indices in samples.chunks(batch_size):
            logits.append(model(samples.load(indices)).double())
            if on_progress:
                on_progress(1)
    return torch.cat(logits)
