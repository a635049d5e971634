"""What a model expects of its input, and batches prepared for it.

Stored images are float32 in [0, 1] at their own size and channel count; a model wants
its own (C, H, W), mean and std. :class:`Preprocessing` records that mapping (it travels in
model and GMM artifacts, so the cloud embeds public images exactly as the device embedded
private ones) and applies it to whole batches, on any torch device.

Imports torch at module level: import this module only where torch is needed.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tapvits_cli.data.dataset import Dataset

INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, as PIL's convert("L")
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    input_size: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in self.input_size):
            raise ValueError(f"input_size must be (C, H, W) of positive integers, got {list(self.input_size)}")
        object.__setattr__(self, "input_size", tuple(int(v) for v in self.input_size))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        channels = self.input_size[0] if len(self.input_size) == 3 else -1
        if min(self.input_size, default=0) < 1 or channels < 1:
            raise ValueError(f"input_size must be (C, H, W) of positive integers, got {self.input_size}")
        if len(self.mean) != channels or len(self.std) != channels or min(self.std) <= 0 \
                or not all(math.isfinite(v) for v in (*self.mean, *self.std)):
            raise ValueError(f"mean and std need {channels} finite values (std > 0), got {self.mean} and {self.std}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> "Preprocessing":
        """Read timm's ``pretrained_cfg``, corrected by what the model really is.

        A model created with ``img_size=28, in_chans=1`` keeps the 3×224×224 cfg of its
        architecture, so the patch embedding's image size and the first convolution's input
        channels win. Mean/std are averaged to one channel or repeated to more; an unknown
        interpolation (timm also knows "lanczos", "random") becomes bilinear.
        """
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
        channels, height, width = cfg.get("input_size", (3, 224, 224))
        first_conv = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
        if first_conv is not None:
            channels = first_conv.in_channels
        img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if img_size is not None:
            height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
        mean = tuple(cfg.get("mean", _IMAGENET_MEAN))
        std = tuple(cfg.get("std", _IMAGENET_STD))
        if len(mean) != channels:
            mean, std = (_adapt(mean, channels), _adapt(std, channels))
        interpolation = cfg.get("interpolation", "bilinear")
        return cls((channels, height, width), mean, std,
                   interpolation if interpolation in INTERPOLATIONS else "bilinear")

    def to_dict(self) -> dict:
        return {"input_size": list(self.input_size), "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation}

    @classmethod
    def from_dict(cls, data: Mapping) -> "Preprocessing":
        """Inverse of :meth:`to_dict`; unknown keys are ignored (newer producers may add some)."""
        missing = [key for key in ("input_size", "mean", "std", "interpolation") if key not in data]
        if missing:
            raise ValueError(f"preprocessing lacks {', '.join(missing)}")
        return cls(tuple(data["input_size"]), tuple(data["mean"]), tuple(data["std"]), data["interpolation"])

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """(n, C', H', W') floats in [0, 1] → (n, C, H, W) normalised, as one batched operation.

        Grey to colour repeats the channel (after resizing, where it is cheaper); colour to
        grey uses BT.601 luma. Resizing antialiases when shrinking; bicubic results are
        clamped to [0, 1] like PIL's 8-bit output would be.
        """
        channels, height, width = self.input_size
        if batch.ndim != 4 or not batch.is_floating_point():
            raise ValueError(f"expected a float batch (n, C, H, W), got {batch.dtype} {tuple(batch.shape)}")
        x = batch
        if x.shape[1] == 3 and channels == 1:
            luma = torch.tensor(_LUMA, dtype=x.dtype, device=x.device)
            x = torch.einsum("nchw,c->nhw", x, luma).unsqueeze(1)
        elif x.shape[1] not in (1, channels):
            raise ValueError(f"cannot map {x.shape[1]} image channels to the model's {channels}")
        if tuple(x.shape[-2:]) != (height, width):
            if self.interpolation == "nearest":
                x = F.interpolate(x, size=(height, width), mode="nearest-exact")
            else:
                shrinking = height < x.shape[-2] or width < x.shape[-1]
                x = F.interpolate(x, size=(height, width), mode=self.interpolation, align_corners=False,
                                  antialias=shrinking)
                if self.interpolation == "bicubic":
                    x = x.clamp(0.0, 1.0)
        x = x.expand(-1, channels, -1, -1)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std


def _adapt(values: tuple[float, ...], channels: int) -> tuple[float, ...]:
    """Per-channel statistics for another channel count: the average for one, else cycled."""
    if channels == 1:
        return (sum(values) / len(values),)
    return tuple(values[i % len(values)] for i in range(channels))


def iterate_batches(dataset: Dataset, preprocessing: Preprocessing, batch_size: int,
                    positions=None, device: str | torch.device = "cpu",
                    ) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
    """Yield ``(ids, images, labels)`` over ``positions`` (default: all) in order.

    Images move to ``device`` before preprocessing, so resizing runs on the GPU when asked.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    positions = np.arange(len(dataset)) if positions is None else np.asarray(positions, dtype=np.int64)
    for start in range(0, len(positions), batch_size):
        chunk = positions[start:start + batch_size]
        images = torch.from_numpy(dataset.images(chunk)).to(device)
        labels = torch.from_numpy(dataset.labels[chunk]).to(device)
        yield dataset.ids[chunk], preprocessing(images), labels


class TorchImageDataset(torch.utils.data.Dataset):
    """A :class:`Dataset` for ``torch.utils.data.DataLoader`` (shuffling, samplers, workers).

    Item i is (preprocessed image, label) of position ``positions[i]``. ``__getitems__``
    lets the DataLoader fetch and preprocess a whole batch at once.
    """

    def __init__(self, dataset: Dataset, preprocessing: Preprocessing, positions=None) -> None:
        self.dataset = dataset
        self.preprocessing = preprocessing
        self.positions = np.arange(len(dataset)) if positions is None else np.asarray(positions, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices) -> list[tuple[torch.Tensor, int]]:
        positions = self.positions[np.asarray(indices, dtype=np.int64)]
        images = self.preprocessing(torch.from_numpy(self.dataset.images(positions)))
        return list(zip(images, self.dataset.labels[positions].tolist()))
