"""Latency on a device: measuring the table of a ``profile`` (``tapvits profile``).

``measure`` times real blocks with torch or onnxruntime; on onnxruntime the blocks are
the graphs of ``onnx_graphs`` and the architecture is read by ``architecture``, neither
of which needs torch, so the device install profiles too. The table itself and the
latency of a pruned model predicted from it (pure, no torch: what the cloud needs) are
:mod:`tapvits_cli.payloads.latency_table`, which the profile artifact reads and writes.
"""
