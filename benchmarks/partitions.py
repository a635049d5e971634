"""Issue 14 benchmark: the device experiment over several partitions of Fashion-MNIST's test split.

One partition hides what another shows: on 5 label-disjoint 2-class devices top-k selection
looks perfect, on devices of three overlapping classes it misses whole classes. This runs
the device benchmark's methods on four partitions (recipes/fashion-mnist-devices.yaml and
recipes/fashion-mnist/partitions/):

* ``pairs``: 5 label-disjoint devices of 2 classes (the device benchmark's own);
* ``overlap3``: 5 devices of 3 classes, neighbours sharing one class;
* ``dirichlet-0.5``, ``dirichlet-0.1``: 5 non-IID devices drawn with Dirichlet(α) class
  proportions (seed 0, ``dirichlet=α:part=K/5`` references).

Each (partition, method, selection strategy) is one ``tapvits run`` of the method's recipe
with the partition's devices (``--set devices=...``) and the strategy
(``--set stages.select.strategy=...``), through the real CLI, all sharing the device
benchmark's stage cache (pool features, GMMs are made once per version of tapvits's code).
The first run trains the base model and saves it as ``partitions-work/base-seed0.safetensors``;
every later run, of any seed, starts from that file. Methods:

* ``select``: selection only (no scoring, training or evaluation): precision, class recall,
  the smallest class's ratio and component coverage of each strategy, cheaply;
* ``base`` (the unpruned base model, evaluated as it is), ``base-finetuned`` (fine-tuned on
  the selected set), ``tap`` (70% by default; the output-norm criterion since issue 14),
  ``tap-composite`` (TAP with the paper's composite criterion, TAP's before), ``tap-kl-power``
  and ``tap-global`` (TAP with the other two allocations), and the baselines that use the
  same selected set: ``magnitude-uniform-gmm`` and ``taylor-global-gmm``;
* probes: ``tap-kl-power-0.5`` (``kl-power`` with exponent τ = 0.5 instead of 1.1, between
  ``kl``'s near-uniform shares and ``kl-power``'s), and ``tap-3-epochs``,
  ``base-finetuned-3-epochs``, ``taylor-global-gmm-3-epochs``, ``magnitude-uniform-gmm-3-epochs``
  (three epochs of fine-tuning instead of one).

Rows are updated in place (``--fresh`` starts anew), so a run adds or redoes some rows and
keeps the rest. Targets per partition (issue 14), for ``--default-strategy``: TAP at the
budget ≥ the unpruned base; ≥ the best same-set baseline + 1 point; no device more than
2 points below its unpruned base. They are judged on seed 0, and again on the mean over
seeds where ``--seed`` added rows for TAP and both baselines.

    bash .ci/env python benchmarks/partitions.py --methods select --strategies topk,stratified,ratio,ratio-stratified,class-prior
    bash .ci/env python benchmarks/partitions.py --methods base,tap --strategies class-prior,stratified,ratio-stratified
    bash .ci/env python benchmarks/partitions.py --methods magnitude-uniform-gmm,taylor-global-gmm,base-finetuned \\
        --strategies class-prior
    bash .ci/env python benchmarks/partitions.py --methods tap,magnitude-uniform-gmm,taylor-global-gmm \
        --strategies class-prior --seed 1      # another seed of every per-device stage, on seed 0's base model
    bash .ci/env python benchmarks/partitions.py --report     # redraw the Markdown from the JSON

The default strategy was first ``stratified`` (better than ``ratio-stratified`` by 0.12
points of TAP's mean top-1 on ``overlap3``, the first partition measured), then
``ratio-stratified`` once all four partitions were measured: 1.7 points better on
Dirichlet α = 0.5, within 0.2 elsewhere, and it covers small device classes; then
``class-prior``, which keeps classes the device lacks out of the sets: 1.3 to 8.6 points
above ``ratio-stratified`` on every partition.

Writes benchmarks/results/partitions.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
WORK = RESULTS / "partitions-work"
CACHE = RESULTS / "cache" / "stages"
SEED0_BASE = WORK / "base-seed0.safetensors"   # the base model other seeds fine-tune from (a copy of seed 0's)
BASE_RECIPE = ROOT / "recipes" / "fashion-mnist-devices.yaml"
VARIANTS = ROOT / "recipes" / "fashion-mnist"

PARTITIONS = {
    "pairs": BASE_RECIPE,
    "overlap3": VARIANTS / "partitions" / "overlap3.yaml",
    "dirichlet-0.5": VARIANTS / "partitions" / "dirichlet-0.5.yaml",
    "dirichlet-0.1": VARIANTS / "partitions" / "dirichlet-0.1.yaml",
}
# method → (recipe, fixed budget or None for --budget, extra settings, whether the selected set matters)
METHODS = {
    "select": (VARIANTS / "base.yaml", 1.0, ("stages.eval=false",), True),
    "base": (VARIANTS / "base.yaml", 1.0, (), False),
    "base-finetuned": (VARIANTS / "base-finetuned.yaml", 1.0, (), True),
    "tap": (BASE_RECIPE, None, (), True),
    "tap-composite": (VARIANTS / "tap-composite.yaml", None, (), True),
    "tap-kl-power": (BASE_RECIPE, None, ("stages.allocate.strategy=kl-power",), True),
    "tap-global": (BASE_RECIPE, None, ("stages.allocate.strategy=global",), True),
    "magnitude-uniform-gmm": (VARIANTS / "magnitude-uniform-gmm.yaml", None, (), True),
    "taylor-global-gmm": (VARIANTS / "taylor-global-gmm.yaml", None, (), True),
    # probes of what else could move TAP against the baselines (README, "TAP's criterion and allocation")
    "tap-kl-power-0.5": (BASE_RECIPE, None, ("stages.allocate.strategy=kl-power", "stages.allocate.temperature=0.5"),
                         True),
    "tap-3-epochs": (BASE_RECIPE, None, ("stages.finetune.epochs=3",), True),
    "base-finetuned-3-epochs": (VARIANTS / "base-finetuned.yaml", 1.0, ("stages.finetune.epochs=3",), True),
    "taylor-global-gmm-3-epochs": (VARIANTS / "taylor-global-gmm.yaml", None, ("stages.finetune.epochs=3",), True),
    "magnitude-uniform-gmm-3-epochs": (VARIANTS / "magnitude-uniform-gmm.yaml", None, ("stages.finetune.epochs=3",),
                                       True),
    "tap-taylor": (BASE_RECIPE, None, ("stages.score.criterion=taylor",), True),
    "tap-taylor-kl-power": (BASE_RECIPE, None, ("stages.score.criterion=taylor", "stages.allocate.strategy=kl-power"),
                            True),
}
SAME_SET_BASELINES = ("magnitude-uniform-gmm", "taylor-global-gmm")
TARGET_BUDGET = 0.7   # the issue's targets are TAP's at 70%, whatever budget a run measures
TAP_METHODS = ("tap", "tap-composite", "tap-kl-power", "tap-global")   # judged against the same-set baselines over seeds
SELECTION_FIGURES = ("metric_precision", "finetune_precision", "metric_class_recall", "finetune_class_recall",
                     "metric_min_class_ratio", "finetune_min_class_ratio", "metric_coverage", "finetune_coverage",
                     "metric_worst_component_ratio", "finetune_worst_component_ratio")


def devices_of(recipe: Path) -> list:
    """The devices list of a partition recipe (its own, or the recipe it extends)."""
    document = yaml.safe_load(recipe.read_text())
    if "devices" in document:
        return document["devices"]
    return devices_of((recipe.parent / document["extends"]).resolve())


def seed_settings(seed: int) -> list[str]:
    """Every run after the first fine-tunes from seed 0's saved base model; another seed reruns every
    per-device stage on it, so the spread of one method's result comes from GMM fits, selection
    draws, scoring and fine-tuning with the base held fixed. Saved, the base is an input like a
    downloaded checkpoint: the stage cache's key follows tapvits's code, and retraining it
    (about 20 minutes) after every edit would only reproduce it."""
    if not SEED0_BASE.exists():
        if not seed:
            return []   # this run trains it (the recipe's base_model.train); run() saves it
        run(next(iter(PARTITIONS)), "base", None, 1.0)
    return [*([f"seed={seed}"] if seed else []), "base_model.train=null", f"base_model.artifact={SEED0_BASE}"]


def run(partition: str, method: str, strategy: str | None, budget: float, seed: int = 0) -> dict:
    recipe, fixed, extra, _ = METHODS[method]
    budget = fixed or budget
    label = f"{method}-{strategy}" if strategy else method
    run_dir = WORK / partition / (f"{label}@{budget:g}" + (f"-seed{seed}" if seed else ""))
    settings = [f"budget={budget}", f"devices={json.dumps(devices_of(PARTITIONS[partition]))}", *extra,
                *seed_settings(seed)]
    if strategy:
        settings.append(f"stages.select.strategy={strategy}")
    command = ["tapvits", "--json", "run", str(recipe), "--run-dir", str(run_dir), "--cache", str(CACHE)]
    for setting in settings:
        command += ["--set", setting]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"{partition}/{label} at {budget:g} failed (exit {result.returncode}): {result.stderr.strip()[-2000:]}")
    summary = json.loads(result.stdout)
    trained = run_dir / "base" / "model.safetensors"
    if not SEED0_BASE.exists() and trained.exists():
        shutil.copyfile(trained, SEED0_BASE)
    summary["wall_seconds"] = time.perf_counter() - started
    summary["run_dir"] = str(run_dir.relative_to(ROOT))
    summary["command"] = " ".join(command[:2] + ["run", str(Path(recipe).relative_to(ROOT)), "--run-dir",
                                                 summary["run_dir"], "--cache", str(CACHE.relative_to(ROOT))]
                                  + [f"--set '{s}'" for s in settings])
    return summary


def mean_of(devices: list[dict], key: str) -> float | None:
    values = [d[key] for d in devices if d.get(key) is not None]
    return sum(values) / len(values) if values else None


def row_of(partition: str, method: str, strategy: str | None, budget: float, summary: dict, seed: int = 0) -> dict:
    devices = summary["devices"]
    row = {"partition": partition, "method": method, "strategy": strategy, "budget": summary["budget"], "seed": seed,
           "mean_top1": summary["mean"]["top1"] if summary["mean"] else None,
           "params_kept": summary["mean"]["params_kept"] if summary["mean"] else None,
           "per_device_top1": {d["device"]: d.get("top1") for d in devices},
           "per_device": {d["device"]: {key: d.get(key) for key in SELECTION_FIGURES} for d in devices},
           "wall_seconds": round(summary["wall_seconds"], 1), "command": summary["command"]}
    row.update({key: mean_of(devices, key) for key in SELECTION_FIGURES})
    return row


def key_of(row: dict) -> tuple:
    return row["partition"], row["method"], row["strategy"], row["budget"], row.get("seed", 0)


def device_drops(base: dict, row: dict) -> dict[str, float]:
    """Points each device of ``row`` lies below its unpruned ``base`` (negative: above)."""
    return {d: (base["per_device_top1"][d] - top1) * 100 for d, top1 in row["per_device_top1"].items()
            if top1 is not None and base["per_device_top1"].get(d) is not None}


def verdicts(rows: list[dict], strategy: str, budget: float) -> list[str]:
    find = {key_of(r): r for r in rows}
    lines = []
    for partition in PARTITIONS:
        base = find.get((partition, "base", None, 1.0, 0))
        tap = find.get((partition, "tap", strategy, budget, 0))
        if base is None or tap is None:
            continue
        lines.append(f"{partition}: TAP ({strategy}) at {budget:.0%} {tap['mean_top1']:.2%} vs the unpruned base "
                     f"{base['mean_top1']:.2%}: {'met' if tap['mean_top1'] >= base['mean_top1'] else 'NOT met'} "
                     f"(target ≥)")
        baselines = [find[(partition, m, strategy, budget, 0)] for m in SAME_SET_BASELINES
                     if (partition, m, strategy, budget, 0) in find]
        if baselines:
            best = max(baselines, key=lambda r: r["mean_top1"])
            gap = (tap["mean_top1"] - best["mean_top1"]) * 100
            lines.append(f"{partition}: TAP − best same-set baseline ({best['method']}) = {gap:+.2f} points "
                         f"({'met' if gap >= 1 else 'NOT met'}: target ≥ +1)")
            tuned = find.get((partition, "base-finetuned", strategy, 1.0, 0))
            if tuned is not None:   # what the same fine-tuning makes of the whole model: the room TAP competes in
                lines.append(f"  {partition}: the unpruned base fine-tuned the same way {tuned['mean_top1']:.2%}; "
                             f"TAP {(tap['mean_top1'] - tuned['mean_top1']) * 100:+.2f} points, best same-set "
                             f"baseline {(best['mean_top1'] - tuned['mean_top1']) * 100:+.2f} points from it")
        drops = device_drops(base, tap)
        worst = max(drops, key=drops.get)
        lines.append(f"{partition}: worst device vs its unpruned base: {worst} {-drops[worst]:+.2f} points "
                     f"({'met' if drops[worst] <= 2 else 'NOT met'}: target ≥ −2)")
        for other in sorted({r["strategy"] for r in rows if r["partition"] == partition and r["method"] == "tap"
                             and r["budget"] == budget and r["strategy"] != strategy and not r.get("seed")}):
            delta = (tap["mean_top1"] - find[(partition, "tap", other, budget, 0)]["mean_top1"]) * 100
            lines.append(f"  {partition}: TAP ({strategy}) − TAP ({other}) = {delta:+.2f} points")
    return lines


def seed_verdicts(rows: list[dict], strategy: str, budget: float) -> list[str]:
    """The targets again on the mean over every seed a TAP method and all same-set baselines share,
    where there is more than one: one seed's ranking of methods this close is partly luck."""
    find = {key_of(r): r for r in rows}
    lines = []
    for partition in PARTITIONS:
        base = find.get((partition, "base", None, 1.0, 0))
        if base is None:
            continue
        for candidate in TAP_METHODS:
            methods = (candidate, *SAME_SET_BASELINES)
            seeds = sorted(seed for seed in {r.get("seed", 0) for r in rows}
                           if all((partition, m, strategy, budget, seed) in find for m in methods))
            if len(seeds) < 2:
                continue
            means = {m: sum(find[(partition, m, strategy, budget, seed)]["mean_top1"] for seed in seeds) / len(seeds)
                     for m in methods}
            best = max(SAME_SET_BASELINES, key=means.get)
            drops = [drop for seed in seeds
                     for drop in device_drops(base, find[(partition, candidate, strategy, budget, seed)]).values()]
            lines.append(f"{partition}, mean over seeds {', '.join(map(str, seeds))}: {candidate} "
                         f"{means[candidate]:.2%} (unpruned base {base['mean_top1']:.2%}), best same-set baseline "
                         f"{best} {means[best]:.2%}: {(means[candidate] - means[best]) * 100:+.2f} points; worst "
                         f"device on any seed {-max(drops):+.2f} points vs its unpruned base")
    return lines


def fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def not_measured(rows: list[dict], strategy: str, budget: float) -> list[str]:
    """What the issue's comparison needs per partition and the results do not hold yet."""
    have = {key_of(r)[:4] for r in rows if not r.get("seed")}
    wanted = [(p, "select", s, 1.0) for p in PARTITIONS for s in ("topk", "stratified", "ratio", "ratio-stratified")]
    wanted += [(p, "base", None, 1.0) for p in PARTITIONS]
    wanted += [(p, m, s, budget) for p in PARTITIONS for m, s in
               (("tap", strategy), ("tap", "topk"), *((m, strategy) for m in SAME_SET_BASELINES))]
    wanted += [(p, "base-finetuned", strategy, 1.0) for p in PARTITIONS]
    return [f"{p} {m}" + (f" ({s})" if s else "") + (f" at {b:.0%}" if b < 1 else "")
            for p, m, s, b in wanted if (p, m, s, b) not in have]


def markdown(rows: list[dict], base_model: dict | None, lines: list[str], missing: list[str] = ()) -> str:
    out = []
    if base_model:
        out += [f"Base model: {base_model['parameters']:,} parameters, Fashion-MNIST test top-1 "
                f"{base_model['top1']:.2%}.", ""]
    out += ["## Selection per partition and strategy (means over devices)", "",
            "| partition | strategy | precision (metric / fine-tune) | class recall (metric / fine-tune) | "
            "smallest class ratio (metric / fine-tune) | component coverage (metric / fine-tune) |",
            "|---|---|---|---|---|---|"]
    selection_rows = [r for r in rows if r["method"] == "select"]
    for r in sorted(selection_rows, key=lambda r: (list(PARTITIONS).index(r["partition"]), r["strategy"])):
        out.append(f"| {r['partition']} | {r['strategy']} | {fmt(r['metric_precision'], '.3f')} / "
                   f"{fmt(r['finetune_precision'], '.3f')} | {fmt(r['metric_class_recall'], '.2f')} / "
                   f"{fmt(r['finetune_class_recall'], '.2f')} | {fmt(r['metric_min_class_ratio'], '.2f')} / "
                   f"{fmt(r['finetune_min_class_ratio'], '.2f')} | {fmt(r['metric_coverage'], '.2f')} / "
                   f"{fmt(r['finetune_coverage'], '.2f')} |")
    for partition in PARTITIONS:
        own = [r for r in rows if r["partition"] == partition and r["method"] != "select"]
        if not own:
            continue
        devices = list(own[0]["per_device_top1"])
        out += ["", f"## {partition}", "",
                "| method | strategy | budget | mean top-1 | " + " | ".join(devices)
                + " | precision | class recall | smallest class ratio | coverage |",
                "|" + "---|" * (8 + len(devices))]
        for r in own:
            seed = f" (seed {r['seed']})" if r.get("seed") else ""
            out.append(f"| {r['method']}{seed} | {r['strategy'] or '–'} | {r['budget']:.0%} | {fmt(r['mean_top1'], '.2%')} | "
                       + " | ".join(fmt(r["per_device_top1"].get(d), ".2%") for d in devices)
                       + f" | {fmt(r['finetune_precision'], '.3f')} | {fmt(r['finetune_class_recall'], '.2f')} | "
                       f"{fmt(r['finetune_min_class_ratio'], '.2f')} | {fmt(r['finetune_coverage'], '.2f')} |")
    return "\n".join(out + ["", "Precision, class recall, smallest class ratio and coverage in the method tables are "
                                "those of the fine-tuning set (the `base` row's set is not used).", "", *lines, "",
                                *(["Not measured yet: " + "; ".join(missing) + ".", ""] if missing else [])])


def base_model_figures() -> dict:
    """The base model's top-1 on the whole test split (evaluated once, cached in the work directory)."""
    report = WORK / "base-test-report.json"
    if not report.exists():
        result = subprocess.run(["tapvits", "eval", str(SEED0_BASE), "--data", "fashion-mnist:split=test", "--no-latency",
                                 "-o", str(report)], capture_output=True, text=True, cwd=ROOT)
        if result.returncode != 0:
            sys.exit(f"evaluating the base model failed: {result.stderr.strip()}")
    body = json.loads(report.read_text())
    return {"top1": body["top1"], "parameters": body["parameters"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--partitions", default=",".join(PARTITIONS))
    parser.add_argument("--methods", default="select,base,tap")
    parser.add_argument("--strategies", default="topk,stratified,ratio,ratio-stratified")
    parser.add_argument("--default-strategy", default="class-prior",
                        help="the strategy the verdicts judge (the recipes' default)")
    parser.add_argument("--budget", type=float, default=TARGET_BUDGET,
                        help="budget of the pruning methods' runs; the verdicts stay at 70%%")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of every per-device stage; other than 0, on seed 0's base model")
    parser.add_argument("--fresh", action="store_true", help="start the results anew instead of updating them")
    parser.add_argument("--report", action="store_true", help="only redraw partitions.md from partitions.json")
    args = parser.parse_args()
    if args.report:
        rewrite_markdown()
        return
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    partitions, methods = args.partitions.split(","), args.methods.split(",")
    strategies = args.strategies.split(",")
    unknown = (set(partitions) - set(PARTITIONS)) | (set(methods) - set(METHODS))
    if unknown:
        sys.exit(f"unknown partitions or methods: {', '.join(sorted(unknown))}")
    path = RESULTS / "partitions.json"
    document = json.loads(path.read_text()) if path.exists() and not args.fresh else {"rows": []}
    rows, base_model = document["rows"], document.get("base_model")
    # cheap before costly: every partition's selection, then the unpruned base, then the rest
    schedule = [(p, m, s) for m in methods for p in partitions
                for s in (strategies if METHODS[m][3] else [None])]
    for partition, method, strategy in schedule:
        summary = run(partition, method, strategy, args.budget, args.seed)
        row = row_of(partition, method, strategy, args.budget, summary, args.seed)
        rows[:] = [r for r in rows if key_of(r) != key_of(row)] + [row]
        if base_model is None and SEED0_BASE.exists():
            base_model = base_model_figures()
        print(f"{partition:<14} {method:<22} {strategy or '–':<17} mean top-1 {fmt(row['mean_top1'], '.2%'):>7}  "
              f"precision {fmt(row['finetune_precision'], '.3f')}  class recall "
              f"{fmt(row['finetune_class_recall'], '.2f')}/{fmt(row['metric_class_recall'], '.2f')}  min class "
              f"{fmt(row['finetune_min_class_ratio'], '.2f')}/{fmt(row['metric_min_class_ratio'], '.2f')}  coverage "
              f"{fmt(row['finetune_coverage'], '.2f')}/{fmt(row['metric_coverage'], '.2f')}  "
              f"({summary['wall_seconds']:.0f} s)", flush=True)
        rows.sort(key=lambda r: (list(PARTITIONS).index(r["partition"]), list(METHODS).index(r["method"]),
                                 r["strategy"] or "", -r["budget"], r.get("seed", 0)))
        lines = judged(rows, args.default_strategy)
        document = {"experiment": "Fashion-MNIST test split in four partitions into 5 devices each; GMM on fold 0/2 "
                                  "of a device's images, top-1 on fold 1/2",
                    "partitions": {p: str(PARTITIONS[p].relative_to(ROOT)) for p in PARTITIONS},
                    "default_strategy": args.default_strategy, "budget": TARGET_BUDGET, "base_model": base_model,
                    "rows": rows, "verdicts": lines,
                    "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                "python": sys.version.split()[0]}}
        RESULTS.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(document, indent=2) + "\n")
        write_markdown(rows, base_model, args.default_strategy, lines)
    print("\n".join(document.get("verdicts", [])))


def judged(rows: list[dict], strategy: str) -> list[str]:
    """Every verdict line on ``rows``: seed 0's, then the means over seeds, at the targets' budget."""
    return verdicts(rows, strategy, TARGET_BUDGET) + seed_verdicts(rows, strategy, TARGET_BUDGET)


def write_markdown(rows: list[dict], base_model: dict | None, strategy: str, lines: list[str]) -> None:
    (RESULTS / "partitions.md").write_text(markdown(rows, base_model, lines,
                                                    not_measured(rows, strategy, TARGET_BUDGET)))


def rewrite_markdown() -> None:
    """Redraw partitions.md from partitions.json (``--report``), e.g. after the code that draws it changed."""
    document = json.loads((RESULTS / "partitions.json").read_text())
    rows, strategy = document["rows"], document["default_strategy"]
    write_markdown(rows, document.get("base_model"), strategy, judged(rows, strategy))


if __name__ == "__main__":
    main()
