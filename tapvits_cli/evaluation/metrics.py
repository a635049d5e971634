"""Accuracy, MACs and latency of a classifier: what ``tapvits eval`` reports.

Pure logic: no file I/O and no printing; progress through ``on_progress(n)``. Counts
accumulate as tensors on the evaluation device, so a GPU run synchronises once at the
end instead of once per batch.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from tapvits_cli.data.dataset import Dataset
from tapvits_cli.data.preprocess import Preprocessing, iterate_batches

TOP_K = 5


@dataclass(frozen=True)
class Accuracy:
    samples: int
    top1: float
    top5: float
    top5_k: int                    # k actually used: min(5, number of classes)
    loss: float                    # mean cross-entropy (natural log), no label smoothing
    class_samples: np.ndarray      # per label 0..C-1, int64
    class_correct: np.ndarray      # per label, top-1 hits, int64
    nonfinite: int = 0             # samples whose logits hold NaN or infinity (their loss and ranks mean nothing)

    @property
    def finite(self) -> bool:
        """Whether every figure is a number: a damaged or overflowing model yields NaN logits, a NaN loss,
        and top-k ranks that mean nothing, which a report must not present as a measurement."""
        return self.nonfinite == 0 and bool(np.isfinite(self.loss))

    def per_class(self) -> list[tuple[int, int, int, float]]:
        """``(label, samples, correct, accuracy)`` for each class present in the data."""
        present = np.flatnonzero(self.class_samples)
        return [(int(c), int(self.class_samples[c]), int(self.class_correct[c]),
                 float(self.class_correct[c] / self.class_samples[c])) for c in present]


def evaluate(model: torch.nn.Module, dataset: Dataset, preprocessing: Preprocessing, batch_size: int,
             device: str, on_progress: Callable[[int], None] = lambda n: None) -> Accuracy:
    """One pass over ``dataset``: top-1, top-k, mean loss and per-class accuracy.

    Samples with non-finite logits are counted (``Accuracy.nonfinite``), not hidden: the
    caller decides that such a model cannot be reported on.
    """
    if len(dataset) == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    model = model.to(device).eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    hits1 = torch.zeros((), dtype=torch.int64, device=device)
    hitsk = torch.zeros((), dtype=torch.int64, device=device)
    nonfinite = torch.zeros((), dtype=torch.int64, device=device)
    class_samples = class_correct = None
    k = 1
    with torch.inference_mode():
        for _, images, labels in iterate_batches(dataset, preprocessing, batch_size, device=device):
            logits = model(images).float()
            classes = logits.shape[1]
            if class_samples is None:
                k = min(TOP_K, classes)
                class_samples = torch.zeros(classes, dtype=torch.int64, device=device)
                class_correct = torch.zeros(classes, dtype=torch.int64, device=device)
            labels = labels.long()
            nonfinite += (~torch.isfinite(logits)).any(dim=1).sum()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
            top = logits.topk(k, dim=1).indices
            correct = top[:, 0] == labels
            hits1 += correct.sum()
            hitsk += (top == labels[:, None]).any(dim=1).sum()
            class_samples += torch.bincount(labels, minlength=classes)
            class_correct += torch.bincount(labels[correct], minlength=classes)
            on_progress(len(labels))
    n = len(dataset)
    return Accuracy(samples=n, top1=hits1.item() / n, top5=hitsk.item() / n, top5_k=k, loss=loss_sum.item() / n,
                    class_samples=class_samples.cpu().numpy(), class_correct=class_correct.cpu().numpy(),
                    nonfinite=int(nonfinite.item()))


def count_macs(model: torch.nn.Module, input_size: tuple[int, int, int]) -> int:
    """Multiply-accumulates of one image's forward pass, by torch's own FLOP counter.

    ``FlopCounterMode`` counts 2 FLOPs per multiply-add of matrix products, convolutions
    and attention (it ignores element-wise work such as norms, activations, softmax), so
    MACs = FLOPs / 2. The pass runs on a single zero image where the model lives.

    On the CPU, ``scaled_dot_product_attention`` runs as the fused kernel
    ``_scaled_dot_product_flash_attention_for_cpu``, which torch's counter (2.14) has no
    formula for, so attention would silently count zero; torch's own attention formula is
    mapped onto that kernel here. Where the counter already knows it, the count is the same.
    """
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def fused_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    device = next(model.parameters()).device
    counter = FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: fused_attention_flops})
    with torch.inference_mode(), counter:
        model.eval()(torch.zeros(1, *input_size, device=device))
    return counter.get_total_flops() // 2


def measure_latency(model: torch.nn.Module, input_size: tuple[int, int, int], batch_size: int, warmup: int,
                    repeats: int, device: str) -> dict:
    """Wall-clock time of forward passes on random input after ``warmup`` untimed ones.

    Each of ``repeats`` runs is timed alone (with ``cuda.synchronize`` on a GPU, so the
    clock covers the kernels, not their launch); the median resists outliers, p90 shows
    the spread. The thread count is recorded because CPU latency depends on it.
    """
    if repeats < 1 or warmup < 0 or batch_size < 1:
        raise ValueError("need repeats >= 1, warmup >= 0 and batch_size >= 1")
    model = model.to(device).eval()
    generator = torch.Generator().manual_seed(0)
    batch = torch.randn(batch_size, *input_size, generator=generator).to(device)
    on_gpu = torch.device(device).type == "cuda"
    times_ms = []
    with torch.inference_mode():
        for run in range(warmup + repeats):
            if on_gpu:
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(batch)
            if on_gpu:
                torch.cuda.synchronize()
            if run >= warmup:
                times_ms.append((time.perf_counter() - start) * 1000.0)
    return {"batch_size": batch_size, "median_ms": statistics.median(times_ms),
            "p90_ms": float(np.percentile(times_ms, 90)), "repeats": repeats, "warmup": warmup,
            "threads": torch.get_num_threads(), "device": device}
