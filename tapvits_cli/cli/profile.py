"""``tapvits profile``: a model's architecture → this device's latency table (a profile artifact).

Longer than the pipeline's subcommands: it is not on the stage API yet, so it checks its
options and writes the artifact itself (``latency/`` measures).
"""

from __future__ import annotations

from pathlib import Path

import click

from tapvits_cli.cli.options import CURRENT, WritingCommand, global_options
from tapvits_cli.cli.output import emit, progress_bar, stderr_console
from tapvits_cli.errors import UsageError


def _integers(option: str, text: str | None) -> tuple[int, ...] | None:
    """'1,32' → (1, 32); positive integers only."""
    if text is None:
        return None
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise UsageError(f"{option} must be positive integers separated by commas (e.g. 1,32), got '{text}'")
    return values


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what the platform module says."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith(("model name", "Model", "Hardware")) and ":" in line:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@click.command("profile", cls=WritingCommand, renamed={"--warmup": "--warmup-runs"},
               short_help="Measure this device's latency for a model's blocks at every prunable width.")
@click.argument("model_path", metavar="MODEL", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Profile artifact to write (.json).")
@click.option("--runtime", type=click.Choice(["auto", "torch", "onnxruntime"]), default="auto",
              help="Runtime the blocks run on; onnxruntime (CPU provider) builds them as ONNX graphs with NumPy "
                   "alone, so the device install profiles too  [default: torch where installed, else onnxruntime]")
@click.option("--batch-sizes", default="1,32", show_default=True, metavar="B,B", help="Batch sizes to measure.")
@click.option("--tokens", type=click.IntRange(1), metavar="N",
              help="Tokens per image in the blocks and the head  [default: the model's input's]")
@click.option("--widths", metavar="W,W", help="MLP hidden widths to measure  [default: 1 and 8 evenly spaced up "
                                               "to the full width]; heads are measured at every count")
@click.option("--repeats", type=click.IntRange(1), default=20, show_default=True,
              help="Timed rounds (the median is kept).")
@click.option("--warmup-runs", type=click.IntRange(0), default=5, show_default=True, help="Untimed rounds first.")
@click.option("--threads", type=click.IntRange(1), metavar="T",
              help="Intra-op threads  [default: torch's; on onnxruntime the cores available]")
@global_options
def command(model_path: str, output: str, runtime: str, batch_sizes: str, tokens: int | None, widths: str | None,
            repeats: int, warmup_runs: int, threads: int | None) -> None:
    """Measure how long this machine takes for MODEL's building blocks at every width pruning
    can produce, and write the table as a profile artifact (protocol/profile.md).

    Each block kind is timed as pruned models build it: attention at every head count
    (MLP removed), the MLP at a grid of hidden widths (attention removed), a block with
    both removed, and the fixed parts (patch embedding, final norm + classifier), at each
    batch size, interleaved over --repeats rounds after --warmup-runs. Only the architecture
    of MODEL matters (pruned or not, the unpruned widths are profiled; weights are not
    used). The latency of any pruned model of that architecture is then predicted from
    the table (tapvits_cli.latency.predict_model). ViT/DeiT models only.

    Without torch (the device install) the blocks run on onnxruntime and the architecture
    is read from MODEL's header; give it the unpruned base model (a pruned one is profiled
    at its architecture's widths, recomputed from the embedding width and mlp_ratio).

    Example: tapvits profile base.safetensors -o device.profile.json --batch-sizes 1,32
    """
    from tapvits_cli.artifacts.files import sha256_file
    from tapvits_cli.artifacts.header import LineageEntry
    from tapvits_cli.artifacts.model import read_model_spec
    from tapvits_cli.artifacts.profile import write_profile
    from tapvits_cli.latency.measure import measure_profile
    from tapvits_cli.runtime import resolve_device, seed_everything, torch_available

    sizes = _integers("--batch-sizes", batch_sizes)
    mlp_widths = _integers("--widths", widths)
    if runtime == "auto":
        runtime = "torch" if torch_available() else "onnxruntime"
    if runtime == "torch":
        device = resolve_device(CURRENT.device)
    elif CURRENT.device not in ("cpu", "auto"):
        raise UsageError("--runtime onnxruntime runs on the CPU provider: use --device cpu")
    else:
        device = "cpu"
    seed_everything(CURRENT.seed)
    artifact, spec = read_model_spec(model_path)
    gpu = None
    if device == "cuda":
        import torch

        gpu = torch.cuda.get_device_name(torch.device(device))
    with progress_bar("profile", warmup_runs + repeats) as advance:
        profile = measure_profile(spec, sizes, runtime=runtime, device=device, tokens=tokens, mlp_widths=mlp_widths,
                                  repeats=repeats, warmup=warmup_runs, threads=threads, cpu=cpu_name(), gpu=gpu,
                                  seed=CURRENT.seed, on_progress=advance,
                                  tensors={name: info.shape for name, info in artifact.tensors.items()},
                                  source=str(model_path))
    params = {"runtime": runtime, "batch_sizes": list(profile.batch_sizes), "tokens": tokens,
              "widths": list(mlp_widths) if mlp_widths else None, "repeats": repeats, "warmup": warmup_runs,
              "threads": profile.threads, "seed": CURRENT.seed, "device": device}
    inputs = {"model": LineageEntry(sha256_file(model_path), "model", Path(model_path).name)}
    path = write_profile(output, profile, params, inputs)
    from tapvits_cli.latency.table import predict_latency

    predicted = {b: predict_latency(profile, profile.blocks, b).total_ms for b in profile.batch_sizes}
    if CURRENT.verbosity >= 0:
        stderr_console().print(f"profiled {spec.architecture} on {profile.runtime} {profile.runtime_version} "
                               f"({profile.threads} threads, {profile.cpu or profile.device}); unpruned model: "
                               + ", ".join(f"batch {b} {ms:.2f} ms" for b, ms in predicted.items()))
    emit({"path": str(path), "runtime": profile.runtime, "batch_sizes": list(profile.batch_sizes),
          "tokens": profile.tokens, "unpruned_ms": {str(b): ms for b, ms in predicted.items()}}, str(path))
