"""Stage 4 of METHOD.md: per-layer keep ratios that hit a whole-model budget, then kept units.

Pure logic on a :class:`~tapvits_cli.models.units.CostModel` and per-unit scores (no
files, no printing). See :func:`tapvits_cli.allocation.strategies.allocate`.
"""
