"""Choosing the public samples for a device: the metric set and the fine-tuning set.

Pure logic over log-likelihoods and mixture components; see :mod:`.strategies`.
"""

from tapvits_cli.selection.strategies import (STRATEGIES, Selection, StreamingSelection, proportional_quotas, select,
                                              select_from_scores)

__all__ = ["STRATEGIES", "Selection", "StreamingSelection", "proportional_quotas", "select", "select_from_scores"]
