"""The ``profile`` artifact: a device's latency table for one architecture, as one JSON object.

See protocol/profile.md. ``tapvits profile`` writes it on the device; the cloud reads it to
predict the latency of any pruned model of that architecture on that device
(``payloads.latency_table.predict_latency``) without the device.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from tapvits_cli.artifacts.containers import ArtifactFile, read_json_body, write_json
from tapvits_cli.artifacts.header import Header, LineageEntry, finite_number
from tapvits_cli.artifacts.kinds import KindSpec, Summary, Table, read_artifact, register
from tapvits_cli.payloads.latency_table import BranchTable, LatencyProfile, predict_latency
from tapvits_cli.vocabulary import RUNTIMES

KIND = "profile"
VERSION = 1
_UNITS = {"attn": "heads", "mlp": "hidden neurons", "mlp_unaligned": "hidden neurons"}   # width tables


def profile_body(profile: LatencyProfile) -> dict[str, Any]:
    """The JSON body of ``profile`` (protocol/profile.md, "Body members")."""
    return {
        "model": dict(profile.model),
        "runtime": {"name": profile.runtime, "version": profile.runtime_version, "threads": profile.threads,
                    "device": profile.device},
        "hardware": {"cpu": profile.cpu, "gpu": profile.gpu},
        "tokens": profile.tokens,
        "batch_sizes": list(profile.batch_sizes),
        "repeats": profile.repeats,
        "warmup": profile.warmup,
        "fixed": {"embed_ms": list(profile.embed_ms), "head_ms": list(profile.head_ms),
                  "block_ms": list(profile.block_ms)},
        **{name: {"widths": list(table.widths), "median_ms": table.median_ms.tolist()}
           for name, table in _tables(profile)},
        "mlp_alignment": profile.mlp_alignment,
    }


def _tables(profile: LatencyProfile) -> list[tuple[str, BranchTable]]:
    """The body's width tables, by member name: ``mlp_unaligned`` only at an MLP alignment > 1."""
    unaligned = [] if profile.mlp_unaligned is None else [("mlp_unaligned", profile.mlp_unaligned)]
    return [("attn", profile.attn), ("mlp", profile.mlp), *unaligned]


def write_profile(path: str | os.PathLike, profile: LatencyProfile, params: Mapping[str, Any],
                  inputs: Mapping[str, LineageEntry]):
    header = Header(kind=KIND, version=VERSION, inputs=dict(inputs), params=dict(params))
    return write_json(path, header, profile_body(profile))


def read_profile(path: str | os.PathLike) -> LatencyProfile:
    """The checked latency table of a profile artifact (every rule of protocol/profile.md)."""
    return _parse(read_artifact(path, expect=KIND))


def _integer(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


# A forward pass of one block, or of a model's fixed parts, measured on a device: milliseconds to
# seconds. A latency beyond 10^6 ms (17 minutes) is no measurement, and near the double's maximum
# a predicted sum of latencies overflows to infinity.
MAX_LATENCY_MS = 1e6


def _positive_ms(value: Any) -> bool:
    return finite_number(value) and 0 < value <= MAX_LATENCY_MS


def _increasing(values: Any, least: int) -> bool:
    return isinstance(values, list) and len(values) > 0 and all(_integer(v, least) for v in values) \
        and all(a < b for a, b in zip(values, values[1:]))


def _object(artifact: ArtifactFile, body: dict, name: str, members: Mapping[str, Any]) -> dict:
    """``body[name]`` as an object whose members pass their checks (``members``: name → predicate, description)."""
    value = body.get(name)
    if not isinstance(value, dict):
        raise artifact.fail(f"required member '{name}' must be an object")
    for member, (check, description) in members.items():
        if member not in value:
            raise artifact.fail(f"required member '{name}.{member}' is missing")
        if not check(value[member]):
            raise artifact.fail(f"member '{name}.{member}' must be {description}")
    return value


def _parse(artifact: ArtifactFile) -> LatencyProfile:
    body = read_json_body(artifact)
    fail = artifact.fail
    for name, least in (("tokens", 1), ("repeats", 1), ("warmup", 0)):
        if name not in body:
            raise fail(f"required member '{name}' is missing")
        if not _integer(body[name], least):
            raise fail(f"member '{name}' must be an integer ≥ {least}")
    sizes = body.get("batch_sizes")
    if not _increasing(sizes, 1):
        raise fail("member 'batch_sizes' must be a non-empty list of strictly increasing integers ≥ 1")
    text = (lambda v: isinstance(v, str), "a string")
    runtime = _object(artifact, body, "runtime", {
        "name": (lambda v: v in RUNTIMES, f"one of {', '.join(RUNTIMES)}"), "version": text,
        "threads": (lambda v: _integer(v, 1), "an integer ≥ 1"), "device": text})
    hardware = _object(artifact, body, "hardware", {"cpu": text,
                                                   "gpu": (lambda v: v is None or isinstance(v, str), "a string or null")})
    record = _object(artifact, body, "model", {"architecture": text, "kwargs": (lambda v: isinstance(v, dict), "an object"),
                                               "family": text, "blocks": (lambda v: isinstance(v, list) and v, "a non-empty list")})
    for index, block in enumerate(record["blocks"]):
        if not isinstance(block, dict) or not all(_integer(block.get(k), 1) for k in ("heads", "head_dim", "mlp_hidden")):
            raise fail(f"model.blocks[{index}] must hold integers heads, head_dim, mlp_hidden ≥ 1")
    row = (lambda v: isinstance(v, list) and len(v) == len(sizes) and all(_positive_ms(x) for x in v),
           f"a list of {len(sizes)} positive numbers of at most {MAX_LATENCY_MS:g} ms (one per batch size)")
    fixed = _object(artifact, body, "fixed", {"embed_ms": row, "head_ms": row, "block_ms": row})
    alignment = _alignment(artifact, body)
    names = ["attn", "mlp", *(["mlp_unaligned"] if alignment > 1 else [])]
    tables = {name: _branch(artifact, body, name, record["blocks"], row) for name in names}
    for name in names[1:]:
        stray = [w for w in tables[name].widths if (w % alignment == 0) != (name == "mlp")]
        if stray:
            raise fail(f"'{name}.widths' holds {stray}, {'not ' if name == 'mlp' else ''}multiples of "
                       f"'mlp_alignment' {alignment}")
    return LatencyProfile(
        model=record, runtime=runtime["name"], runtime_version=runtime["version"], threads=runtime["threads"],
        device=runtime["device"], cpu=hardware["cpu"], gpu=hardware["gpu"], batch_sizes=tuple(sizes),
        tokens=body["tokens"], repeats=body["repeats"], warmup=body["warmup"],
        embed_ms=tuple(float(v) for v in fixed["embed_ms"]), head_ms=tuple(float(v) for v in fixed["head_ms"]),
        block_ms=tuple(float(v) for v in fixed["block_ms"]), attn=tables["attn"], mlp=tables["mlp"],
        mlp_alignment=alignment, mlp_unaligned=tables.get("mlp_unaligned"))


def _alignment(artifact: ArtifactFile, body: dict) -> int:
    """``mlp_alignment`` (1 where absent: profiles written before it hold one MLP curve), checked against the
    presence of ``mlp_unaligned``."""
    alignment = body.get("mlp_alignment", 1)
    if not _integer(alignment, 1):
        raise artifact.fail("member 'mlp_alignment' must be an integer ≥ 1")
    if (alignment > 1) != ("mlp_unaligned" in body):
        raise artifact.fail(f"member 'mlp_unaligned' must be present exactly when 'mlp_alignment' > 1 "
                            f"(it is {alignment})")
    return alignment


def _branch(artifact: ArtifactFile, body: dict, name: str, blocks: list, row) -> BranchTable:
    """The width table ``body[name]`` (``row``: the latency-list check, with its description)."""
    unit = _UNITS[name]
    table = _object(artifact, body, name, {
        "widths": (lambda v: _increasing(v, 1), "a non-empty list of strictly increasing integers ≥ 1"),
        "median_ms": (lambda v: isinstance(v, list), "a list")})
    widest = max(b["heads"] if name == "attn" else b["mlp_hidden"] for b in blocks)
    if table["widths"][-1] > widest:
        raise artifact.fail(f"'{name}.widths' goes up to {table['widths'][-1]} {unit}, the architecture has {widest}")
    if len(table["median_ms"]) != len(table["widths"]) or not all(row[0](r) for r in table["median_ms"]):
        raise artifact.fail(f"'{name}.median_ms' must hold one row per width, each {row[1]}")
    return BranchTable(tuple(table["widths"]), np.array(table["median_ms"], dtype=np.float64))


def _validate(artifact: ArtifactFile) -> None:
    _parse(artifact)


def _summarize(artifact: ArtifactFile) -> Summary:
    """Figures, then per batch size one table of milliseconds per block at each measured width."""
    profile = _parse(artifact)
    figures = {
        "architecture": profile.model["architecture"], "kwargs": dict(profile.model["kwargs"]),
        "blocks": len(profile.blocks), "tokens": profile.tokens,
        "runtime": f"{profile.runtime} {profile.runtime_version}, {profile.threads} threads, {profile.device}",
        "cpu": profile.cpu, "gpu": profile.gpu, "batch_sizes": list(profile.batch_sizes),
        "repeats": profile.repeats, "warmup": profile.warmup, "mlp_alignment": profile.mlp_alignment,
        "unpruned_ms": {str(b): round(predict_latency(profile, profile.blocks, b).total_ms, 4)
                        for b in profile.batch_sizes},
    }
    batches = [f"batch {b}" for b in profile.batch_sizes]
    fixed = Table("fixed parts (ms)", ["part", *batches],
                  [[part, *values] for part, values in (("patch embedding", profile.embed_ms),
                                                        ("final norm + head", profile.head_ms),
                                                        ("emptied block", profile.block_ms))])
    tables = [fixed]
    for name, table in _tables(profile):
        tables.append(Table(_title(name, profile.mlp_alignment), ["width", *batches],
                            [[width, *map(float, row)] for width, row in zip(table.widths, table.median_ms)]))
    return Summary(figures=figures, tables=tables)


def _title(name: str, alignment: int) -> str:
    """The title ``inspect`` gives the width table ``name``."""
    if name == "attn":
        return "attention-only block (ms) by heads"
    mlp = "MLP-only block (ms) by hidden width"
    return mlp if alignment == 1 else f"{mlp}, {'not ' if name == 'mlp_unaligned' else ''}multiples of {alignment}"


SPEC = register(KindSpec(
    name=KIND, format="json", version=VERSION, validate=_validate, summarize=_summarize,
    description="a device's latency table: blocks at every prunable width, the fixed parts, runtime and hardware",
))
