"""Stage 7 (eval): accuracy, cost and latency of a model on a labelled set; pure logic."""

from tapvits_cli.evaluation.metrics import Accuracy, count_macs, evaluate, measure_latency

__all__ = ["Accuracy", "count_macs", "evaluate", "measure_latency"]
