"""A fitted Gaussian mixture in an extractor's feature space, and fast scoring with it.

The device fits the mixture in a projected space (standardised, optionally PCA-reduced
features); the cloud must score public features through the *same* map, so the
:class:`Projection` is part of the :class:`Mixture`. Densities are computed by
scikit-learn itself: the mixture is rebuilt as a fitted ``GaussianMixture`` from its
parameters, so tapvits never re-implements the Gaussian algebra.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Iterable, Iterator

import numpy as np

SCORING_BLOCK_ROWS = 4096
RANGE_CHECK_VECTORS = 16   # unit vectors Mixture.check_range scores besides e0: those projected farthest


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Each row divided by its L2 norm (a zero row stays zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.finfo(np.float64).tiny)


@dataclass(frozen=True, eq=False)
class Projection:
    """Feature map applied before the mixture: ``((x - mean) / scale) @ components.T``.

    ``scale`` is all ones when standardisation is off; ``components`` (d, D) holds the PCA
    axes, or is ``None`` for the identity (then d = D). With ``unit_norm`` every feature
    vector is first divided by its L2 norm: the differentially private fit needs features
    of bounded norm, and a bound chosen without looking at the private data can only be
    had this way.
    """

    mean: np.ndarray
    scale: np.ndarray
    components: np.ndarray | None = None
    unit_norm: bool = False

    @property
    def feature_dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def dim(self) -> int:
        return self.feature_dim if self.components is None else int(self.components.shape[0])

    @cached_property
    def _affine(self) -> tuple[np.ndarray, np.ndarray]:
        """The map folded into x·A + b (A: (D, d)), or x ⊙ a + b without PCA: one pass per chunk."""
        if self.components is None:
            return 1.0 / self.scale, -self.mean / self.scale
        matrix = (self.components / self.scale).T
        return matrix, -(self.mean @ matrix)

    def unit_vectors(self, indices: np.ndarray) -> np.ndarray:
        """``apply`` of the unit feature vectors e_i for i in ``indices``, without building them: with PCA
        each is a row of the folded matrix plus the offset; without, the offset with one entry moved."""
        linear, offset = self._affine
        indices = np.asarray(indices, dtype=np.int64)
        if linear.ndim == 2:
            return linear[indices] + offset
        rows = np.tile(offset, (len(indices), 1))
        rows[np.arange(len(indices)), indices] += linear[indices]
        return rows

    def unit_vector_reach(self) -> np.ndarray:
        """For each unit feature vector e_i, the largest absolute entry of its projection (D values,
        computed without a D × D matrix: without PCA, e_i's projection is the offset with entry i moved)."""
        linear, offset = self._affine
        if linear.ndim == 2:
            return np.abs(linear + offset).max(axis=1)
        others = np.abs(offset)
        largest = int(others.argmax())
        beside = np.full(len(offset), others[largest])   # the largest |offset| entry other than i ...
        beside[largest] = np.delete(others, largest).max(initial=0.0)   # ... for i at that entry, the next one
        return np.maximum(np.abs(linear + offset), beside)

    def apply(self, features: np.ndarray) -> np.ndarray:
        """(n, D) features of any float dtype → (n, d) float64."""
        features = np.asarray(features)
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(f"expected features of shape (n, {self.feature_dim}), got {features.shape}")
        linear, offset = self._affine
        x = features.astype(np.float64, copy=False)
        if self.unit_norm:
            x = unit_rows(x)
        projected = x @ linear if linear.ndim == 2 else x * linear
        projected += offset
        return projected


@dataclass(frozen=True, eq=False)
class Mixture:
    """Mixture parameters in scikit-learn's layout for ``covariance_type``.

    ``covariances``: full (K, d, d), tied (d, d), diag (K, d), spherical (K,).
    """

    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray
    covariance_type: str
    projection: Projection

    @property
    def components(self) -> int:
        return int(self.weights.shape[0])

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    @property
    def feature_dim(self) -> int:
        return self.projection.feature_dim

    @cached_property
    def precisions_cholesky(self) -> np.ndarray:
        """Cholesky factors of the precisions, computed by scikit-learn's own routine.

        Raises ``ValueError`` when a covariance is not positive definite.
        """
        from sklearn.mixture._gaussian_mixture import _compute_precision_cholesky

        return _compute_precision_cholesky(np.asarray(self.covariances, dtype=np.float64), self.covariance_type)

    @cached_property
    def estimator(self):
        """A fitted ``sklearn.mixture.GaussianMixture`` carrying exactly these parameters."""
        from sklearn.mixture import GaussianMixture

        model = GaussianMixture(n_components=self.components, covariance_type=self.covariance_type)
        model.weights_ = np.asarray(self.weights, dtype=np.float64)
        model.means_ = np.asarray(self.means, dtype=np.float64)
        model.covariances_ = np.asarray(self.covariances, dtype=np.float64)
        chol = model.precisions_cholesky_ = self.precisions_cholesky
        diagonal = self.covariance_type in ("diag", "spherical")
        model.precisions_ = chol ** 2 if diagonal else chol @ np.swapaxes(chol, -1, -2)
        model.converged_, model.n_iter_, model.lower_bound_ = True, 0, -np.inf
        model.n_features_in_ = self.dim
        return model

    def check_range(self) -> None:
        """``ValueError`` unless densities can be computed: finite values can still overflow.

        A mixture read from a file may hold means of 1e200 or a projection scale of 1e-310:
        each value is finite, yet the projection or the squared distances overflow, every
        log-likelihood comes out −inf or NaN, and a selection made from them would look
        valid. So the projection is folded, every unit vector of the feature space (valid
        with ``unit_norm`` too) is projected, and e0 and the :data:`RANGE_CHECK_VECTORS`
        projected farthest are scored, all with floating-point overflow raised, not
        ignored: one column of 1e200 among sane ones overflows here as it would on real
        features. Scoring all D vectors cost seconds per read of a large mixture without
        PCA; these few bound the cost by a small multiple of the file's own size. (What
        still overflows on real features, ``select`` refuses: a selection ranked by
        densities that overflowed.)
        """
        try:
            with np.errstate(over="raise", invalid="raise", divide="ignore"):   # log of a zero weight is −inf, fine
                linear, offset = self.projection._affine
                reach = self.projection.unit_vector_reach()
                farthest = np.argsort(-reach, kind="stable")[:RANGE_CHECK_VECTORS]
                loglik = self.estimator.score_samples(self.projection.unit_vectors(np.union1d([0], farthest)))
            usable = all(np.isfinite(values).all() for values in (linear, offset, reach, loglik))
        except FloatingPointError:
            usable = False
        if not usable:
            raise ValueError("its values are out of range: the projection or the densities overflow")

    def log_likelihood(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-sample log density (in the projected space) and most likely component.

        Both come from one pass of scikit-learn's weighted log-probabilities (calling
        ``score_samples`` and ``predict`` would compute them twice). Rows go through in
        blocks of :data:`SCORING_BLOCK_ROWS`, small enough for the CPU cache, each with
        single-threaded BLAS, the blocks spread over the CPU's cores: on 2 cores this was
        2-4x less CPU time than one threaded pass (measured), since d×d products are
        too small for BLAS threads. Results do not depend on the number of workers.
        """
        from concurrent.futures import ThreadPoolExecutor

        from threadpoolctl import threadpool_limits

        features = np.asarray(features)
        loglik = np.empty(len(features), dtype=np.float64)
        component = np.empty(len(features), dtype=np.int32)
        estimator = self.estimator

        def score_block(start: int) -> None:
            block = slice(start, start + SCORING_BLOCK_ROWS)
            weighted = estimator._estimate_weighted_log_prob(self.projection.apply(features[block]))
            best = weighted.argmax(axis=1)
            top = np.take_along_axis(weighted, best[:, None], axis=1)
            with np.errstate(under="ignore", invalid="ignore"):
                loglik[block] = top[:, 0] + np.log(np.exp(weighted - top).sum(axis=1))
            component[block] = best

        starts = range(0, len(features), SCORING_BLOCK_ROWS)
        workers = min(len(starts), _scoring_workers())
        with threadpool_limits(limits=1):
            if workers > 1:
                with ThreadPoolExecutor(workers) as pool:
                    list(pool.map(score_block, starts))
            else:
                for start in starts:
                    score_block(start)
        return loglik, component


def _scoring_workers() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def score_in_chunks(mixture: Mixture, chunks: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
                    on_progress: Callable[[int], None] | None = None,
                    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Score a stream of ``(ids, features, labels)`` chunks: yields ``(ids, loglik, component, labels)``.

    Only one chunk is in memory at a time, so a pool of any size scores in bounded memory.
    """
    for ids, features, labels in chunks:
        loglik, component = mixture.log_likelihood(features)
        yield ids, loglik, component, labels
        if on_progress is not None:
            on_progress(len(ids))
