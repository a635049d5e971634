"""Requested versus achieved budget of `allocate`, for budgets 0.9 … 0.5 and every strategy.

Issue 4 target: every gap |achieved − requested| / requested ≤ 0.5%, the budget counting
the whole model (embeddings and head included). Uses the allocation logic `tapvits
allocate` runs, on the cost model of each architecture (built on torch's meta device, no
weights), with seeded random unit scores and layer importances (allocation accuracy
depends on the architecture's granularity, not on the score values). Default
architectures: DeiT-Small (vit_small_patch16_224) and the DeiT-Tiny-shaped ViT for 28×28
grey images used by the tests and benchmarks. Writes benchmarks/results/budget_accuracy.json.

    bash .ci/env python benchmarks/budget_accuracy.py [--budget-kind params|macs|both]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from tapvits_cli.allocation.strategies import allocate
from tapvits_cli.models.factory import create_model
from tapvits_cli.models.families import vit
from tapvits_cli.vocabulary import ALLOCATION_STRATEGIES as STRATEGIES

RESULT = Path(__file__).parent / "results" / "budget_accuracy.json"
MODELS = {
    "deit-small-224": ("vit_small_patch16_224", {}),
    "deit-tiny-28px": ("vit_tiny_patch16_224", {"img_size": 28, "patch_size": 4, "in_chans": 1, "num_classes": 10}),
}
BUDGETS = (0.9, 0.8, 0.7, 0.6, 0.5)
TOLERANCE = 0.005


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-kind", choices=["params", "macs", "both"], default="both")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULT)
    args = parser.parse_args()
    kinds = ("params", "macs") if args.budget_kind == "both" else (args.budget_kind,)

    rows = []
    for label, (architecture, kwargs) in MODELS.items():
        with torch.device("meta"):
            cost = vit.cost_model(create_model(architecture, kwargs))
        rng = np.random.default_rng(args.seed)
        scores = {(layer.block, layer.kind): rng.random(layer.units) for layer in cost.layers}
        blocks = len(cost.layers) // 2
        importance = {kind: rng.exponential(0.5, blocks) for kind in ("attn", "mlp")}
        for kind in kinds:
            measure = cost.measure(kind)
            for strategy in STRATEGIES:
                for budget in BUDGETS:
                    result = allocate(cost, scores, importance, kind, budget, strategy, tolerance=1.0)
                    achieved = measure(result.counts) / measure(cost.units)
                    rows.append({"model": label, "budget_kind": kind, "strategy": strategy, "requested": budget,
                                 "achieved": achieved, "gap": abs(achieved - budget) / budget,
                                 "params_fraction": result.params / result.base_params,
                                 "macs_fraction": result.macs / result.base_macs})
    worst = max(row["gap"] for row in rows)
    document = {"tolerance": TOLERANCE, "worst_gap": worst, "met": worst <= TOLERANCE, "seed": args.seed, "rows": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(document, indent=2) + "\n")
    print(f"{'model':<16}{'budget':<8}{'strategy':<10}{'requested':>10}{'achieved':>10}{'gap':>10}")
    for row in rows:
        print(f"{row['model']:<16}{row['budget_kind']:<8}{row['strategy']:<10}{row['requested']:>10.2f}"
              f"{row['achieved']:>10.5f}{row['gap']:>10.4%}")
    print(f"worst gap {worst:.4%} (target ≤ {TOLERANCE:.1%}); wrote {args.output}")
    raise SystemExit(0 if worst <= TOLERANCE else 1)


if __name__ == "__main__":
    main()
