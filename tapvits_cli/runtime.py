"""Process-wide settings every stage shares: seeding and device choice, and the machine's CPU name."""

from __future__ import annotations

import random


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so a stage repeats exactly on the same machine.

    scikit-learn estimators take ``random_state`` explicitly; stages pass the same seed.
    """
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    if torch_available():
        import torch

        torch.manual_seed(seed)


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what the platform module says."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith(("model name", "Model", "Hardware")) and ":" in line:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def torch_available() -> bool:
    """Whether torch can be imported: the device install (ONNX extractors) runs without it."""
    import importlib.util

    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


def resolve_device(choice: str) -> str:
    """``auto`` picks CUDA when available; ``cuda`` without a GPU is a clear error.

    Without torch (the device install) only the CPU exists.
    """
    from tapvits_cli.errors import UsageError

    if not torch_available():
        if choice == "cuda":
            raise UsageError("--device cuda needs torch, which this install lacks (the device install runs on CPU)")
        return "cpu"
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but torch sees no CUDA device")
    return choice
