"""Write the conformance kit: small valid and invalid files of every kind, and manifest.json.

    bash .ci/env python protocol/conformance/generate.py [--out DIR]

The valid files are made by tapvits itself (a tiny ViT on scikit-learn's digits, every
stage once, seeded, on the CPU, on one intra-op thread), each normalised right after it
is written so that the kit does not depend on when, where or how fast it was made:
``tapvits.created``, every measured duration a header records (a key or a member of a
header's JSON record named ``*_seconds``) and the profile's latencies get fixed values.
Normalising happens before the next stage reads the file, so lineage hashes stay true.
The invalid files are those valid files broken in one documented way each.
``manifest.json`` gives, per file, the kind, the verdict ``tapvits validate`` must reach
(with its exit code) and, for a valid file, the key figures and content hashes any
conforming reader recomputes from protocol/.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import tempfile
from pathlib import Path

import h5py
import numpy as np
from safetensors.numpy import load_file

HERE = Path(__file__).resolve().parent
CREATED = "2026-01-01T00:00:00+00:00"
MODEL_ARGS = {"img_size": 8, "patch_size": 4, "in_chans": 1, "num_classes": 10, "embed_dim": 12, "depth": 2,
              "num_heads": 2, "mlp_ratio": 2.0}
POOL = "digits:split=train:sample=120"
PRIVATE = "digits:split=test:classes=0-3:fold=0/2"
HELD_OUT = "digits:split=test:classes=0-3:fold=1/2"
SECONDS = 1.0   # every measured duration in a header
THREADS = 1     # torch's intra-op threads for every command

# The valid files the tapvits commands write, in order: each one's arguments. An argument
# that names an earlier file stands for that file.
STEPS = {
    "model.safetensors": ("create-model", "vit_tiny_patch16_224",
                          *[t for k, v in MODEL_ARGS.items() for t in ("-a", f"{k}={v}")]),
    "features.h5": ("features", "--data", POOL, "--extractor", "model.safetensors"),
    "gmm.safetensors": ("fit-gmm", "--data", PRIVATE, "--extractor", "model.safetensors", "--covariance", "diag",
                        "--components", "2-3", "--pca-dim", "4", "--min-samples", "40"),
    "metric-set.h5": ("select", "gmm.safetensors", "--pool", "features.h5", "--metric-size", "16",
                      "--finetune-size", "48"),
    "scores.safetensors": ("score", "model.safetensors", "--metric-set", "metric-set.h5", "--data", POOL,
                           "--criterion", "composite", "--budget", "0.7", "--hsic-batch", "8"),   # every component
    "plan.safetensors": ("allocate", "scores.safetensors", "--budget", "0.7", "--model", "model.safetensors",
                         "--tolerance", "0.05"),
    "pruned.safetensors": ("prune", "model.safetensors", "plan.safetensors"),
    "report.json": ("eval", "pruned.safetensors", "--data", HELD_OUT, "--no-latency"),
    "profile.json": ("profile", "model.safetensors", "--batch-sizes", "1,2", "--widths", "8,24", "--repeats", "1",
                     "--warmup-runs", "0", "--threads", "1", "--runtime", "torch"),
}


def tapvits(*args) -> None:
    """Run one command in this process on THREADS intra-op threads, whatever the machine's cores: a
    report records torch's thread count, and a threaded reduction may add in another order."""
    import torch

    from tapvits_cli.cli.main import main

    torch.set_num_threads(THREADS)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        code = main([str(a) for a in (*args, "--seed", "0", "--device", "cpu")])
    if code != 0:
        raise SystemExit(f"tapvits {' '.join(map(str, args))} failed ({code}): {err.getvalue().strip()}")


# -- reading and rewriting the three containers ----------------------------------------------

def safetensors_parts(path: Path) -> tuple[dict, dict]:
    header_length = int.from_bytes(path.read_bytes()[:8], "little")
    metadata = json.loads(path.read_bytes()[8:8 + header_length])["__metadata__"]
    return load_file(str(path)), dict(metadata)


def rewrite_safetensors(src: Path, dst: Path, tensors: dict | None = None, drop=(), **changes) -> Path:
    """Copy with tensors replaced or dropped and metadata keys changed ("a__b" is "a.b"; None deletes)."""
    stored, metadata = safetensors_parts(src)
    stored = {name: t for name, t in {**stored, **(tensors or {})}.items() if name not in drop}
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            metadata.pop(key, None)
        else:
            metadata[key] = value
    write_safetensors(dst, stored, metadata)
    return dst


SAFETENSORS_DTYPES = {"float64": "F64", "float32": "F32", "int64": "I64", "int32": "I32", "uint8": "U8", "bool": "BOOL"}


def write_safetensors(path: Path, tensors: dict, metadata: dict) -> None:
    """The safetensors layout with sorted keys (the library writes its metadata in hash order, so
    its bytes differ from run to run): the same content always gives the same file."""
    header, offset, chunks = {"__metadata__": dict(sorted(metadata.items()))}, 0, []
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        raw = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": SAFETENSORS_DTYPES[array.dtype.name], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        chunks.append(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(chunks))


def canonical_hdf5(path: Path) -> None:
    """Rewrite an HDF5 artifact without object timestamps, so the same content gives the same bytes."""
    copy = path.with_suffix(".canonical")
    with h5py.File(path, "r") as source, h5py.File(copy, "w", track_order=True) as target:
        def clone(src, dst):
            for key, value in src.attrs.items():
                dst.attrs[key] = value
            for name, item in src.items():
                if isinstance(item, h5py.Group):
                    clone(item, dst.create_group(name, track_order=True))
                else:
                    made = dst.create_dataset(name, data=item[...], chunks=item.chunks, track_times=False)
                    for key, value in item.attrs.items():
                        made.attrs[key] = value
        clone(source, target)
    copy.replace(path)


def tensor_hash(tensors: dict, rule: str = "container") -> str:
    from tapvits_cli.artifacts.digests import tensors_sha256

    return tensors_sha256(tensors, rule)


def rewrite_hdf5(src: Path, dst: Path, change) -> Path:
    shutil.copyfile(src, dst)
    with h5py.File(dst, "r+") as handle:
        change(handle)
    canonical_hdf5(dst)
    return dst


def rewrite_json(src: Path, dst: Path, change) -> Path:
    document = json.loads(src.read_text())
    change(document)
    dst.write_text(json.dumps(document, indent=2) + "\n")
    return dst


def fixed_seconds(header) -> dict[str, str]:
    """The header entries (text values by key) that hold a measured duration, with every duration set to
    SECONDS: a key named ``*_seconds`` (``gmm.fit_seconds``) or a compact-JSON record with such a member
    (``metric-set.public_mixture``). By name, not by a list, so a duration a new version records is fixed too;
    the ``tapvits.*`` header (parameters and lineage) is what the step was given, never a measurement."""
    from tapvits_cli.artifacts.header import compact_json

    def fix(value):
        if isinstance(value, dict):
            return {key: SECONDS if key.endswith("_seconds") else fix(item) for key, item in value.items()}
        return [fix(item) for item in value] if isinstance(value, list) else value

    fixed = {}
    for key, text in header.items():
        if key.startswith("tapvits."):
            continue
        if key.endswith("_seconds"):
            fixed[key] = repr(SECONDS)
        elif isinstance(text, str) and text.startswith(("{", "[")):
            record = json.loads(text)
            if fix(record) != record:
                fixed[key] = compact_json(fix(record))
    return fixed


def normalise(path: Path) -> None:
    """Fixed creation time, seconds and latencies: the kit does not depend on the machine that made it."""
    if path.suffix == ".safetensors":
        _, metadata = safetensors_parts(path)
        fixed = {key.replace(".", "__"): value for key, value in fixed_seconds(metadata).items()}
        rewrite_safetensors(path, path, tapvits__created=CREATED, **fixed)
    elif path.suffix == ".h5":
        def stamp(handle):
            handle.attrs["tapvits.created"] = CREATED
            for key, value in fixed_seconds(dict(handle.attrs)).items():
                handle.attrs[key] = value
        rewrite_hdf5(path, path.with_suffix(".tmp"), stamp)
        path.with_suffix(".tmp").replace(path)
    else:
        def stamp(document):
            document["tapvits.created"] = CREATED
            if document.get("tapvits.kind") == "profile":
                measured = np.arange(1, 1 + len(document["batch_sizes"])) / 10
                document["runtime"]["version"], document["hardware"] = "0", {"cpu": "conformance", "gpu": None}
                document["fixed"] = {key: list(measured * (i + 1)) for i, key in enumerate(("embed_ms", "head_ms", "block_ms"))}
                for kind in [k for k in ("attn", "mlp", "mlp_unaligned") if k in document]:
                    document[kind]["median_ms"] = [list(measured * (4 + w)) for w in range(len(document[kind]["widths"]))]
        rewrite_json(path, path, stamp)


# -- the kit -----------------------------------------------------------------------------------

def make_step(name: str, inputs: Path, out: Path) -> Path:
    """Write ``out/name`` by its step of STEPS, normalised, reading the earlier files it names from ``inputs``.
    Lineage records file names only, so the same inputs anywhere give the same bytes."""
    path = out / name
    tapvits(*[inputs / arg if arg in STEPS else arg for arg in STEPS[name]], "-o", path)
    normalise(path)
    return path


def make_valid(work: Path) -> dict[str, Path]:
    """One valid file of every kind (and the older versions a reader must still accept)."""
    made = {name: make_step(name, work, work) for name in STEPS}
    model, gmm = made["model.safetensors"], made["gmm.safetensors"]
    made["profile-one-curve.json"] = rewrite_json(made["profile.json"], work / "profile-one-curve.json", one_curve)

    tensors, _ = safetensors_parts(model)   # the versions before the container tensor hash
    made["model-v1.safetensors"] = rewrite_safetensors(model, work / "model-v1.safetensors", tapvits__version="1",
                                                       model__timm_version=None,
                                                       model__weights_sha256=tensor_hash(tensors, "legacy"))
    mixture, _ = safetensors_parts(gmm)
    made["gmm-v2.safetensors"] = rewrite_safetensors(gmm, work / "gmm-v2.safetensors", tapvits__version="2",
                                                     gmm__tensors_sha256=tensor_hash(mixture, "legacy"))
    return made


def one_curve(document: dict) -> None:
    """A profile as written before ``mlp_alignment`` existed (one MLP curve), which reads as alignment 1."""
    for key in ("mlp_alignment", "mlp_unaligned"):
        document.pop(key)
    params = json.loads(document["tapvits.params"])
    params.pop("mlp_alignment")
    document["tapvits.params"] = json.dumps(params, sort_keys=True, separators=(",", ":"))


def make_invalid(valid: dict[str, Path], work: Path) -> list[tuple[str, str, int, str]]:
    """(file, kind, exit code, the rule it breaks) for each broken copy written to ``work``."""
    broken = []

    def add(name, kind, code, rule):
        broken.append((name, kind, code, rule))
        return work / name

    model, gmm = valid["model.safetensors"], valid["gmm.safetensors"]
    tensors, metadata = safetensors_parts(model)
    data = model.read_bytes()
    add("model-truncated.safetensors", "model", 3, "the tensor data ends before the header's offsets").write_bytes(
        data[:len(data) - 100])
    flipped = bytearray(data)
    flipped[-5] ^= 0x01
    add("model-flipped-bit.safetensors", "model", 3, "the tensors do not hash to model.weights_sha256").write_bytes(
        bytes(flipped))
    rewrite_safetensors(model, add("model-newer.safetensors", "model", 4, "a format version newer than the reader's"),
                        tapvits__version="3")
    rewrite_safetensors(model, add("model-no-weights-hash.safetensors", "model", 3,
                                   "a required key (model.weights_sha256) is missing"), model__weights_sha256=None)
    rewrite_safetensors(model, add("model-v2-legacy-hash.safetensors", "model", 3,
                                   "a version 2 file whose hash follows the legacy rule"),
                        model__weights_sha256=tensor_hash(tensors, "legacy"))
    rewrite_safetensors(model, add("model-no-timm-version.safetensors", "model", 3,
                                   "version 2 without model.timm_version"), model__timm_version=None)
    loading = {**json.loads(safetensors_parts(model)[1]["model.kwargs"]), "pretrained": True}
    rewrite_safetensors(model, add("model-pretrained-kwargs.safetensors", "model", 3,
                                   "model.kwargs holds a keyword that loads weights (pretrained)"),
                        model__kwargs=json.dumps(loading, sort_keys=True, separators=(",", ":")))
    rewrite_safetensors(model, add("model-params-nan.safetensors", "model", 3,
                                   "tapvits.params holds NaN, which is not JSON"),
                        tapvits__params='{"nan":NaN,' + safetensors_parts(model)[1]["tapvits.params"][1:])
    rewrite_safetensors(model, add("model-created-not-utc.safetensors", "model", 3,
                                   "tapvits.created is not a time in UTC"),
                        tapvits__created="2026-01-01T00:00:00+01:00")
    rewrite_safetensors(model, add("model-blocks-not-json.safetensors", "model", 3,
                                   "model.blocks is not a JSON list"), model__blocks="[{")
    rewrite_safetensors(model, add("model-wrong-parameters.safetensors", "model", 3,
                                   "model.parameters differs from the tensors' count"),
                        model__parameters=str(int(metadata["model.parameters"]) + 1))
    nan = {**tensors, "head.bias": np.full_like(tensors["head.bias"], np.nan)}
    rewrite_safetensors(model, add("model-nan.safetensors", "model", 3, "a weight is NaN (hash recomputed)"),
                        tensors=nan, model__weights_sha256=tensor_hash(nan))
    narrow = {**tensors, "blocks.0.mlp.fc1.weight": tensors["blocks.0.mlp.fc1.weight"][:-1]}
    rewrite_safetensors(model, add("model-shape-mismatch.safetensors", "model", 3,
                                   "a tensor's shape disagrees with model.blocks (hash recomputed)"),
                        tensors=narrow, model__weights_sha256=tensor_hash(narrow))

    mixture, _ = safetensors_parts(gmm)
    rewrite_safetensors(gmm, add("gmm-newer.safetensors", "gmm", 4, "a format version newer than the reader's"),
                        tapvits__version="4")
    flat = {**mixture, "weights": mixture["weights"] * 0.5}
    rewrite_safetensors(gmm, add("gmm-weights-sum.safetensors", "gmm", 3,
                                 "mixing weights do not sum to 1 (hash recomputed)"),
                        tensors=flat, gmm__tensors_sha256=tensor_hash(flat))
    moved = {**mixture, "means": mixture["means"] + 1.0}
    rewrite_safetensors(gmm, add("gmm-tensor-changed.safetensors", "gmm", 3,
                                 "the tensors do not hash to gmm.tensors_sha256"), tensors=moved)
    rewrite_safetensors(gmm, add("gmm-extractor-hash.safetensors", "gmm", 3,
                                 "gmm.extractor_sha256 is not the hash of gmm.extractor"),
                        gmm__extractor_sha256="0" * 64)
    rewrite_safetensors(gmm, add("gmm-no-privacy.safetensors", "gmm", 3, "a required key (gmm.privacy) is missing"),
                        gmm__privacy=None)
    huge = {**mixture, "means": mixture["means"] * 0 + 1e200}
    rewrite_safetensors(gmm, add("gmm-means-overflow.safetensors", "gmm", 3,
                                 "finite means whose densities overflow (hash recomputed)"),
                        tensors=huge, gmm__tensors_sha256=tensor_hash(huge))
    one_axis = {**mixture, "projection.mean": np.concatenate([mixture["projection.mean"][:1],
                                                              np.zeros_like(mixture["projection.mean"][1:])]),
                "projection.scale": np.concatenate([mixture["projection.scale"][:1],
                                                    np.full_like(mixture["projection.scale"][1:], 1e-200)])}
    rewrite_safetensors(gmm, add("gmm-scale-overflow.safetensors", "gmm", 3,
                                 "a scale of 1e-200 on features 1.. overflows (e0 alone scores finite; hash recomputed)"),
                        tensors=one_axis, gmm__tensors_sha256=tensor_hash(one_axis))
    single = {**mixture, "weights": mixture["weights"].astype(np.float32)}
    rewrite_safetensors(gmm, add("gmm-f32-weights.safetensors", "gmm", 3, "a tensor is not F64 (hash recomputed)"),
                        tensors=single, gmm__tensors_sha256=tensor_hash(single))

    features = valid["features.h5"]

    def rows_done(handle):
        handle.attrs["features.rows_done"] = str(int(handle.attrs["features.rows"]) - 1)

    def changed_row(handle):
        handle["features/features"][0, 0] += 1.0

    def changed_label(handle):
        handle["features/labels"][0] = (handle["features/labels"][0] + 1) % 10

    def unordered_ids(handle):
        ids = handle["features/ids"][...]
        ids[[0, 1]] = ids[[1, 0]]
        handle["features/ids"][...] = ids

    def newer_group(handle):
        handle["features"].attrs["encoding-version"] = "2"

    def features_hash(handle):
        handle.attrs["features.extractor_sha256"] = "0" * 64

    def newer_features(handle):
        handle.attrs["tapvits.version"] = "2"

    for name, code, rule, change in (
            ("features-incomplete.h5", 3, "features.rows_done is below features.rows", rows_done),
            ("features-row-changed.h5", 3, "the rows do not hash to features.features_sha256", changed_row),
            ("features-label-changed.h5", 3, "the ids and labels do not hash to features.index_sha256",
             changed_label),
            ("features-ids-unordered.h5", 3, "ids are not strictly increasing", unordered_ids),
            ("features-group-newer.h5", 4, "the group's encoding-version is newer than the reader's", newer_group),
            ("features-extractor-hash.h5", 3, "features.extractor_sha256 is not the hash of features.extractor",
             features_hash),
            ("features-newer.h5", 4, "a format version newer than the reader's", newer_features)):
        rewrite_hdf5(features, add(name, "features", code, rule), change)

    def borrowed(name, rule, replace):
        """A copy whose features dataset is replaced by one holding the same rows in another way (in the valid
        table beside it, or compressed): a reader that takes whatever h5py returns sees valid rows, so only the
        rules on how an artifact stores its values refuse it. Not canonicalised (a rewrite would copy the
        borrowed values in, uncompressed), so the new dataset is made without timestamps."""
        target = add(name, "features", 3, rule)
        shutil.copyfile(features, target)
        with h5py.File(target, "r+") as handle:
            shape, dtype = handle["features/features"].shape, handle["features/features"].dtype
            del handle["features/features"]
            replace(handle["features"], shape, dtype)

    def external_link(group, shape, dtype):
        group["features"] = h5py.ExternalLink(features.name, "/features/features")

    def virtual(group, shape, dtype):
        layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
        layout[...] = h5py.VirtualSource(features.name, "/features/features", shape=shape)
        layout.dcpl.set_obj_track_times(False)
        group.create_virtual_dataset("features", layout)

    def compressed(group, shape, dtype):
        group.create_dataset("features", data=rows, chunks=(shape[0], shape[1]), compression="gzip",
                             track_times=False)

    with h5py.File(features, "r") as handle:
        rows = handle["features/features"][...]
    borrowed("features-compressed.h5", "features/features is gzip-compressed (values are stored as they are)",
             compressed)
    borrowed("features-external-link.h5", "features/features is an external link to another file", external_link)
    borrowed("features-virtual.h5", "features/features is a virtual dataset over another file", virtual)

    metric = valid["metric-set.h5"]

    def swapped_rows(handle):
        ll = handle["selection/log_likelihood"][...]
        ll[[0, 1]] = ll[[1, 0]] if ll[0] != ll[1] else ll[[0, 1]] - np.array([1.0, 0.0])
        handle["selection/log_likelihood"][...] = ll

    def duplicate_ids(handle):
        ids = handle["selection/ids"][...]
        ids[1] = ids[0]
        handle["selection/ids"][...] = ids

    def coverage(handle):
        record = json.loads(handle.attrs["metric-set.coverage"])
        record["metric"]["coverage"] = record["metric"]["coverage"] / 2
        handle.attrs["metric-set.coverage"] = json.dumps(record, sort_keys=True, separators=(",", ":"))

    def no_pool(handle):
        del handle.attrs["metric-set.pool"]

    def newer_metric(handle):
        handle.attrs["tapvits.version"] = "2"

    for name, code, rule, change in (
            ("metric-set-row-order.h5", 3, "rows are not ordered by decreasing log-likelihood", swapped_rows),
            ("metric-set-duplicate-ids.h5", 3, "ids are not distinct", duplicate_ids),
            ("metric-set-coverage.h5", 3, "metric-set.coverage disagrees with the component column", coverage),
            ("metric-set-no-pool.h5", 3, "a required attribute (metric-set.pool) is missing", no_pool),
            ("metric-set-newer.h5", 4, "a format version newer than the reader's", newer_metric)):
        rewrite_hdf5(metric, add(name, "metric-set", code, rule), change)

    scores = valid["scores.safetensors"]
    values, _ = safetensors_parts(scores)
    rewrite_safetensors(scores, add("scores-negative-relevance.safetensors", "scores", 3,
                                    "a relevance is negative"),
                        tensors={"blocks.0.mlp.relevance": -np.abs(values["blocks.0.mlp.relevance"]) - 1})
    rewrite_safetensors(scores, add("scores-wrong-shape.safetensors", "scores", 3,
                                    "a score vector's length disagrees with the block's width"),
                        tensors={"blocks.1.attn.score": values["blocks.1.attn.score"][:-1]})
    rewrite_safetensors(scores, add("scores-no-criterion.safetensors", "scores", 3,
                                    "a required key (scores.criterion) is missing"), scores__criterion=None)
    rewrite_safetensors(scores, add("scores-newer.safetensors", "scores", 4,
                                    "a format version newer than the reader's"), tapvits__version="2")

    plan = valid["plan.safetensors"]
    keep, _ = safetensors_parts(plan)
    kept = keep["blocks.0.mlp.keep"]
    rewrite_safetensors(plan, add("plan-unordered-keep.safetensors", "plan", 3, "kept indices are not increasing"),
                        tensors={"blocks.0.mlp.keep": kept[::-1].copy()})
    rewrite_safetensors(plan, add("plan-keep-out-of-range.safetensors", "plan", 3,
                                  "a kept index is beyond the block's width"),
                        tensors={"blocks.0.mlp.keep": np.append(kept[:-1], 10_000).astype(np.int64)})
    rewrite_safetensors(plan, add("plan-newer.safetensors", "plan", 4, "a format version newer than the reader's"),
                        tapvits__version="2")
    _, plan_metadata = safetensors_parts(plan)
    budget = json.loads(plan_metadata["plan.budget"])
    rewrite_safetensors(plan, add("plan-beyond-budget.safetensors", "plan", 3,
                                  "the kept units' cost is further than tapvits.params.tolerance from plan.budget"),
                        plan__budget=json.dumps({**budget, "value": budget["value"] / 2}, separators=(",", ":")))

    report = valid["report.json"]
    rewrite_json(report, add("report-top5-below-top1.json", "report", 3, "top5 is below top1"),
                 lambda d: d.update(top5=d["top1"] / 2))
    rewrite_json(report, add("report-per-class-sum.json", "report", 3, "per-class samples do not add up"),
                 lambda d: d.update(samples=d["samples"] + 1))
    rewrite_json(report, add("report-no-loss.json", "report", 3, "a required member (loss) is missing"),
                 lambda d: d.pop("loss"))
    rewrite_json(report, add("report-newer.json", "report", 4, "a format version newer than the reader's"),
                 lambda d: d.update({"tapvits.version": "2"}))
    rewrite_json(report, add("report-numeric-version.json", "report", 3,
                             "a header member is a JSON number, not a string"), lambda d: d.update({"tapvits.version": 1}))
    rewrite_json(report, add("report-nested-params.json", "report", 3,
                             "tapvits.params is a nested object, not compact-JSON text"),
                 lambda d: d.update({"tapvits.params": json.loads(d["tapvits.params"])}))

    duplicate = add("report-top1-twice.json", "report", 3, "a member named twice in one object (top1)")
    document = json.loads(report.read_text())   # the valid figure last, where Python's json keeps it
    duplicate.write_text('{\n  "top1": %s,\n' % json.dumps(document["top1"] / 2)
                         + json.dumps(document, indent=2)[2:] + "\n")

    profile = valid["profile.json"]
    rewrite_json(profile, add("profile-negative-latency.json", "profile", 3, "a latency is not positive"),
                 lambda d: d["fixed"]["embed_ms"].__setitem__(0, -1.0))
    rewrite_json(profile, add("profile-widths-unordered.json", "profile", 3, "attn.widths is not increasing"),
                 lambda d: d["attn"].update(widths=d["attn"]["widths"][::-1]))
    rewrite_json(profile, add("profile-unaligned-missing.json", "profile", 3,
                              "mlp_unaligned is missing although mlp_alignment > 1"), lambda d: d.pop("mlp_unaligned"))
    rewrite_json(profile, add("profile-newer.json", "profile", 4, "a format version newer than the reader's"),
                 lambda d: d.update({"tapvits.version": "2"}))

    add("foreign-bytes.bin", "", 3, "neither safetensors, HDF5 nor JSON").write_bytes(bytes(range(64)))
    add("foreign-json.json", "", 3, "a JSON object without tapvits.kind").write_text('{"hello": "world"}\n')
    rewrite_json(report, add("unknown-kind.json", "", 3, "a kind this protocol does not define"),
                 lambda d: d.update({"tapvits.kind": "recipe"}))
    return broken


def expectations(path: Path) -> dict:
    """What a conforming reader finds in a valid file: key figures and every content hash it recomputes."""
    from tapvits_cli.artifacts.containers import open_file

    artifact = open_file(path)
    meta = artifact.metadata
    kind, version = artifact.header.kind, artifact.header.version
    found = {"kind": kind, "version": version, "inputs": {role: e.to_dict() for role, e in artifact.header.inputs.items()}}
    if kind == "model":
        found.update(weights_sha256=meta["model.weights_sha256"], parameters=int(meta["model.parameters"]),
                     blocks=json.loads(meta["model.blocks"]), num_classes=int(meta["model.num_classes"]))
    elif kind == "gmm":
        found.update(tensors_sha256=meta["gmm.tensors_sha256"], extractor_sha256=meta["gmm.extractor_sha256"],
                     components=int(meta["gmm.components"]), dim=int(meta["gmm.dim"]),
                     samples=int(meta["gmm.samples"]))
    elif kind == "features":
        found.update(extractor_sha256=meta["features.extractor_sha256"],
                     features_sha256=meta["features.features_sha256"], rows=int(meta["features.rows"]),
                     dim=int(meta["features.dim"]), fingerprint=json.loads(meta["features.dataset"])["fingerprint"])
    elif kind == "metric-set":
        with h5py.File(path, "r") as handle:
            group = handle["selection"]
            found.update(metric_size=int(group.attrs["metric_size"]), finetune_size=int(group.attrs["finetune_size"]),
                         strategy=str(group.attrs["strategy"]), ids=[int(i) for i in group["ids"][...]])
    elif kind == "scores":
        found.update(criterion=meta["scores.criterion"], samples=int(meta["scores.samples"]),
                     model_weights_sha256=json.loads(meta["scores.model"])["weights_sha256"])
    elif kind == "plan":
        keep, _ = safetensors_parts(path)
        found.update(budget=json.loads(meta["plan.budget"]),
                     kept={name: len(values) for name, values in sorted(keep.items())})
    elif kind == "report":
        body = json.loads(path.read_text())
        found.update(top1=body["top1"], samples=body["samples"], parameters=body["parameters"])
    elif kind == "profile":
        body = json.loads(path.read_text())
        found.update(batch_sizes=body["batch_sizes"], attn_widths=body["attn"]["widths"],
                     mlp_alignment=body.get("mlp_alignment", 1))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description="Write the conformance kit (files/ and manifest.json).")
    parser.add_argument("--out", type=Path, default=HERE, help="the folder to write files/ and manifest.json to "
                        "(default: next to this script, the committed kit); another folder gives a rerun to "
                        "compare with it, e.g. with diff -r")
    out = parser.parse_args().out
    files = out / "files"
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        valid = make_valid(work)
        broken = make_invalid(valid, work)
        if files.exists():
            shutil.rmtree(files)
        files.mkdir(parents=True)
        entries = []
        for name, path in valid.items():
            shutil.copyfile(path, files / name)
            entries.append({"file": name, "verdict": "valid", "exit_code": 0, "expect": expectations(path)})
        for name, kind, code, rule in broken:
            shutil.copyfile(work / name, files / name)
            entries.append({"file": name, "kind": kind, "verdict": "incompatible" if code == 4 else "invalid",
                            "exit_code": code, "rule": rule})
    manifest = {"protocol": "tapvits artifact protocol, version 1 (model v2, gmm v3)",
                "made_by": "protocol/conformance/generate.py", "files": entries}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(f.stat().st_size for f in files.iterdir())
    print(f"{len(entries)} files, {total} bytes in {files}")


if __name__ == "__main__":
    main()
