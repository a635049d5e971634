"""Issue 17 benchmark: the device install and what it costs to fit a GMM on it.

1. Installs tapvits without extras (the device install) into a fresh virtual environment
   and measures it on disk; checks that torch and timm are absent from it.
2. In that environment, times `tapvits fit-gmm` on 1,000 Fashion-MNIST images with an
   ONNX features graph of a DeiT-Tiny-shaped ViT (the device benchmark's base model when
   its stage cache holds one, else a freshly initialised one of the same shape: the
   timing does not depend on the weights) and with ONNX efficientnet-lite0 at 224×224.
   The paper reports about 60 s for 1,000 samples on a Jetson Orin Nano.
3. In that environment, times `tapvits profile` (onnxruntime: the device install has no
   torch) for the ViT above at batch 1 and 32 (default rounds) and for a DeiT-Small-shaped
   ViT at 224×224 (batch 1, 5 rounds after 1), and checks the one prediction a profile
   makes of a model the device can also run whole: the unpruned model, exported with
   `tapvits export` and timed on onnxruntime in the same environment (same threads, each
   timed run right after an untimed one, median). Pruned models' prediction error is
   `benchmarks/profile_prediction.py`'s.

    bash .ci/env python benchmarks/device_side.py [--keep-venv DIR]

Writes benchmarks/results/device_side.{json,md}; the machine's load average is recorded,
since a shared machine's load stretches every wall-clock figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CACHE = RESULTS / "cache" / "stages"
PRIVATE = "fashion-mnist:split=test:classes=0,6,7:sample=1000"
TARGET_GB = 0.45


def run(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=ROOT, **kwargs)


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def device_install(venv: Path) -> dict:
    started = time.perf_counter()
    made = run(sys.executable, "-m", "venv", venv)
    if made.returncode != 0:
        sys.exit(f"creating {venv} failed: {made.stderr}")
    python = venv / "bin" / "python"
    installed = run(python, "-m", "pip", "install", "-q", "-c", ROOT / ".ci" / "constraints.txt", str(ROOT))
    if installed.returncode != 0:
        sys.exit(f"the device install failed: {installed.stderr[-2000:]}")
    packages = run(python, "-m", "pip", "list", "--format", "json")
    names = sorted(p["name"].lower() for p in json.loads(packages.stdout))
    return {"bytes": disk_bytes(venv), "seconds": time.perf_counter() - started, "packages": names,
            "has_torch": "torch" in names, "has_timm": "timm" in names}


def base_model(work: Path) -> tuple[Path, str]:
    """The device benchmark's trained base model if cached, else a fresh one of its shape."""
    for record in sorted(CACHE.glob("*.record.json")):
        if json.loads(record.read_text()).get("output", "").endswith("base/model.safetensors"):
            return record.with_name(record.name.replace(".record.json", ".safetensors")), "trained (stage cache)"
    path = work / "vit.safetensors"
    made = run("tapvits", "create-model", "vit_tiny_patch16_224", "-a", "img_size=28", "-a", "patch_size=4",
               "-a", "in_chans=1", "-a", "embed_dim=48", "-a", "depth=12", "-a", "num_heads=3", "-a", "num_classes=10",
               "-o", path)
    if made.returncode != 0:
        sys.exit(f"create-model failed: {made.stderr}")
    return path, "random initialisation (timing only)"


def fit_on_device(venv: Path, extractor: Path, work: Path, name: str) -> dict:
    started = time.perf_counter()
    result = run(venv / "bin" / "tapvits", "--json", "fit-gmm", "--data", PRIVATE, "--extractor", extractor,
                 "-o", work / f"{name}.gmm.safetensors")
    wall = time.perf_counter() - started
    if result.returncode != 0:
        return {"error": result.stderr.strip()[-500:]}
    body = json.loads(result.stdout)
    return {"wall_seconds": wall, "extract_seconds": body["extract_seconds"], "fit_seconds": body["fit_seconds"],
            "components": body["components"], "dim": body["dim"], "samples": body["samples"]}


# Times a whole exported model on onnxruntime as `profile` times its blocks: warm, median.
WHOLE_MODEL = """
import json, statistics, sys, time
import numpy as np, onnxruntime
path, threads, repeats, batches = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split(",")
options = onnxruntime.SessionOptions()
options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
shape = session.get_inputs()[0].shape[1:]
medians = {}
for batch in batches:
    images = np.random.default_rng(0).standard_normal((int(batch), *shape), dtype=np.float32)
    times = []
    for _ in range(repeats):
        session.run(None, {"images": images})
        start = time.perf_counter()
        session.run(None, {"images": images})
        times.append((time.perf_counter() - start) * 1000.0)
    medians[batch] = statistics.median(times)
print(json.dumps(medians))
"""


def profile_on_device(venv: Path, model: Path, work: Path, name: str, options: tuple[str, ...]) -> dict:
    """`tapvits profile` in the device environment, then the unpruned model whole, predicted against measured."""
    out = work / f"{name}.profile.json"
    os.sync()   # the model file was just written: its writeback would take CPU from the profile's timing
    started = time.perf_counter()
    result = run(venv / "bin" / "tapvits", "--json", "profile", model, "-o", out, *options)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        return {"error": result.stderr.strip()[-500:]}
    profile = json.loads(out.read_text())
    predicted = json.loads(result.stdout)["unpruned_ms"]
    threads, batches = profile["runtime"]["threads"], ",".join(predicted)
    record = {"options": list(options), "wall_seconds": wall, "threads": threads, "tokens": profile["tokens"],
              "runtime": f"{profile['runtime']['name']} {profile['runtime']['version']}", "predicted_ms": predicted}
    onnx = work / f"{name}.onnx"
    exported = run("tapvits", "export", model, "--no-check", "-o", onnx)
    if exported.returncode != 0:
        return {**record, "error": exported.stderr.strip()[-500:]}
    os.sync()   # likewise the exported file (86 MB for DeiT-Small): unsynced, it cost the whole model 37 % once
    timed = run(venv / "bin" / "python", "-c", WHOLE_MODEL, onnx, threads, 10, batches)
    if timed.returncode != 0:
        return {**record, "error": timed.stderr.strip()[-500:]}
    measured = json.loads(timed.stdout)
    return {**record, "measured_ms": measured,
            "error_percent": {b: 100.0 * (predicted[b] - measured[b]) / measured[b] for b in predicted}}


def deit_small(work: Path) -> Path:
    path = work / "deit-small.safetensors"
    made = run("tapvits", "create-model", "vit_small_patch16_224", "-a", "num_classes=10", "-o", path)
    if made.returncode != 0:
        sys.exit(f"create-model failed: {made.stderr}")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep-venv", type=Path, default=None, help="build the device environment here and keep it")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tapvits-device-"))
    venv = args.keep_venv or work / "venv"
    try:
        install = device_install(venv)
        model, model_kind = base_model(work)
        graphs = {"vit": (model, "1,28,28"), "efficientnet-lite0": ("efficientnet-lite0", "1,28,28")}
        timings = {}
        for name, (source, raw) in graphs.items():
            onnx = work / f"{name}.onnx"
            exported = run("tapvits", "export", source, "--features", "--raw-input", raw, "-o", onnx)
            if exported.returncode != 0:
                timings[name] = {"error": exported.stderr.strip()[-500:]}
                continue
            timings[name] = {"onnx_bytes": onnx.stat().st_size, **fit_on_device(venv, onnx, work, name)}
        profiles = {
            "vit": profile_on_device(venv, model, work, "vit", ("--batch-sizes", "1,32")),
            "deit-small-224": profile_on_device(venv, deit_small(work), work, "deit-small-224",
                                                ("--batch-sizes", "1", "--repeats", "5", "--warmup-runs", "1")),
        }
        load = os.getloadavg()
    finally:
        if args.keep_venv is None:
            shutil.rmtree(work, ignore_errors=True)

    gb = install["bytes"] / 1e9
    lines = [f"Device install (`pip install tapvits`, no extras): {gb:.2f} GB on disk, "
             f"{len(install['packages'])} packages, torch {'PRESENT' if install['has_torch'] else 'absent'}, "
             f"timm {'PRESENT' if install['has_timm'] else 'absent'} "
             f"({'met' if gb <= TARGET_GB and not install['has_torch'] else 'NOT met'}: target ≤ {TARGET_GB} GB, "
             f"against 6.0 GB with torch)", "",
             f"`fit-gmm` on the device install, {PRIVATE} (ViT extractor: {model_kind}):", "",
             "| extractor | ONNX size | wall s | extraction s | fit s | K | d |", "|---|---|---|---|---|---|---|"]
    for name, t in timings.items():
        if "error" in t:
            lines.append(f"| {name} | failed: {t['error'][:100]} |")
            continue
        lines.append(f"| {name} | {t['onnx_bytes'] / 1e6:.1f} MB | {t['wall_seconds']:.1f} | {t['extract_seconds']:.1f} | "
                     f"{t['fit_seconds']:.2f} | {t['components']} | {t['dim']} |")
    lines += ["", "The paper: about 60 s for 1,000 samples on a Jetson Orin Nano.", "",
              "`tapvits profile` on the device install, and the unpruned model's predicted latency against the "
              "whole exported model timed on the same runtime:", "",
              "| model | options | runtime, threads | profile wall s | batch | predicted ms | measured ms | error |",
              "|---|---|---|---|---|---|---|---|"]
    for name, p in profiles.items():
        if "predicted_ms" not in p:
            lines.append(f"| {name} | failed: {p['error'][:100]} |")
            continue
        for batch, predicted in p["predicted_ms"].items():
            measured = p.get("measured_ms", {}).get(batch)
            lines.append(f"| {name} ({p['tokens']} tokens) | `{' '.join(p['options'])}` | {p['runtime']}, "
                         f"{p['threads']} | {p['wall_seconds']:.1f} | {batch} | {predicted:.2f} | "
                         + (f"{measured:.2f} | {p['error_percent'][batch]:+.1f} % |" if measured is not None
                            else f"failed: {p.get('error', '')[:80]} | |"))
    lines += ["", "The profile's error on 20 pruned DeiT-Small-shaped models (the issue's target: median ≤ 10 %, "
              "worst ≤ 20 %, batch 1 and 32, torch and onnxruntime) is measured over interleaved rounds by "
              "`benchmarks/profile_prediction.py` (results/profile_prediction*.md), which needs the cloud's torch "
              "to build and export the models."]
    lines += ["", f"Load average during the run: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min) on "
              f"{os.cpu_count()} cores shared with other jobs: wall-clock figures stretch with it.", ""]
    text = "\n".join(lines)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "device_side.json").write_text(json.dumps({
        "install": install, "fit_gmm": timings, "profile": profiles, "load_average": load, "private": PRIVATE,
        "vit_extractor": model_kind,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}},
        indent=2) + "\n")
    (RESULTS / "device_side.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
