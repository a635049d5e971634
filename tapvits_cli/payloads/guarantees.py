"""Per-component privacy guarantees of a device mixture: the rules and the figures its parameters show.

Bounding the *average* number of samples per component is not enough: EM is free to
give one component a single private sample, and that component's mean then *is* the
sample's projected feature vector (a reconstruction target for anyone holding the
extractor), its variances collapse onto ``reg_covar``. So every component of a written
mixture must, on its own (protocol/gmm.md, "Per-component guarantees"):

* be supported by at least :func:`min_support` private samples, both in effective count
  (weight × n) and in samples whose most likely component it is;
* keep a variance, as the geometric mean over projected dimensions of its variance
  relative to the mixture's overall variance there, of at least :data:`MIN_VARIANCE_RATIO`:
  a component squeezed onto a few points sits at the regulariser in every dimension,
  while a legitimate tight class is narrow in some dimensions only (those that separate
  it from the others), so a per-dimension minimum would reject real fits;
* have its mean no closer to any private sample than :data:`MIN_DISTANCE_RATIO` times
  the private samples' median nearest-neighbour distance (all in the projected space):
  a mean that averages many samples sits among them, one that copies a sample sits on it.

The effective support and the variance rule can be checked from the file alone
(:func:`audit_parameters`: ``validate`` and every reader of a gmm artifact); the assigned
count and the distances need the private data, so only the device can check them
(``gmm.privacy.audit_against_data``: ``fit-gmm`` before writing, ``audit-gmm`` any time).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Legitimate components of the digits and Fashion-MNIST devices keep geometric-mean ratios
# of 0.06 or more (measured over K = 2-8, full and diag; their smallest single-dimension
# ratio went down to 1e-4); blobs 20 standard deviations apart give 0.0025; a component
# collapsed onto one sample sits near reg_covar, ~1e-6. The floor sits between the last two.
MIN_VARIANCE_RATIO = 0.001
# A mean copied from a sample lies ~1e-14 from it. Means of legitimate fits come close to a
# sample in few dimensions, where samples crowd round the centre: over 223 fits of the
# digits devices (4 covariance types, d = 5-16, 5 seeds) the smallest ratio was 0.19, the
# median 0.48. The floor sits well below that and far above a copy.
MIN_DISTANCE_RATIO = 0.1


def min_support(covariance_type: str, dim: int) -> int:
    """Fewest private samples each component must hold, for its covariance type in ``dim`` dims.

    ``full``: 2 (d + 1), since a d×d covariance from d or fewer samples is singular and
    hugs them, twice that keeps it away; ``tied``: d + 1, the covariance is pooled but
    every mean still needs a neighbourhood; ``diag`` and ``spherical``: 10, per-dimension
    variances from at least ten samples.
    """
    if covariance_type == "full":
        return 2 * (dim + 1)
    if covariance_type == "tied":
        return dim + 1
    if covariance_type in ("diag", "spherical"):
        return 10
    raise ValueError(f"unknown covariance type {covariance_type!r}")


def component_variances(mixture) -> np.ndarray:
    """(K, d) per-dimension variances of each component, whatever the covariance layout."""
    k, d, cov = mixture.components, mixture.dim, np.asarray(mixture.covariances)
    if mixture.covariance_type == "full":
        return np.diagonal(cov, axis1=1, axis2=2).copy()
    if mixture.covariance_type == "tied":
        return np.broadcast_to(np.diag(cov), (k, d)).copy()
    if mixture.covariance_type == "diag":
        return cov.copy()
    return np.repeat(cov[:, None], d, axis=1)


def overall_variance(mixture) -> np.ndarray:
    """(d,) variance of the whole mixture per dimension: Σₖ wₖ(σ²ₖ + μₖ²) − (Σₖ wₖμₖ)².

    For a maximum-likelihood fit this equals the private data's variance in the projected
    space (plus ``reg_covar``), so it serves as the data's own scale without the data.
    """
    weights = mixture.weights[:, None]
    centre = (weights * mixture.means).sum(axis=0)
    second = (weights * (component_variances(mixture) + mixture.means ** 2)).sum(axis=0)
    return np.maximum(second - centre ** 2, np.finfo(np.float64).tiny)


def variance_ratios(mixture) -> np.ndarray:
    """(K,) each component's variance relative to the mixture's: the geometric mean over dimensions."""
    return np.exp(np.log(component_variances(mixture) / overall_variance(mixture)).mean(axis=1))


@dataclass(frozen=True)
class ComponentAudit:
    """Per-component figures (arrays of length K); ``assigned``/``distance_ratio`` need the data."""

    weight: np.ndarray
    effective_support: np.ndarray          # weight × n
    variance_ratio: np.ndarray
    assigned: np.ndarray | None = None     # private samples whose most likely component it is
    distance_ratio: np.ndarray | None = None

    def violations(self, support: int) -> list[str]:
        """One readable line per broken guarantee, naming the component and its figure."""
        found = []
        for k in range(len(self.weight)):
            name = f"component {k}"
            if self.effective_support[k] < support:
                found.append(f"{name} has an effective support of {self.effective_support[k]:.1f} samples "
                             f"(weight {self.weight[k]:.4g}), below {support}")
            if self.assigned is not None and self.assigned[k] < support:
                found.append(f"{name} is the most likely component of {int(self.assigned[k])} samples, below {support}")
            if self.variance_ratio[k] < MIN_VARIANCE_RATIO:
                found.append(f"{name} has a variance {self.variance_ratio[k]:.2g} times the data's "
                             f"(geometric mean over dimensions), below {MIN_VARIANCE_RATIO}")
            if self.distance_ratio is not None and self.distance_ratio[k] < MIN_DISTANCE_RATIO:
                found.append(f"{name}'s mean lies {self.distance_ratio[k]:.3g} median neighbour distances from "
                             f"a private sample, below {MIN_DISTANCE_RATIO}")
        return found

    def rows(self) -> list[dict]:
        """JSON-ready per-component records (aggregate numbers only)."""
        out = []
        for k in range(len(self.weight)):
            row = {"component": k, "weight": float(self.weight[k]),
                   "effective_support": float(self.effective_support[k]),
                   "variance_ratio": float(self.variance_ratio[k])}
            if self.assigned is not None:
                row["assigned"] = int(self.assigned[k])
            if self.distance_ratio is not None:
                row["distance_ratio"] = float(self.distance_ratio[k])
            out.append(row)
        return out


def audit_parameters(mixture, samples: int) -> ComponentAudit:
    """What the file alone tells: weights, effective support and variance ratios."""
    weights = np.asarray(mixture.weights, dtype=np.float64)
    return ComponentAudit(weight=weights, effective_support=weights * samples, variance_ratio=variance_ratios(mixture))
