"""A differentially private device mixture: bounded features, private projection, DP-EM.

The mechanism, end to end, on n private feature vectors (protocol/gmm.md, "Differential
privacy"); neighbouring datasets differ by *replacing* one sample, so n is public (the
artifact records it):

1. Every feature vector is scaled to unit L2 norm (a per-sample map, no privacy cost),
   which bounds each sample's contribution without looking at the data.
2. Private projection: the mean and the second-moment matrix of the unit vectors are
   released with Gaussian noise (the symmetric noise matrix of "Analyze Gauss", Dwork,
   Talwar, Thakurta & Zhang, STOC 2014); the top d eigenvectors of the noisy covariance
   are the PCA axes. Projected samples are clipped to the norm R = min(1 + ‖mean‖,
   3 √(Σ λ̂)) (λ̂ the released eigenvalues): computed from released values only, so the
   bound holds whatever they are, and usually far tighter than the sure 1 + ‖mean‖.
3. DP-EM (Park, Foulds, Chaudhuri & Welling, "DP-EM: Differentially Private Expectation
   Maximization", AISTATS 2017): from a data-independent start, each iteration releases
   the per-component sufficient statistics — soft counts Σᵢ rᵢₖ, sums Σᵢ rᵢₖzᵢ and second
   moments Σᵢ rᵢₖzᵢzᵢᵀ (their diagonal for ``diag``) — with Gaussian noise, and the
   M-step is computed from the noisy statistics only.
4. Accounting in zero-concentrated DP (Bun & Steinke, "Concentrated Differential
   Privacy: Simplifications, Extensions, and Lower Bounds", TCC 2016): a Gaussian
   mechanism of L2 sensitivity Δ and noise σ is Δ²/(2σ²)-zCDP, zCDP composes by
   addition, and ρ-zCDP implies (ρ + 2√(ρ ln(1/δ)), δ)-DP. The (ε, δ) asked for is turned
   into the total ρ, split as :data:`BUDGET_SHARES` says (:mod:`tapvits_cli.payloads.zcdp`).

L2 sensitivities under replacement of one sample (rᵢ is a probability vector, ‖zᵢ‖ ≤ R):
sum of unit vectors 2; second-moment matrix √2 (‖uuᵀ − vvᵀ‖_F ≤ √2 for unit u, v);
soft counts √2; per-component sums 2R; per-component second moments 2R².
Everything after the noisy releases (eigenvectors, M-step, flooring variances, dropping
components too small to keep) is post-processing and costs nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tapvits_cli.errors import NotImplementedStageError, ParameterError, UsageError
from tapvits_cli.gmm.fit import default_pca_dim
from tapvits_cli.payloads.mixture import Mixture, Projection, unit_rows
from tapvits_cli.payloads.zcdp import epsilon_for, gaussian_sigma, rho_for
from tapvits_cli.vocabulary import DP_COVARIANCE_TYPES, DP_DEFAULT_DIM, DP_DEFAULT_ITERATIONS

DEFAULT_DELTA = 1e-5
# Share of ρ per release: the projection's mean and second moment, then EM, split evenly
# over its iterations and, within one, over counts, sums and second moments.
BUDGET_SHARES = {"projection_mean": 0.05, "projection_second_moment": 0.15, "em": 0.80}
# Projected samples are clipped to this many times their root-mean-square radius, as the
# noisy eigenvalues give it, when that is tighter than the sure bound 1 + ‖mean‖: the sure
# bound is loose when the features share a direction, and noise grows with R².
CLIP_RMS_MULTIPLE = 3.0
# Component variances are floored at this fraction of the noisy data variance (post-processing),
# which keeps every written component well above the variance guarantee of payloads.guarantees.
VARIANCE_FLOOR = 0.05


def default_private_dim(samples: int, feature_dim: int) -> int:
    """The private fit's projection dimension when none is asked for.

    The non-private rule (:func:`tapvits_cli.gmm.fit.default_pca_dim`, one dimension per
    12 samples, at most 32) capped at :data:`DP_DEFAULT_DIM` and at the feature dimension:
    every release's noise grows with d, so fewer dimensions than a plain fit would use.
    """
    return min(DP_DEFAULT_DIM, default_pca_dim(samples, feature_dim) or feature_dim)


@dataclass(frozen=True)
class PrivateFit:
    mixture: Mixture
    rho: float                   # total zCDP budget spent
    epsilon: float               # (ε, δ) that it implies
    delta: float
    iterations: int
    clip_norm: float             # R: projected samples were clipped to this norm
    dropped_components: int      # components removed for too little (noisy) support
    sigmas: dict[str, float]     # noise standard deviation of every kind of release

    def record(self) -> dict:
        """The ``dp`` entry of ``gmm.privacy``: what was spent and how."""
        return {"epsilon": self.epsilon, "delta": self.delta, "rho": self.rho, "accounting": "zCDP",
                "neighbouring": "replace-one", "iterations": self.iterations, "clip_norm": self.clip_norm,
                "feature_norm": "unit L2", "projection": "private", "budget_shares": dict(BUDGET_SHARES),
                "sigmas": dict(self.sigmas), "dropped_components": self.dropped_components}


def _symmetric_noise(dim: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """A symmetric matrix whose upper triangle (diagonal included) is i.i.d. N(0, σ²)."""
    upper = np.triu(rng.normal(scale=sigma, size=(dim, dim)))
    return upper + np.triu(upper, 1).T


def private_projection(unit: np.ndarray, dim: int, rho_mean: float, rho_second: float,
                       rng: np.random.Generator) -> tuple[Projection, np.ndarray, dict[str, float]]:
    """PCA axes and mean from noisy releases: ``(projection, eigenvalues (d,), sigmas)``."""
    n, feature_dim = unit.shape
    sigma_mean = gaussian_sigma(2.0, rho_mean)
    sigma_second = gaussian_sigma(math.sqrt(2.0), rho_second)
    mean = (unit.sum(axis=0) + rng.normal(scale=sigma_mean, size=feature_dim)) / n
    second = (unit.T @ unit + _symmetric_noise(feature_dim, sigma_second, rng)) / n
    values, vectors = np.linalg.eigh(second - np.outer(mean, mean))
    order = np.argsort(values)[::-1][:dim]
    eigenvalues = np.maximum(values[order], 1e-12)
    # An eigenvector's sign is LAPACK's choice and differs between CPUs; the simplex start is laid
    # along these axes, so they take PCA's convention (largest entry positive), as the plain fit's
    # scikit-learn PCA does, for one result on every machine.
    from sklearn.utils.extmath import svd_flip

    _, axes = svd_flip(np.empty((0, len(order))), vectors[:, order].T, u_based_decision=False)
    projection = Projection(mean=mean, scale=np.ones(feature_dim),
                            components=np.ascontiguousarray(axes), unit_norm=True)
    return projection, eigenvalues, {"projection_mean": sigma_mean, "projection_second_moment": sigma_second}


def _clip_rows(x: np.ndarray, radius: float) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x * np.minimum(1.0, radius / np.maximum(norms, np.finfo(np.float64).tiny))


def _m_step(counts, sums, seconds, covariance_type: str, radius: float, floor: np.ndarray):
    """Mixture parameters from (noisy) sufficient statistics, repaired into a valid mixture."""
    counts = np.maximum(counts, 1.0)
    weights = counts / counts.sum()
    means = _clip_rows(sums / counts[:, None], radius)
    if covariance_type == "diag":
        variances = seconds / counts[:, None] - means ** 2
        return weights, means, np.maximum(variances, floor)
    covariances = seconds / counts[:, None, None] - means[:, :, None] * means[:, None, :]
    covariances = (covariances + np.swapaxes(covariances, 1, 2)) / 2
    values, vectors = np.linalg.eigh(covariances)
    values = np.maximum(values, floor.min())
    return weights, means, (vectors * values[:, None, :]) @ np.swapaxes(vectors, 1, 2)


def simplex_start(k: int, eigenvalues: np.ndarray) -> np.ndarray:
    """(K, d) initial means: a centred regular simplex in the top K−1 axes, scaled by √λ.

    Axes beyond d are dropped (the vertices then overlap in projection but stay distinct
    while K − 1 <= d); a single component starts at the centre.
    """
    dim = len(eigenvalues)
    vertices = np.eye(k) - 1.0 / k                       # centred simplex in R^K, rank K−1
    basis = np.linalg.svd(vertices, full_matrices=False)[2][: k - 1]  # its (K−1)-dim span
    coordinates = vertices @ basis.T                      # (K, K−1), all at the same distance from 0
    if k > 1:
        coordinates /= np.linalg.norm(coordinates, axis=1, keepdims=True)
    means = np.zeros((k, dim))
    used = min(k - 1, dim)
    means[:, :used] = coordinates[:, :used] * np.sqrt(eigenvalues[:used])
    return means


def fit_private_mixture(features: np.ndarray, k: int, covariance_type: str, dim: int, epsilon: float,
                        delta: float = DEFAULT_DELTA, iterations: int = DP_DEFAULT_ITERATIONS, seed: int = 0,
                        min_component_support: int = 1) -> PrivateFit:
    """Fit a K-component mixture with (ε, δ)-differential privacy for every private sample.

    ``features`` is (n, D). Components whose noisy count ends below
    ``min_component_support`` are dropped and the weights renormalised (post-processing).
    The noise comes from ``default_rng([seed, 7])``: the same seed gives the same file,
    which is what reproducibility needs; a device wanting unpredictable noise picks a
    secret seed.
    """
    if covariance_type not in DP_COVARIANCE_TYPES:
        raise NotImplementedStageError(
            f"--dp-epsilon supports --covariance {' or '.join(DP_COVARIANCE_TYPES)}, not {covariance_type}")
    if iterations < 1:
        raise ParameterError(f"{{dp_iterations}} must be >= 1, got {iterations}")
    features = np.asarray(features, dtype=np.float64)
    n, feature_dim = features.shape
    if not 1 <= dim <= feature_dim:
        raise ParameterError(f"{{pca_dim}} {dim} must lie in 1..{feature_dim} (the feature dimension)")
    rho = rho_for(epsilon, delta)
    rng = np.random.default_rng([seed, 7])
    unit = unit_rows(features)

    projection, eigenvalues, sigmas = private_projection(
        unit, dim, rho * BUDGET_SHARES["projection_mean"], rho * BUDGET_SHARES["projection_second_moment"], rng)
    radius = min(1.0 + float(np.linalg.norm(projection.mean)), CLIP_RMS_MULTIPLE * math.sqrt(eigenvalues.sum()))
    z = _clip_rows(projection.apply(features), radius)

    rho_release = rho * BUDGET_SHARES["em"] / (3 * iterations)
    sigma_count = gaussian_sigma(math.sqrt(2.0), rho_release)
    sigma_sum = gaussian_sigma(2 * radius, rho_release)
    sigma_second = gaussian_sigma(2 * radius ** 2, rho_release)
    sigmas.update(em_counts=sigma_count, em_sums=sigma_sum, em_second_moments=sigma_second)
    floor = VARIANCE_FLOOR * eigenvalues

    # A start that looks at no private sample, only at released values: the means at the
    # vertices of a regular simplex laid along the top noisy principal axes (spread over
    # the directions that carry the most variance, where separated groups differ), each
    # with 1/K of the noisy variance (the full variance makes every component cover all). Random starts, which EM on plain data survives by restarts
    # that here would each cost budget, left clusters merged (measured).
    weights = np.full(k, 1.0 / k)
    means = simplex_start(k, eigenvalues)
    covariances = (np.tile(eigenvalues / k, (k, 1)) if covariance_type == "diag"
                   else np.tile(np.diag(eigenvalues / k), (k, 1, 1)))
    for _ in range(iterations):
        responsibilities = Mixture(weights, means, covariances, covariance_type, projection).estimator.predict_proba(z)
        counts = responsibilities.sum(axis=0) + rng.normal(scale=sigma_count, size=k)
        sums = responsibilities.T @ z + rng.normal(scale=sigma_sum, size=(k, dim))
        if covariance_type == "diag":
            seconds = responsibilities.T @ (z ** 2) + rng.normal(scale=sigma_second, size=(k, dim))
        else:
            seconds = np.einsum("ik,id,ie->kde", responsibilities, z, z)
            seconds += np.stack([_symmetric_noise(dim, sigma_second, rng) for _ in range(k)])
        weights, means, covariances = _m_step(counts, sums, seconds, covariance_type, radius, floor)

    keep = weights * n >= min_component_support
    if not keep.any():
        raise UsageError(f"no component of the private mixture keeps {min_component_support} samples' support "
                         f"after the noise of --dp-epsilon {epsilon}: use fewer --components, a larger "
                         f"--dp-epsilon or more private samples")
    weights = weights[keep] / weights[keep].sum()
    mixture = Mixture(weights, means[keep], covariances[keep], covariance_type, projection)
    return PrivateFit(mixture=mixture, rho=rho, epsilon=epsilon_for(rho, delta), delta=delta, iterations=iterations,
                      clip_norm=radius, dropped_components=int((~keep).sum()), sigmas=sigmas)
