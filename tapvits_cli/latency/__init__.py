"""Latency on a device: the measured table of a ``profile`` and the latency of a pruned model predicted from it.

``table`` is pure (no torch): what the cloud needs to predict. ``measure`` times real
blocks with torch or onnxruntime (``tapvits profile``); on onnxruntime the blocks are the
graphs of ``onnx_graphs`` and the architecture is read by ``architecture``, neither of
which needs torch, so the device install profiles too.
"""

from tapvits_cli.latency.table import (BranchTable, LatencyPrediction, LatencyProfile, check_fits, model_fingerprint,
                                       predict_latency, predict_model)

__all__ = ["BranchTable", "LatencyPrediction", "LatencyProfile", "check_fits", "model_fingerprint", "predict_latency",
           "predict_model"]
