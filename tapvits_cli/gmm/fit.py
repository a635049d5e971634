"""Fitting the device's mixture: projection, BIC search over K, refusal rules, optional noise.

The refusal rules exist for privacy as much as for statistics (protocol/gmm.md):

* before fitting, a fit is refused, or a K dropped, when the samples cannot support it
  on average: at least ``min_samples`` samples in total (default 50), a projection
  dimension d below the sample count and at most the feature dimension D, and
  ``n / K`` at least :func:`~tapvits_cli.payloads.guarantees.min_support` for the covariance type;
* after fitting, a K is rejected when any one component breaks the per-component
  guarantees of :mod:`tapvits_cli.payloads.guarantees` (support, variance floor, distance of
  its mean to the nearest private sample): averages say nothing about the smallest
  component, and EM readily puts one component on a single sample.

Infeasible and rejected K are reported in ``FitResult.dropped``; the lowest BIC among
the K that pass wins, and when none passes the fit is refused with what would work.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np

from tapvits_cli.errors import ParameterError, UsageError
from tapvits_cli.gmm.privacy import audit_against_data, median_neighbour_distance
from tapvits_cli.payloads.guarantees import component_variances, min_support
from tapvits_cli.payloads.mixture import Mixture, Projection
from tapvits_cli.vocabulary import COVARIANCE_TYPES

DEFAULT_MIN_SAMPLES = 50
DEFAULT_COMPONENTS = range(2, 11)
DEFAULT_PCA_DIM = 32
# The default projection keeps at most one dimension per this many private samples. With
# d = 32 on 54-74 samples the mixture remembered who was in the fit (membership AUC
# 0.64-0.81 on the quickstart's digits devices); at n // 12 it is 0.49-0.59 with the same
# selection precision (measured, README "Privacy").
SAMPLES_PER_DIM = 12


def default_pca_dim(samples: int, feature_dim: int) -> int | None:
    """The projection dimension when none is asked for; ``None`` (no PCA) when it would keep every axis."""
    dim = max(1, min(DEFAULT_PCA_DIM, samples // SAMPLES_PER_DIM))
    return None if dim >= feature_dim else dim


@dataclass(frozen=True)
class FitResult:
    mixture: Mixture
    bic_per_k: dict[int, float]           # every K that was fitted
    chosen_k: int                         # the one with the lowest BIC
    fit_seconds: float                    # projection + all mixture fits
    samples: int
    dropped: dict[int, str] = field(default_factory=dict)  # K → why it was not tried or was rejected
    converged: bool = True                # whether EM converged for the chosen K


def fit_projection(features: np.ndarray, pca_dim: int | None, standardize: bool, seed: int) -> Projection:
    """Centre, optionally scale to unit variance, optionally keep the top ``pca_dim`` PCA axes.

    A constant feature keeps scale 1 rather than dividing by zero. Features with no spread
    at all (a broken extractor, one repeated image) leave PCA's explained-variance ratio
    0/0: its warning is silenced, and the fit refuses such data with one line of its own.
    """
    x = np.asarray(features, dtype=np.float64)
    mean = x.mean(axis=0)
    scale = x.std(axis=0) if standardize else np.ones(x.shape[1])
    scale = np.where(scale > 0, scale, 1.0)
    if pca_dim is None:
        return Projection(mean, scale)
    from sklearn.decomposition import PCA

    with np.errstate(divide="ignore", invalid="ignore"):
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
        raise ParameterError(f"{samples} samples are fewer than the floor of {min_samples} ({{min_samples}}): a "
                             "mixture fitted to so few would describe individual private images; collect more samples")
    dim = feature_dim if pca_dim is None else pca_dim
    if pca_dim is not None and not 1 <= pca_dim <= feature_dim:
        raise ParameterError(f"{{pca_dim}} {pca_dim} must lie in 1..{feature_dim} (the feature dimension)")
    if pca_dim is not None and pca_dim >= samples:
        raise ParameterError(f"{{pca_dim}} {pca_dim} needs more than {pca_dim} samples, got {samples}: "
                             f"use {{pca_dim}} < {samples}")
    need = min_support(covariance_type, dim)
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
        raise ParameterError(f"{{noise_scale}} must be >= 0, got {noise_scale}")
    samples, feature_dim = features.shape
    feasible, dropped = check_feasible(samples, feature_dim, components, covariance_type, pca_dim, min_samples)

    start = time.perf_counter()
    fits, bic = {}, {}
    # EM works on d×d matrices: too small for threaded BLAS, whose spinning threads made
    # the BIC search 10-100x slower on a busy 2-core machine (measured).
    with threadpool_limits(limits=1):
        projection = fit_projection(features, pca_dim, standardize, seed)
        projected = projection.apply(features)
        try:
            neighbour_distance = median_neighbour_distance(projected, seed)
        except ValueError as exc:
            raise UsageError(f"cannot fit a private mixture: {exc}") from None
        support = min_support(covariance_type, projection.dim)
        for k in feasible:
            model = GaussianMixture(n_components=k, covariance_type=covariance_type, reg_covar=reg_covar,
                                    max_iter=max_iter, n_init=n_init, random_state=seed)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                model.fit(projected)
            mixture = Mixture(model.weights_, model.means_, model.covariances_, covariance_type, projection)
            violations = audit_against_data(mixture, samples, projected, neighbour_distance).violations(support)
            if violations:
                dropped[k] = f"rejected after fitting: {violations[0]}" + (
                    f" (and {len(violations) - 1} more)" if len(violations) > 1 else "")
                continue
            fits[k] = mixture, not any(issubclass(w.category, ConvergenceWarning) for w in caught)
            bic[k] = float(model.bic(projected))
        if not fits:
            raise UsageError(_refusal_after_fitting(samples, covariance_type, projection.dim, feasible, dropped))
        chosen = min(bic, key=lambda k: (bic[k], k))
        mixture, converged = fits[chosen]
        if noise_scale > 0:
            mixture = add_mean_noise(mixture, noise_scale, seed)
            violations = audit_against_data(mixture, samples, projected, neighbour_distance).violations(support)
            if violations:
                raise ParameterError(f"{{noise_scale}} {noise_scale} moved a mean onto private samples: "
                                     f"{violations[0]}; use another {{seed}} or a smaller {{noise_scale}}")
    return FitResult(mixture=mixture, bic_per_k=bic, chosen_k=chosen, fit_seconds=time.perf_counter() - start,
                     samples=samples, dropped=dict(sorted(dropped.items())), converged=converged)


def _refusal_after_fitting(samples: int, covariance_type: str, dim: int, tried: Sequence[int],
                           dropped: dict[int, str]) -> str:
    """The one-line refusal when every fitted K broke a per-component guarantee."""
    smallest = min(tried)
    hints = [f"--components 1-{smallest}" if smallest > 1 else None,
             "--covariance diag" if covariance_type in ("full", "tied") else None,
             f"--pca-dim {max(1, dim // 2)}" if dim > 1 else None, "more private samples"]
    hints = [h for h in hints if h]
    return (f"every mixture fitted to the {samples} private samples (K={', '.join(map(str, tried))}, "
            f"{covariance_type} covariance in {dim} dims) breaks a per-component privacy guarantee, e.g. "
            f"K={smallest}: {dropped[smallest].removeprefix('rejected after fitting: ')}; "
            f"try {', '.join(hints[:-1])} or {hints[-1]}")


def add_mean_noise(mixture: Mixture, noise_scale: float, seed: int) -> Mixture:
    """Shift each mean by N(0, (s·σ_k)²) per dimension; a fresh, seeded generator."""
    rng = np.random.default_rng([seed, 3])
    noise = rng.standard_normal(mixture.means.shape) * noise_scale * np.sqrt(component_variances(mixture))
    return replace(mixture, means=mixture.means + noise)
