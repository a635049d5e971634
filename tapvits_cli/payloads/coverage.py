"""How well a selected set covers the device's task: per mixture component (label-free) and per class.

Precision (the share of selected public images whose label the device holds) cannot see
a selection that takes one of the device's classes and none of the others: every image
is "right", yet the model is then scored and fine-tuned on part of the task. Coverage
measures what precision misses.

* **Component coverage** (label-free, computable by the cloud for any GMM): the selected
  rows' shares s_k per mixture component (each row counted in its most likely component)
  against the component weights w_k. ``coverage = Σ_k min(s_k, w_k) = 1 − TV(s, w)``,
  one minus the total-variation divergence: 1 when the shares follow the weights, w_k
  when the whole set sits in component k alone. ``worst_ratio = min_k s_k / w_k`` is how
  short the worst-served component falls (0: a component with no row at all).
* **Class coverage** (simulated devices only, whose private labels the benchmark may
  read): ``class_recall`` is the share of the device's classes with at least one selected
  row; ``min_class_ratio`` is, over the device's classes, the smallest ratio of a class's
  share of the selected rows that carry a device label to its share of the device's data
  (0: a class is missing; 1: every class at least as represented as on the device).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def component_shares(component: np.ndarray, components: int) -> np.ndarray:
    """Share of the rows in each of ``components`` mixture components (zeros for no rows)."""
    counts = np.bincount(np.asarray(component, dtype=np.int64), minlength=components)[:components]
    return counts / max(int(counts.sum()), 1)


def component_coverage(component: np.ndarray, weights) -> dict[str, Any]:
    """``{"coverage", "worst_ratio", "missing", "shares"}`` of one selected set (see the module docstring)."""
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 1 or len(weights) == 0 or (weights < 0).any() or not np.isclose(weights.sum(), 1.0, atol=1e-6):
        raise ValueError("mixture weights must be a non-empty 1-D distribution")
    component = np.asarray(component)
    if len(component) and (component.min() < 0 or component.max() >= len(weights)):
        raise ValueError(f"components must lie in 0..{len(weights) - 1}")
    shares = component_shares(component, len(weights))
    weighted = weights > 0
    return {"coverage": float(np.minimum(shares, weights).sum()),
            "worst_ratio": float((shares[weighted] / weights[weighted]).min()),
            "missing": int(((shares == 0) & weighted).sum()),
            "shares": [float(s) for s in shares]}


def selection_coverage(component: np.ndarray, weights, metric_size: int) -> dict[str, Any]:
    """Component coverage of the metric set (the first ``metric_size`` rows) and the fine-tuning set (all)."""
    component = np.asarray(component)
    return {"weights": [float(w) for w in np.asarray(weights, dtype=np.float64)],
            "metric": component_coverage(component[:metric_size], weights),
            "finetune": component_coverage(component, weights)}


def class_coverage(selected_labels: np.ndarray, private_labels: np.ndarray) -> dict[str, float]:
    """``{"class_recall", "min_class_ratio"}`` of a selected set against a device's private labels."""
    classes, private_counts = np.unique(np.asarray(private_labels), return_counts=True)
    if len(classes) == 0:
        raise ValueError("the device holds no labelled sample")
    selected = np.asarray(selected_labels)
    selected = selected[np.isin(selected, classes)]
    counts = np.bincount(np.searchsorted(classes, selected), minlength=len(classes))
    device_share = private_counts / private_counts.sum()
    selected_share = counts / max(len(selected), 1)
    return {"class_recall": float((counts > 0).mean()),
            "min_class_ratio": float((selected_share / device_share).min())}
