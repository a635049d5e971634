"""The device's Gaussian mixture: fitting (:mod:`.fit`) and scoring (:mod:`.mixture`).

Pure logic on arrays: no file I/O, no printing; ``artifacts.gmm`` reads and writes it.
"""
