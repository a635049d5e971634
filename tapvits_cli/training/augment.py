"""Light augmentation on whole batches, on the device: random crop with padding, horizontal flip.

Random numbers are drawn per *global* batch from NumPy with a seed of (run seed, epoch),
for a whole epoch at once, and each process takes its slice. So augmentation does not
depend on the device, on the number of processes nor on where a run was resumed: a
2-process run augments sample for sample like a 1-process run.

``flip`` mirrors left and right: right for clothes and most photographs, wrong for
digits and text (a mirrored 2 is no 2), hence off unless asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tapvits_cli.errors import UsageError

KINDS = ("crop", "flip")


@dataclass(frozen=True)
class Augmentation:
    crop_padding: int = 0   # 0: no crop; p: pad by p pixels, crop back at a random offset
    hflip: bool = False

    @property
    def enabled(self) -> bool:
        return self.crop_padding > 0 or self.hflip

    @classmethod
    def parse(cls, text: str | None, image_size: int) -> "Augmentation":
        """``crop``, ``crop=4``, ``flip``, comma-separated; ``crop`` pads by image_size/8 (≥ 1 pixel)."""
        padding, flip = 0, False
        for item in filter(None, (part.strip() for part in (text or "").split(","))):
            name, _, value = item.partition("=")
            if name == "crop":
                try:
                    padding = int(value) if value else max(1, image_size // 8)
                except ValueError:
                    padding = -1
                if not 1 <= padding <= image_size:   # crop=100000 padded every batch to terabytes
                    raise UsageError(f"augmentation '{item}': the crop padding must be an integer from 1 to the "
                                     f"image size ({image_size})")
            elif name == "flip" and not value:
                flip = True
            else:
                raise UsageError(f"unknown augmentation '{item}'; known: crop, crop=PIXELS, flip")
        return cls(padding, flip)

    def describe(self) -> list[str]:
        return ([f"crop={self.crop_padding}"] if self.crop_padding else []) + (["flip"] if self.hflip else [])

    def draw_epoch(self, seed: int, epoch: int, steps: int, global_batch: int) -> tuple[np.ndarray, np.ndarray]:
        """Per step and global-batch slot: crop offsets (steps, B, 2) in 0..2p and flips (steps, B)."""
        rng = np.random.default_rng([seed, epoch, 2])
        offsets = rng.integers(0, 2 * self.crop_padding + 1, size=(steps, global_batch, 2))
        flips = rng.random((steps, global_batch)) < 0.5
        return offsets, flips


def augment_batch(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor | None, padding: int,
                  fill: torch.Tensor) -> torch.Tensor:
    """Translate each image by its crop offset (pixels entering from outside get ``fill``, one
    value per channel) and mirror those whose flip is set (``flips=None``: no flipping); one gather for the batch.
    """
    n, _, height, width = images.shape
    if padding:
        fill = fill.view(1, -1, 1, 1)
        padded = F.pad(images - fill, (padding, padding, padding, padding)) + fill
        rows = offsets[:, 0, None] + torch.arange(height, device=images.device)      # (n, H)
        cols = offsets[:, 1, None] + torch.arange(width, device=images.device)       # (n, W)
        batch = torch.arange(n, device=images.device)[:, None, None]
        images = padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if flips is None:
        return images
    return torch.where(flips.view(-1, 1, 1, 1), images.flip(-1), images)
