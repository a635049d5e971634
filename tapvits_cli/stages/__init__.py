"""The stage API: one module per subcommand, each ``run(options) -> Result``.

``stages.<name>.run(options)`` reads the input artifacts, checks they fit together, calls
the pure stage logic, builds the lineage and writes the output artifact. The command
line (``cli/``), ``tapvits run`` and any other executor call it the same way; an options
object is a plain, picklable dataclass, so a step can run in another process or on
another machine as ``stages.<name>.run(options)``.
"""

from __future__ import annotations

import importlib
from types import ModuleType


def stage_module(stage: str) -> ModuleType:
    """The module of a pipeline stage, by its subcommand name (``fit-gmm`` → :mod:`.fit_gmm`)."""
    return importlib.import_module(f"{__name__}.{stage.replace('-', '_')}")
