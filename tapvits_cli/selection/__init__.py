"""Choosing the public samples for a device: the metric set and the fine-tuning set.

Pure logic over log-likelihoods, density ratios and mixture components; see
:mod:`.strategies`, :mod:`.density_ratio` (the public-pool mixture and the ratio score) and
:mod:`.coverage` (how well a selection covers the device's components and classes).
"""

from tapvits_cli.selection.coverage import class_coverage, component_coverage, selection_coverage
from tapvits_cli.selection.strategies import (Selection, StreamingSelection, proportional_quotas, select,
                                              select_from_scores)

__all__ = ["Selection", "StreamingSelection",
           "class_coverage", "component_coverage", "proportional_quotas", "select", "select_from_scores",
           "selection_coverage"]
