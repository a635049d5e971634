"""Issue 17 benchmark: the device install and what it costs to fit a GMM on it.

1. Installs tapvits without extras (the device install) into a fresh virtual environment
   and measures it on disk; checks that torch and timm are absent from it.
2. In that environment, times `tapvits fit-gmm` on 1,000 Fashion-MNIST images with an
   ONNX features graph of a DeiT-Tiny-shaped ViT (the device benchmark's base model when
   its stage cache holds one, else a freshly initialised one of the same shape: the
   timing does not depend on the weights) and with ONNX efficientnet-lite0 at 224×224.
   The paper reports about 60 s for 1,000 samples on a Jetson Orin Nano.

    bash .ci/env python benchmarks/device_side.py [--keep-venv DIR]

Writes benchmarks/results/device_side.{json,md}. Not measured here (not built yet): the
latency profile and its prediction error (`tapvits profile`).
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
    result = run(venv / "bin" / "tapvits", "--json", "fit-gmm", PRIVATE, "--extractor", extractor,
                 "-o", work / f"{name}.gmm.safetensors")
    wall = time.perf_counter() - started
    if result.returncode != 0:
        return {"error": result.stderr.strip()[-500:]}
    body = json.loads(result.stdout)
    return {"wall_seconds": wall, "extract_seconds": body["extract_seconds"], "fit_seconds": body["fit_seconds"],
            "components": body["components"], "dim": body["dim"], "samples": body["samples"]}


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
    lines += ["", "The paper: about 60 s for 1,000 samples on a Jetson Orin Nano. Not measured: the latency "
              "profile (`tapvits profile` is not built yet).", ""]
    text = "\n".join(lines)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "device_side.json").write_text(json.dumps({
        "install": install, "fit_gmm": timings, "private": PRIVATE, "vit_extractor": model_kind,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}},
        indent=2) + "\n")
    (RESULTS / "device_side.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
