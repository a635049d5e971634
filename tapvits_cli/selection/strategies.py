"""Selection strategies over a scored pool, streamed chunk by chunk in bounded memory.

A selection is one ordered list of pool positions whose first ``metric_size`` entries
are the metric set and whose first ``finetune_size`` entries (all of them) are the
fine-tuning set, so the metric set is always inside the fine-tuning set. Within each of
the two parts, rows are ordered by decreasing log-likelihood, ties by pool position.

Each row is ranked by a *score*: its log-likelihood under the device's mixture, or for
the ratio strategies (``ratio``, ``ratio-stratified``, ``class-prior``) the density ratio log p_device(x) − log p_public(x) against a
mixture the cloud fitted on the public pool (:mod:`.density_ratio`), which stops dense
public regions from winning by density alone.

* ``topk`` (the paper): the highest log-likelihood.
* ``stratified``: a quota per mixture component in proportion to its weight
  (:func:`proportional_quotas`), the most likely samples inside each component, so one
  broad component cannot swallow the whole set; the metric set has quotas too.
* ``ratio``: the highest density ratio.
* ``ratio-stratified``: the quotas of ``stratified``, filled inside each component by
  density ratio.
* ``class-prior``: a quota per *class* of the labelled pool in proportion to the device's
  estimated class shares (:mod:`.class_prior`), filled inside each class by density ratio,
  so classes that merely look like the device's get no quota; the metric set has quotas too.
  A *class floor* spreads a share of the fine-tuning set over every pool class in the pool's
  proportions: a mixture fitted on a few hundred images blurs a class holding 2-3 % of them,
  its estimated share falls to zero, and without a floor fine-tuning never sees it.
  (Filled by log-likelihood instead, each class gave only its most typical images: on
  non-IID devices of many classes fine-tuning on them lost 3-7 points on some devices.)
* ``random``: a seeded uniform sample; the ablation floor.

A pool is never held whole: :class:`StreamingSelection` keeps a running best
``finetune_size`` rows (per component for the stratified strategies), merged with each
chunk by partial partitioning, so memory is bounded by one chunk plus K × ``finetune_size``
rows (K strata: components or classes) and the result equals a full sort of the pool
(exact ties included).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np

from tapvits_cli.errors import UsageError
from tapvits_cli.vocabulary import QUOTA_STRATEGIES, RATIO_STRATEGIES, SELECTION_STRATEGIES



@dataclass(frozen=True)
class Selection:
    """Selected rows in selection order, with any per-row columns the caller streamed in."""

    positions: np.ndarray        # int64 positions in the pool's stream order
    log_likelihood: np.ndarray   # float64
    component: np.ndarray        # int32
    columns: Mapping[str, np.ndarray]
    metric_size: int
    finetune_size: int
    strategy: str
    score: np.ndarray | None = None  # float64 ranking score of the ratio strategies (the density ratio)


def proportional_quotas(weights, total: int, available) -> np.ndarray:
    """Split ``total`` into integer quotas proportional to ``weights``, capped by ``available``.

    Water-filling: a component whose proportional share exceeds what it has gets all it
    has, and the shortfall is shared among the others in proportion to their weights,
    until no share exceeds its cap; shares are then rounded by largest remainder (ties
    to the lower index). The quotas sum to ``total`` exactly.
    """
    weights = np.asarray(weights, dtype=np.float64)
    available = np.asarray(available, dtype=np.int64)
    if total > available.sum():
        raise ValueError(f"cannot take {total} from {int(available.sum())} available")
    share = np.zeros(len(weights))
    capped = available <= 0
    while True:
        open_ = ~capped
        if not open_.any():
            break
        w = np.where(open_, weights, 0.0)
        if w.sum() <= 0:  # only weightless components have room left: share evenly
            w = open_.astype(np.float64)
        share[open_] = (total - available[capped].sum()) * w[open_] / w.sum()
        over = open_ & (share >= available)
        if not over.any():
            break
        share[over] = available[over]
        capped |= over
    quotas = np.minimum(np.floor(share + 1e-9).astype(np.int64), available)
    missing = int(total - quotas.sum())
    if missing > 0:
        order = np.lexsort((np.arange(len(share)), -(share - quotas)))
        order = order[quotas[order] < available[order]][:missing]
        quotas[order] += 1
    return quotas


def _order(score: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Indices sorting rows by decreasing score, ties by increasing position."""
    return np.lexsort((positions, -score))


def _best(score: np.ndarray, positions: np.ndarray, limit: int) -> np.ndarray:
    """Indices of the ``limit`` highest-scoring rows (ties: lower position) without a full sort."""
    if len(score) <= limit:
        return np.arange(len(score))
    threshold = np.partition(score, len(score) - limit)[len(score) - limit]
    above = np.flatnonzero(score > threshold)
    tied = np.flatnonzero(score == threshold)
    tied = tied[np.argsort(positions[tied], kind="stable")[: limit - len(above)]]
    return np.concatenate([above, tied])


class StreamingSelection:
    """Feed scored chunks in pool order with :meth:`update`, then take :meth:`result`."""

    def __init__(self, strategy: str, pool_size: int, metric_size: int, finetune_size: int,
                 mixture_weights, seed: int = 0, class_shares=None, class_floor: float = 0.0) -> None:
        if strategy not in SELECTION_STRATEGIES:
            raise UsageError(f"unknown selection strategy '{strategy}'; choose one of {', '.join(SELECTION_STRATEGIES)}")
        if not 1 <= metric_size <= finetune_size:
            raise UsageError(f"the metric set ({metric_size}) must hold at least one sample and no more than "
                             f"the fine-tuning set ({finetune_size}) it is part of")
        if finetune_size > pool_size:
            raise UsageError(f"the pool has {pool_size:,} samples, fewer than the fine-tuning set of "
                             f"{finetune_size:,}: use a larger pool or --finetune-size {pool_size} or less")
        self.strategy, self.pool_size = strategy, pool_size
        self.metric_size, self.finetune_size = metric_size, finetune_size
        self.weights = np.asarray(mixture_weights, dtype=np.float64)
        if (strategy == "class-prior") != (class_shares is not None):
            raise ValueError("class shares go with the class-prior strategy, and only with it")
        if not 0.0 <= class_floor < 1.0:
            raise UsageError(f"the class floor is a share of the fine-tuning set in [0, 1), got {class_floor}")
        if class_floor and strategy != "class-prior":
            raise UsageError("a class floor spreads part of the fine-tuning set over the pool's classes: "
                             "it needs the class-prior strategy")
        self.class_floor = class_floor
        # quotas are per stratum: a mixture component, or for class-prior a pool class
        self.stratum_weights = self.weights if class_shares is None else np.asarray(class_shares, dtype=np.float64)
        self._seen = 0
        self._counts = np.zeros(len(self.stratum_weights), dtype=np.int64)
        self._kept: dict[str, np.ndarray] | None = None
        if strategy == "random":
            # Floyd's sampling inside numpy for small fractions: O(finetune_size) memory.
            draw = np.random.default_rng([seed, 4]).choice(pool_size, finetune_size, replace=False)
            self._chosen = np.sort(draw)
            self._draw_rank = np.empty(finetune_size, dtype=np.int64)
            self._draw_rank[np.searchsorted(self._chosen, draw)] = np.arange(finetune_size)

    def update(self, loglik: np.ndarray, component: np.ndarray, score: np.ndarray | None = None,
               **columns: np.ndarray) -> None:
        """Add the next chunk's log-likelihoods, components, ranking ``score`` (the ratio
        strategies need it; the others rank by log-likelihood) and equally long ``columns``
        such as ids, labels."""
        n = len(loglik)
        loglik = np.where(np.isnan(loglik), -np.inf, np.asarray(loglik, dtype=np.float64))
        component = np.asarray(component, dtype=np.int32)
        if self.strategy in RATIO_STRATEGIES:
            if score is None:
                raise ValueError(f"strategy '{self.strategy}' ranks by a density ratio: pass score")
            score = np.asarray(score, dtype=np.float64)
            score = np.where(np.isnan(score), -np.inf, score)
        else:
            score = loglik
        if len(component) != n or len(score) != n or any(len(v) != n for v in columns.values()):
            raise ValueError("every array of a chunk must have the same length")
        if n and (component.min() < 0 or component.max() >= len(self.weights)):
            raise ValueError(f"components must lie in 0..{len(self.weights) - 1}")
        stratum = component
        if self.strategy == "class-prior":
            stratum = np.asarray(columns.get("labels", np.zeros(0)), dtype=np.int64)
            if len(stratum) != n or (n and (stratum.min() < 0 or stratum.max() >= len(self.stratum_weights))):
                raise ValueError(f"the class-prior strategy needs labels in 0..{len(self.stratum_weights) - 1}")
        positions = np.arange(self._seen, self._seen + n, dtype=np.int64)
        self._seen += n
        if self._seen > self.pool_size:
            raise ValueError(f"the pool streamed more than the announced {self.pool_size} rows")
        self._counts += np.bincount(stratum, minlength=len(self.stratum_weights))
        chunk = {"position": positions, "loglik": loglik, "score": score, "component": component,
                 "stratum": stratum, **columns}
        if self.strategy == "random":
            spot = np.searchsorted(self._chosen, positions).clip(max=len(self._chosen) - 1)
            chunk = {k: v[self._chosen[spot] == positions] for k, v in chunk.items()}
        rows = chunk if self._kept is None else {k: np.concatenate([self._kept[k], chunk[k]]) for k in chunk}
        if self.strategy in ("topk", "ratio"):
            rows = {k: v[_best(rows["score"], rows["position"], self.finetune_size)] for k, v in rows.items()}
        elif self.strategy in QUOTA_STRATEGIES:
            keep = [members[_best(rows["score"][members], rows["position"][members], self.finetune_size)]
                    for members in (np.flatnonzero(rows["stratum"] == c) for c in range(len(self.stratum_weights)))]
            rows = {k: v[np.concatenate(keep)] for k, v in rows.items()}
        self._kept = rows

    def _finetune_weights(self) -> np.ndarray:
        """The strata's shares of the fine-tuning set: the class floor's share spread over the pool's
        classes as the pool holds them, the rest by the device's estimated shares (the metric set
        keeps the estimated shares alone)."""
        if not self.class_floor:
            return self.stratum_weights
        estimated = self.stratum_weights / self.stratum_weights.sum()
        return (1.0 - self.class_floor) * estimated + self.class_floor * self._counts / self._counts.sum()

    def result(self) -> Selection:
        if self._seen != self.pool_size:
            raise ValueError(f"the pool streamed {self._seen} rows, {self.pool_size} were announced")
        rows = self._kept
        if self.strategy in ("topk", "ratio"):
            in_metric = np.zeros(len(rows["score"]), dtype=bool)
            in_metric[_best(rows["score"], rows["position"], self.metric_size)] = True
            in_finetune = np.ones_like(in_metric)
        elif self.strategy == "random":
            rank = self._draw_rank[np.searchsorted(self._chosen, rows["position"])]
            in_metric, in_finetune = rank < self.metric_size, np.ones(len(rank), dtype=bool)
        else:
            finetune_quota = proportional_quotas(self._finetune_weights(), self.finetune_size, self._counts)
            metric_quota = proportional_quotas(self.stratum_weights, self.metric_size, finetune_quota)
            order = np.lexsort((rows["position"], -rows["score"], rows["stratum"]))
            sorted_stratum = rows["stratum"][order]
            first = np.searchsorted(sorted_stratum, sorted_stratum)
            rank = np.empty(len(order), dtype=np.int64)
            rank[order] = np.arange(len(order)) - first
            in_finetune = rank < finetune_quota[rows["stratum"]]
            in_metric = rank < metric_quota[rows["stratum"]]
        metric = np.flatnonzero(in_metric)
        rest = np.flatnonzero(in_finetune & ~in_metric)
        order = np.concatenate([metric[_order(rows["loglik"][metric], rows["position"][metric])],
                                rest[_order(rows["loglik"][rest], rows["position"][rest])]])
        rows = {k: v[order] for k, v in rows.items()}
        columns = {k: v for k, v in rows.items() if k not in ("position", "loglik", "score", "component", "stratum")}
        return Selection(positions=rows["position"], log_likelihood=rows["loglik"], component=rows["component"],
                         columns=columns, metric_size=self.metric_size, finetune_size=self.finetune_size,
                         strategy=self.strategy,
                         score=rows["score"] if self.strategy in RATIO_STRATEGIES else None)


def select_from_scores(scored_chunks: Iterable[tuple[np.ndarray, ...]], pool_size: int, mixture_weights,
                       metric_size: int, finetune_size: int, strategy: str = "topk", seed: int = 0,
                       class_shares=None, class_floor: float = 0.0) -> Selection:
    """Select from ``(ids, loglik, component, labels)`` chunks (what ``gmm.score_in_chunks`` yields),
    or ``(ids, loglik, component, labels, score)`` chunks (``density_ratio.score_ratio_in_chunks``);
    ``class_shares`` are the class-prior strategy's estimated shares of the pool's classes, and
    ``class_floor`` the share of the fine-tuning set it spreads over all of them in the pool's proportions."""
    selection = StreamingSelection(strategy, pool_size, metric_size, finetune_size, mixture_weights, seed,
                                   class_shares, class_floor)
    for ids, loglik, component, labels, *score in scored_chunks:
        selection.update(loglik, component, score[0] if score else None, ids=np.asarray(ids, dtype=np.int64),
                         labels=np.asarray(labels, dtype=np.int64))
    return selection.result()


def select(loglik, component, mixture_weights, metric_size: int, finetune_size: int,
           strategy: str = "topk", seed: int = 0, chunk_rows: int | None = None, score=None,
           labels=None, class_shares=None, class_floor: float = 0.0) -> np.ndarray:
    """Ordered pool positions for in-memory scores: the first ``metric_size`` are the metric set.

    ``score`` is the ranking score of the ratio strategies (e.g. a density ratio), ``labels``
    and ``class_shares`` the pool's labels and the device's class shares of the class-prior
    strategy (``class_floor`` its share of the fine-tuning set spread over the pool's classes);
    ``chunk_rows`` streams the arrays in chunks of that size (the result is the same).
    """
    loglik, component = np.asarray(loglik), np.asarray(component)
    score = None if score is None else np.asarray(score)
    columns = {} if labels is None else {"labels": np.asarray(labels, dtype=np.int64)}
    selection = StreamingSelection(strategy, len(loglik), metric_size, finetune_size, mixture_weights, seed,
                                   class_shares, class_floor)
    step = chunk_rows or max(1, len(loglik))
    for start in range(0, len(loglik), step):
        part = slice(start, start + step)
        selection.update(loglik[part], component[part], None if score is None else score[part],
                         **{name: column[part] for name, column in columns.items()})
    return selection.result().positions
