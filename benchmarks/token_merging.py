"""Issue 8 benchmark: CPU latency of token merging on top of 70 % pruning, DeiT-Small at 224×224.

DeiT-Small shape (`vit_small_patch16_224`, random weights), batch 32, on the CPU: the
unpruned model, the model pruned to 70 % of its parameters by the `kl` allocation (the
plan `benchmarks/speedup.py` makes: seeded random scores, which decide how many units
each layer keeps, not the cost), and that pruned model with token merging at three
strengths per method (`bipartite`, `neighbour`), installed by the code `tapvits prune
--merge` runs. Target (CAIT's DeiT-Small figure): pruned + merging ≥ 1.9× faster than
unpruned. Accuracy is not measured here: random weights have none (the device benchmark
adds accuracy rows with trained weights).

Latency comes from `speedup.py`'s interleaved rounds (each round times the unpruned model,
then the variant, on the same input; speedup = ratio of the fastest rounds) because this
shared machine's load swings within seconds.

    bash .ci/env python benchmarks/token_merging.py [--repeats 5] [--warmup 1]

Writes benchmarks/results/token_merging.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from speedup import INPUT, interleaved_latency, plans, run_conditions   # the issue-5 benchmark's plans and timing
from tapvits_cli.evaluation.metrics import count_macs
from tapvits_cli.models.factory import count_parameters, create_model
from tapvits_cli.models.spec import TokenMerging
from tapvits_cli.models.token_merging import set_token_merging
from tapvits_cli.pruning import prune_model

RESULTS = Path(__file__).parent / "results"
ARCHITECTURE, BLOCKS, BATCH, BUDGET, STRATEGY = "vit_small_patch16_224", 12, 32, 0.7, "kl"
TARGET = 1.9
# (method, amount per merging block, merging blocks or None for all), weakest first.
STRENGTHS = (("bipartite", 8, None), ("bipartite", 12, None), ("bipartite", 15, None),
             ("neighbour", 1, range(4, 12)), ("neighbour", 1, None), ("neighbour", 2, range(0, 4)))


def describe(method: str, amount: int, layers) -> str:
    blocks = "all blocks" if layers is None else f"blocks {layers[0]}-{layers[-1]}"
    unit = "tokens" if method == "bipartite" else "line pairs"
    return f"{method} {amount} {unit}, {blocks}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    base = create_model(ARCHITECTURE, {}).eval()
    keep = next(kept for strategy, budget, kept in plans(ARCHITECTURE, args.seed)
                if strategy == STRATEGY and budget == BUDGET)
    pruned = prune_model(base, keep).eval()
    variants = [("pruned 70%", None, pruned)]
    for method, amount, layers in STRENGTHS:
        merging = TokenMerging.uniform(method, amount, BLOCKS, layers)
        variant = copy.deepcopy(pruned)
        set_token_merging(variant, merging)
        variants.append((f"pruned 70% + {describe(method, amount, layers)}", merging, variant))

    base_macs, base_params = count_macs(base, INPUT), count_parameters(base)
    rows = []
    for label, merging, variant in variants:
        timed = interleaved_latency(base, variant, BATCH, args)
        row = {"variant": label, "token_merging": merging.to_dict() if merging else None,
               "tokens_per_block": list(merging.token_counts((14, 14), 1)) if merging else [197] * BLOCKS,
               "params_fraction": count_parameters(variant) / base_params,
               "macs_ratio": base_macs / count_macs(variant, INPUT),
               f"base_latency_ms@{BATCH}": timed["min_base"], f"latency_ms@{BATCH}": timed["min_pruned"],
               f"speedup@{BATCH}": timed["min_base"] / timed["min_pruned"],
               f"speedup_of_medians@{BATCH}": timed["median_base"] / timed["median_pruned"]}
        rows.append(row)
        print(f"{label:<58} MACs ×{row['macs_ratio']:.2f}  {row[f'latency_ms@{BATCH}']:.0f} ms "
              f"(unpruned {row[f'base_latency_ms@{BATCH}']:.0f} ms)  speedup ×{row[f'speedup@{BATCH}']:.2f}",
              flush=True)
    unpruned_ms = min(row[f"base_latency_ms@{BATCH}"] for row in rows)
    merged_rows = [row for row in rows if row["token_merging"]]
    best = {method: max(row[f"speedup@{BATCH}"] for row in merged_rows if row["token_merging"]["method"] == method)
            for method in ("bipartite", "neighbour")}
    document = {"target": f"pruned + merging speedup@{BATCH} >= {TARGET} x unpruned (CAIT, DeiT-Small)",
                "best_speedup_per_method": best, "met": all(value >= TARGET for value in best.values()),
                f"unpruned_latency_ms@{BATCH}": unpruned_ms, "model": ARCHITECTURE, "input": list(INPUT),
                "batch": BATCH, "budget": BUDGET, "strategy": STRATEGY, **run_conditions(args), "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "token_merging.json").write_text(json.dumps(document, indent=2) + "\n")
    lines = [f"| variant | params | MACs ratio | tokens after the last block | latency@{BATCH} ms (unpruned) | "
             f"speedup@{BATCH} |", "|---|---|---|---|---|---|",
             f"| unpruned | 1.000 | 1.00 | 197 | {unpruned_ms:.0f} (fastest of all its rounds) | 1.00 |"]
    for row in rows:
        lines.append(f"| {row['variant']} | {row['params_fraction']:.3f} | {row['macs_ratio']:.2f} | "
                     f"{row['tokens_per_block'][-1]} | {row[f'latency_ms@{BATCH}']:.0f} "
                     f"({row[f'base_latency_ms@{BATCH}']:.0f}) | {row[f'speedup@{BATCH}']:.2f} |")
    text = "\n".join(lines) + (
        f"\n\nbest speedup at batch {BATCH}: bipartite ×{best['bipartite']:.2f}, neighbour ×{best['neighbour']:.2f} "
        f"(target ≥ {TARGET}); DeiT-Small, 224×224, random weights, {torch.get_num_threads()} threads; latency = "
        f"fastest of {args.repeats} interleaved rounds after {args.warmup} warm-up\n")
    (RESULTS / "token_merging.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
