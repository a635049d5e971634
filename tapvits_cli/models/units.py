"""Prunable units as family-neutral views: what the importance criteria and budgets work on.

A model family (``families/vit.py``, ``families/swin.py``) describes each of its prunable layers as
a :class:`UnitLayer`: how many units it has (MLP neurons, attention heads), the module
whose *input* carries the units' outputs side by side (``gate``: unit-major channels,
``channels`` per unit), and the weights each unit owns. Zeroing a unit's channels at the
gate is exactly what physically removing the unit does, so the KL probes of ``score``
measure the model that ``prune`` will build. Criteria only ever see these views, never
a module name, so a new family plugs in without touching them.

:class:`CostModel` is the matching plain-data view for budgets: parameters and MACs per
unit, per branch and for the rest of the model, so ``allocate`` counts the whole model
(embeddings and head included) for any combination of kept units.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np


@dataclass(frozen=True)
class OwnedWeights:
    """A parameter and how to view it as ``(units, elements)``: row u holds what unit u owns."""

    parameter: Any                            # torch.nn.Parameter
    per_unit: Callable[[Any], Any]            # tensor shaped like ``parameter`` -> (units, m)


@dataclass(frozen=True)
class UnitLayer:
    """One prunable layer: the MLP neurons or the attention heads of one block."""

    block: int
    kind: str                                 # "attn" or "mlp"
    units: int
    channels: int                             # gate channels per unit (head_dim for heads, 1 for neurons)
    gate: Any                                 # module whose input is (..., units * channels), unit-major
    owned: tuple[OwnedWeights, ...]
    per_sample_tokens: Callable[[Any], Any]   # gate input -> (samples, tokens, units * channels)

    @property
    def name(self) -> str:
        return f"blocks.{self.block}.{self.kind}"


@dataclass(frozen=True)
class BlockSequence:
    """A model as ``tail(blocks[L-1](…blocks[0](stem(images))))``: what KL probes replay from block l."""

    stem: Callable[[Any], Any]
    blocks: Sequence[Callable[[Any], Any]]
    tail: Callable[[Any], Any]


@contextlib.contextmanager
def observing(layers: Sequence[UnitLayer], observe: Callable[[UnitLayer, Any], None]) -> Iterator[None]:
    """Call ``observe(layer, activations)`` with each layer's (samples, tokens, channels) gate input."""
    handles = [layer.gate.register_forward_pre_hook(
        lambda module, args, layer=layer: observe(layer, layer.per_sample_tokens(args[0]))) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def removing(layer: UnitLayer, keep: Any) -> Iterator[None]:
    """Run ``layer`` as if only units with ``keep[u]`` True existed (their channels zeroed at the gate)."""
    import torch

    keep = torch.as_tensor(keep, dtype=torch.bool)
    mask = keep.repeat_interleave(layer.channels).to(dtype=layer.gate.weight.dtype, device=layer.gate.weight.device)
    handle = layer.gate.register_forward_pre_hook(lambda module, args: (args[0] * mask, *args[1:]))
    try:
        yield
    finally:
        handle.remove()


@dataclass(frozen=True)
class LayerCost:
    """What one prunable layer costs: per kept unit, plus what disappears with the whole branch."""

    block: int
    kind: str
    units: int
    unit_params: int
    unit_macs: int
    branch_params: int   # norms, output bias, layer scale: removed only with the last unit


@dataclass(frozen=True)
class CostModel:
    """Parameters and MACs of a model as a function of how many units each layer keeps.

    MACs are multiply-accumulates of matrix products and convolutions for one image
    (torch's flop counter reports twice as many FLOPs); norms, softmax, activations and
    bias additions are not counted.
    """

    fixed_params: int
    fixed_macs: int
    layers: tuple[LayerCost, ...]

    def __post_init__(self):
        # Costs are summed in int64 (vectorised over layers): an architecture whose whole cost
        # would not fit (a recorded 100,000-pixel input) is refused here, not overflowed later.
        params = self.fixed_params + sum(layer.units * layer.unit_params + layer.branch_params for layer in self.layers)
        macs = self.fixed_macs + sum(layer.units * layer.unit_macs for layer in self.layers)
        if max(params, macs) >= 2 ** 63:
            raise ValueError(f"the model's cost ({params} parameters, {macs} MACs) does not fit 64-bit counts")

    @property
    def units(self) -> np.ndarray:
        """Units per layer of the unpruned model, in the order of ``layers``."""
        return np.array([layer.units for layer in self.layers], dtype=np.int64)

    def params(self, counts: Sequence[int]) -> int:
        counts = np.asarray(counts, dtype=np.int64)
        unit = np.array([layer.unit_params for layer in self.layers], dtype=np.int64)
        branch = np.array([layer.branch_params for layer in self.layers], dtype=np.int64)
        return int(self.fixed_params + (counts * unit).sum() + branch[counts > 0].sum())

    def macs(self, counts: Sequence[int]) -> int:
        counts = np.asarray(counts, dtype=np.int64)
        unit = np.array([layer.unit_macs for layer in self.layers], dtype=np.int64)
        return int(self.fixed_macs + (counts * unit).sum())

    def measure(self, kind: str) -> Callable[[Sequence[int]], int]:
        """The cost function a budget of ``kind`` ("params" or "macs") is counted in."""
        return {"params": self.params, "macs": self.macs}[kind]


def unit_params(layer: UnitLayer) -> int:
    """Parameters one unit of ``layer`` owns (all units of a layer own equally many)."""
    return sum(int(owned.parameter.numel()) for owned in layer.owned) // layer.units
