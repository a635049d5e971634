"""Process-wide settings every stage shares: seeding and device choice."""

from __future__ import annotations

import random


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so a stage repeats exactly on the same machine.

    scikit-learn estimators take ``random_state`` explicitly; stages pass the same seed.
    """
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(choice: str) -> str:
    """``auto`` picks CUDA when available; ``cuda`` without a GPU is a clear error."""
    import torch

    from tapvits_cli.errors import UsageError

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but torch sees no CUDA device")
    return choice
