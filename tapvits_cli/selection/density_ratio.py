"""The density-ratio score: the device's mixture against a mixture of the public pool.

Top-k by the device GMM's likelihood favours the densest, tightest regions of feature
space: a device class whose public images sit close together wins the whole set, and a
broad class gets nothing. Dividing by the density of the public pool itself,

    r(x) = log p_device(x) − log p_public(x),

cancels that: in a region of one of the device's classes both densities are high or low
together, so r is about log(π_device / π_public) of the class whatever its tightness,
while public images of classes the device does not hold have a low p_device and a high
p_public. p_public is a Gaussian mixture the cloud fits on a seeded sample of the pool,
in the device mixture's own projection (the same standardisation and PCA axes), so both
densities are over the same variable and the projection's Jacobian cancels. Nothing
here sees a private sample: the cloud has the device's mixture and its own pool.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

from tapvits_cli.errors import UsageError
from tapvits_cli.payloads.mixture import Mixture

SAMPLE_STREAM = 7   # default_rng([seed, 7]) draws the pool rows the public mixture is fitted on


@dataclass(frozen=True)
class PublicMixture:
    mixture: Mixture         # in the device mixture's projection
    samples: int             # pool rows it was fitted on
    fit_seconds: float
    converged: bool

    def describe(self) -> dict:
        return {"components": self.mixture.components, "covariance_type": self.mixture.covariance_type,
                "samples": self.samples, "fit_seconds": round(self.fit_seconds, 3), "converged": self.converged}


def sample_positions(pool_size: int, sample: int, seed: int) -> np.ndarray:
    """Sorted pool positions of a seeded uniform sample of ``min(sample, pool_size)`` rows."""
    if sample < 1:
        raise UsageError(f"the public sample must hold at least one row, got {sample}")
    if sample >= pool_size:
        return np.arange(pool_size, dtype=np.int64)
    return np.sort(np.random.default_rng([seed, SAMPLE_STREAM]).choice(pool_size, sample, replace=False))


def rows_at(chunks: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
            positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of the rows at sorted ``positions`` of a ``(ids, features, labels)`` chunk stream."""
    features_picked, labels_picked, seen = [], [], 0
    for _, features, labels in chunks:
        inside = positions[(positions >= seen) & (positions < seen + len(features))] - seen
        features_picked.append(np.asarray(features)[inside])
        labels_picked.append(np.asarray(labels)[inside])
        seen += len(features)
    if seen <= positions[-1]:
        raise ValueError(f"the pool streamed {seen} rows, fewer than position {int(positions[-1])} needs")
    return np.concatenate(features_picked), np.concatenate(labels_picked)


def _per_component_minimum(covariance_type: str, dim: int) -> int:
    """Rows one public component needs on average to estimate its covariance well."""
    return {"full": 2 * (dim + 1), "tied": dim + 1}.get(covariance_type, 10)


def fit_public_mixture(features: np.ndarray, device: Mixture, components: int, seed: int = 0,
                       covariance_type: str | None = None, reg_covar: float = 1e-6,
                       max_iter: int = 100) -> PublicMixture:
    """A ``components``-component mixture of public ``features`` in ``device``'s projection.

    The covariance type is the device mixture's unless given. K is lowered to what the
    sample supports (see :func:`_per_component_minimum`); at least one component.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture
    from threadpoolctl import threadpool_limits

    if components < 1:
        raise UsageError(f"the public mixture needs at least one component, got {components}")
    covariance_type = covariance_type or device.covariance_type
    started = time.perf_counter()
    with threadpool_limits(limits=1):   # d×d algebra: threaded BLAS only spins (see gmm.fit)
        projected = device.projection.apply(features)
        k = max(1, min(components, len(projected) // _per_component_minimum(covariance_type, device.dim)))
        model = GaussianMixture(n_components=k, covariance_type=covariance_type, reg_covar=reg_covar,
                                max_iter=max_iter, random_state=seed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            model.fit(projected)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    mixture = Mixture(model.weights_, model.means_, model.covariances_, covariance_type, device.projection)
    return PublicMixture(mixture, len(projected), time.perf_counter() - started, converged)


def score_ratio_in_chunks(device: Mixture, public: Mixture, chunks: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
                          on_progress: Callable[[int], None] | None = None,
                          ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Score ``(ids, features, labels)`` chunks: yields ``(ids, loglik, component, labels, ratio)``.

    ``loglik`` and ``component`` are the device mixture's (as ``gmm.score_in_chunks``);
    ``ratio`` = loglik − the public mixture's log density; −inf (last) where either density
    is not finite, so a row beyond both mixtures' reach never tops the ranking.
    """
    for ids, features, labels in chunks:
        loglik, component = device.log_likelihood(features)
        public_loglik, _ = public.log_likelihood(features)
        finite = np.isfinite(loglik) & np.isfinite(public_loglik)
        ratio = np.where(finite, np.where(finite, loglik, 0.0) - np.where(finite, public_loglik, 0.0), -np.inf)
        yield ids, loglik, component, labels, ratio
        if on_progress is not None:
            on_progress(len(ids))
