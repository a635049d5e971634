"""What artifacts carry and stage logic computes on, with the rules both apply.

Below both ``artifacts/`` (which reads and writes these payloads and checks them on
every read) and the stage-logic packages (which produce and use them), so neither has
to import the other:

- :mod:`.mixture`: a device's Gaussian mixture with its feature projection, and scoring with it;
- :mod:`.guarantees`: the per-component privacy guarantees and what the parameters alone show of them;
- :mod:`.zcdp`: zero-concentrated differential-privacy accounting (ε from ρ and back);
- :mod:`.coverage`: how well a selected set covers the device's mixture components and classes;
- :mod:`.latency_table`: a device's latency table and the latency of a pruned model predicted from it.

Pure: arrays and plain values in, arrays and plain values out; no torch, no file I/O.
"""
