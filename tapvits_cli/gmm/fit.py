"""Fitting the device's mixture: projection, BIC search over K, refusal rule, optional noise.

The refusal rule exists for privacy as much as for statistics. A component that owns
fewer samples than its covariance has degrees of freedom collapses onto those samples:
its mean and covariance then describe a handful of private images almost exactly. So a
fit is refused, or a K dropped, before that can happen (protocol/gmm.md, "Refusal rule"):

* at least ``min_samples`` samples in total (default 50);
* the projection dimension d must be below the sample count and at most the feature
  dimension D;
* a K is feasible only if ``n / K`` reaches the per-component minimum of its covariance
  type: ``2 (d + 1)`` for ``full`` (a d×d covariance from fewer than d + 1 samples is
  singular; twice that keeps it well away from the samples), ``d + 1`` for ``tied`` (the
  covariance is pooled, but each mean still needs to sit among enough samples), and 10
  for ``diag`` and ``spherical`` (per-dimension variances from at least ten samples).

Infeasible K are dropped from the search (reported in ``FitResult.dropped``); when none
is left the fit is refused with a message naming what would work.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np

from tapvits_cli.errors import UsageError
from tapvits_cli.gmm.mixture import COVARIANCE_TYPES, Mixture, Projection

DEFAULT_MIN_SAMPLES = 50
DEFAULT_COMPONENTS = range(2, 11)


def min_samples_per_component(covariance_type: str, dim: int) -> int:
    """Fewest samples one component may own on average (see the module docstring)."""
    if covariance_type == "full":
        return 2 * (dim + 1)
    if covariance_type == "tied":
        return dim + 1
    if covariance_type in ("diag", "spherical"):
        return 10
    raise ValueError(f"unknown covariance type {covariance_type!r}")


@dataclass(frozen=True)
class FitResult:
    mixture: Mixture
    bic_per_k: dict[int, float]           # every K that was fitted
    chosen_k: int                         # the one with the lowest BIC
    fit_seconds: float                    # projection + all mixture fits
    samples: int
    dropped: dict[int, str] = field(default_factory=dict)  # K → why it was not tried
    converged: bool = True                # whether EM converged for the chosen K


def fit_projection(features: np.ndarray, pca_dim: int | None, standardize: bool, seed: int) -> Projection:
    """Centre, optionally scale to unit variance, optionally keep the top ``pca_dim`` PCA axes.

    A constant feature keeps scale 1 rather than dividing by zero.
    """
    x = np.asarray(features, dtype=np.float64)
    mean = x.mean(axis=0)
    scale = x.std(axis=0) if standardize else np.ones(x.shape[1])
    scale = np.where(scale > 0, scale, 1.0)
    if pca_dim is None:
        return Projection(mean, scale)
    from sklearn.decomposition import PCA

    pca = PCA(n_components=pca_dim, svd_solver="full", random_state=seed).fit((x - mean) / scale)
    return Projection(mean, scale, np.ascontiguousarray(pca.components_, dtype=np.float64))


def check_feasible(samples: int, feature_dim: int, components: Sequence[int], covariance_type: str,
                   pca_dim: int | None, min_samples: int = DEFAULT_MIN_SAMPLES) -> tuple[list[int], dict[int, str]]:
    """Apply the refusal rule: ``(feasible K, {dropped K: reason})``, or raise UsageError."""
    if covariance_type not in COVARIANCE_TYPES:
        raise UsageError(f"unknown covariance type '{covariance_type}'; choose one of {', '.join(COVARIANCE_TYPES)}")
    if not components or min(components) < 1:
        raise UsageError("the component range must hold at least one K >= 1")
    if samples < min_samples:
        raise UsageError(f"{samples} samples are fewer than the floor of {min_samples} (--min-samples): "
                         f"a mixture fitted to so few would describe individual private images; collect more samples")
    dim = feature_dim if pca_dim is None else pca_dim
    if pca_dim is not None and not 1 <= pca_dim <= feature_dim:
        raise UsageError(f"--pca-dim {pca_dim} must lie in 1..{feature_dim} (the feature dimension)")
    if pca_dim is not None and pca_dim >= samples:
        raise UsageError(f"--pca-dim {pca_dim} needs more than {pca_dim} samples, got {samples}: use --pca-dim < {samples}")
    need = min_samples_per_component(covariance_type, dim)
    feasible = [k for k in sorted(set(components)) if samples >= k * need]
    dropped = {k: f"needs {k * need} samples ({need} per component for {covariance_type} covariance in "
                  f"{dim} dims), has {samples}" for k in sorted(set(components)) if k not in feasible}
    if feasible:
        return feasible, dropped
    smallest = min(components)
    hints = []
    if covariance_type in ("full", "tied"):
        largest_dim = samples // smallest // (2 if covariance_type == "full" else 1) - 1
        if largest_dim >= 1:
            hints.append(f"--pca-dim {min(largest_dim, samples - 1)} or less")
    if covariance_type != "diag" and samples >= smallest * 10:
        hints.append("--covariance diag")
    if smallest > 1 and samples >= need:
        hints.append(f"--components {'1' if samples < 2 * need else f'1-{samples // need}'}")
    hints.append(f"at least {smallest * need} samples")
    advice = ", ".join(hints[:-1]) + f" or {hints[-1]}" if len(hints) > 1 else hints[0]
    raise UsageError(
        f"{samples} samples are too few for a {covariance_type}-covariance mixture in d={dim} dims: "
        f"K={smallest} needs {need} samples per component ({smallest * need} in all), or its components "
        f"would collapse onto individual samples; use {advice}"
    )


def fit_mixture(features: np.ndarray, components: Sequence[int] = DEFAULT_COMPONENTS,
                covariance_type: str = "full", pca_dim: int | None = 32, standardize: bool = True,
                reg_covar: float = 1e-6, seed: int = 0, max_iter: int = 100, n_init: int = 1,
                min_samples: int = DEFAULT_MIN_SAMPLES, noise_scale: float = 0.0) -> FitResult:
    """Fit one ``GaussianMixture`` per feasible K on projected features; keep the lowest BIC.

    ``features`` is (n, D). Ties in BIC go to the smaller K. With ``noise_scale`` s > 0,
    each component mean moves by Gaussian noise of standard deviation s·sqrt(diag Σ_k)
    after the fit (seeded by ``seed``): privacy hardening that blurs where the private
    samples sit at a cost in fidelity proportional to s.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture
    from threadpoolctl import threadpool_limits

    features = np.asarray(features)
    if features.ndim != 2:
        raise ValueError(f"features must be (n, D), got shape {features.shape}")
    if not np.isfinite(features).all():
        raise UsageError("the extracted features contain NaN or infinite values; check the extractor and the data")
    if noise_scale < 0:
        raise UsageError(f"--noise-scale must be >= 0, got {noise_scale}")
    samples, feature_dim = features.shape
    feasible, dropped = check_feasible(samples, feature_dim, components, covariance_type, pca_dim, min_samples)

    start = time.perf_counter()
    fits, bic = {}, {}
    # EM works on d×d matrices: too small for threaded BLAS, whose spinning threads made
    # the BIC search 10-100x slower on a busy 2-core machine (measured).
    with threadpool_limits(limits=1):
        projection = fit_projection(features, pca_dim, standardize, seed)
        projected = projection.apply(features)
        for k in feasible:
            model = GaussianMixture(n_components=k, covariance_type=covariance_type, reg_covar=reg_covar,
                                    max_iter=max_iter, n_init=n_init, random_state=seed)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                model.fit(projected)
            fits[k] = model, not any(issubclass(w.category, ConvergenceWarning) for w in caught)
            bic[k] = float(model.bic(projected))
    chosen = min(bic, key=lambda k: (bic[k], k))
    model, converged = fits[chosen]
    mixture = Mixture(model.weights_, model.means_, model.covariances_, covariance_type, projection)
    if noise_scale > 0:
        mixture = add_mean_noise(mixture, noise_scale, seed)
    return FitResult(mixture=mixture, bic_per_k=bic, chosen_k=chosen, fit_seconds=time.perf_counter() - start,
                     samples=samples, dropped=dropped, converged=converged)


def component_variances(mixture: Mixture) -> np.ndarray:
    """(K, d) per-dimension variances of each component, whatever the covariance layout."""
    k, d, cov = mixture.components, mixture.dim, np.asarray(mixture.covariances)
    if mixture.covariance_type == "full":
        return np.diagonal(cov, axis1=1, axis2=2).copy()
    if mixture.covariance_type == "tied":
        return np.broadcast_to(np.diag(cov), (k, d)).copy()
    if mixture.covariance_type == "diag":
        return cov.copy()
    return np.repeat(cov[:, None], d, axis=1)


def add_mean_noise(mixture: Mixture, noise_scale: float, seed: int) -> Mixture:
    """Shift each mean by N(0, (s·σ_k)²) per dimension; a fresh, seeded generator."""
    rng = np.random.default_rng([seed, 3])
    noise = rng.standard_normal(mixture.means.shape) * noise_scale * np.sqrt(component_variances(mixture))
    return replace(mixture, means=mixture.means + noise)
