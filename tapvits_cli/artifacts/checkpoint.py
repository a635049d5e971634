"""Fine-tuning checkpoints: the resumable state of an interrupted ``finetune`` run.

Internal files, not protocol artifacts: only the same tapvits resumes from them. One
file per checkpoint directory, replaced atomically at every epoch end, holding the
epoch, step, model/optimizer/scheduler states and history, plus the run's parameters
as JSON so a run with other parameters is refused instead of silently continued.
Written with ``torch.save`` and read with ``weights_only=True``: tensors, numbers,
strings, lists and dicts only, nothing unpickled.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from tapvits_cli.artifacts.files import atomic_write
from tapvits_cli.artifacts.header import compact_json, parse_json
from tapvits_cli.errors import InvalidArtifactError

FILE_NAME = "finetune-checkpoint.pt"
FORMAT = "tapvits-finetune-checkpoint/1"


def checkpoint_path(directory: str | os.PathLike) -> Path:
    return Path(directory) / FILE_NAME


def write_checkpoint(directory: str | os.PathLike, state: Mapping[str, Any], run: Mapping[str, Any]) -> Path:
    """Atomically replace the directory's checkpoint with ``state`` of the run ``run``."""
    import torch

    path = checkpoint_path(directory)
    with atomic_write(path) as tmp:
        torch.save({"format": FORMAT, "run": compact_json(dict(run)), **state}, tmp)
    return path


@dataclass(frozen=True)
class Checkpoint:
    """A read checkpoint: the run it belongs to (parameters and input hashes) and the state to resume."""

    run: dict[str, Any]
    state: dict[str, Any]    # epoch, step, model/optimizer/scheduler states, history


def read_checkpoint(directory: str | os.PathLike) -> Checkpoint | None:
    """The directory's checkpoint, or None when it holds none."""
    import torch

    path = checkpoint_path(directory)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.pop("format", None) != FORMAT:
            raise ValueError(f"not a {FORMAT} file")
        run = parse_json(state.pop("run"))
        if not (isinstance(run, dict) and isinstance(run.get("params"), dict) and isinstance(run.get("inputs"), dict)):
            raise ValueError("its run record is not {params: {...}, inputs: {...}}")
    except Exception as exc:  # torch raises assorted types for foreign or truncated files
        raise InvalidArtifactError(f"{path}: unreadable checkpoint ({exc}); delete it to start afresh") from None
    return Checkpoint(run, state)


def remove_checkpoint(directory: str | os.PathLike) -> None:
    """Delete the checkpoint, and the directory when that leaves it empty."""
    checkpoint_path(directory).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        Path(directory).rmdir()
