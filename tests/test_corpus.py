"""A corpus of broken artifacts and a property test over mutated ones (issue 16).

Every artifact reader (``validate``, ``inspect`` and each subcommand that consumes the
kind) runs on valid artifacts with one mutation each: a bit flip, a truncation, a
metadata key removed, retyped or replaced by a hostile value, a nested JSON member
replaced, a tensor set to NaN. Whatever the mutation, a reader must

- exit with a documented code (never 1, "internal error"),
- on failure print exactly one line on stderr (``tapvits: error: …``), no traceback,
  and leave no output file behind,
- leave its inputs byte-for-byte as they were,
- refuse (non-zero) whatever ``validate`` refuses: the semantic checks are shared.

The examples are derandomized and bounded so the suite stays deterministic and within
CI's time; ``pytest -m fuzz`` runs many more (see the ``FUZZ_EXAMPLES`` setting below).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from conftest import TINY_VIT, TINY_VIT_KWARGS, model_args
from tapvits_cli.errors import ExitCode

# Codes a reader may give for a broken input (README "Exit codes"): never 1 (a bug), 7
# (not implemented) or 9 (the environment: nothing here touches the disk's limits).
READER_CODES = {ExitCode.OK, ExitCode.USAGE, ExitCode.INVALID_ARTIFACT, ExitCode.INCOMPATIBLE,
                ExitCode.UNSATISFIABLE_BUDGET, ExitCode.BELOW_THRESHOLD, ExitCode.DATA_UNAVAILABLE}
CORPUS_EXAMPLES = int(os.environ.get("TAPVITS_CORPUS_EXAMPLES", "12"))
FUZZ_EXAMPLES = int(os.environ.get("TAPVITS_FUZZ_EXAMPLES", "500"))


def _run(*args) -> tuple[int, str, str]:
    """The real entry point in-process, capturing what it prints."""
    import contextlib
    import io

    from tapvits_cli.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict[str, Path]:
    """One valid artifact of every kind, made by the tool itself (the chain of the quickstart, tiny)."""
    root = tmp_path_factory.mktemp("chain")
    files = {kind: root / name for kind, name in (
        ("model", "model.safetensors"), ("features", "pool.h5"), ("gmm", "gmm.safetensors"),
        ("metric-set", "metric.h5"), ("scores", "scores.safetensors"), ("plan", "plan.safetensors"),
        ("report", "report.json"))}
    steps = [
        ("create-model", TINY_VIT, *model_args(TINY_VIT_KWARGS), "-o", files["model"]),
        ("features", "--data", "digits", "--extractor", files["model"], "-o", files["features"]),
        ("fit-gmm", "--data", "digits:split=test:classes=0,1", "--extractor", files["model"], "--covariance", "diag",
         "--min-samples", "40", "-o", files["gmm"]),
        ("select", files["gmm"], "--pool", files["features"], "--metric-size", "16", "--finetune-size", "32",
         "-o", files["metric-set"]),
        ("score", files["model"], "--metric-set", files["metric-set"], "--max-samples", "16", "-o", files["scores"]),
        ("allocate", files["scores"], "--budget", "0.7", "-o", files["plan"]),
        ("eval", files["model"], "--data", "digits:split=test:indices=0-19", "--no-latency", "-o", files["report"]),
    ]
    for step in steps:
        code, _, err = _run("-q", *step)
        assert code == 0, (step[0], err)
    return files


# The readers of each kind: argument lists with BAD standing for the mutated file and OUT
# for the output; the other inputs are the chain's valid artifacts.
BAD, OUT = object(), object()
READERS = {
    "model": {
        "eval": lambda f: ("eval", BAD, "--data", "digits:split=test:indices=0-9", "--no-latency", "-o", OUT),
        "finetune": lambda f: ("finetune", BAD, "--data", "digits:split=test:indices=0-15", "--max-steps", "1",
                               "--batch-size", "8", "--no-checkpoint", "-o", OUT),
        "export": lambda f: ("export", BAD, "--no-check", "-o", OUT),
        "prune": lambda f: ("prune", BAD, f["plan"], "-o", OUT),
        "score": lambda f: ("score", BAD, "--metric-set", f["metric-set"], "--max-samples", "8",
                            "--no-layer-importance", "-o", OUT),
        "allocate": lambda f: ("allocate", f["scores"], "--budget", "0.7", "--model", BAD, "-o", OUT),
        "features": lambda f: ("features", "--data", "digits:split=test:indices=0-15", "--extractor", BAD, "-o", OUT),
    },
    "features": {
        "select": lambda f: ("select", f["gmm"], "--pool", BAD, "--metric-size", "8", "--finetune-size", "16",
                             "-o", OUT),
    },
    "gmm": {
        "select": lambda f: ("select", BAD, "--pool", f["features"], "--metric-size", "8", "--finetune-size", "16",
                             "-o", OUT),
        "audit-gmm": lambda f: ("audit-gmm", BAD, "--private", "digits:split=test:classes=0,1", "-e", f["model"]),
    },
    "metric-set": {
        "score": lambda f: ("score", f["model"], "--metric-set", BAD, "--max-samples", "8", "--no-layer-importance",
                            "-o", OUT),
        "finetune": lambda f: ("finetune", f["model"], "--data", "digits", "--finetune-set", BAD, "--max-steps", "1",
                               "--batch-size", "8", "--no-checkpoint", "-o", OUT),
    },
    "scores": {
        "allocate": lambda f: ("allocate", BAD, "--budget", "0.7", "-o", OUT),
    },
    "plan": {
        "prune": lambda f: ("prune", f["model"], BAD, "-o", OUT),
    },
    "report": {},
}
OUTPUT_NAMES = {"eval": "out.json", "export": "out.onnx", "select": "out.h5", "features": "out.h5"}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_readers(kind: str, bad: Path, files: dict[str, Path], work: Path, readers=None) -> dict[str, int]:
    """Run ``validate``, ``inspect`` and every consumer of ``kind`` on ``bad``; assert the contract; return codes."""
    inputs = [bad, *files.values()]
    before = {path: _digest(path) for path in inputs}
    codes = {}
    commands = {"validate": lambda f: ("validate", BAD), "inspect": lambda f: ("inspect", BAD),
                **READERS[kind]}
    for name, build in commands.items():
        if readers is not None and name not in readers:
            continue
        out_dir = work / f"out-{name}"
        out_dir.mkdir()
        output = out_dir / OUTPUT_NAMES.get(name, "out.safetensors")
        args = [bad if a is BAD else output if a is OUT else a for a in build(files)]
        code, stdout, stderr = _run("-q", *args)
        codes[name] = code
        what = f"{name} on a mutated {kind}: exit {code}, stderr {stderr!r}"
        assert code in READER_CODES, what
        assert "Traceback" not in stderr, what
        if code != 0:
            assert stderr.count("\n") == 1 and stderr.startswith("tapvits: error: "), what
            assert not any(out_dir.iterdir()), f"{what}; left {sorted(p.name for p in out_dir.iterdir())}"
        shutil.rmtree(out_dir)
    assert {path: _digest(path) for path in inputs} == before, f"a reader changed its input ({kind})"
    if codes.get("validate", 0) != 0:
        # inspect shows what a file claims after the cheap checks only (a feature table's rows
        # are not hashed to print its header): it must fail cleanly, but need not refuse
        passed = [name for name, code in codes.items() if code == 0 and name != "inspect"]
        assert not passed, f"validate refuses the mutated {kind} (exit {codes['validate']}) but {passed} accept it"
    return codes


# --- mutations ----------------------------------------------------------------------

def _safetensors_split(data: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length]), data[8 + length:]


def _safetensors_join(header: dict, payload: bytes) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + payload


def read_metadata(path: Path) -> dict:
    """The string metadata of any artifact (safetensors ``__metadata__``, HDF5 root attributes, JSON members)."""
    data = path.read_bytes()
    if data.startswith(b"\x89HDF"):
        with h5py.File(path, "r") as handle:
            return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in handle.attrs.items()}
    if data[:1] == b"{":
        return json.loads(data)
    return _safetensors_split(data)[0]["__metadata__"]


def write_metadata(path: Path, update: dict, remove=()) -> None:
    """Set (``update``) and delete (``remove``) metadata keys in place, keeping everything else."""
    data = path.read_bytes()
    if data.startswith(b"\x89HDF"):
        with h5py.File(path, "r+") as handle:
            for key in remove:
                del handle.attrs[key]
            for key, value in update.items():   # HDF5 strings cannot hold NUL: the nearest hostile text
                handle.attrs[key] = value.replace("\x00", "\x01") if isinstance(value, str) else value
        return
    if data[:1] == b"{":
        document = json.loads(data)
        for key in remove:
            document.pop(key)
        document.update(update)
        path.write_text(json.dumps(document, indent=2))
        return
    header, payload = _safetensors_split(data)
    for key in remove:
        header["__metadata__"].pop(key)
    header["__metadata__"].update(update)
    path.write_bytes(_safetensors_join(header, payload))


def write_nan(path: Path, pick: int) -> str:
    """One float value of a tensor (safetensors) or dataset (HDF5) set to NaN; returns its name."""
    data = path.read_bytes()
    if data.startswith(b"\x89HDF"):
        names = []
        with h5py.File(path, "r+") as handle:
            handle.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) and o.dtype.kind == "f"
                              and o.size else None)
            name = sorted(names)[pick % len(names)]
            dataset = handle[name]
            values = dataset[()]
            values.flat[pick % values.size] = np.nan
            dataset[()] = values
        return name
    if data[:1] == b"{":   # a JSON artifact: one number of the body becomes NaN (Python's json writes it)
        document = json.loads(data)
        numbers = [p for p in _json_paths(document) if isinstance(_get(document, p), float)]
        path_ = numbers[pick % len(numbers)]
        path.write_text(json.dumps(_replace_at(document, path_, float("nan"))))
        return str(list(path_))
    header, payload = _safetensors_split(data)
    floats = sorted(n for n, e in header.items() if n != "__metadata__" and e["dtype"] in ("F32", "F64")
                    and e["data_offsets"][1] > e["data_offsets"][0])
    if not floats:
        return "nothing (no float tensor)"   # a plan holds indices only
    name = floats[pick % len(floats)]
    start, end = header[name]["data_offsets"]
    width = 4 if header[name]["dtype"] == "F32" else 8
    at = start + (pick % ((end - start) // width)) * width
    nan = struct.pack("<f" if width == 4 else "<d", float("nan"))
    path.write_bytes(data[:len(data) - len(payload)] + payload[:at] + nan + payload[at + width:])
    return name


HOSTILE_TEXT = ["", "null", "true", "-1", "0", "1e999", "NaN", "[]", "{}", '{"a":', "[1,2]", '"text"',
                "99999999999999999999", "\u0000", "x" * 5000, "1.5", "-0"]
HOSTILE_JSON = [None, True, False, -1, 0, 1.5, 1e308, -1e308, 10 ** 20, "", "x", [], {}, [1, 2], {"a": 1},
                [[[]]], 100000, [3, 100000, 100000], "NaN"]


def _retype(value: str):
    """The same content, of another JSON type: an object as a list, a number as a string, …"""
    try:
        parsed = json.loads(value)
    except ValueError:
        return json.dumps([value])
    if isinstance(parsed, dict):
        return json.dumps(list(parsed.values()))
    if isinstance(parsed, list):
        return json.dumps({str(i): v for i, v in enumerate(parsed)})
    if isinstance(parsed, str):
        return json.dumps({"value": parsed})
    return json.dumps(str(parsed))


def _structured(value):
    """A metadata value's JSON object or list (parsed from its string), else None."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    return value if isinstance(value, (dict, list)) else None


def _json_paths(value, prefix=()):
    """Every path into a JSON value (keys and indices), the value's own first."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _json_paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value[:8]):
            yield from _json_paths(item, (*prefix, index))


def _get(value, path):
    for step in path:
        value = value[step]
    return value


def _replace_at(value, path, new):
    if not path:
        return new
    copy = value.copy()
    copy[path[0]] = _replace_at(value[path[0]], path[1:], new)
    return copy


MUTATIONS = st.one_of(
    # half the bit flips land in the first 2 KiB, where every container keeps its header
    st.tuples(st.just("flip"), st.one_of(st.integers(0, 2047), st.integers(0, 2 ** 31)), st.integers(0, 7)),
    st.tuples(st.just("truncate"), st.integers(0, 2 ** 31)),
    st.tuples(st.just("drop"), st.integers(0, 2 ** 31)),
    st.tuples(st.just("hostile"), st.integers(0, 2 ** 31), st.sampled_from(HOSTILE_TEXT)),
    st.tuples(st.just("retype"), st.integers(0, 2 ** 31)),
    st.tuples(st.just("nested"), st.integers(0, 2 ** 31), st.integers(0, 2 ** 31), st.sampled_from(HOSTILE_JSON)),
    st.tuples(st.just("nan"), st.integers(0, 2 ** 31)),
    st.tuples(st.just("structure"), st.integers(0, 2 ** 31), st.sampled_from(["drop", "dtype", "shape", "attribute"]),
              st.sampled_from([-1, 0, 10 ** 12, "x", 2.5])),
)


def write_structure(path: Path, pick: int, change: str, value) -> str:
    """A tensor or HDF5 dataset dropped, retyped or reshaped (its bytes kept consistent), or a group attribute set."""
    data = path.read_bytes()
    if data.startswith(b"\x89HDF"):
        with h5py.File(path, "r+") as handle:
            datasets, attributes = [], []
            handle.visititems(lambda n, o: datasets.append(n) if isinstance(o, h5py.Dataset) else None)
            handle.visititems(lambda n, o: attributes.extend((n, a) for a in o.attrs))
            if change == "attribute" and attributes:
                name, attribute = sorted(attributes)[pick % len(attributes)]
                handle[name].attrs[attribute] = value
                return f"{name} attribute {attribute} = {value!r}"
            name = sorted(datasets)[pick % len(datasets)]
            values = handle[name][()]
            del handle[name]
            if change == "drop":
                return f"{name} dropped"
            if change == "dtype":
                handle[name] = values.astype(np.float64 if values.dtype.kind in "iu" else np.int32)
                return f"{name} retyped"
            handle[name] = values.reshape(-1) if values.ndim > 1 else values.reshape(-1, 1)
            return f"{name} reshaped"
    if data[:1] == b"{":
        return "nothing (JSON has no tensors)"
    header, payload = _safetensors_split(data)
    names = sorted(n for n in header if n != "__metadata__")
    if not names:
        return "nothing (no tensor)"
    name = names[pick % len(names)]
    entry = header[name]
    if change == "drop":   # the entry and its bytes: later offsets move down
        start, end = entry["data_offsets"]
        del header[name]
        for other in header.values():
            if isinstance(other, dict) and "data_offsets" in other and other["data_offsets"][0] >= end:
                other["data_offsets"] = [o - (end - start) for o in other["data_offsets"]]
        payload = payload[:start] + payload[end:]
    elif change == "dtype":
        entry["dtype"] = {"F32": "I32", "I32": "F32", "F64": "I64", "I64": "F64"}.get(entry["dtype"], "U8")
        if entry["dtype"] == "U8":
            entry["shape"] = [entry["data_offsets"][1] - entry["data_offsets"][0]]
    else:
        numel = int(np.prod(entry["shape"], dtype=np.int64))
        entry["shape"] = [numel] if len(entry["shape"]) != 1 else [numel, 1]
    path.write_bytes(_safetensors_join(header, payload))
    return f"tensor {name}: {change}"


def mutate(source: Path, target: Path, mutation: tuple) -> str:
    """Write ``source`` with ``mutation`` applied to ``target``; returns what was done (for messages)."""
    shutil.copyfile(source, target)
    op, *args = mutation
    data = source.read_bytes()
    if op == "flip":
        at = args[0] % len(data)
        target.write_bytes(data[:at] + bytes([data[at] ^ (1 << args[1])]) + data[at + 1:])
        return f"bit {args[1]} of byte {at} flipped"
    if op == "truncate":
        length = args[0] % len(data)
        target.write_bytes(data[:length])
        return f"truncated to {length} bytes"
    if op == "nan":
        return f"NaN in {write_nan(target, args[0])}"
    if op == "structure":
        return write_structure(target, *args)
    metadata = read_metadata(source)
    keys = sorted(k for k in metadata if isinstance(metadata[k], str) or data[:1] != b"{" or k.startswith("tapvits."))
    key = keys[args[0] % len(keys)]
    if op == "drop":
        write_metadata(target, {}, remove=[key])
        return f"{key} removed"
    if op == "hostile":
        write_metadata(target, {key: args[1]})
        return f"{key} = {args[1][:40]!r}"
    if op == "retype":
        write_metadata(target, {key: _retype(metadata[key])})
        return f"{key} retyped"
    # nested: replace one member inside a JSON-valued key (or inside a JSON artifact's body)
    jsonish = sorted(k for k in metadata if _structured(metadata[k]) is not None)
    key = jsonish[args[0] % len(jsonish)]
    value = _structured(metadata[key])
    paths = list(_json_paths(value))
    path = paths[args[1] % len(paths)]
    new = _replace_at(value, path, args[2])
    write_metadata(target, {key: new if not isinstance(metadata[key], str) else json.dumps(new)})
    return f"{key}{list(path)} = {args[2]!r}"


# Mutations the fuzz run found bugs with, replayed first in every run (byte offsets of files
# the pinned h5py writes): h5py crashing (SIGSEGV) on an attribute's encoding, a corrupt
# label making inspect allocate a petabyte, h5py's RuntimeError on a damaged attribute table.
FOUND = {"features": [("flip", 1025, 3), ("flip", 29181, 7)], "metric-set": [("flip", 881, 0)]}


def _kind_test(kind: str, examples: int):
    # no shrinking: a failure reports the mutation it was found with, and CI's time stays bounded
    replay = [example(mutation=mutation) for mutation in FOUND.get(kind, [])]

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None,
              phases=(Phase.explicit, Phase.generate), suppress_health_check=list(HealthCheck))
    @given(mutation=MUTATIONS)
    def test(chain, tmp_path_factory, mutation):
        work = tmp_path_factory.mktemp(f"mutated-{kind}")
        bad = work / chain[kind].name
        done = mutate(chain[kind], bad, mutation)
        try:
            check_readers(kind, bad, chain, work)
        except AssertionError as exc:
            raise AssertionError(f"{done}: {exc}") from None
        finally:
            shutil.rmtree(work)
    for replayed in replay:
        test = replayed(test)
    return test


def _only_when_selected(test):
    """The long fuzz run: collected always, run only with ``-m fuzz`` (CI's default run skips it)."""
    def guarded(request, chain, tmp_path_factory):
        if "fuzz" not in (request.config.option.markexpr or ""):
            pytest.skip("the long fuzz run: select it with `pytest -m fuzz tests/test_corpus.py`")
        test(chain, tmp_path_factory)
    guarded.__name__ = test.__name__
    return pytest.mark.fuzz(guarded)


for _kind in READERS:
    _name = _kind.replace("-", "_")
    globals()[f"test_mutated_{_name}_is_handled_by_every_reader"] = _kind_test(_kind, CORPUS_EXAMPLES)
    globals()[f"test_fuzz_{_name}"] = _only_when_selected(_kind_test(_kind, FUZZ_EXAMPLES))


# --- the corpus: named broken inputs and the code each must give ----------------------

def _edit_model_metadata(source: Path, target: Path, **changes) -> Path:
    shutil.copyfile(source, target)
    write_metadata(target, {f"model.{key}": value for key, value in changes.items()})
    return target


MODEL_CASES = {
    "kwargs of the wrong JSON type": {"kwargs": "[1, 2]"},
    "preprocessing of the wrong JSON type": {"preprocessing": "42"},
    "blocks inconsistent with depth": {"blocks": json.dumps([{"heads": 3, "head_dim": 8, "mlp_hidden": 48}] * 3)},
    "a depth of 100000": {"kwargs": json.dumps({**TINY_VIT_KWARGS, "depth": 100000})},
    "class_names not JSON": {"class_names": "['0', '1'"},
    "class_names not a list of strings": {"class_names": "[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]"},
    "3 channels for a 1-channel model": {"preprocessing": json.dumps(
        {"input_size": [3, 8, 8], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear"})},
    "an input of 100000x100000": {"preprocessing": json.dumps(
        {"input_size": [1, 100000, 100000], "mean": [0.5], "std": [0.5], "interpolation": "bilinear"})},
    "an input of 8.0 x 8.0 pixels": {"preprocessing": json.dumps(
        {"input_size": [1, 8.0, 8.0], "mean": [0.5], "std": [0.5], "interpolation": "bilinear"})},
    "a NaN std": {"preprocessing": json.dumps(
        {"input_size": [1, 8, 8], "mean": [0.5], "std": [float("nan")], "interpolation": "bilinear"})},
    "num_classes disagreeing with the head": {"num_classes": "5"},
    "num_classes not an integer": {"num_classes": "ten"},
    "an unknown architecture": {"architecture": "vit_enormous_patch1_9000"},
    "an unknown family": {"family": "cnn"},
    "a token-merging schedule for another depth": {"token_merging": json.dumps(
        {"method": "bipartite", "schedule": [1, 1, 1], "proportional_attention": True})},
    # kwargs go to timm.create_model: these would download weights or load a file the artifact names
    "kwargs asking timm for pretrained weights": {"kwargs": json.dumps({**TINY_VIT_KWARGS, "pretrained": True})},
    "kwargs naming a checkpoint to load": {"kwargs": json.dumps({**TINY_VIT_KWARGS, "checkpoint_path": "/etc/hosts"})},
    "blocks nested 100000 deep": {"blocks": "[" * 100000 + "]" * 100000},
}


@pytest.mark.parametrize("case", MODEL_CASES)
def test_semantically_broken_models_are_invalid_for_every_reader(case, chain, tmp_path):
    bad = _edit_model_metadata(chain["model"], tmp_path / "model.safetensors", **MODEL_CASES[case])
    codes = check_readers("model", bad, chain, tmp_path)
    assert set(codes.values()) == {ExitCode.INVALID_ARTIFACT}, (case, codes)


def test_a_safetensors_header_length_that_starts_with_a_brace_is_not_json(chain, tmp_path):
    header, payload = _safetensors_split(chain["model"].read_bytes())
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((123 - len(raw)) % 256)   # header length 123 mod 256: the file's first byte is "{"
    braced = tmp_path / "braced.safetensors"
    braced.write_bytes(struct.pack("<Q", len(raw)) + raw + payload)
    assert braced.read_bytes()[:1] == b"{"
    codes = check_readers("model", braced, chain, tmp_path, readers={"validate", "inspect", "eval", "prune"})
    assert set(codes.values()) == {ExitCode.OK}, codes


def test_a_truncated_feature_table_given_to_select_is_invalid(chain, tmp_path):
    data = chain["features"].read_bytes()
    for length in (len(data) // 2, len(data) - 4096, 4096):
        bad = tmp_path / f"pool-{length}.h5"
        bad.write_bytes(data[:length])
        work = tmp_path / f"work-{length}"
        work.mkdir()
        codes = check_readers("features", bad, chain, work)
        assert set(codes.values()) == {ExitCode.INVALID_ARTIFACT}, (length, codes)


def test_an_id_outside_the_pool_is_invalid_for_score_and_finetune(chain, tmp_path):
    bad = tmp_path / "metric.h5"
    shutil.copyfile(chain["metric-set"], bad)
    with h5py.File(bad, "r+") as handle:
        ids = handle["selection/ids"][()]
        ids[0] = 10 ** 6   # distinct, non-negative, and no sample of the pool
        handle["selection/ids"][...] = ids
    codes = check_readers("metric-set", bad, chain, tmp_path)
    # only the pool can tell: validate and inspect, which do not open it, accept the file
    assert codes == {"validate": 0, "inspect": 0, "score": ExitCode.INVALID_ARTIFACT,
                     "finetune": ExitCode.INVALID_ARTIFACT}, codes


def test_malformed_datasets_are_bad_input(tmp_path, tapvits, tiny_model_file):
    from PIL import Image

    np.savez(tmp_path / "good.npz", x=np.zeros((4, 8, 8), np.uint8), y=np.arange(4))
    data = (tmp_path / "good.npz").read_bytes()
    (tmp_path / "truncated.npz").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.npz").write_bytes(b"PK\x03\x04" + bytes(200))
    np.savez(tmp_path / "mislabelled.npz", x=np.zeros((4, 8, 8), np.uint8), y=np.arange(3))
    folder = tmp_path / "folder"
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True)
        Image.new("L", (8, 8)).save(folder / label / "0.png")
    png = (folder / "b" / "0.png").read_bytes()
    (folder / "b" / "1.png").write_bytes(png[: len(png) // 2])       # truncated
    (folder / "b" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))   # a header and nothing
    for source in ("truncated.npz", "garbage.npz", "mislabelled.npz", "folder"):
        out = tmp_path / f"{source}.json"
        result = tapvits("eval", tiny_model_file, "--data", tmp_path / source, "--no-latency", "-o", out)
        assert result.exit_code == ExitCode.USAGE, (source, result.stderr)
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
        assert not out.exists()


def _edit_record(key: str, change):
    """Edit the JSON model record a scores or plan artifact keeps under ``key``."""
    def edit(path: Path) -> None:
        record = json.loads(read_metadata(path)[key])
        change(record)
        write_metadata(path, {key: json.dumps(record)})
    return edit


def _rebuild_features(rows: int | None = None, dim: int | None = None):
    """A feature table cut to ``rows`` rows or ``dim`` features, consistent in itself (hash, metadata)."""
    def edit(path: Path) -> None:
        with h5py.File(path, "r+") as handle:
            group = handle["features"]
            ids, labels, features = (group[name][()] for name in ("ids", "labels", "features"))
            ids, labels, features = ids[:rows], labels[:rows], features[:rows, :dim]
            for name, data in (("ids", ids), ("labels", labels), ("features", features)):
                del group[name]
                group.create_dataset(name, data=data)
            extractor = json.loads(handle.attrs["features.extractor"])
            extractor["feature_dim"] = features.shape[1]
            text = json.dumps(extractor, sort_keys=True, separators=(",", ":"))
            handle.attrs.update({"features.extractor": text, "features.extractor_sha256": hashlib.sha256(
                text.encode()).hexdigest(), "features.dim": str(features.shape[1]), "features.rows": str(len(ids)),
                "features.rows_done": str(len(ids)), "features.features_sha256": hashlib.sha256(
                    np.ascontiguousarray(features, dtype="<f4").tobytes()).hexdigest()})
    return edit


def _flip_label(path: Path, row: int) -> None:
    """One public label changed: the features, and so their hash, untouched."""
    with h5py.File(path, "r+") as handle:
        handle["features/labels"][row] = (handle["features/labels"][row] + 1) % 10


def _metric_set_column(name: str, value, drop_coverage: bool = False):
    def edit(path: Path) -> None:
        with h5py.File(path, "r+") as handle:
            column = handle[f"selection/{name}"]
            column[...] = np.full(column.shape, value, dtype=column.dtype)
            if drop_coverage:
                del handle.attrs["metric-set.coverage"]
    return edit


# Found by a review that fed hostile artifacts to every reader: each was accepted, or crashed
# (exit 1), or spoke to the network. Expected: the codes of the readers that run.
REVIEWED_CASES = {
    "scores recording a model that asks for pretrained weights": (
        "scores", _edit_record("scores.model", lambda r: r["kwargs"].update(pretrained=True)),
        {"validate": 0, "inspect": 0, "allocate": ExitCode.INVALID_ARTIFACT}),
    "scores recording no prunable family": (
        "scores", _edit_record("scores.model", lambda r: r.update(family="cnn")), ExitCode.INVALID_ARTIFACT),
    "scores recording 2.0 heads": (
        "scores", _edit_record("scores.model", lambda r: r["blocks"][0].update(heads=float(r["blocks"][0]["heads"]))),
        ExitCode.INVALID_ARTIFACT),
    "scores whose probe fraction is a boolean": (
        "scores", lambda path: write_metadata(path, {"scores.probe_fraction": "true"}), ExitCode.INVALID_ARTIFACT),
    "scores of -5 samples": (
        "scores", lambda path: write_metadata(path, {"scores.samples": "-5"}), ExitCode.INVALID_ARTIFACT),
    "a plan whose model costs more than 64-bit counts hold": (
        "plan", _edit_record("plan.model", lambda r: r["kwargs"].update(img_size=100000)),
        {"validate": ExitCode.INVALID_ARTIFACT, "inspect": 0, "prune": ExitCode.INVALID_ARTIFACT}),
    "a header nested 100000 deep": (
        "plan", lambda path: write_metadata(path, {"tapvits.params": "[" * 100000 + "]" * 100000}),
        ExitCode.INVALID_ARTIFACT),
    "a feature table with one label changed (features.index_sha256)": (
        "features", lambda path: _flip_label(path, 3), ExitCode.INVALID_ARTIFACT),
    "a feature table of no rows": ("features", _rebuild_features(rows=0), ExitCode.INVALID_ARTIFACT),
    "a feature table of no features": ("features", _rebuild_features(dim=0), ExitCode.INVALID_ARTIFACT),
    "a metric set whose component index would size a 16 GiB table": (
        "metric-set", _metric_set_column("component", 2 ** 31 - 1, drop_coverage=True),
        {"validate": 0, "inspect": 0, "score": 0, "finetune": 0}),
    "a metric set of −inf log-likelihoods (overflowed densities rank nothing)": (
        "metric-set", _metric_set_column("log_likelihood", -np.inf), 3),
}


@pytest.mark.parametrize("case", REVIEWED_CASES)
def test_reviewed_hostile_artifacts(case, chain, tmp_path):
    kind, edit, expected = REVIEWED_CASES[case]
    bad = tmp_path / chain[kind].name
    shutil.copyfile(chain[kind], bad)
    edit(bad)
    codes = check_readers(kind, bad, chain, tmp_path)
    assert codes == (expected if isinstance(expected, dict) else dict.fromkeys(codes, expected)), (case, codes)
