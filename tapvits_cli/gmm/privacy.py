"""The per-component privacy audit against the private data, and the membership-inference figure.

The guarantees themselves, and what a mixture's parameters alone show of them, are
:mod:`tapvits_cli.payloads.guarantees` (every gmm reader checks those). What needs the
private samples is here, so only the device computes it (``fit-gmm`` before writing,
``audit-gmm`` any time): how many samples each component is the most likely one for,
and how close its mean comes to a private sample. The audit adds a membership-inference
figure: how well the mixture's log-likelihood tells the samples it was fitted on from
held-out samples of the same device (ROC AUC; 0.5 means it learned nothing about who
was in the fit).
"""

from __future__ import annotations

import numpy as np

from tapvits_cli.payloads.guarantees import ComponentAudit, audit_parameters

# Nearest-neighbour distances are estimated on at most this many private samples.
NEIGHBOUR_SAMPLE = 4096


def median_neighbour_distance(projected: np.ndarray, seed: int = 0) -> float:
    """Median distance from a private sample to its nearest other sample (projected space).

    Exact duplicates are skipped (a distance of 0 says nothing about spread); with more
    than :data:`NEIGHBOUR_SAMPLE` samples, that many seeded queries estimate the median.
    """
    from sklearn.neighbors import NearestNeighbors

    unique = np.unique(projected, axis=0)
    if len(unique) < 2:
        raise ValueError("all private samples have the same features: no spread to compare distances with")
    queries = unique
    if len(unique) > NEIGHBOUR_SAMPLE:
        queries = unique[np.random.default_rng(seed).choice(len(unique), NEIGHBOUR_SAMPLE, replace=False)]
    distances, _ = NearestNeighbors(n_neighbors=2).fit(unique).kneighbors(queries)
    return float(np.median(distances[:, 1]))


def distance_ratios(means: np.ndarray, projected: np.ndarray, neighbour_distance: float) -> np.ndarray:
    """(K,) distance from each mean to its nearest private sample, in median neighbour distances."""
    from sklearn.neighbors import NearestNeighbors

    nearest, _ = NearestNeighbors(n_neighbors=1).fit(projected).kneighbors(means)
    return nearest[:, 0] / neighbour_distance


def membership_auc(fitted_loglik: np.ndarray, held_out_loglik: np.ndarray) -> float:
    """ROC AUC of the log-likelihood at telling fitted samples (positives) from held-out ones."""
    from sklearn.metrics import roc_auc_score

    truth = np.concatenate([np.ones(len(fitted_loglik)), np.zeros(len(held_out_loglik))])
    return float(roc_auc_score(truth, np.concatenate([fitted_loglik, held_out_loglik])))


def audit_against_data(mixture, samples: int, projected: np.ndarray, neighbour_distance: float) -> ComponentAudit:
    """The full per-component audit against the private samples, given in the projected space.

    ``neighbour_distance`` is :func:`median_neighbour_distance` of ``projected``, passed in
    so that a search over K computes it once.
    """
    from dataclasses import replace

    assigned = np.bincount(mixture.estimator.predict(projected), minlength=mixture.components)
    return replace(audit_parameters(mixture, samples), assigned=assigned,
                   distance_ratio=distance_ratios(mixture.means, projected, neighbour_distance))
