"""Issue 13 benchmark, selection only: the privacy figures of the private fits without the
whole pipeline (no scoring, fine-tuning or evaluation), for when `privacy.py`'s full runs
do not fit the time there is.

For each ε and device of recipes/fashion-mnist-devices.yaml it runs `fit-gmm --dp-epsilon`
on the device's private half with the base model and pool features that `privacy.py`'s
default run made, `select --strategy topk` (640 / 6,400), and `audit-gmm` against the
held-out half: selection precision@640 (share of the metric set whose label the device
holds), membership AUC, worst mean-to-nearest-sample ratio.

    bash .ci/env python benchmarks/privacy.py --configs default     # makes the base and pool
    bash .ci/env python benchmarks/privacy_selection.py [--epsilons 3,1]
    bash .ci/env python benchmarks/privacy_selection.py --sweep [--seeds 4]

Writes benchmarks/results/privacy_selection.{json,md}. ``--sweep`` instead calls the
private fit as a library over projection dimensions and DP-EM iterations, for several
noise seeds, and writes the precision@640 of each setting (mean and worst over devices
and seeds) to benchmarks/results/privacy_sweep.{json,md}: the measurement behind
fit-gmm's defaults under --dp-epsilon. The noise makes one seed's figure a lottery, so
settings are compared on several.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SOURCE = RESULTS / "privacy-work" / "default"
WORK = RESULTS / "privacy-work" / "selection-only"
RECIPE = ROOT / "recipes" / "fashion-mnist-devices.yaml"
sys.path.insert(0, str(ROOT / "benchmarks"))
from privacy import tapvits  # noqa: E402  (the same invocation as the full benchmark)


def precision(metric_path: Path, private_ref: str) -> float:
    from tapvits_cli.artifacts.metric_set import read_metric_set

    metric = read_metric_set(metric_path)
    return float(np.isin(metric.labels[:640], device_classes(private_ref)).mean())


def device_classes(private_ref: str) -> np.ndarray:
    from tapvits_cli.data import open_dataset

    return np.unique(open_dataset(private_ref).labels)


def sweep(base: Path, pool_path: Path, devices: list[dict], epsilons: list[float], seeds: int) -> None:
    """Precision@640 of topk selection from private mixtures, over (ε, dimensions, iterations)."""
    from tapvits_cli.artifacts.features import open_feature_table
    from tapvits_cli.stages.extractor import embed_dataset, resolve_extractor
    from tapvits_cli.data import open_dataset
    from tapvits_cli.gmm.dp import fit_private_mixture

    extractor, _ = resolve_extractor(str(base), "cpu")
    private = {d["name"]: embed_dataset(extractor, open_dataset(d["private"]), 256, "cpu", d["name"]) for d in devices}
    classes = {d["name"]: device_classes(d["private"]) for d in devices}
    with open_feature_table(pool_path) as table:
        chunks = list(table.iter_chunks(20_000))
    pool = np.concatenate([c[1] for c in chunks]).astype(np.float64)
    labels = np.concatenate([c[2] for c in chunks])
    rows = []
    for epsilon in epsilons:
        for dim in (8, 16, 24, 32):
            for iterations in (2, 4, 10):
                precisions = []
                for seed in range(seeds):
                    for name, features in private.items():
                        fit = fit_private_mixture(features, 4, "diag", dim, epsilon, iterations=iterations, seed=seed,
                                                  min_component_support=10)
                        loglik = fit.mixture.log_likelihood(pool)[0]
                        top = np.argsort(-loglik, kind="stable")[:640]
                        precisions.append(float(np.isin(labels[top], classes[name]).mean()))
                rows.append({"epsilon": epsilon, "dim": dim, "iterations": iterations, "seeds": seeds,
                             "mean_precision": float(np.mean(precisions)), "worst_precision": float(np.min(precisions))})
                print(f"ε={epsilon:g} d={dim} iterations={iterations}: mean {rows[-1]['mean_precision']:.3f}, "
                      f"worst {rows[-1]['worst_precision']:.3f}", file=sys.stderr)
    lines = [f"Precision@640 of topk selection from DP mixtures (K=4, diag), {len(devices)} devices × {seeds} "
             "noise seeds: mean / worst.", "", "| ε | d | DP-EM iterations | mean | worst |", "|---|---|---|---|---|"]
    lines += [f"| {r['epsilon']:g} | {r['dim']} | {r['iterations']} | {r['mean_precision']:.1%} | "
              f"{r['worst_precision']:.1%} |" for r in rows]
    text = "\n".join(lines) + "\n"
    (RESULTS / "privacy_sweep.json").write_text(json.dumps({"recipe": str(RECIPE.relative_to(ROOT)),
                                                             "rows": rows}, indent=2) + "\n")
    (RESULTS / "privacy_sweep.md").write_text(text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epsilons", default=None, help="comma-separated ε [default: 3,1; 10,3,1 with --sweep]")
    parser.add_argument("--sweep", action="store_true", help="sweep dimensions and iterations (library calls)")
    parser.add_argument("--seeds", type=int, default=4, help="noise seeds per setting in --sweep")
    args = parser.parse_args()
    base, pool = SOURCE / "base" / "model.safetensors", SOURCE / "public" / "features.h5"
    if not base.is_file() or not pool.is_file():
        sys.exit(f"run `python benchmarks/privacy.py --configs default` first ({base} or {pool} missing)")
    devices = yaml.safe_load(RECIPE.read_text())["devices"]
    if args.sweep:
        sweep(base, pool, devices, [float(e) for e in (args.epsilons or "10,3,1").split(",")], args.seeds)
        return
    rows = []
    for epsilon in [float(e) for e in (args.epsilons or "3,1").split(",")]:
        per_device = {}
        for device in devices:
            where = WORK / f"dp-{epsilon:g}" / device["name"]
            where.mkdir(parents=True, exist_ok=True)
            gmm, metric = where / "gmm.safetensors", where / "metric.h5"
            fitted = tapvits("fit-gmm", "--data", device["private"], "--extractor", str(base), "--dp-epsilon", str(epsilon),
                             "-o", str(gmm))
            if fitted.returncode != 0:
                per_device[device["name"]] = {"error": fitted.stderr.strip()[-300:]}
                continue
            selected = tapvits("select", str(gmm), "--pool", str(pool), "--strategy", "topk", "--metric-size", "640",
                               "--finetune-size", "6400", "-o", str(metric))
            if selected.returncode != 0:
                per_device[device["name"]] = {"error": selected.stderr.strip()[-300:]}
                continue
            report = tapvits("--json", "audit-gmm", str(gmm), "--private", device["private"], "--held-out",
                             device["test"], "--extractor", str(base))
            body = json.loads(report.stdout) if report.stdout.strip() else {}
            per_device[device["name"]] = {
                "precision": precision(metric, device["private"]),
                "membership_auc": body.get("membership_auc"),
                "worst_distance_ratio": min((r["distance_ratio"] for r in body.get("components", [])), default=None),
                "components": len(body.get("components", []))}
            print(f"ε={epsilon:g} {device['name']}: {per_device[device['name']]}", file=sys.stderr)
        done = [d for d in per_device.values() if "error" not in d]
        rows.append({"epsilon": epsilon, "per_device": per_device,
                     "mean_precision": float(np.mean([d["precision"] for d in done])) if done else None,
                     "worst_auc": max((d["membership_auc"] for d in done if d["membership_auc"] is not None), default=None),
                     "worst_distance_ratio": min((d["worst_distance_ratio"] for d in done
                                                  if d["worst_distance_ratio"] is not None), default=None)})
    lines = ["| ε | precision@640 (mean) | per device | membership AUC (worst) | worst mean-to-sample ratio |",
             "|---|---|---|---|---|"]
    for r in rows:
        per = ", ".join(f"{name} {d['precision']:.1%}" if "error" not in d else f"{name} failed"
                        for name, d in r["per_device"].items())
        fmt = (lambda v, spec: "–" if v is None else format(v, spec))
        lines.append(f"| {r['epsilon']:g} | {fmt(r['mean_precision'], '.1%')} | {per} | "
                     f"{fmt(r['worst_auc'], '.3f')} | {fmt(r['worst_distance_ratio'], '.3f')} |")
    text = "\n".join(lines) + "\n"
    (RESULTS / "privacy_selection.json").write_text(json.dumps({"recipe": str(RECIPE.relative_to(ROOT)),
                                                                 "rows": rows}, indent=2) + "\n")
    (RESULTS / "privacy_selection.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
