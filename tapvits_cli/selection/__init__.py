"""Choosing the public samples for a device: the metric set and the fine-tuning set.

Pure logic over log-likelihoods, density ratios and mixture components; see
:mod:`.strategies` and :mod:`.density_ratio` (the public-pool mixture and the ratio score).
How well a selection covers the device's components and classes is
:mod:`tapvits_cli.payloads.coverage` (the metric-set reader checks the recorded figures).
"""

from tapvits_cli.selection.strategies import (Selection, StreamingSelection, proportional_quotas, select,
                                              select_from_scores)

__all__ = ["Selection", "StreamingSelection", "proportional_quotas", "select", "select_from_scores"]
