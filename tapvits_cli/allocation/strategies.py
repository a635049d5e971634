"""Budget allocation: ``kl``, ``uniform`` and ``global`` keep ratios, solved to the budget.

Every strategy is a family of continuous per-layer keep ratios r_l(ρ), non-decreasing in
one scalar ρ:

- ``kl`` (METHOD.md): per unit type t, π^t = softmax(τ·I^t) over the blocks' KL layer
  importances of that type, and r_l = π^t_l · L_t · ρ, so the ratios of each type average
  ρ before clipping. MLP and attention layers thus each follow their own importance and
  share one ρ.
- ``kl-power``: the same with π^t_l ∝ (KL_l)^τ, i.e. softmax(τ·log KL): only the KLs' ratios
  matter, not their unit. softmax(τ·KL) is nearly flat when KLs are small (0.004–0.22 nats
  for a width-48 ViT's attention, below 0.001 for its MLPs), so ``kl`` then allocates
  almost uniformly; ``kl-power`` gives a layer of 0.2 nats 50 times the share of one of
  0.004. A layer whose probe changed nothing (KL 0) gets its floor.
- ``uniform``: r_l = ρ.
- ``global``: every unit's score divided by the mean score of its unit type over the
  whole model (types become comparable, layers keep their relative level); the top
  ⌊ρ·N⌉ of all N units in that one ranking are kept, r_l is layer l's share.

Counts are c_l = round(r_l·U_l), capped at U_l and raised to the floor
⌈min_keep·U_l⌉ (at least 1). With ``allow_branch_removal`` a layer whose r_l·U_l is below
half its floor is removed entirely instead. ρ is found by bisection so the whole model's
cost (parameters or MACs, embeddings and head included) comes closest to the target.
Whole heads are coarse (a DeiT-Small head holds 0.45% of the model), so the rounding
residue is then redistributed over the finest units (MLP neurons), one at a time, to the
layers whose ratio was rounded down most (``kl``, ``uniform``) or whose next unit ranks
highest (``global``), while that brings the cost closer to the target. A result further
than ``tolerance`` (relative) from the target is an :class:`UnsatisfiableBudgetError`
naming the closest achievable value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from tapvits_cli.errors import UnsatisfiableBudgetError
from tapvits_cli.models.units import CostModel
from tapvits_cli.vocabulary import ALLOCATION_STRATEGIES, BUDGET_KINDS, LAYER_IMPORTANCE_STRATEGIES, UNIT_KINDS

_BISECTION_STEPS = 60


@dataclass(frozen=True)
class Allocation:
    keep: tuple[np.ndarray, ...]     # per cost-model layer: sorted kept unit indices (int64)
    counts: np.ndarray
    params: int
    macs: int
    base_params: int
    base_macs: int
    target: float                    # in the budget's measure

    def kept_units(self, cost: CostModel) -> dict[str, tuple[np.ndarray, ...]]:
        """:attr:`keep` in the one shape plans and pruning use: unit kind → per block, the kept indices."""
        blocks = 1 + max(layer.block for layer in cost.layers)
        by_kind = {kind: [np.zeros(0, dtype=np.int64)] * blocks for kind in UNIT_KINDS}
        for layer, kept in zip(cost.layers, self.keep):
            by_kind[layer.kind][layer.block] = kept
        return {kind: tuple(per_block) for kind, per_block in by_kind.items()}


class _Strategy:
    """Ratios r(ρ) per layer, the ρ range, and which layer gains/loses a unit first."""

    def __init__(self, ratios: Callable[[float], np.ndarray], rho_max: float, units: np.ndarray,
                 add_priority: Callable[[np.ndarray, float], np.ndarray] | None = None,
                 remove_priority: Callable[[np.ndarray, float], np.ndarray] | None = None) -> None:
        self.ratios, self.rho_max, self.units = ratios, rho_max, units
        self.add_priority = add_priority or (lambda counts, rho: self.ratios(rho) * units - counts)
        self.remove_priority = remove_priority or (lambda counts, rho: counts - self.ratios(rho) * units)


def _uniform(cost: CostModel, scores, importance, temperature) -> _Strategy:
    return _Strategy(lambda rho: np.full(len(cost.layers), rho), 1.0, cost.units)


def _shares_by_importance(cost: CostModel, importance, weigh: Callable[[np.ndarray], np.ndarray]) -> _Strategy:
    """r_l = π_l·L·ρ per unit type, π ∝ ``weigh``(the type's layer KLs); a type with no weight shares equally."""
    share = np.zeros(len(cost.layers))
    for kind in {layer.kind for layer in cost.layers}:
        members = [i for i, layer in enumerate(cost.layers) if layer.kind == kind]
        weights = weigh(np.array([importance[kind][cost.layers[i].block] for i in members], dtype=np.float64))
        share[members] = weights / weights.sum() * len(members) if weights.sum() > 0 else 1.0
    return _Strategy(lambda rho: share * rho, 1.0 / share[share > 0].min(), cost.units)


def _kl(cost: CostModel, scores, importance, temperature) -> _Strategy:
    return _shares_by_importance(cost, importance, lambda values: np.exp(temperature * (values - values.max())))


def _kl_power(cost: CostModel, scores, importance, temperature) -> _Strategy:
    return _shares_by_importance(cost, importance, lambda values: np.clip(values, 0.0, None) ** temperature)


def _global(cost: CostModel, scores, importance, temperature) -> _Strategy:
    kinds = [layer.kind for layer in cost.layers]
    means = {kind: np.concatenate([s for s, k in zip(scores, kinds) if k == kind]).mean() for kind in set(kinds)}
    normalised = [s / means[k] if means[k] > 0 else np.zeros_like(s) for s, k in zip(scores, kinds)]
    layer_of = np.concatenate([np.full(len(v), i) for i, v in enumerate(normalised)])
    flat = np.concatenate(normalised)
    ranking = layer_of[np.lexsort((np.arange(len(flat)), -flat))]   # layer of the k-th best unit
    descending = [np.sort(v)[::-1] for v in normalised]
    total = len(flat)

    def ratios(rho: float) -> np.ndarray:
        top = int(math.floor(rho * total + 0.5))
        return np.bincount(ranking[:top], minlength=len(normalised)) / cost.units

    def next_score(counts: np.ndarray, offset: int) -> np.ndarray:
        return np.array([d[c + offset] if 0 <= c + offset < len(d) else -np.inf for d, c in zip(descending, counts)])

    return _Strategy(ratios, 1.0, cost.units,
                     add_priority=lambda counts, rho: next_score(counts, 0),
                     remove_priority=lambda counts, rho: -next_score(counts, -1))


_RATIOS = {"kl": _kl, "kl-power": _kl_power, "uniform": _uniform, "global": _global}


def _counts(ratios: np.ndarray, units: np.ndarray, floors: np.ndarray, allow_branch_removal: bool) -> np.ndarray:
    wanted = ratios * units
    counts = np.minimum(np.floor(wanted + 0.5).astype(np.int64), units)
    below = counts < floors
    removed = below & allow_branch_removal & (wanted < floors / 2)
    counts[below] = floors[below]
    counts[removed] = 0
    return counts


def allocate(cost: CostModel, scores: Mapping[tuple[int, str], np.ndarray], importance: Mapping[str, np.ndarray] | None,
             budget_kind: str, budget: float, strategy: str = "kl", min_keep: float = 0.1,
             allow_branch_removal: bool = False, temperature: float = 1.1, tolerance: float = 0.005) -> Allocation:
    """Keep ``budget`` × the whole model's ``budget_kind`` ("params" or "macs"); see the module docstring."""
    if strategy not in ALLOCATION_STRATEGIES:
        raise ValueError(f"unknown strategy '{strategy}'; choose one of {', '.join(ALLOCATION_STRATEGIES)}")
    if budget_kind not in BUDGET_KINDS:
        raise ValueError(f"unknown budget kind '{budget_kind}'; choose one of {', '.join(BUDGET_KINDS)}")
    if strategy in LAYER_IMPORTANCE_STRATEGIES and importance is None:
        raise ValueError(f"the {strategy} strategy needs layer importance; score without --no-layer-importance")
    ordered = [np.asarray(scores[(layer.block, layer.kind)], dtype=np.float64) for layer in cost.layers]
    units = cost.units
    floors = np.maximum(1, np.ceil(min_keep * units - 1e-9)).astype(np.int64)
    chosen = _RATIOS[strategy](cost, ordered, importance, temperature)
    measure = cost.measure(budget_kind)
    target = budget * measure(units)

    def counts_at(rho: float) -> np.ndarray:
        return _counts(chosen.ratios(rho), units, floors, allow_branch_removal)

    low, high = 0.0, chosen.rho_max
    for _ in range(_BISECTION_STEPS):
        middle = (low + high) / 2
        low, high = (middle, high) if measure(counts_at(middle)) < target else (low, middle)
    rho = low if abs(measure(counts_at(low)) - target) <= abs(measure(counts_at(high)) - target) else high
    counts = _redistribute(counts_at(rho), rho, chosen, cost, measure, target, floors, budget_kind)
    achieved = measure(counts)
    if abs(achieved - target) > tolerance * target:
        full = measure(units)
        raise UnsatisfiableBudgetError(
            f"a {budget_kind} budget of {budget:g} ({target:,.0f}) cannot be met within {tolerance:.1%} with the "
            f"{strategy} strategy: the closest achievable is {achieved:,} ({achieved / full:.4f} of the model); "
            f"try that budget, a lower --min-keep or another strategy")
    keep = tuple(np.sort(np.lexsort((np.arange(len(s)), -s))[:c]).astype(np.int64) for s, c in zip(ordered, counts))
    return Allocation(keep=keep, counts=counts, params=cost.params(counts), macs=cost.macs(counts),
                      base_params=cost.params(units), base_macs=cost.macs(units), target=target)


def _redistribute(counts: np.ndarray, rho: float, strategy: _Strategy, cost: CostModel,
                  measure: Callable[[np.ndarray], int], target: float, floors: np.ndarray, budget_kind: str) -> np.ndarray:
    """Move the rounding residue onto the finest units, one at a time, while it gets closer to the target."""
    step = np.array([layer.unit_params if budget_kind == "params" else layer.unit_macs for layer in cost.layers])
    finest_kind = min({layer.kind for layer in cost.layers},
                      key=lambda kind: max(s for s, layer in zip(step, cost.layers) if layer.kind == kind))
    fine = np.array([layer.kind == finest_kind for layer in cost.layers])
    counts = counts.copy()
    while True:
        gap = target - measure(counts)
        if gap > 0:
            open_ = fine & (counts > 0) & (counts < cost.units)
            priority = np.where(open_, strategy.add_priority(counts, rho), -np.inf)
            direction = 1
        else:
            open_ = fine & (counts > floors)
            priority = np.where(open_, strategy.remove_priority(counts, rho), -np.inf)
            direction = -1
        if not open_.any():
            return counts
        layer = int(np.argmax(priority))
        if step[layer] >= 2 * abs(gap):
            return counts
        counts[layer] += direction
