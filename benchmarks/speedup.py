"""Issue 5 benchmark: real CPU speedup of physically pruned ViTs, next to their MACs ratio.

DeiT-Tiny and DeiT-Small shapes at 224×224 with random weights. For budgets 0.9 … 0.5 of
the parameters and each allocation strategy (`kl`, `uniform`, `global`), a plan is made
by the allocation code `tapvits allocate` runs (seeded random unit scores and layer
importances: which units go does not change the cost, only how many per layer), the
model is pruned by the code `tapvits prune` runs, and its latency is measured with the
code `tapvits eval` runs at batch 1 and 32.

The machine is a shared virtual machine whose neighbours' load comes and goes within
seconds, so one median per model (what `eval` reports) swings by 30 % between two runs
of the same model. The speedup therefore comes from interleaved rounds: after a warm-up
of both, each round times the unpruned model and then the pruned one on the same input,
and the speedup is the ratio of the two models' fastest rounds (the least-disturbed
measurement of each; the ratio of medians is recorded too). Target: latency speedup
≥ 0.9 × the MACs ratio at batch 32; batch 1 is reported as measured.

    bash .ci/env python benchmarks/speedup.py [--models deit-tiny,deit-small] [--repeats 7]

On 2 idle cores the default (7 rounds) takes about 6 minutes; with 5 rounds one DeiT-Tiny row
of 30 came out at 0.89 and the same model measured again at 0.97-1.20, which is the noise left.

Writes benchmarks/results/speedup.json and .md. ``measure`` and ``write_results`` work for
any prunable family: ``swin_speedup.py`` runs them on a Swin.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from tapvits_cli.allocation.strategies import allocate
from tapvits_cli.evaluation.metrics import count_macs, measure_latency
from tapvits_cli.models.factory import count_parameters, create_model
from tapvits_cli.models.families import family_module, family_of
from tapvits_cli.pruning import prune_model
from tapvits_cli.vocabulary import ALLOCATION_STRATEGIES as STRATEGIES

RESULTS = Path(__file__).parent / "results"
MODELS = {"deit-tiny": "vit_tiny_patch16_224", "deit-small": "vit_small_patch16_224"}
BUDGETS = (0.9, 0.8, 0.7, 0.6, 0.5)
INPUT = (3, 224, 224)


def latency(model, batch: int, args) -> float:
    return measure_latency(model, INPUT, batch, args.warmup, args.repeats, "cpu")["median_ms"]


def interleaved_latency(base, pruned, batch: int, args) -> dict:
    """Fastest and median round of each model, timed alternately on the same input."""
    inputs = torch.randn(batch, *INPUT, generator=torch.Generator().manual_seed(args.seed))
    times = {"base": [], "pruned": []}
    with torch.inference_mode():
        for round_index in range(args.warmup + args.repeats):
            for name, model in (("base", base), ("pruned", pruned)):
                start = time.perf_counter()
                model(inputs)
                if round_index >= args.warmup:
                    times[name].append((time.perf_counter() - start) * 1000.0)
    return {f"{stat}_{name}": fn(values) for name, values in times.items()
            for stat, fn in (("min", min), ("median", statistics.median))}


def plans(architecture: str, seed: int):
    """(strategy, budget, keep) for every combination, from seeded random scores."""
    with torch.device("meta"):
        skeleton = create_model(architecture, {})
        cost = family_module(family_of(skeleton)).cost_model(skeleton)
    rng = np.random.default_rng(seed)
    scores = {(layer.block, layer.kind): rng.random(layer.units) for layer in cost.layers}
    blocks = len(cost.layers) // 2
    importance = {kind: rng.exponential(0.5, blocks) for kind in ("attn", "mlp")}
    for strategy in STRATEGIES:
        for budget in BUDGETS:
            result = allocate(cost, scores, importance, "params", budget, strategy)
            keep = {"attn": [None] * blocks, "mlp": [None] * blocks}
            for layer, kept in zip(cost.layers, result.keep):
                keep[layer.kind][layer.block] = kept
            yield strategy, budget, keep


def arguments(description: str, models: str, repeats: int) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--models", default=models)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def measure(models: Mapping[str, str], args) -> list[dict]:
    """One row per model, strategy and budget (plus each model's unpruned row), timed as the module says."""
    torch.manual_seed(args.seed)
    rows = []
    for label, architecture in models.items():
        base = create_model(architecture, {}).eval()
        base_macs, base_params = count_macs(base, INPUT), count_parameters(base)
        base_latency = {batch: latency(base, batch, args) for batch in (1, 32)}
        print(f"{label}: {base_params:,} params, {base_macs / 1e9:.2f} GMACs, "
              f"{base_latency[1]:.1f} ms @1, {base_latency[32]:.0f} ms @32", flush=True)
        for strategy, budget, keep in plans(architecture, args.seed):
            pruned = prune_model(base, keep).eval()
            macs_ratio = base_macs / count_macs(pruned, INPUT)
            row = {"model": label, "strategy": strategy, "budget": budget,
                   "params_fraction": count_parameters(pruned) / base_params, "macs_ratio": macs_ratio}
            for batch in (1, 32):
                timed = interleaved_latency(base, pruned, batch, args)
                row[f"base_latency_ms@{batch}"] = timed["min_base"]
                row[f"latency_ms@{batch}"] = timed["min_pruned"]
                row[f"speedup@{batch}"] = timed["min_base"] / timed["min_pruned"]
                row[f"speedup_of_medians@{batch}"] = timed["median_base"] / timed["median_pruned"]
            row["speedup_over_macs@32"] = row["speedup@32"] / macs_ratio
            rows.append(row)
            print(f"  {strategy:<8} {budget:.1f}: params {row['params_fraction']:.3f}, MACs ×{macs_ratio:.2f}, "
                  f"speedup ×{row['speedup@1']:.2f} @1, ×{row['speedup@32']:.2f} @32 "
                  f"({row['speedup_over_macs@32']:.2f} of the MACs ratio)", flush=True)
        base_latency_after = {batch: latency(base, batch, args) for batch in (1, 32)}
        rows.append({"model": label, "strategy": "unpruned", "budget": 1.0, "params_fraction": 1.0, "macs_ratio": 1.0,
                     "latency_ms@1": base_latency[1], "latency_ms@32": base_latency[32],
                     "latency_ms_after@1": base_latency_after[1], "latency_ms_after@32": base_latency_after[32]})
    return rows


def run_conditions(args) -> dict:
    """How the latencies were taken (threads, rounds, the machine and its load): recorded beside every result."""
    return {"threads": torch.get_num_threads(), "repeats": args.repeats, "warmup": args.warmup,
            "speedup_definition": "fastest unpruned round / fastest round of the measured variant, rounds interleaved",
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg(),
                        "torch": torch.__version__}}


def write_results(rows: list[dict], args, name: str, target: float) -> None:
    """``results/NAME.json`` and ``.md``; ``target`` is the least acceptable speedup / MACs ratio at batch 32."""
    pruned_rows = [r for r in rows if r["strategy"] != "unpruned"]
    worst = min(r["speedup_over_macs@32"] for r in pruned_rows)
    document = {"target": f"speedup@32 >= {target} x MACs ratio", "worst_speedup_over_macs@32": worst,
                "met": worst >= target, **run_conditions(args), "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(document, indent=2) + "\n")
    lines = ["| model | strategy | budget | params | MACs ratio | latency@1 ms (base) | speedup@1 | "
             "latency@32 ms (base) | speedup@32 | speedup/MACs@32 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["strategy"] == "unpruned":
            lines.append(f"| {r['model']} | unpruned | 1.0 | 1.000 | 1.00 | {r['latency_ms@1']:.1f} (after: "
                         f"{r['latency_ms_after@1']:.1f}) | 1.00 | {r['latency_ms@32']:.0f} (after: "
                         f"{r['latency_ms_after@32']:.0f}) | 1.00 | |")
        else:
            lines.append(f"| {r['model']} | {r['strategy']} | {r['budget']:.1f} | {r['params_fraction']:.3f} | "
                         f"{r['macs_ratio']:.2f} | {r['latency_ms@1']:.1f} ({r['base_latency_ms@1']:.1f}) | "
                         f"{r['speedup@1']:.2f} | {r['latency_ms@32']:.0f} ({r['base_latency_ms@32']:.0f}) | "
                         f"{r['speedup@32']:.2f} | {r['speedup_over_macs@32']:.2f} |")
    text = "\n".join(lines) + f"\n\nworst speedup/MACs at batch 32: {worst:.2f} (target ≥ {target}); " \
                              f"{torch.get_num_threads()} threads; latency = fastest of {args.repeats} " \
                              f"interleaved rounds after {args.warmup} warm-up\n"
    (RESULTS / f"{name}.md").write_text(text)
    print(text)


def main() -> None:
    args = arguments(__doc__.splitlines()[0], "deit-tiny,deit-small", repeats=7).parse_args()
    rows = measure({label: MODELS[label] for label in args.models.split(",")}, args)
    write_results(rows, args, "speedup", target=0.9)


if __name__ == "__main__":
    main()
