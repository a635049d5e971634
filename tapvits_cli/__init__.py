"""tapvits: task-adaptive pruning of Vision Transformers for edge devices, as a CLI.

Importing this package must stay cheap: no torch, timm or scikit-learn at import time,
so that ``tapvits --help`` is instant. Heavy modules are imported inside functions.
"""

import os

# OpenMP threads that spin while waiting made every torch op 20-40x slower whenever
# another process shared the cores (measured: 40 ms vs 1.1 s per training step of a tiny
# ViT on 2 busy cores). Sleeping waiters cost little on an idle machine. It must be set
# before torch loads its OpenMP runtime; a value the user exported wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
