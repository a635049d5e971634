"""The composite criterion of METHOD.md: activity, redundancy, task relevance, combined per layer.

Choices (also in protocol/scores.md):

- **Redundancy** R_j is the Gaussian mutual information between unit j and each other unit
  of its layer, averaged over the others, estimated from the channel correlation matrix
  over all (sample, token) observations (token-level co-activation is what makes two
  units interchangeable). For a neuron, I(i; j) = −½·log(1 − ρ²); for a head (head_dim
  channels) the same Gaussian formula for vectors, ½·(log det C_ii + log det C_jj −
  log det C_[ij]), which reduces to the former for one channel. The correlation matrix
  is shrunk towards the identity by ``SHRINKAGE`` so copies give a large, finite value.
- **Task relevance** T_j is HSIC between the unit's per-sample representation (its
  outputs averaged over tokens: a scalar per neuron, a head_dim vector per head) and the
  softmax outputs: RBF kernel with the median-heuristic bandwidth on the unit, linear
  kernel on the probabilities, both centred, biased estimator tr(K H L H)/(b − 1)².
  It is averaged over HSIC mini-batches: the samples, in metric-set order, split into
  ⌈S / hsic_batch⌉ consecutive groups of near-equal size, a partition that does not depend
  on the forward batch size. All units of a layer are one batched (units × b × b) product.
- **Composite** I_j = α·n(A_j) + β·(1 − n(R_j)) + γ·n(T_j), n = min-max within the layer
  (a constant component normalises to 0).
"""

from __future__ import annotations

import math
import numpy as np
import torch

from tapvits_cli.importance.statistics import LayerStatistics

SHRINKAGE = 1e-3


def redundancy(correlation: torch.Tensor, units: int, channels: int) -> torch.Tensor:
    """Mean Gaussian MI of each unit with every other unit of its layer: (units,)."""
    if units < 2:
        return torch.zeros(units, dtype=torch.float64, device=correlation.device)
    eye = torch.eye(correlation.shape[0], dtype=correlation.dtype, device=correlation.device)
    shrunk = (1 - SHRINKAGE) * correlation + SHRINKAGE * eye
    if channels == 1:
        pairwise = -0.5 * torch.log1p(-shrunk.square())
    else:
        blocks = shrunk.reshape(units, channels, units, channels).transpose(1, 2)  # [i, j] = C_ij
        own = blocks.diagonal(dim1=0, dim2=1).permute(2, 0, 1)                      # (units, c, c) = C_ii
        joint = torch.cat([torch.cat([own[:, None].expand_as(blocks), blocks], dim=3),
                           torch.cat([blocks.transpose(2, 3), own[None, :].expand_as(blocks)], dim=3)], dim=2)
        log_det_own = torch.linalg.slogdet(own).logabsdet
        pairwise = 0.5 * (log_det_own[:, None] + log_det_own[None, :] - torch.linalg.slogdet(joint).logabsdet)
    pairwise = pairwise.clamp_min(0).fill_diagonal_(0)
    return pairwise.sum(1) / (units - 1)


def hsic_groups(count: int, hsic_batch: int) -> list[np.ndarray]:
    """The fixed partition of sample indices into HSIC mini-batches (near-equal consecutive groups)."""
    return np.array_split(np.arange(count), max(1, math.ceil(count / hsic_batch)))


def relevance(representations: torch.Tensor, probabilities: torch.Tensor, hsic_batch: int) -> torch.Tensor:
    """HSIC of each unit's per-sample representation with the output probabilities: (units,).

    ``representations`` is (samples, units, channels), ``probabilities`` (samples, classes).
    """
    samples, units = representations.shape[:2]
    total = torch.zeros(units, dtype=torch.float64, device=representations.device)
    groups = [g for g in hsic_groups(samples, hsic_batch) if len(g) > 1]
    for group in groups:
        index = torch.as_tensor(group, device=representations.device)
        b = len(group)
        x = representations[index].transpose(0, 1).double()                          # (units, b, c)
        distances = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist").square()
        upper = torch.triu_indices(b, b, 1, device=x.device)
        off_diagonal = distances[:, upper[0], upper[1]]
        bandwidth = off_diagonal.median(dim=1).values                                # σ² = median squared distance
        bandwidth = torch.where(bandwidth > 0, bandwidth, off_diagonal.mean(dim=1))
        bandwidth = torch.where(bandwidth > 0, bandwidth, torch.ones_like(bandwidth))  # constant unit: K = 1, HSIC 0
        kernel = torch.exp(-distances / (2 * bandwidth[:, None, None]))
        p = probabilities[index].double()
        centred = p @ p.T
        centred = centred - centred.mean(0, keepdim=True)
        centred = centred - centred.mean(1, keepdim=True)                           # H L H
        total += (kernel * centred).sum((1, 2)) / (b - 1) ** 2
    return (total / max(1, len(groups))).clamp_min(0)   # HSIC ≥ 0 (K and HLH are PSD) up to rounding


def min_max(values: torch.Tensor) -> torch.Tensor:
    low, high = values.min(), values.max()
    return (values - low) / (high - low) if high > low else torch.zeros_like(values)


def composite_scores(statistics: LayerStatistics, probabilities: torch.Tensor, weights: tuple[float, float, float],
                     hsic_batch: int) -> dict[str, np.ndarray]:
    """Every component of one layer plus the composite (``score``), float32 arrays of length units."""
    layer = statistics.layer
    components = {
        "activity": statistics.activity(),
        "redundancy": redundancy(statistics.correlation(), layer.units, layer.channels),
        "relevance": relevance(statistics.representations(), probabilities, hsic_batch),
    }
    alpha, beta, gamma = weights
    composite = alpha * min_max(components["activity"]) + beta * (1 - min_max(components["redundancy"])) \
        + gamma * min_max(components["relevance"])
    return {**{k: v.float().cpu().numpy() for k, v in components.items()}, "score": composite.float().cpu().numpy()}

