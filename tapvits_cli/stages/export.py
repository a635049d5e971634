"""``export``: an ONNX file from a model artifact (or the feature extractor), checked against PyTorch."""

from __future__ import annotations

import os
from dataclasses import dataclass

from tapvits_cli.errors import UsageError
from tapvits_cli.models.onnx_export import DEFAULT_OPSET, TOLERANCE   # light: torch and onnx load inside functions
from tapvits_cli.stages.common import Written as Result, argument, artifact_lineage, comma_list, option
from tapvits_cli.stages.feedback import log


@dataclass(frozen=True, kw_only=True)
class Options:
    model: str = argument()
    output: str = option("-o", recipe=False)
    features_graph: bool = option("--features", False)
    raw_input: tuple[int, int, int] | None = option("--raw-input", render=comma_list)
    batch_size: int = option("--batch-size", 1)
    dynamic_batch: bool = option("--dynamic-batch", True, off="--static-batch")
    opset: int = option("--opset", DEFAULT_OPSET)
    check: bool = option("--check", True, off="--no-check")
    seed: int = 0
    device: str = "auto"   # export runs on the CPU whatever is asked


def run(options: Options) -> Result:
    from tapvits_cli.artifacts.external import write_export
    from tapvits_cli.models.onnx_export import check_onnx, export_onnx, require_onnx

    model, raw_input, features_graph = options.model, options.raw_input, options.features_graph
    batch_size, dynamic_batch, opset, check = options.batch_size, options.dynamic_batch, options.opset, options.check
    require_onnx()
    if raw_input is not None and not features_graph:
        raise UsageError("--raw-input applies to --features graphs only")
    params = {"batch_size": batch_size, "dynamic_batch": dynamic_batch, "opset": opset, "check": check,
              "tolerance": TOLERANCE, "seed": options.seed, "device": "cpu"}
    if features_graph:
        module, input_shape, output_name, metadata = _features_graph(model, raw_input, params)
    else:
        module, input_shape, output_name, metadata = _logits_graph(model, params)
    data = export_onnx(module, input_shape, batch_size, dynamic_batch, opset, metadata, output_name=output_name)
    result = {"kind": "onnx", "graph": output_name, "opset": opset,
              "input_shape": ["batch" if dynamic_batch else batch_size, *input_shape]}
    if check:
        batches = (batch_size, batch_size + 2) if dynamic_batch else (batch_size,)
        checked = check_onnx(module, data, input_shape, batches, seed=options.seed, output_name=output_name)
        result.update(checked_batch_sizes=list(checked.batch_sizes), max_abs_diff=checked.max_abs_diff)
        log(f"onnxruntime matches PyTorch at batch {', '.join(map(str, batches))}: "
            f"max abs diff {checked.max_abs_diff:.2e}")
    path = write_export(options.output, data)
    return Result(str(path), {"output": str(path), **result})


def _logits_graph(model: str, params: dict):
    """The classifier: normalised images in, logits out."""
    from tapvits_cli.artifacts.external import export_provenance
    from tapvits_cli.artifacts.model import load_model
    from tapvits_cli.models.onnx_export import OUTPUT_NAME

    if not os.path.isfile(model):
        raise UsageError(f"MODEL '{model}' is not a file (a built-in extractor exports only with --features)")
    loaded = load_model(model, device="cpu")
    source = artifact_lineage(model, "model")
    return (loaded.module, tuple(loaded.spec.preprocessing["input_size"]), OUTPUT_NAME,
            export_provenance(loaded.artifact.metadata, source, params))


def _features_graph(model: str, raw_input: tuple[int, int, int] | None, params: dict):
    """The feature extractor, preprocessing included: stored images in, pooled features out."""
    from tapvits_cli.artifacts.external import features_graph_provenance
    from tapvits_cli.models.extract import feature_graph
    from tapvits_cli.models.onnx_extractor import FEATURES_OUTPUT, OnnxExtractor
    from tapvits_cli.stages.extractor import resolve_extractor

    extractor, lineage = resolve_extractor(model, "cpu")
    if isinstance(extractor, OnnxExtractor):
        raise UsageError(f"{model} is already an ONNX extractor")
    shape = raw_input or tuple(extractor.preprocessing.input_size)
    model_metadata = {}
    if os.path.isfile(model):
        from tapvits_cli.artifacts.containers import open_file

        model_metadata = open_file(model).metadata
    metadata = features_graph_provenance(model_metadata, lineage, params, extractor.fingerprint, shape)
    return feature_graph(extractor), shape, FEATURES_OUTPUT, metadata
