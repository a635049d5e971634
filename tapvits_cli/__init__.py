"""tapvits: task-adaptive pruning of Vision Transformers for edge devices, as a CLI.

Importing this package must stay cheap: no torch, timm or scikit-learn at import time,
so that ``tapvits --help`` is instant. Heavy modules are imported inside functions.
"""

__version__ = "0.1.0"
