"""``inspect``'s view of anything tapvits writes: artifacts, ONNX exports, run directories.

Every path becomes one plain document with the same members (``path``, ``kind``,
``version``, ``format``, ``producer``, ``producer_version``, ``created``, ``inputs``,
``params``, ``figures``, ``tables``, ``tensors``), so the CLI prints any of them the
same way, as text or as JSON. Fractions stay numbers here; the text view formats the
members named in :data:`FRACTION_NAMES` as percentages, as ``eval`` and ``run`` do.

A model's blocks show ``kept/built`` widths (``3/4`` heads) against its architecture's
own widths, and a scores artifact's units (``units=True``) show their score, its
components and rank, and whether a plan made from that very scores file kept them: the
answer to "why was head 2 of block 5 dropped?".
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from tapvits_cli.artifacts.header import parse_json
from tapvits_cli.artifacts.kinds import Table
from tapvits_cli.errors import InvalidArtifactError, UsageError

# Names (figure keys and table columns) whose values are fractions: shown as 95.56%.
FRACTION_NAMES = frozenset({
    "top1", "top5", "accuracy", "params_kept", "params_fraction", "macs_fraction", "metric_precision",
    "finetune_precision", "metric_class_recall", "finetune_class_recall", "top-1", "top-5", "params kept",
    "attn keep", "mlp keep", "precision", "class recall", "mean top-1", "mean params kept"})

HEADER_MEMBERS = ("kind", "version", "format", "producer", "producer_version", "created")
RUN_STATE, RUN_SUMMARY, RUN_DIRECTORY, ONNX_EXPORT = "run-state", "run-summary", "run-directory", "onnx-export"
UNIT_NAMES = {"attn": "head", "mlp": "neuron"}


def _document(path: str | os.PathLike, kind: str, **members: Any) -> dict[str, Any]:
    document: dict[str, Any] = {"path": str(path), "kind": kind, "version": None, "format": None, "producer": None,
                                "producer_version": None, "created": None, "inputs": {}, "params": {},
                                "figures": {}, "tables": [], "tensors": {}}
    document.update(members)
    return document


def inspect_paths(paths: Sequence[str | os.PathLike], units: bool = False,
                  blocks: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """One document per path, in order. Scores files gain unit tables with ``units``; a plan
    among ``paths`` made from one of them marks which units it kept."""
    plans = [path for path in paths if units and Path(path).is_file() and _kind_of(path) == "plan"]
    return [inspect_path(path, units=units, blocks=blocks, plans=plans) for path in paths]


def _kind_of(path: str | os.PathLike) -> str | None:
    from tapvits_cli.artifacts.containers import open_file

    try:
        return open_file(path).header.kind
    except InvalidArtifactError:
        return None


def inspect_path(path: str | os.PathLike, units: bool = False, blocks: Sequence[int] | None = None,
                 plans: Sequence[str | os.PathLike] = ()) -> dict[str, Any]:
    """The document for one path; raises the reader's error for a file that is none of the known things."""
    file = Path(path)
    if file.is_dir():
        return inspect_run_directory(file, units=units, blocks=blocks)
    if file.suffix.lower() == ".onnx":
        return inspect_onnx(file)
    if file.suffix.lower() == ".json" and not _has_tapvits_header(file):
        return _inspect_run_json(file)
    return inspect_artifact(file, units=units, blocks=blocks, plans=plans)


def _has_tapvits_header(file: Path) -> bool:
    """A JSON artifact (a report) starts with its ``tapvits.*`` members; run records have none."""
    try:
        document = parse_json(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, OSError):
        return True   # let the artifact reader give its precise reason
    return not isinstance(document, dict) or any(key.startswith("tapvits.") for key in document)


# --- artifacts -----------------------------------------------------------------------

def inspect_artifact(path: Path, units: bool = False, blocks: Sequence[int] | None = None,
                     plans: Sequence[str | os.PathLike] = ()) -> dict[str, Any]:
    from tapvits_cli.artifacts.kinds import summarize_artifact

    artifact, summary = summarize_artifact(path)
    header = artifact.header.to_dict()
    document = _document(artifact.path, header["kind"], format=artifact.format,
                         **{key: header[key] for key in HEADER_MEMBERS if key in header and key not in ("kind", "format")},
                         inputs=header["inputs"], params=header["params"], figures=summary.figures,
                         tables=[table.to_dict() for table in summary.tables],
                         tensors={n: {"dtype": t.dtype, "shape": list(t.shape)} for n, t in artifact.tensors.items()})
    if document["kind"] == "model":
        _show_kept_widths(document, artifact.metadata)
    if units and document["kind"] == "scores":
        document["tables"] += [table.to_dict() for table in unit_tables(path, plans, blocks)]
    return document


def _architecture_blocks(metadata: Mapping[str, str]):
    """The per-block widths the recorded architecture builds unpruned, or None without torch.

    Built on the ``meta`` device: no memory, no weights, only the module's shapes.
    """
    from tapvits_cli.runtime import torch_available

    if not torch_available() or "model.architecture" not in metadata:
        return None
    import torch

    from tapvits_cli.models.factory import create_model, describe_model

    kwargs = parse_json(metadata.get("model.kwargs", "{}"))
    with torch.device("meta"):
        module = create_model(metadata["model.architecture"], kwargs)
    return describe_model(module, metadata["model.architecture"], kwargs).blocks


def _show_kept_widths(document: dict[str, Any], metadata: Mapping[str, str]) -> None:
    """Rewrite the ``blocks`` table's widths as ``kept/built`` when the model is pruned."""
    table = next((t for t in document["tables"] if t["title"] == "blocks"), None)
    if table is None:
        return
    built = _architecture_blocks(metadata)
    if built is None or len(built) != len(table["rows"]):
        return
    heads, hidden = table["columns"].index("heads"), table["columns"].index("mlp_hidden")
    pruned = any(row[heads] != full.heads or row[hidden] != full.mlp_hidden for row, full in zip(table["rows"], built))
    document["figures"]["pruned"] = pruned
    if pruned:
        for row, full in zip(table["rows"], built):
            row[heads], row[hidden] = f"{row[heads]}/{full.heads}", f"{row[hidden]}/{full.mlp_hidden}"


def unit_tables(scores_path: str | os.PathLike, plans: Iterable[str | os.PathLike] = (),
                blocks: Sequence[int] | None = None) -> list[Table]:
    """Per head and per MLP neuron: score, its components, rank in its layer and, given a plan
    made from this scores file, whether the plan kept it.

    Rank 1 is the most important unit of its layer; units are pruned from the highest rank
    down within the layer's keep ratio, so a dropped unit's rank and components say why.
    """
    from tapvits_cli.artifacts.files import sha256_file
    from tapvits_cli.artifacts.plan import read_plan
    from tapvits_cli.artifacts.scores import COMPONENTS, UNIT_KINDS, read_scores

    scores = read_scores(scores_path)
    digest = sha256_file(scores_path)
    plan = next((p for p in (read_plan(path) for path in plans) if p.scores_sha256 == digest), None)
    chosen = range(len(scores.blocks)) if blocks is None else blocks
    outside = [block for block in chosen if not 0 <= block < len(scores.blocks)]
    if outside:
        raise UsageError(f"--block {outside[0]}: the scored model has blocks 0-{len(scores.blocks) - 1}")
    components = [name for name in COMPONENTS if name in scores.values[(0, "attn")]] if scores.blocks else []
    tables = []
    for kind in UNIT_KINDS:
        columns = ["block", UNIT_NAMES[kind], "score", *components, "rank"] + (["kept"] if plan else [])
        rows: list[list[Any]] = []
        for block in chosen:
            values = scores.values[(block, kind)]
            count = len(values["score"])
            if count == 0:
                continue
            order = np.argsort(-values["score"], kind="stable")
            rank = np.empty(count, dtype=np.int64)
            rank[order] = np.arange(1, count + 1)
            kept = np.isin(np.arange(count), plan.keep[kind][block]) if plan else None
            columns_of_values = [values["score"], *(values[name] for name in components)]
            for unit in range(count):
                row = [block, unit, *(float(v[unit]) for v in columns_of_values), f"{rank[unit]}/{count}"]
                if kept is not None:
                    row.append("yes" if kept[unit] else "no")
                rows.append(row)
        title = f"{UNIT_NAMES[kind]}s" + (f" (kept: plan {plan.artifact.path})" if plan else "")
        tables.append(Table(title, columns, rows))
    return tables


# --- ONNX exports --------------------------------------------------------------------

def inspect_onnx(path: Path) -> dict[str, Any]:
    """An export's provenance (``metadata_props``, protocol/README.md "Exports") and graph signature."""
    try:
        import onnxruntime
    except ImportError:
        from tapvits_cli.errors import DataUnavailableError

        raise DataUnavailableError(f"{path}: inspecting ONNX needs onnxruntime: pip install tapvits") from None
    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:   # onnxruntime raises its own exception types for a damaged graph
        raise InvalidArtifactError(f"{path}: not a readable ONNX graph ({str(exc).splitlines()[0][:200]})") from None
    metadata = dict(session.get_modelmeta().custom_metadata_map)
    if metadata.get("tapvits.export") != "onnx":
        raise InvalidArtifactError(f"{path}: an ONNX graph, but not one tapvits exported (no tapvits.export key)")

    def loaded(key: str, default: Any) -> Any:
        try:
            return parse_json(metadata[key]) if key in metadata else default
        except ValueError as exc:
            raise InvalidArtifactError(f"{path}: metadata '{key}' is not valid JSON ({exc})") from None

    figures: dict[str, Any] = {"graph": metadata.get("tapvits.graph", "logits")}
    for key in ("architecture", "family", "num_classes", "weights_sha256", "parameters"):
        if f"model.{key}" in metadata:
            figures[key] = metadata[f"model.{key}"]
    if "tapvits.extractor" in metadata:
        figures["extractor"] = loaded("tapvits.extractor", None)
    signature = [[node.name, role, str(node.type), "×".join(str(d) for d in node.shape)]
                 for role, nodes in (("input", session.get_inputs()), ("output", session.get_outputs()))
                 for node in nodes]
    tables = [{"title": "graph", "columns": ["name", "role", "type", "shape"], "rows": signature}]
    blocks = loaded("model.blocks", [])
    if blocks:
        tables.append({"title": "blocks", "columns": ["block", "heads", "head_dim", "mlp_hidden"],
                       "rows": [[i, b.get("heads"), b.get("head_dim"), b.get("mlp_hidden")] for i, b in enumerate(blocks)]})
    document = _document(path, ONNX_EXPORT, version=int(metadata.get("tapvits.export_version", 0) or 0), format="onnx",
                         producer=metadata.get("tapvits.producer"), producer_version=metadata.get("tapvits.producer_version"),
                         created=metadata.get("tapvits.created"), inputs=loaded("tapvits.inputs", {}),
                         params=loaded("tapvits.params", {}), figures=figures, tables=tables)
    if blocks:
        _show_kept_widths(document, metadata)
    return document


# --- run directories -----------------------------------------------------------------

def _read_json(path: Path) -> Any:
    try:
        return parse_json(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArtifactError(f"{path}: invalid or truncated JSON ({exc})") from None


def _inspect_run_json(path: Path) -> dict[str, Any]:
    from tapvits_cli.artifacts.run_directory import read_run_state, read_run_summary

    document = _read_json(path)
    if isinstance(document, dict) and isinstance(document.get("steps"), dict) and "version" in document:
        document = read_run_state(path)
        return _document(path, RUN_STATE, version=document["version"], format="json",
                         figures=_step_counts(document["steps"]), tables=[_steps_table(document["steps"])])
    if isinstance(document, dict) and isinstance(document.get("devices"), list) and "recipe" in document:
        document = read_run_summary(path)
        return _document(path, RUN_SUMMARY, format="json", figures=summary_figures(document),
                         tables=[devices_table(document)])
    raise InvalidArtifactError(f"{path}: not a tapvits artifact, run.json or summary.json")


def _step_counts(steps: Mapping[str, Any]) -> dict[str, Any]:
    sources = [record.get("source") for record in steps.values()]
    return {"steps": len(steps), **{source: sources.count(source) for source in ("ran", "cache")},
            "seconds": round(sum(r["seconds"] for r in steps.values() if isinstance(r.get("seconds"), (int, float))
                                 and not isinstance(r.get("seconds"), bool)), 3)}


def _steps_table(steps: Mapping[str, Any]) -> dict[str, Any]:
    return {"title": "steps", "columns": ["step", "output", "source", "seconds", "finished", "sha256"],
            "rows": [[step, r.get("output"), r.get("source"), r.get("seconds"), r.get("finished"), r.get("sha256")]
                     for step, r in steps.items()]}


def summary_figures(summary: Mapping[str, Any]) -> dict[str, Any]:
    figures = {key: summary.get(key) for key in ("recipe", "budget", "base_parameters", "passed")}
    mean = summary.get("mean") or {}
    if mean:
        figures.update({"mean top-1": mean.get("top1"), "mean params kept": mean.get("params_kept")})
    if summary.get("failures"):
        figures["failures"] = summary["failures"]
    if summary.get("steps"):
        figures["steps"] = summary["steps"]
    return figures


def devices_table(summary: Mapping[str, Any]) -> dict[str, Any]:
    columns = ["device", "top-1", "top-5", "params kept", "parameters", "MACs", "ms @1", "ms @32", "precision",
               "class recall"]
    keys = ["device", "top1", "top5", "params_kept", "parameters", "macs", "latency_ms_at_1", "latency_ms_at_32",
            "finetune_precision", "finetune_class_recall"]
    return {"title": "devices", "columns": columns,
            "rows": [[row.get(key) for key in keys] for row in summary.get("devices", []) if isinstance(row, dict)]}


def inspect_run_directory(root: Path, units: bool = False, blocks: Sequence[int] | None = None) -> dict[str, Any]:
    """A ``tapvits run`` directory (protocol/run.md): its summary, steps and every artifact's kind and hash."""
    from tapvits_cli.artifacts.containers import open_file
    from tapvits_cli.artifacts.run_directory import STATE_FILE, SUMMARY_FILE, read_run_state, read_run_summary

    state_file, summary_file = root / STATE_FILE, root / SUMMARY_FILE
    if not state_file.is_file():
        raise UsageError(f"{root}: a directory, but not a tapvits run directory (no {STATE_FILE})")
    state = read_run_state(state_file)
    figures: dict[str, Any] = {}
    tables = []
    if summary_file.is_file():
        summary = read_run_summary(summary_file)
        figures.update(summary_figures(summary))
        tables.append(devices_table(summary))
    figures.update(_step_counts(state["steps"]))
    artifacts = []
    for step, record in state["steps"].items():
        output = root / str(record.get("output", ""))
        kind = "missing"
        if output.is_file():
            try:
                kind = open_file(output).header.kind
            except InvalidArtifactError:
                kind = "unreadable"
        artifacts.append([str(record.get("output")), kind, step, record.get("sha256")])
    tables.append({"title": "artifacts", "columns": ["path", "kind", "step", "sha256"], "rows": artifacts})
    tables.append(_steps_table(state["steps"]))
    if units:
        for scores in sorted(root.glob("devices/*/scores.safetensors")):
            plan = scores.with_name("plan.safetensors")
            for table in unit_tables(scores, [plan] if plan.is_file() else [], blocks):
                table.title = f"{scores.parent.name}: {table.title}"
                tables.append(table.to_dict())
    return _document(root, RUN_DIRECTORY, version=state.get("version"), format="directory",
                     figures=figures, tables=tables)
