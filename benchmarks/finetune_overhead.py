"""Throughput of tapvits' training loop against a bare PyTorch loop on the same model and data.

Issue 5 target: `finetune` trains at ≥ 0.9× the images/s of the most direct loop one
would write by hand. Both train the DeiT-Tiny-shaped ViT for 28×28 grey images
(vit_tiny_patch16_224, img_size=28, patch_size=4, in_chans=1, num_classes=10) from the
same initial weights, with AdamW and label smoothing, for the same number of steps of
the same batch size on the same Fashion-MNIST images:

- bare: images preloaded and normalised once as one tensor (outside the timing),
  a seeded permutation, slicing, forward, backward, step; nothing else;
- tapvits: `tapvits_cli.training.loop.train`, exactly what `tapvits finetune` runs:
  reads and preprocesses each batch from the dataset through the DataLoader, warm-up +
  cosine schedule, loss bookkeeping, progress callback, and the end-of-epoch checkpoint
  written to disk as `finetune` does by default.

Runs alternate (bare, tapvits, bare, ...) so that load on the machine hits both alike.
The ratio compares the fastest run of each (best of N: the run least disturbed by other
work on the machine, as `timeit` does); medians and every run's time are recorded too,
with the load average, in benchmarks/results/finetune_overhead.json.

    bash .ci/env python benchmarks/finetune_overhead.py [--samples 2048] [--repeats 3] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ARCHITECTURE = "vit_tiny_patch16_224"
KWARGS = {"img_size": 28, "patch_size": 4, "in_chans": 1, "num_classes": 10}
RESULT = Path(__file__).parent / "results" / "finetune_overhead.json"


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bare_loop(model, images, labels, batch_size: int, steps: int, device: str) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    model.train()
    synchronize(device)
    started = time.perf_counter()
    for k in range(steps):
        index = order[k * batch_size:(k + 1) * batch_size]
        x, y = images[index].to(device, non_blocking=True), labels[index].to(device, non_blocking=True)
        loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    synchronize(device)
    return time.perf_counter() - started


def tapvits_loop(model, dataset, preprocessing, batch_size: int, device: str, checkpoint_dir: str) -> float:
    from tapvits_cli.artifacts.checkpoint import write_checkpoint
    from tapvits_cli.training.loop import TrainConfig, train

    config = TrainConfig(epochs=1, batch_size=batch_size, lr=5e-4, weight_decay=0.05, label_smoothing=0.1)
    synchronize(device)
    started = time.perf_counter()
    train(model, dataset, preprocessing, config, device=device, on_step=lambda step, loss: None,
          on_epoch_end=lambda state: write_checkpoint(checkpoint_dir, state, {"benchmark": True}))
    synchronize(device)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    from tapvits_cli.data import open_dataset
    from tapvits_cli.data.preprocess import Preprocessing
    from tapvits_cli.models.factory import create_model
    from tapvits_cli.runtime import resolve_device

    load_start = os.getloadavg()
    device = resolve_device(args.device)
    dataset = open_dataset(f"fashion-mnist:sample={args.samples}")
    torch.manual_seed(0)
    initial = create_model(ARCHITECTURE, KWARGS).state_dict()
    preprocessing = Preprocessing.from_model(create_model(ARCHITECTURE, KWARGS))
    images = preprocessing(torch.from_numpy(dataset.images(range(len(dataset)))))
    labels = torch.from_numpy(dataset.labels.astype("int64"))
    if device.startswith("cuda"):
        images, labels = images.to(device), labels.to(device)
    steps = len(dataset) // args.batch_size
    trained = steps * args.batch_size

    def fresh():
        model = create_model(ARCHITECTURE, KWARGS)
        model.load_state_dict(initial)
        return model.to(device)

    bare_loop(fresh(), images, labels, args.batch_size, 2, device)   # warm-up: allocator, kernels
    seconds = {"bare": [], "tapvits": []}
    with tempfile.TemporaryDirectory() as checkpoints:
        for _ in range(args.repeats):
            seconds["bare"].append(bare_loop(fresh(), images, labels, args.batch_size, steps, device))
            seconds["tapvits"].append(tapvits_loop(fresh(), dataset, preprocessing, args.batch_size, device, checkpoints))
    rates = {name: trained / min(values) for name, values in seconds.items()}
    median_rates = {name: trained / statistics.median(values) for name, values in seconds.items()}
    ratio = rates["tapvits"] / rates["bare"]
    overhead_ms = 1000 * (min(seconds["tapvits"]) - min(seconds["bare"])) / steps
    document = {
        "benchmark": "finetune_overhead",
        "model": {"architecture": ARCHITECTURE, "kwargs": KWARGS},
        "data": str(dataset.ref), "images_per_run": trained, "batch_size": args.batch_size, "steps": steps,
        "device": device, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "seconds": seconds, "images_per_second": rates, "images_per_second_median": median_rates,
        "ratio_tapvits_to_bare": ratio, "ratio_of_medians": median_rates["tapvits"] / median_rates["bare"],
        "overhead_ms_per_step": overhead_ms, "target": 0.9,
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(document, indent=2) + "\n")
    print(f"{'loop':<10}{'best s':>10}{'median s':>10}{'images/s':>10}")
    for name in ("bare", "tapvits"):
        print(f"{name:<10}{min(seconds[name]):>10.2f}{statistics.median(seconds[name]):>10.2f}{rates[name]:>10.1f}")
    print(f"ratio tapvits/bare: {ratio:.3f} (target >= 0.9; medians: {document['ratio_of_medians']:.3f}), "
          f"overhead {overhead_ms:.1f} ms/step, on {device}, {trained} images x {args.repeats} runs, "
          f"load average {load_start[0]:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"written: {RESULT}")


if __name__ == "__main__":
    main()
