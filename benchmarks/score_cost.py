"""Cost of `score` in forward-pass equivalents, split into statistics and KL probes.

Issue 4 targets, on a DeiT-Small-shaped ViT (vit_small_patch16_224, random weights) at
224×224 over 640 images on the CPU: the whole composite scoring ≤ 2·L + 4 forward-pass
equivalents (L = blocks), its statistics collection ≤ 3. One forward-pass equivalent is
the time of one plain inference pass of the same model over the same images at the same
batch size (the faster of one pass before and one after scoring). Both wall-clock and
process CPU time are reported: on a shared machine other processes inflate wall time
unevenly; with ``--threads 1`` CPU time is nearly immune to them (no spinning threads). Images are seeded Gaussian noise (the cost does not depend on content). Runs
exactly what `tapvits score` runs (`tapvits_cli.importance.scoring.score_model`) minus
file reading. Writes benchmarks/results/score_cost.json.

    bash .ci/env python benchmarks/score_cost.py                      # the issue's setting (long on 2 cores)
    bash .ci/env python benchmarks/score_cost.py --images 128         # a quicker, smaller run
    bash .ci/env python benchmarks/score_cost.py --threads 1          # on a shared machine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from tapvits_cli.importance.samples import SampleSet
from tapvits_cli.importance.scoring import ScoreConfig, score_model
from tapvits_cli.models.factory import create_model

RESULT = Path(__file__).parent / "results" / "score_cost.json"


def plain_forward_seconds(model, images: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """Wall and process CPU seconds of one inference pass over ``images``."""
    started = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            model(images[start:start + batch_size])
    return time.perf_counter() - started[0], time.process_time() - started[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224", help="timm architecture (random weights)")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=640)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, help="torch threads (1 makes CPU time robust to other load)")
    parser.add_argument("--output", type=Path, default=RESULT)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = create_model(args.model, {"img_size": args.img_size}).eval()
    blocks = len(model.blocks)
    images = torch.randn(args.images, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(0))
    samples = SampleSet(args.images, lambda i: images[torch.as_tensor(i)])
    plain_forward_seconds(model, images[: args.batch_size], args.batch_size)                # warm-up
    forward = plain_forward_seconds(model, images, args.batch_size)
    started = time.perf_counter(), time.process_time()
    result = score_model(model, samples, ScoreConfig(batch_size=args.batch_size, probe_fraction=0.3))
    total = time.perf_counter() - started[0], time.process_time() - started[1]
    forward_after = plain_forward_seconds(model, images, args.batch_size)
    # the faster of the two passes, so that ratios err on the high side when the machine is shared
    reference = min(forward[0], forward_after[0]), min(forward[1], forward_after[1])
    seconds = {
        "wall": {"forward_before": forward[0], "forward_after": forward_after[0],
                 "statistics": result.seconds["statistics"], "kl_probes": result.seconds["probes"], "total": total[0]},
        "cpu": {"forward_before": forward[1], "forward_after": forward_after[1],
                "statistics": result.seconds["statistics_cpu"], "kl_probes": result.seconds["probes_cpu"],
                "total": total[1]},
    }
    figures = {clock: {part: seconds[clock][part] / reference[index] for part in ("statistics", "kl_probes", "total")}
               for index, clock in enumerate(("wall", "cpu"))}
    targets = {"statistics": 3.0, "total": 2.0 * blocks + 4}
    document = {
        "model": args.model, "img_size": args.img_size, "images": args.images, "batch_size": args.batch_size,
        "blocks": blocks, "seconds": seconds, "forward_pass_equivalents": figures, "targets": targets,
        "met": {clock: {key: figures[clock][key] <= limit for key, limit in targets.items()} for clock in figures},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "load_average": os.getloadavg()},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(document, indent=2) + "\n")
    print(f"{args.model} at {args.img_size}px, {args.images} images, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads: one forward pass {reference[0]:.1f} s wall, {reference[1]:.1f} s CPU")
    print(f"{'part':<12}{'wall s':>9}{'fwd-eq':>8}{'CPU s':>9}{'fwd-eq':>8}{'target':>9}")
    for part in ("statistics", "kl_probes", "total"):
        limit = targets.get(part)
        print(f"{part:<12}{seconds['wall'][part]:>9.1f}{figures['wall'][part]:>8.2f}{seconds['cpu'][part]:>9.1f}"
              f"{figures['cpu'][part]:>8.2f}{'≤ %g' % limit if limit else '':>9}")
    print(f"wrote {args.output}")
    raise SystemExit(0 if all(document["met"]["wall"].values()) else 1)


if __name__ == "__main__":
    main()
