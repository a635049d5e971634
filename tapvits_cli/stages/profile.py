"""``profile``: a model's architecture → this device's latency table (a profile artifact).

Not a step of a recipe (it runs on the device, like ``fit-gmm``, but its table is an
input of the cloud's choices rather than of one device's chain); ``latency.measure``
times the blocks, ``artifacts.profile`` writes the table.
"""

from __future__ import annotations

from dataclasses import dataclass

from tapvits_cli.errors import UsageError
from tapvits_cli.stages.common import Written as Result, argument, artifact_lineage, option, positive_integers
from tapvits_cli.stages.feedback import log, progress
from tapvits_cli.vocabulary import MAX_BATCH, MAX_WIDTH

AUTO_RUNTIME = "auto"   # torch where installed, else onnxruntime


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """``--batch-sizes`` read (the command line checks with it too)."""
    return positive_integers("--batch-sizes", text, MAX_BATCH)


def parse_mlp_widths(text: str) -> tuple[int, ...]:
    """``--widths`` read (the command line checks with it too)."""
    return positive_integers("--widths", text, MAX_WIDTH)


@dataclass(frozen=True, kw_only=True)
class Options:
    model_path: str = argument()
    output: str = option("-o", recipe=False)
    runtime: str = option("--runtime", AUTO_RUNTIME)
    batch_sizes: str = option("--batch-sizes", "1,32")
    tokens: int | None = option("--tokens")
    widths: str | None = option("--widths")
    mlp_alignment: int = option("--mlp-alignment", 8)
    repeats: int = option("--repeats", 20)
    warmup_runs: int = option("--warmup-runs", 5)
    threads: int | None = option("--threads")
    seed: int = 0
    device: str = "auto"


def run(options: Options) -> Result:
    from tapvits_cli.artifacts.model import read_model_spec
    from tapvits_cli.artifacts.profile import write_profile
    from tapvits_cli.latency.measure import measure_profile
    from tapvits_cli.payloads.latency_table import predict_latency
    from tapvits_cli.runtime import cpu_name, resolve_device, seed_everything, torch_available

    sizes = parse_batch_sizes(options.batch_sizes)
    widths = None if options.widths is None else parse_mlp_widths(options.widths)
    runtime = options.runtime
    if runtime == AUTO_RUNTIME:
        runtime = "torch" if torch_available() else "onnxruntime"
    if runtime == "torch":
        device = resolve_device(options.device)
    elif options.device not in ("cpu", "auto"):
        raise UsageError("--runtime onnxruntime runs on the CPU provider: use --device cpu")
    else:
        device = "cpu"
    seed_everything(options.seed)
    model = read_model_spec(options.model_path)
    gpu = None
    if device == "cuda":
        import torch

        gpu = torch.cuda.get_device_name(torch.device(device))
    with progress("profile", options.warmup_runs + options.repeats) as advance:
        profile = measure_profile(model.spec, sizes, runtime=runtime, device=device, tokens=options.tokens,
                                  mlp_widths=widths, mlp_alignment=options.mlp_alignment,
                                  repeats=options.repeats, warmup=options.warmup_runs,
                                  threads=options.threads, cpu=cpu_name(), gpu=gpu, seed=options.seed,
                                  on_progress=advance,
                                  tensors={name: info.shape for name, info in model.artifact.tensors.items()},
                                  source=str(options.model_path))
    params = {"runtime": runtime, "batch_sizes": list(profile.batch_sizes), "tokens": options.tokens,
              "widths": list(widths) if widths else None, "mlp_alignment": options.mlp_alignment,
              "repeats": options.repeats,
              "warmup": options.warmup_runs, "threads": profile.threads, "seed": options.seed, "device": device}
    path = write_profile(options.output, profile, params, {"model": artifact_lineage(options.model_path, "model")})
    predicted = {b: predict_latency(profile, profile.blocks, b).total_ms for b in profile.batch_sizes}
    log(f"profiled {model.spec.architecture} on {profile.runtime} {profile.runtime_version} "
        f"({profile.threads} threads, {profile.cpu or profile.device}); unpruned model: "
        + ", ".join(f"batch {b} {ms:.2f} ms" for b, ms in predicted.items()))
    return Result(str(path), {"path": str(path), "runtime": profile.runtime, "batch_sizes": list(profile.batch_sizes),
                              "tokens": profile.tokens, "unpruned_ms": {str(b): ms for b, ms in predicted.items()}})
