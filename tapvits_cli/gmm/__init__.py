"""Fitting the device's Gaussian mixture: plain (:mod:`.fit`), differentially private (:mod:`.dp`),
and the per-component audit against the private data (:mod:`.privacy`).

Pure logic on arrays: no file I/O, no printing. The mixture itself, its guarantees and
the privacy accounting are ``payloads`` (``artifacts.gmm`` reads and writes them).
"""
