"""Issue 18 benchmark: one fleet of simulated digits devices, serially, with ``--jobs 2`` and on Ray.

A cloud serving devices spends most of its time in the per-device chain (fit-gmm → select
→ score → allocate → prune → finetune → eval); the shared steps (base model, pool
features) run once. This measures that chain for ``--devices`` simulated digits devices
(default 24; each holds 2 to 4 random classes of digits' test split, private half
fold=0/2, held-out half fold=1/2) through the real CLI, in these configurations:

* ``serial``: ``tapvits run`` one step at a time, with every core's threads;
* ``serial-1thread``: the same under ``OMP_NUM_THREADS=1`` (the models here are small
  enough that a second thread gains little, so this shows what the scheduler itself adds);
* ``jobs2``: ``tapvits run --jobs 2`` (two worker processes, cores/2 threads each);
* ``ray``: ``tapvits run --executor ray`` on a local Ray instance of 2 CPUs (1 per step),
  which the run starts and shuts down (about 2.3 s and 1.4 s here);
* ``ray-cluster``: the same on a running Ray head of 2 CPUs (``--address auto``), as a
  cloud that serves devices keeps one; the head is started before the run and stopped
  after it (and given 10 s to settle), outside the timing, so no other configuration
  can attach to it.

The base model and the pool features are made once beforehand and copied into each
configuration's run directory (recorded as finished), so every configuration times the
devices' steps only. Reported: wall time, devices per minute, speed-up against serial,
and, from per-stage seconds measured with one thread per step (``SLOT_CONFIGS``), the
cloud seconds per device and a projection for 10,000 devices at several numbers of
parallel slots (ideal scaling: the per-device chain is independent, the shared steps run
once). ``--report`` redraws the Markdown from the JSON. Goals (issue 18): ``jobs2``
≥ 1.7× serial; Ray within 15% of ``jobs2``.

    bash .ci/env python benchmarks/fleet.py                    # about 18 minutes on 2 idle cores
    bash .ci/env python benchmarks/fleet.py --devices 6 --configs serial,jobs2 --rounds 1
    bash .ci/env python benchmarks/fleet.py --workload light --configs serial,serial-1thread,jobs2 --name fleet_light

Run it on an otherwise idle machine: the comparison is between ways of using the same
cores. Writes benchmarks/results/fleet.{json,md} (``--name`` for another name).
The default workload is examples/fleet.sh's (see ``WORKLOADS``); ``--workload light`` gives
each device a quarter of that work against the same fixed start-up cost, which shows what
bounds the speed-up when devices are cheap.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
WORK = RESULTS / "fleet-work"
CONFIGS = {
    "serial": [],
    "serial-1thread": [],
    "jobs2": ["--jobs", "2"],
    "ray": ["--executor", "ray", "--jobs", "2", "--cpus-per-step", "1"],
    "ray-cluster": ["--executor", "ray", "--address", "auto", "--jobs", "2", "--cpus-per-step", "1"],
}
# A serial run with one torch thread: small models gain little from a second thread, so this
# separates what the scheduler gains from what one thread per process gains.
CONFIG_ENVIRONMENT = {"serial-1thread": {"OMP_NUM_THREADS": "1"}}
SHARED = ("base", "public/features")
HEAD_SETTLE_SECONDS = 10   # a head's own agents start after `ray start` returns: a kept cluster has finished that
PROJECTED_DEVICES = 10_000
PROJECTED_SLOTS = (2, 64, 512)


# What each device's chain does. ``fleet-example`` is examples/fleet.sh's defaults (the fleet a user
# runs first): a 4-block, 64-wide ViT, 384 fine-tuning images, 8 epochs, 5 latency repeats. ``light``
# is a quarter of that work per device (2 blocks, 32 wide, 256 images, 2 epochs, 2 repeats), where
# the run's fixed start-up (importing torch and timm, about 5 s of one core, serial or not) weighs most.
WORKLOADS = {
    "fleet-example": {"args": {"embed_dim": 64, "depth": 4, "num_heads": 4}, "finetune-size": 384, "epochs": 8,
                      "latency-repeats": 5},
    "light": {"args": {"embed_dim": 32, "depth": 2, "num_heads": 2}, "finetune-size": 256, "epochs": 2,
              "latency-repeats": 2},
}


def recipe(devices: int, workload: dict) -> dict:
    rng = np.random.default_rng(0)
    entries = []
    for index in range(devices):
        classes = ",".join(str(c) for c in sorted(rng.choice(10, size=int(rng.integers(2, 5)), replace=False)))
        entries.append({"name": f"d{index:02d}", "private": f"digits:split=test:classes={classes}:fold=0/2",
                        "test": f"digits:split=test:classes={classes}:fold=1/2"})
    return {
        "version": 1, "name": "fleet-benchmark", "device": "cpu", "public": "digits:split=train",
        "base_model": {"train": {"model": "vit_tiny_patch16_224", "epochs": 10, "batch-size": 64, "lr": 2e-3,
                                 "args": {"img_size": 8, "patch_size": 2, "in_chans": 1, **workload["args"]}}},
        "devices": entries, "budget": 0.7,
        "stages": {"fit-gmm": {"covariance": "diag", "min-samples": 20, "components": "1-3"},
                   "select": {"metric-size": 64, "finetune-size": workload["finetune-size"]},
                   "finetune": {"epochs": workload["epochs"], "lr": 1e-3, "distill": True},
                   "eval": {"latency-repeats": workload["latency-repeats"]}},
    }


def tapvits(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).parent / "tapvits"), *args]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if result.returncode != 0:
        sys.exit(f"fleet benchmark: {' '.join(command)} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    return result


def prepare_shared(recipe_path: Path) -> Path:
    """A run directory holding only the shared steps (base model, pool features), made once."""
    shared = WORK / "shared"
    one_device = WORK / "shared.yaml"
    document = yaml.safe_load(recipe_path.read_text())
    one_device.write_text(yaml.safe_dump({**document, "devices": document["devices"][:1],
                                          "stages": {**document["stages"], "finetune": False, "eval": False},
                                          "budget": 1.0}, sort_keys=False))
    tapvits("-q", "run", str(one_device), "--run-dir", str(shared))
    return shared


def seeded_run_directory(shared: Path, name: str) -> Path:
    """A fresh run directory whose shared steps are already recorded as finished."""
    target = WORK / name
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for part in ("base", "public"):
        shutil.copytree(shared / part, target / part)
    state = json.loads((shared / "run.json").read_text())
    state["steps"] = {k: v for k, v in state["steps"].items() if k in SHARED}
    (target / "run.json").write_text(json.dumps(state))
    return target


@contextlib.contextmanager
def running_ray_head(wanted: bool):
    """A Ray head of 2 CPUs for the ``ray-cluster`` configuration, stopped afterwards."""
    if not wanted:
        yield
        return
    ray = str(Path(sys.executable).parent / "ray")
    started = subprocess.run([ray, "start", "--head", "--num-cpus", "2", "--include-dashboard", "false",
                              "--disable-usage-stats"], capture_output=True, text=True)
    if started.returncode != 0:
        sys.exit(f"fleet benchmark: ray start failed: {started.stderr.strip()[-2000:]}")
    time.sleep(HEAD_SETTLE_SECONDS)
    try:
        yield
    finally:
        subprocess.run([ray, "stop"], capture_output=True)


def measure(recipe_path: Path, shared: Path, name: str, devices: int) -> dict:
    run_dir = seeded_run_directory(shared, name)
    with running_ray_head(name == "ray-cluster"):
        started = time.perf_counter()
        tapvits("--json", "run", str(recipe_path), "--run-dir", str(run_dir), *CONFIGS[name],
                env=CONFIG_ENVIRONMENT.get(name))
        wall = time.perf_counter() - started
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"]["skipped"] == len(SHARED) and not summary["failed_devices"], summary["steps"]
    stage_seconds: dict[str, float] = {}
    for row in summary["devices"]:
        for stage, seconds in row["stage_seconds"].items():
            stage_seconds[stage] = stage_seconds.get(stage, 0.0) + seconds / devices
    options = [f"{k}={v}" for k, v in CONFIG_ENVIRONMENT.get(name, {}).items()] + CONFIGS[name]
    return {"config": name, "options": options, "wall_seconds": round(wall, 1),
            "devices_per_minute": round(60 * devices / wall, 2),
            "top1": {row["device"]: row["top1"] for row in summary["devices"]},
            "stage_seconds_per_device": {k: round(v, 3) for k, v in stage_seconds.items()}}


def combine(name: str, runs: list[dict], serial_runs: list[dict] | None) -> dict:
    """One config's row: the median wall time over rounds, and the median of its per-round speed-ups
    against the serial run of the same round."""
    walls = [run["wall_seconds"] for run in runs]
    wall = statistics.median(walls)
    row = {**runs[0], "wall_seconds": round(wall, 1), "wall_seconds_per_round": walls,
           "devices_per_minute": round(60 * len(runs[0]["top1"]) / wall, 2)}
    if any(run["top1"] != runs[0]["top1"] for run in runs):
        row["top1"] = None   # differs between rounds: reported as not the same
    if serial_runs:
        speedups = [s["wall_seconds"] / run["wall_seconds"] for s, run in zip(serial_runs, runs)]
        row["speedup_per_round"] = [round(x, 3) for x in speedups]
        row["speedup"] = round(statistics.median(speedups), 3)
    return row


# A slot is one core running one step at a time with one thread: the first of these measured
# such slots (a serial run with two threads does not, and overstates a step's seconds on small models).
SLOT_CONFIGS = ("jobs2", "serial-1thread", "ray", "serial")


def projection(rows: list[dict]) -> dict | None:
    """Hours for 10,000 devices at several slot counts, from one configuration's per-device seconds by stage."""
    source = next((row for name in SLOT_CONFIGS for row in rows if row["config"] == name), None)
    if source is None:
        return None
    per_device = sum(source["stage_seconds_per_device"].values())
    return {"config": source["config"], "stage_seconds_per_device": source["stage_seconds_per_device"],
            "seconds_per_device": round(per_device, 3),
            "hours": {slots: PROJECTED_DEVICES * per_device / slots / 3600 for slots in PROJECTED_SLOTS}}


def workload_text(settings: dict) -> str:
    model = settings["args"]
    return (f"ViT {model['depth']} blocks × {model['embed_dim']} wide, {settings['finetune-size']} fine-tuning "
            f"images × {settings['epochs']} epochs, {settings['latency-repeats']} latency repeats per device")


def markdown(report: dict) -> str:
    rows = report["configs"]
    serial = next((r for r in rows if r["config"] == "serial"), None)
    lines = [f"# Fleet benchmark: {report['devices']} simulated digits devices", "",
             f"{report['machine']}; per-device chain only (shared steps made beforehand), "
             f"workload `{report['workload']}` ({workload_text(report['workload_settings'])}); "
             f"{report['rounds']} interleaved rounds, medians.", "",
             "| executor | options | wall (s), median | wall per round (s) | devices/min | speed-up vs serial, "
             "median (per round) |", "|---|---|---:|---|---:|---|"]
    for row in rows:
        speedup = (f"{row['speedup']:.2f}× ({', '.join(f'{x:.2f}' for x in row['speedup_per_round'])})"
                   if serial else "–")
        lines.append(f"| {row['config']} | `{' '.join(row['options']) or '(none)'}` | {row['wall_seconds']} | "
                     f"{', '.join(str(w) for w in row['wall_seconds_per_round'])} | {row['devices_per_minute']} | "
                     f"{speedup} |")
    if report.get("projection"):
        projection = report["projection"]
        lines += ["", f"Cloud seconds per device, by stage (`{projection['config']}` run): "
                      + ", ".join(f"{k} {v:.2f}" for k, v in projection["stage_seconds_per_device"].items())
                      + f"; total {projection['seconds_per_device']:.2f} s.", "",
                  f"| parallel slots | {PROJECTED_DEVICES:,} devices (hours, ideal scaling) |", "|---:|---:|"]
        lines += [f"| {slots} | {hours:.2f} |" for slots, hours in projection["hours"].items()]
    jobs2 = next((r for r in rows if r["config"] == "jobs2"), None)
    if serial and jobs2:
        lines += ["", f"Goal `--jobs 2` ≥ 1.7× serial: {jobs2['speedup']:.2f}× "
                      f"({'met' if jobs2['speedup'] >= 1.7 else 'NOT met'})."]
    one_thread = next((r for r in rows if r["config"] == "serial-1thread"), None)
    if one_thread and jobs2:
        lines.append(f"`--jobs 2` against a one-thread serial run: "
                     f"{one_thread['wall_seconds'] / jobs2['wall_seconds']:.2f}× (medians).")
    for row in rows:
        if jobs2 and row["config"].startswith("ray"):
            slower = row["wall_seconds"] / jobs2["wall_seconds"] - 1
            lines.append(f"Goal {row['config']} within 15 % of `--jobs 2`: {100 * slower:+.1f} % "
                         f"({'met' if slower <= 0.15 else 'NOT met'}).")
    same = report.get("same_top1")
    if same is not None:
        lines += ["", f"Same top-1 per device in every configuration: {'yes' if same else 'NO'}."]
    return "\n".join(lines) + "\n"


def write_report(name: str, report: dict) -> None:
    """NAME.json and NAME.md under the results folder, and the Markdown on stdout."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown(report))
    print(markdown(report))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=24)
    parser.add_argument("--workload", choices=WORKLOADS, default="fleet-example",
                        help="what each device's chain does (see WORKLOADS)")
    parser.add_argument("--epochs", type=int, help="fine-tuning epochs per device (default: the workload's)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; medians are reported")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--name", default="fleet", help="results file name (without extension)")
    parser.add_argument("--report", action="store_true", help="redraw NAME.md from NAME.json and stop")
    args = parser.parse_args()
    if args.report:
        report = json.loads((RESULTS / f"{args.name}.json").read_text())
        report["projection"] = projection(report["configs"])
        write_report(args.name, report)
        return
    configs = [c for c in args.configs.split(",") if c]
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configs: {', '.join(sorted(unknown))}")
    WORK.mkdir(parents=True, exist_ok=True)
    recipe_path = WORK / "fleet.yaml"
    workload = {**WORKLOADS[args.workload], **({"epochs": args.epochs} if args.epochs else {})}
    recipe_path.write_text(yaml.safe_dump(recipe(args.devices, workload), sort_keys=False))
    shared = prepare_shared(recipe_path)
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    for round_ in range(1, args.rounds + 1):   # interleaved, so a slow spell of a shared machine hits every config
        for name in configs:
            runs[name].append(measure(recipe_path, shared, name, args.devices))
            print(f"round {round_}, {name}: {runs[name][-1]['wall_seconds']} s", flush=True)
    rows = [combine(name, runs[name], runs.get("serial")) for name in configs]
    report = {"devices": args.devices, "rounds": args.rounds, "workload": args.workload, "workload_settings": workload,
              "machine": f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}",
              "configs": rows,
              "same_top1": all(r["top1"] is not None and r["top1"] == rows[0]["top1"] for r in rows)}
    report["projection"] = projection(rows)
    write_report(args.name, report)


if __name__ == "__main__":
    main()
