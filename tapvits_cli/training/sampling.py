"""Which samples each optimizer step sees, identical for any number of processes.

The order of an epoch is a permutation seeded by (run seed, epoch). Global batch k is
positions k·B … (k+1)·B−1 of it; with P processes, process r takes the r-th of P equal
slices of that global batch. One process with batch B and P processes with B/P each
therefore see the same samples at every step, and since DistributedDataParallel averages
the P gradients of per-process mean losses, they compute the same update (to rounding).
The incomplete last batch is dropped (a different remainder each epoch), so every step
averages exactly B samples whatever P is.
"""

from __future__ import annotations

import numpy as np
import torch


def epoch_order(samples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 1]).permutation(samples)


class GlobalBatchSampler(torch.utils.data.Sampler):
    """A DataLoader ``batch_sampler`` yielding this process's slice of each global batch.

    The DataLoader hands each list to ``TorchImageDataset.__getitems__``, which reads and
    preprocesses the batch in one call. ``set_epoch`` chooses the epoch's order and how
    many batches to yield (fewer in the last epoch of a step-limited run).
    """

    def __init__(self, samples: int, global_batch: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by {world_size} processes")
        self.samples, self.global_batch, self.seed = samples, global_batch, seed
        self.local_batch = global_batch // world_size
        self.offset = rank * self.local_batch
        self.epoch, self.batches = 0, samples // global_batch

    def set_epoch(self, epoch: int, batches: int | None = None) -> None:
        self.epoch = epoch
        self.batches = self.samples // self.global_batch if batches is None else batches

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        order = epoch_order(self.samples, self.seed, self.epoch)
        for k in range(self.batches):
            start = k * self.global_batch + self.offset
            yield order[start:start + self.local_batch].tolist()
