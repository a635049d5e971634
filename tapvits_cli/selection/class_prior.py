"""The device's class shares, estimated from its mixture and the labelled public pool.

Selection by likelihood alone (top-k, or quotas per mixture component) takes public
images that *look like* the device's, and on a dataset whose classes overlap in feature
space a fifth of them can belong to classes the device never sees (shirts for a device
of pullovers and dresses); fine-tuning on them teaches the pruned model to predict those
classes. The cloud's pool is labelled, so it can ask instead *which classes* the device
holds and in what shares, and give each class its quota.

The device's feature distribution is modelled as a mixture of the pool's class-conditional
densities with unknown shares π, p_device(x) ≈ Σ_c π_c p(x | c), and π is its maximum-
likelihood estimate by EM over draws from the device's own mixture (the device's data is
never seen; its GMM stands in for it). Class densities are Gaussians in the device
mixture's projection, fitted on a seeded sample of the pool, each covariance shrunk
towards the pooled one so that a class with few sampled rows stays well conditioned. This
is the prior-adjustment EM of Saerens et al. (2002) with the device GMM's draws as the
unlabelled data. Shares under :data:`MIN_CLASS_SHARE` (or a tenth of a uniform share, for
pools of more than 10 classes) are set to zero: at that level an estimate is as likely to
be overlap between classes as a class the device holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tapvits_cli.errors import UsageError
from tapvits_cli.payloads.mixture import Mixture

MIN_CLASS_SHARE = 0.01   # estimated shares below this (or below 0.1 / classes) get no quota
DRAW_STREAM = 11         # default_rng([seed, 11]) draws the samples of the device mixture
EM_TOLERANCE = 1e-7      # stop when no share moves by more than this
EM_MAX_ITERATIONS = 1000


@dataclass(frozen=True)
class ClassPrior:
    """Estimated class shares of a device (zero for classes under :data:`MIN_CLASS_SHARE`)."""

    shares: np.ndarray       # (classes,) float64, sums to 1
    draws: int               # samples of the device mixture the EM ran on
    pool_rows: int           # labelled pool rows the class densities were fitted on
    iterations: int
    converged: bool

    def describe(self) -> dict:
        held = np.flatnonzero(self.shares)
        return {"shares": [round(float(s), 6) for s in self.shares], "classes_held": int(len(held)),
                "draws": self.draws, "pool_rows": self.pool_rows, "iterations": self.iterations,
                "converged": self.converged}


def sample_mixture(mixture: Mixture, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` draws from ``mixture`` in its projected space, for any covariance type."""
    per_component = rng.multinomial(count, np.asarray(mixture.weights, dtype=np.float64) / np.sum(mixture.weights))
    component = np.repeat(np.arange(mixture.components), per_component)
    noise = rng.standard_normal((count, mixture.dim))
    covariances = np.asarray(mixture.covariances, dtype=np.float64)
    means = np.asarray(mixture.means, dtype=np.float64)[component]
    if mixture.covariance_type == "full":
        return means + np.einsum("nij,nj->ni", np.linalg.cholesky(covariances)[component], noise)
    if mixture.covariance_type == "tied":
        return means + noise @ np.linalg.cholesky(covariances).T
    if mixture.covariance_type == "diag":
        return means + noise * np.sqrt(covariances[component])
    return means + noise * np.sqrt(covariances[component])[:, None]   # spherical


def class_gaussians(projected: np.ndarray, labels: np.ndarray, classes: int,
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-class means, Cholesky factors and log-determinants of the covariances, and row counts.

    Each class covariance is (n_c·S_c + m·S) / (n_c + m), S the pooled within-class
    covariance and m = dim + 1 rows' worth of weight. A class without rows gets a NaN mean.
    """
    dim = projected.shape[1]
    counts = np.bincount(labels, minlength=classes).astype(np.float64)
    sums = np.zeros((classes, dim))
    np.add.at(sums, labels, projected)
    means = np.divide(sums, counts[:, None], out=np.full((classes, dim), np.nan), where=counts[:, None] > 0)
    centred = projected - means[labels]
    scatter = np.zeros((classes, dim, dim))
    for label in np.flatnonzero(counts):   # one d×d product per class: memory stays O(rows·d)
        rows = centred[labels == label]
        scatter[label] = rows.T @ rows
    pooled = scatter.sum(0) / max(1.0, counts.sum() - np.count_nonzero(counts)) + 1e-6 * np.eye(dim)
    weight = dim + 1.0
    covariances = (scatter + weight * pooled) / (counts + weight)[:, None, None]
    cholesky = np.linalg.cholesky(covariances)
    log_determinants = 2.0 * np.log(np.diagonal(cholesky, axis1=1, axis2=2)).sum(1)
    return means, cholesky, log_determinants, counts


def class_log_densities(points: np.ndarray, means: np.ndarray, cholesky: np.ndarray,
                        log_determinants: np.ndarray) -> np.ndarray:
    """(points, classes) Gaussian log densities; −inf for a class without rows."""
    from scipy.linalg import solve_triangular

    out = np.full((len(points), len(means)), -np.inf)
    constant = points.shape[1] * np.log(2 * np.pi)
    for label in np.flatnonzero(~np.isnan(means[:, 0])):   # one (n, d) solve per class: memory stays O(n·d)
        solved = solve_triangular(cholesky[label], (points - means[label]).T, lower=True)
        out[:, label] = -0.5 * ((solved ** 2).sum(0) + log_determinants[label] + constant)
    return out


def estimate_class_prior(device: Mixture, features: np.ndarray, labels: np.ndarray, classes: int,
                         draws: int = 20000, seed: int = 0) -> ClassPrior:
    """The device's class shares from its mixture and labelled pool rows (``features`` unprojected)."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0 or labels.min() < 0 or labels.max() >= classes:
        raise UsageError(f"the class-prior strategy needs a labelled pool (labels 0..{classes - 1})")
    if draws < 1:
        raise UsageError(f"the class prior needs at least one draw of the device mixture, got {draws}")
    means, cholesky, log_determinants, _ = class_gaussians(device.projection.apply(features), labels, classes)
    points = sample_mixture(device, draws, np.random.default_rng([seed, DRAW_STREAM]))
    log_density = class_log_densities(points, means, cholesky, log_determinants)
    present = np.isfinite(log_density).any(0)
    shares = present / present.sum()
    converged, iteration = False, 0
    for iteration in range(1, EM_MAX_ITERATIONS + 1):
        with np.errstate(divide="ignore"):
            joint = log_density + np.log(shares)
        joint -= joint.max(1, keepdims=True)
        responsibility = np.exp(joint)
        responsibility /= responsibility.sum(1, keepdims=True)
        updated = responsibility.mean(0)
        moved = float(np.abs(updated - shares).max())
        shares = updated
        if moved < EM_TOLERANCE:
            converged = True
            break
    shares = np.where(shares >= min(MIN_CLASS_SHARE, 0.1 / classes), shares, 0.0)
    return ClassPrior(shares / shares.sum(), draws, len(labels), iteration, converged)
