"""Multi-process training under ``torchrun``: which process this is and its device.

torchrun starts one process per device and tells each, through the environment
(``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``), where it stands.
Without those variables this is a plain single process and nothing is initialised.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator


@dataclass(frozen=True)
class Processes:
    rank: int
    world_size: int
    device: str          # this process's device: "cpu", "cuda" or "cuda:LOCAL_RANK"

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints and artifacts and talks to the user."""
        return self.rank == 0


@contextlib.contextmanager
def process_group(device_choice: str) -> Iterator[Processes]:
    """Join torchrun's process group for the duration (gloo on CPU, NCCL on CUDA)."""
    import torch
    import torch.distributed as dist

    from tapvits_cli.runtime import resolve_device

    device = resolve_device(device_choice)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1 or dist.is_initialized():
        yield Processes(dist.get_rank() if dist.is_initialized() else 0, world_size, device)
        return
    if device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        yield Processes(dist.get_rank(), dist.get_world_size(), device)
        # Leave together: a rank that tore its gloo connections down while rank 0 was still
        # writing the artifact sometimes died in gloo's threads (SIGABRT, "terminate called
        # without an active exception"), failing the whole torchrun. Not after an error: the
        # other ranks may never arrive.
        dist.barrier()
    finally:
        dist.destroy_process_group()
