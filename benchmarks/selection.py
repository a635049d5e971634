"""Issue 3 benchmarks: selection precision, fit-gmm cost, select scale.

Everything runs through the `tapvits` command line, as a user would, and reads the
figures back from the artifacts the commands write.

1. **Selection precision.** Public pool = Fashion-MNIST train (60k); extractor = a small
   ViT trained here on that pool (cached). Devices = the test split cut into 5
   label-disjoint devices of 2 classes; each device fits its GMM on the stratified half
   `fold=0/2` of its images (1,000 images). For `topk`, `stratified` and `random`, the
   precision at 640 (metric set) and 6,400 (fine-tuning set) is the share of selected
   public samples whose label is one of the device's classes. Target: mean
   precision@640 ≥ 0.90 for `topk`.
2. **fit-gmm cost** for those 1,000-sample devices, split into feature extraction and
   mixture fitting (BIC search included), as recorded in each GMM artifact.
   Target: fitting ≤ 10 s on this 2-core CPU.
3. **select scale.** Throughput and peak memory (RSS of the `tapvits select` process)
   scoring 10^5 and 10^6 synthetic feature rows from an HDF5 table. Target ≥ 500k rows/s,
   peak memory flat in the row count.

    bash .ci/env python benchmarks/selection.py            # full run (first run trains the extractor)
    bash .ci/env python benchmarks/selection.py --quick    # small smoke run, minutes

Results: benchmarks/results/selection.json (and .md); the extractor and pool table are
cached in benchmarks/results/cache/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
CACHE = RESULTS / "cache"
EXTRACTOR_ARGS = ["vit_tiny_patch16_224", "-a", "img_size=28", "-a", "patch_size=4", "-a", "in_chans=1",
                  "-a", "num_classes=10", "-a", "embed_dim=96", "-a", "depth=6", "-a", "num_heads=3"]
DEVICES = [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
STRATEGIES = ("topk", "stratified", "random")


def tapvits(*args: str) -> tuple[dict, float]:
    """Run one command; returns its --json result and wall seconds."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tapvits_cli", "--json", "--no-progress", *map(str, args)],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"tapvits {' '.join(map(str, args))} failed ({proc.returncode}): {proc.stderr.strip()}")
    return json.loads(proc.stdout), seconds


def peak_rss_kib(args: list[str]) -> tuple[dict, float, int]:
    """Run one tapvits command in a fresh child and measure *its* peak RSS."""
    code = ("import resource, subprocess, sys, json, time\n"
            "t = time.perf_counter()\n"
            "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
            "dt = time.perf_counter() - t\n"
            "print(json.dumps({'rc': p.returncode, 'out': p.stdout, 'err': p.stderr, 'seconds': dt,\n"
            "  'peak_kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))\n")
    command = [sys.executable, "-m", "tapvits_cli", "--json", "--no-progress", *map(str, args)]
    report = json.loads(subprocess.run([sys.executable, "-c", code, *command], capture_output=True,
                                       text=True, check=True).stdout)
    if report["rc"] != 0:
        raise SystemExit(f"{' '.join(map(str, command))} failed: {report['err'].strip()}")
    return json.loads(report["out"] or "{}"), report["seconds"], report["peak_kib"]


def inspect(path: Path) -> dict:
    return tapvits("inspect", path)[0]


def train_extractor(epochs: int, train_ref: str) -> tuple[Path, float]:
    path = CACHE / f"extractor-e{epochs}-{train_ref.replace(':', '_').replace('=', '-')}.safetensors"
    if path.exists():
        return path, float("nan")
    _, seconds = tapvits("finetune", "--model", *EXTRACTOR_ARGS, "--data", train_ref, "--epochs", epochs,
                            "--batch-size", 128, "--lr", "1e-3", "--augment", "crop", "-o", path)
    return path, seconds


def extractor_accuracy(extractor: Path, test_ref: str) -> float:
    """Top-1 of the extractor's own classifier on the test split (reported, not used)."""
    import torch

    from tapvits_cli.artifacts.model import load_model
    from tapvits_cli.data import open_dataset
    from tapvits_cli.data.preprocess import Preprocessing, iterate_batches

    loaded = load_model(extractor)
    model, spec = loaded.module, loaded.spec
    dataset = open_dataset(test_ref)
    preprocessing = Preprocessing.from_dict(spec.preprocessing)
    correct = 0
    with torch.inference_mode():
        for _, images, labels in iterate_batches(dataset, preprocessing, 512):
            correct += int((model(images).argmax(1) == labels).sum())
    return correct / len(dataset)


def precision_benchmark(args) -> dict:
    train_ref = "fashion-mnist:split=train" + (":sample=6000" if args.quick else "")
    test_ref = "fashion-mnist:split=test"
    extractor, train_seconds = train_extractor(args.epochs, train_ref)
    table = CACHE / f"pool-{extractor.stem}.h5"
    if not table.exists():
        tapvits("features", "--data", train_ref, "--extractor", extractor, "-o", table, "--batch-size", 512)
    metric, finetune = (640, 6400) if not args.quick else (64, 640)
    rows, costs = [], []
    work = RESULTS / "selection-work"
    work.mkdir(parents=True, exist_ok=True)
    for device, classes in enumerate(DEVICES):
        private = f"{test_ref}:classes={classes[0]},{classes[1]}:fold=0/2"
        gmm = work / f"device{device}.gmm.safetensors"
        _, wall = tapvits("fit-gmm", "--data", private, "--extractor", extractor, "-o", gmm)
        figures = inspect(gmm)["figures"]
        costs.append({"device": device, "samples": figures["samples"], "components": figures["components"],
                      "extract_seconds": figures["extract_seconds"], "fit_seconds": figures["fit_seconds"],
                      "wall_seconds": round(wall, 2)})
        for strategy in STRATEGIES:
            out = work / f"device{device}-{strategy}.h5"
            tapvits("select", gmm, "--pool", table, "--strategy", strategy, "--metric-size", metric,
                    "--finetune-size", finetune, "-o", out)
            from tapvits_cli.artifacts.metric_set import read_metric_set

            selection = read_metric_set(out)
            hit = np.isin(selection.labels, classes)
            metric_labels = selection.labels[:metric]
            # Coverage: the rarer device class's share of the metric set's on-task rows (0.5 = balanced).
            on_task = [(metric_labels == c).sum() for c in classes]
            rows.append({"device": device, "classes": list(classes), "strategy": strategy,
                         f"precision@{metric}": float(hit[:metric].mean()),
                         f"precision@{finetune}": float(hit[:finetune].mean()),
                         f"minority_share@{metric}": float(min(on_task) / max(1, sum(on_task)))})
    summary = {}
    for strategy in STRATEGIES:
        chosen = [r for r in rows if r["strategy"] == strategy]
        summary[strategy] = {k: float(np.mean([r[k] for r in chosen])) for k in chosen[0] if "@" in k}
    return {"note": "minority share: the rarer device class's fraction of the on-task rows of the metric set",
            "extractor": {"path": extractor.name, "train_reference": train_ref, "epochs": args.epochs,
                          "train_seconds": train_seconds, "test_top1": extractor_accuracy(extractor, test_ref)},
            "sizes": [metric, finetune], "per_device": rows, "mean": summary, "fit_gmm_cost": costs}


def synthetic_inputs(rows: int, dim: int, work: Path) -> tuple[Path, Path]:
    """A feature table of ``rows`` synthetic rows and a GMM sharing its (synthetic) extractor fingerprint.

    The pool is an ``.npz`` of 1-pixel images (so ids, labels and the dataset fingerprint
    are real), its features are drawn from 10 Gaussian clusters in ``dim`` dimensions and
    written with the same writer `tapvits features` uses; the GMM is fitted on 1,000 of
    them with the same code `tapvits fit-gmm` uses.
    """
    from tapvits_cli.artifacts.features import open_feature_writer
    from tapvits_cli.artifacts.gmm import GmmInfo, write_gmm
    from tapvits_cli.artifacts.header import LineageEntry
    from tapvits_cli.data import open_dataset
    from tapvits_cli.gmm.fit import fit_mixture
    from tapvits_cli.models.extract import Extractor

    table, gmm = work / f"synthetic-{rows}.h5", work / f"synthetic-{rows}.gmm.safetensors"
    fingerprint = {"architecture": "synthetic", "kwargs": {}, "weights_sha256": "0" * 64, "preprocessing": {},
                   "feature_layer": "synthetic", "feature_dim": dim}
    extractor = Extractor(model=None, preprocessing=None, fingerprint=fingerprint)
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, size=(10, dim)).astype(np.float32)
    labels = rng.integers(0, 10, size=rows)

    def features(index: np.ndarray) -> np.ndarray:
        noise = np.random.default_rng(int(index[0])).standard_normal((len(index), dim), dtype=np.float32)
        return centres[labels[index]] + noise

    if not table.exists():
        pool = work / f"synthetic-{rows}.npz"
        np.savez(pool, x=np.zeros((rows, 1, 1), dtype=np.uint8), y=labels)
        dataset = open_dataset(str(pool))
        step = 65536
        batches = ((dataset.ids[i:i + step], features(np.arange(i, min(i + step, rows))), labels[i:i + step])
                   for i in range(0, rows, step))
        with open_feature_writer(table, extractor, dataset, {"synthetic": True},
                                 LineageEntry("0" * 64, "file", "synthetic")) as writer:
            writer.write_batches(batches)
            writer.finish()
        pool.unlink()
    device_rows = np.flatnonzero(np.isin(labels, (0, 1)))[:1000]
    result = fit_mixture(features(device_rows), seed=0)
    info = GmmInfo(samples=result.samples, bic=result.bic_per_k, fit_seconds=result.fit_seconds, extract_seconds=0.0,
                   extractor=fingerprint, privacy={"min_samples": 50, "noise_scale": 0.0})
    write_gmm(gmm, result.mixture, info, {"synthetic": True})
    return table, gmm


def scale_benchmark(args) -> list[dict]:
    work = CACHE / "scale"
    work.mkdir(parents=True, exist_ok=True)
    rows_out = []
    for rows in [int(r) for r in args.scale_rows.split(",")]:
        table, gmm = synthetic_inputs(rows, args.scale_dim, work)
        for strategy in ("topk", "stratified"):
            out = work / f"selected-{rows}-{strategy}.h5"
            result, seconds, peak_kib = peak_rss_kib(["select", gmm, "--pool", table, "--strategy", strategy, "-o", out])
            scoring = result["scoring_seconds"]
            rows_out.append({"rows": rows, "dim": args.scale_dim, "strategy": strategy,
                             "command_seconds": round(seconds, 3), "scoring_seconds": scoring,
                             "rows_per_second": round(rows / scoring), "peak_rss_mib": round(peak_kib / 1024, 1)})
    # Most of the absolute figure is importing torch (its CUDA build); what matters is growth with rows.
    smallest = min(r["rows"] for r in rows_out)
    for row in rows_out:
        base = next(r for r in rows_out if r["rows"] == smallest and r["strategy"] == row["strategy"])
        row["peak_rss_growth_mib"] = round(row["peak_rss_mib"] - base["peak_rss_mib"], 1)
    return rows_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small pool and sizes: a smoke run")
    parser.add_argument("--epochs", type=int, default=3, help="extractor training epochs")
    parser.add_argument("--scale-rows", default="100000,1000000", help="row counts for the select-scale benchmark")
    parser.add_argument("--scale-dim", type=int, default=192, help="feature width of the synthetic table")
    parser.add_argument("--skip", default="", help="comma list of parts to skip: precision,scale")
    args = parser.parse_args()
    os.environ.setdefault("PYTHONHASHSEED", "0")
    CACHE.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "load_average": os.getloadavg()}, "quick": args.quick}
    previous = RESULTS / f"{'selection-quick' if args.quick else 'selection'}.json"
    if skip and previous.exists():  # a partial run keeps the other parts' latest figures
        result = {**json.loads(previous.read_text()), **result}
    if "precision" not in skip:
        result["precision"] = precision_benchmark(args)
    if "scale" not in skip:
        result["scale"] = scale_benchmark(args)
        result["scale_machine_load"] = os.getloadavg()
    write_reports(result)


def write_reports(result: dict) -> None:
    lines = ["# Issue 3 benchmarks: selection", "", f"machine: {result['machine']}", ""]
    if "precision" in result:
        p = result["precision"]
        metric, finetune = p["sizes"]
        e = p["extractor"]
        lines += [f"Extractor: {e['path']} ({e['epochs']} epochs on {e['train_reference']}), "
                  f"test top-1 {e['test_top1']:.3f}", "",
                  f"| strategy | mean precision@{metric} | mean precision@{finetune} | mean minority-class share@{metric} |",
                  "|---|---|---|---|"]
        for strategy, values in p["mean"].items():
            lines.append(f"| {strategy} | {values[f'precision@{metric}']:.3f} | {values[f'precision@{finetune}']:.3f} | "
                         f"{values[f'minority_share@{metric}']:.3f} |")
        lines += ["", f"| device | classes | strategy | precision@{metric} | precision@{finetune} | minority share@{metric} |",
                  "|---|---|---|---|---|---|"]
        for r in p["per_device"]:
            lines.append(f"| {r['device']} | {r['classes']} | {r['strategy']} | {r[f'precision@{metric}']:.3f} | "
                         f"{r[f'precision@{finetune}']:.3f} | {r[f'minority_share@{metric}']:.3f} |")
        lines += ["", "fit-gmm cost (seconds, as recorded in each GMM artifact):", "",
                  "| device | samples | K | extraction | mixture fit (BIC search) | command wall |", "|---|---|---|---|---|---|"]
        for c in p["fit_gmm_cost"]:
            lines.append(f"| {c['device']} | {c['samples']} | {c['components']} | {c['extract_seconds']:.2f} | "
                         f"{c['fit_seconds']:.2f} | {c['wall_seconds']:.2f} |")
    if "scale" in result:
        lines += ["", "select scale (synthetic table):", "",
                  "| rows | dim | strategy | command s | scoring s | rows/s (scoring) | peak RSS MiB | growth vs fewest rows MiB |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in result["scale"]:
            lines.append(f"| {r['rows']:,} | {r['dim']} | {r['strategy']} | {r['command_seconds']:.2f} | "
                         f"{r['scoring_seconds']:.2f} | {r['rows_per_second']:,} | {r['peak_rss_mib']} | "
                         f"{r['peak_rss_growth_mib']} |")
    text = "\n".join(lines) + "\n"
    name = "selection-quick" if result["quick"] else "selection"
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
