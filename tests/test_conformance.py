"""The protocol as a contract: an independent reader agrees with `tapvits validate`.

``independent_reader.py`` is written from protocol/ alone and imports nothing of
tapvits_cli. On every file of the conformance kit (protocol/conformance/) and on every
artifact of a real run it must reach the verdict ``tapvits validate`` reaches and
recompute every hash the files record: tensor hashes, extractor and dataset
fingerprints, and the run's step keys.
"""

from __future__ import annotations

import ast
import contextlib
import io
import importlib.metadata
import importlib.util
import json
from pathlib import Path

import pytest
import yaml

import independent_reader as reader

KIT = Path(__file__).parent.parent / "protocol" / "conformance"
MANIFEST = json.loads((KIT / "manifest.json").read_text())


def test_the_reader_is_independent_of_tapvits():
    tree = ast.parse(Path(reader.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= {"__future__", "datetime", "hashlib", "json", "math", "shlex", "dataclasses", "pathlib",
                        "typing", "numpy", "h5py", "sklearn"}, imported


def test_the_kit_is_small_and_covers_every_kind():
    files = sorted((KIT / "files").iterdir())
    assert sum(f.stat().st_size for f in files) < 1_000_000
    assert {f.name for f in files} == {entry["file"] for entry in MANIFEST["files"]}
    kinds = {entry.get("kind") or entry.get("expect", {}).get("kind") for entry in MANIFEST["files"]}
    for kind in reader.NEWEST:
        assert {(e["verdict"]) for e in MANIFEST["files"]
                if (e.get("kind") or e.get("expect", {}).get("kind")) == kind} >= {"valid", "invalid"}, kind
    assert kinds >= set(reader.NEWEST)


def expected_figures(artifact: reader.Artifact) -> dict:
    """The key figures the manifest records, as the independent reader finds them."""
    s, found = artifact.strings, {"kind": artifact.kind, "version": artifact.version, "inputs": artifact.inputs}
    if artifact.kind == "model":
        found.update(weights_sha256=s["model.weights_sha256"], parameters=int(s["model.parameters"]),
                     blocks=json.loads(s["model.blocks"]), num_classes=int(s["model.num_classes"]))
    elif artifact.kind == "gmm":
        found.update(tensors_sha256=s["gmm.tensors_sha256"], extractor_sha256=s["gmm.extractor_sha256"],
                     components=int(s["gmm.components"]), dim=int(s["gmm.dim"]), samples=int(s["gmm.samples"]))
    elif artifact.kind == "features":
        found.update(extractor_sha256=s["features.extractor_sha256"], features_sha256=s["features.features_sha256"],
                     rows=int(s["features.rows"]), dim=int(s["features.dim"]),
                     fingerprint=json.loads(s["features.dataset"])["fingerprint"])
    elif artifact.kind == "metric-set":
        import h5py

        with h5py.File(artifact.path, "r") as handle:
            group = handle["selection"]
            found.update(metric_size=int(group.attrs["metric_size"]), finetune_size=int(group.attrs["finetune_size"]),
                         strategy=str(group.attrs["strategy"]), ids=[int(i) for i in group["ids"][...]])
    elif artifact.kind == "scores":
        found.update(criterion=s["scores.criterion"], samples=int(s["scores.samples"]),
                     model_weights_sha256=json.loads(s["scores.model"])["weights_sha256"])
    elif artifact.kind == "plan":
        found.update(budget=json.loads(s["plan.budget"]),
                     kept={name: info[1][0] for name, info in sorted(artifact.tensors.items())})
    elif artifact.kind == "report":
        found.update(top1=artifact.body["top1"], samples=artifact.body["samples"],
                     parameters=artifact.body["parameters"])
    elif artifact.kind == "profile":
        found.update(batch_sizes=artifact.body["batch_sizes"], attn_widths=artifact.body["attn"]["widths"],
                     mlp_alignment=artifact.body.get("mlp_alignment", 1))
    return found


def check_dataset_lineage(artifact: reader.Artifact) -> int:
    """Every dataset named in lineage has the fingerprint datasets.md gives; returns how many were checked."""
    checked = 0
    for role, entry in artifact.inputs.items():
        if entry["kind"] == "dataset" and entry["name"] != "private":
            assert reader.digits_fingerprint(entry["name"]) == entry["sha256"], (artifact.path, role)
            checked += 1
    return checked


@pytest.mark.parametrize("entry", MANIFEST["files"], ids=lambda entry: entry["file"])
def test_kit_file_gets_the_same_verdict_from_both_readers(entry, tapvits):
    path = KIT / "files" / entry["file"]
    assert reader.verdict(path) == entry["exit_code"], entry["rule"] if "rule" in entry else entry
    assert tapvits("validate", path).exit_code == entry["exit_code"]
    if entry["verdict"] == "valid":
        artifact = reader.read(path)   # recomputes every hash the file records
        assert expected_figures(artifact) == entry["expect"]
        check_dataset_lineage(artifact)
        if artifact.kind == "features":
            dataset = json.loads(artifact.strings["features.dataset"])
            assert reader.digits_fingerprint(dataset["reference"]) == dataset["fingerprint"]


def test_compact_json_and_tensor_hash_follow_the_readme_examples():
    assert reader.compact_json({"b": [1, 2.0, 0.1 + 0.2], "a": "é\n", "c": None, "d": 1e-05}) == \
        '{"a":"\\u00e9\\n","b":[1,2.0,0.30000000000000004],"c":null,"d":1e-05}'
    zeros = reader.Artifact(Path("-"), "safetensors", {}, tensors={"a": ("F32", (3,), bytes(12))})
    assert reader.tensor_sha256(zeros, ["a"], "container") == \
        "c452c96a0887de504d121e9460566cde8131c2297e084f0c1297c5a6f7cb405c"
    assert reader.tensor_sha256(zeros, ["a"], "legacy") == \
        "80e3403489a671872f58faaa12ed9ae167bc6c3c45737fd854d44e7071135012"


def test_every_step_of_the_generator_gives_the_same_bytes_on_a_slower_machine_with_fewer_threads(tmp_path,
                                                                                                  monkeypatch):
    """The kit README's promise, "a rerun gives byte-identical files", step by step: each valid file is
    made twice from the kit's own inputs, the second time under a clock three times slower and with one
    intra-op thread less, and the two must be equal byte for byte. A duration a header records that the
    generator does not normalise (``metric-set.public_mixture``'s ``fit_seconds`` once did), or the thread
    count a report records, breaks it."""
    import time

    import torch

    spec = importlib.util.spec_from_file_location("conformance_generate", KIT / "generate.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    real_clock, threads_before, made = time.perf_counter, torch.get_num_threads(), {}
    try:
        for run, (threads, pace) in enumerate(((2, 1.0), (1, 3.0))):
            out = tmp_path / str(run)
            out.mkdir()
            torch.set_num_threads(threads)
            monkeypatch.setattr(time, "perf_counter", lambda pace=pace: pace * real_clock())
            made[run] = {name: generator.make_step(name, KIT / "files", out).read_bytes() for name in generator.STEPS}
    finally:
        torch.set_num_threads(threads_before)
    assert [name for name in generator.STEPS if made[0][name] != made[1][name]] == []


@pytest.fixture(scope="module")
def run_directory(tmp_path_factory):
    """A real `tapvits run`: one simulated digits device, every stage once (pruned at 0.7, fine-tuned)."""
    from conftest import TINY_VIT, TINY_VIT_KWARGS
    from tapvits_cli.cli.main import main

    root = tmp_path_factory.mktemp("conformance-run")
    recipe = {
        "version": 1, "name": "conformance", "device": "cpu", "public": "digits:split=train:sample=300",
        "base_model": {"train": {"model": TINY_VIT, "epochs": 1, "batch-size": 64,
                                 "args": {k: v for k, v in TINY_VIT_KWARGS.items() if k != "num_classes"}}},
        "devices": [{"name": "low", "private": "digits:split=test:classes=0-4:fold=0/2",
                     "test": "digits:split=test:classes=0-4:fold=1/2"}],
        "budget": 0.7,
        "stages": {"fit-gmm": {"covariance": "diag", "components": "2-3", "pca-dim": 8},
                   "select": {"metric-size": 32, "finetune-size": 96}, "score": {"hsic-batch": 16},
                   "finetune": {"epochs": 1, "distill": True}, "eval": {"no-latency": True}},
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        code = main(["run", str(root / "recipe.yaml"), "--run-dir", str(root / "run")])
    assert code == 0, err.getvalue()
    return root / "run"


def test_every_artifact_of_a_run_reads_alike_with_every_hash_recomputed(run_directory, tapvits):
    artifacts = sorted(p for p in run_directory.rglob("*") if p.suffix in (".safetensors", ".h5", ".json")
                       and p.name not in ("run.json", "summary.json"))
    assert len(artifacts) == 9   # base model, pool features, and per device gmm ... report
    by_sha = {reader.sha256_hex(p.read_bytes()): p for p in artifacts}
    datasets = 0
    for path in artifacts:
        assert reader.verdict(path) == 0, path
        assert tapvits("validate", path).exit_code == 0, path
        artifact = reader.read(path)
        datasets += check_dataset_lineage(artifact)
        for role, entry in artifact.inputs.items():   # every artifact input is a file of the run, by content
            if entry["kind"] not in ("dataset", "file"):
                assert reader.read(by_sha[entry["sha256"]]).kind == entry["kind"], (path, role)
    assert datasets >= 5
    base = reader.read(run_directory / "base" / "model.safetensors")
    pool = reader.read(run_directory / "public" / "features.h5")
    extractor = json.loads(pool.strings["features.extractor"])
    assert extractor["weights_sha256"] == base.strings["model.weights_sha256"]
    gmm = reader.read(run_directory / "devices" / "low" / "gmm.safetensors")
    assert gmm.strings["gmm.extractor_sha256"] == pool.strings["features.extractor_sha256"]


def test_step_keys_are_recomputed_from_run_md(run_directory):
    state = json.loads((run_directory / "run.json").read_text())
    version = reader.read(run_directory / "base" / "model.safetensors").strings["tapvits.producer_version"]
    lines = [line for line in (run_directory / "commands.sh").read_text().splitlines() if line.startswith("tapvits ")]
    assert len(lines) == len(state["steps"]) == 9
    by_output = {str(run_directory / step["output"]): step for step in state["steps"].values()}
    libraries = {}
    for name in ("h5py", "numpy", "onnxruntime", "safetensors", "scikit-learn", "timm", "torch"):   # run.md's list
        try:
            libraries[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            libraries[name] = None
    code = reader.code_fingerprint(Path(importlib.util.find_spec("tapvits_cli").origin).parent, libraries)
    for line in lines:
        output = line.split(" -o ")[1].split()[0]
        assert reader.step_key(line, version, code) == by_output[output]["key"], line
