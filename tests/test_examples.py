"""The shell examples (examples/*.sh) run as written, on digits with a tiny ViT and tiny knobs.

Each script runs in a subprocess, as a user would run it, with `tapvits` on the PATH. Every
`tapvits` process pays torch's import (seconds), so each test runs its script once with as
few devices as still shows what the script promises.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import TINY_VIT, TINY_VIT_KWARGS
from test_run import TINY_RECIPE

EXAMPLES = Path(__file__).parent.parent / "examples"
TINY_KNOBS = {
    "MODEL": TINY_VIT,
    "MODEL_ARGS": " ".join(f"{k}={v}" for k, v in TINY_VIT_KWARGS.items() if k != "num_classes"),
    "BASE_EPOCHS": "1", "EPOCHS": "1", "METRIC_SIZE": "32", "FINETUNE_SIZE": "64", "LATENCY_REPEATS": "1",
    "OMP_NUM_THREADS": "1", "TAPVITS_DEVICE": "cpu",
}


def run_example(script: str, *args, cwd: Path, **knobs: str) -> subprocess.CompletedProcess:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"   # this venv's tapvits
    env = {**os.environ, **TINY_KNOBS, **knobs, "PATH": path}
    return subprocess.run(["bash", str(EXAMPLES / script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def device_environment() -> Path:
    """The device's virtual environment (examples/device_env.sh: the device install only), created on first use
    (about a minute from the package registry) and reused after; the test skips where it cannot be created."""
    result = subprocess.run(["bash", str(EXAMPLES / "device_env.sh")], capture_output=True, text=True, timeout=1800)
    if result.returncode == 75:
        pytest.skip("no device environment: " + result.stderr.strip().splitlines()[-1])
    assert result.returncode == 0, result.stderr
    return Path(result.stdout.strip())


def test_device_to_cloud_runs_the_device_without_torch_and_sends_only_the_gmm_and_the_profile(tmp_path):
    from tapvits_cli.artifacts.profile import read_profile

    venv = device_environment()
    assert subprocess.run([str(venv / "bin" / "python"), "-c", "import torch"], capture_output=True).returncode != 0
    result = run_example("device_to_cloud.sh", "work", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    work = tmp_path / "work"
    report_path = Path(result.stdout.strip().splitlines()[-1])
    assert report_path == work / "device" / "report.json"

    transfers = [line.split("\t") for line in (work / "transfers.log").read_text().splitlines()]
    assert [(direction, name) for direction, name, _ in transfers] == [
        ("cloud -> device", "extractor.onnx"), ("cloud -> device", "base.safetensors"),
        ("device -> cloud", "gmm.safetensors"), ("device -> cloud", "device.profile.json"),
        ("cloud -> device", "model.onnx")]
    for _, name, digest in transfers:
        assert digest == sha256(work / "device" / name) == sha256(work / "cloud" / name)
    assert sorted(p.name for p in (work / "device").iterdir()) == [
        "base.safetensors", "device.profile.json", "extractor.onnx", "gmm.safetensors", "model.onnx", "report.json"]
    made_in_the_cloud = {"base.safetensors", "pool.h5", "extractor.onnx", "metric.h5", "scores.safetensors",
                         "plan.safetensors", "pruned.safetensors", "model.safetensors", "model.onnx"}
    assert {p.name for p in (work / "cloud").iterdir()} == made_in_the_cloud | {"gmm.safetensors",
                                                                                "device.profile.json"}
    assert "the device sent only gmm.safetensors and device.profile.json" in result.stderr

    # the device profiled on onnxruntime (it has no torch); the cloud validated it and predicted from it
    profile = read_profile(work / "cloud" / "device.profile.json")
    assert profile.runtime == "onnxruntime" and profile.batch_sizes == (1, 32)
    assert "device.profile.json: ok (profile v1)" in result.stderr
    assert "model.safetensors on the device, predicted: batch 1: " in result.stderr

    report = json.loads(report_path.read_text())
    assert report["dataset"] == "digits:split=test:classes=0-4:fold=1/2" and report["samples"] > 0
    assert isinstance(report["top1"], float) and 0.0 <= report["top1"] <= 1.0
    assert report["runtime"].startswith("onnxruntime") and set(report["latency_ms"]) == {"1", "32"}


def test_fleet_runs_devices_in_parallel_and_names_a_failed_one(tmp_path, tiny_model_file):
    # Digits has no class 42: that device fails at fit-gmm while the other one finishes.
    result = run_example("fleet.sh", "fleet", "0-4", "42", cwd=tmp_path, BASE_MODEL=str(tiny_model_file), JOBS="2")
    assert result.returncode == 2, result.stderr
    fleet = tmp_path / "fleet"
    assert (fleet / "devices" / "digits-0-4" / "report.json").is_file()
    assert not (fleet / "devices" / "digits-42").exists()
    assert "classes: the source has 10 classes" in result.stderr
    assert "device digits-42 failed: devices/digits-42/fit-gmm: dataset reference" in result.stderr.splitlines()[-1]

    header, *rows = result.stdout.strip().splitlines()
    assert header.split()[:3] == ["device", "samples", "top-1"]
    table = {row.split()[0]: row.split()[1:] for row in rows}
    assert table.keys() == {"digits-0-4", "digits-42"} and table["digits-42"] == ["failed"]
    report = json.loads((fleet / "devices" / "digits-0-4" / "report.json").read_text())
    samples, top1, kept, _ = table["digits-0-4"]
    assert int(samples) == report["samples"] and top1 == f"{report['top1']:.2%}"
    assert float(kept.rstrip("%")) == pytest.approx(70, abs=1)
    assert json.loads((fleet / "summary.json").read_text())["failed_devices"] == ["digits-42"]


def test_ci_eval_gates_on_the_recipe_thresholds(tmp_path):
    recipe = tmp_path / "gate.yaml"
    recipe.write_text(yaml.safe_dump({**TINY_RECIPE, "thresholds": {"min-top1": 0.0}}, sort_keys=False))
    summary = tmp_path / "runs" / "gate-summary.json"

    passed = run_example("ci_eval.sh", recipe, "runs/gate", cwd=tmp_path)
    assert passed.returncode == 0, passed.stderr
    assert passed.stdout.splitlines() == [
        *(f"PASS {row['device']}: top-1 {row['top1']:.4f} >= min-top1 0.0"
          for row in json.loads(summary.read_text())["devices"]),
        f"PASSED: summary in {summary.relative_to(tmp_path)}"]
    assert [line.split()[1] for line in passed.stdout.splitlines()[:2]] == ["low:", "high:"]

    # The same run, an impossible threshold: every step is reused, the gate fails with code 6.
    failed = run_example("ci_eval.sh", recipe, "runs/gate", "--set", "thresholds.min-top1=1.0", cwd=tmp_path)
    assert failed.returncode == 6, failed.stderr
    assert failed.stdout.startswith("FAIL low: top-1 ") and "< min-top1 1.0" in failed.stdout
    assert failed.stdout.splitlines()[-1].startswith("FAILED")
    assert json.loads(summary.read_text())["passed"] is False

    # An error before any verdict passes tapvits' code through and leaves no summary to archive.
    summary.unlink()
    broken = run_example("ci_eval.sh", recipe, "runs/gate", "--set", "budgt=0.5", cwd=tmp_path)
    assert broken.returncode == 2 and "unknown key 'budgt'" in broken.stderr
    assert "failed with exit code 2 before writing a summary" in broken.stderr and not summary.exists()
