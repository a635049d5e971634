"""Measuring a device's latency table (``tapvits profile``) on torch or onnxruntime.

Pure logic: no file I/O, no printing; progress through ``on_progress(n)``.

Every measurement runs real modules built the way pruned models are built: the model
factory rebuilds the architecture with every block at one width (``set_block_widths``,
which removes a branch of width 0 exactly as ``prune`` does), and the clock times the
model's whole sequence of L blocks on a random (batch, tokens, dim) input, divided by L.
Timing L blocks with their own weights rather than one block L times keeps the memory
traffic of the real model: at batch 1 a DeiT-Small block's weights are read from memory,
not from a cache that one repeated block would keep warm. The patch embedding and the
final norm with the classifier are timed the same way, as the model runs them.

Configurations are interleaved: each round times every configuration once, so a load
that comes and goes on a shared machine spreads over all of them instead of skewing
one; the table keeps the median of the timed rounds. Each timed run directly follows an
untimed run of the same configuration and batch, so it finds caches and thread pools as
back-to-back inference leaves them (what a whole model's repeated timing measures),
not as the previous configuration left them.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np

from tapvits_cli.errors import NotImplementedStageError, UsageError
from tapvits_cli.latency.table import BranchTable, LatencyProfile, default_mlp_widths, model_fingerprint
from tapvits_cli.models.spec import BlockWidths, ModelSpec


@dataclass(frozen=True)
class Architecture:
    """What a profile needs to know of the unpruned architecture, read off a ``meta`` build."""

    blocks: tuple[BlockWidths, ...]
    tokens: int
    dim: int
    input_size: tuple[int, int, int]


def unpruned_architecture(spec: ModelSpec) -> Architecture:
    """The architecture's own widths (whatever ``spec.blocks`` were pruned to), its token count and input size."""
    import torch

    from tapvits_cli.models.factory import create_model
    from tapvits_cli.models.families import family_module

    if spec.family != "vit":
        raise NotImplementedStageError(f"tapvits profile measures ViT/DeiT models (family 'vit'); {spec.architecture} "
                                       f"is family '{spec.family}', which is not supported yet")
    with torch.device("meta"):
        model = create_model(spec.architecture, spec.kwargs)
    blocks = family_module("vit").block_widths(model)
    if len(set(blocks)) != 1:
        raise NotImplementedStageError(f"{spec.architecture}: blocks of different widths are not supported by "
                                       "tapvits profile yet")
    size = model.patch_embed.img_size
    return Architecture(blocks=blocks, tokens=model.patch_embed.num_patches + model.num_prefix_tokens,
                        dim=model.embed_dim, input_size=(model.patch_embed.proj.in_channels, *size))


def build_uniform(spec: ModelSpec, width: BlockWidths, device: str):
    """The model of ``spec`` with every block at ``width`` (fresh weights; no token merging)."""
    from tapvits_cli.models.factory import build_model

    uniform = replace(spec, blocks=(width,) * len(spec.blocks), token_merging=None)
    return build_model(uniform, device=device, source=spec.architecture)


def measure_profile(spec: ModelSpec, batch_sizes: Sequence[int], runtime: str = "torch", device: str = "cpu",
                    tokens: int | None = None, mlp_widths: Sequence[int] | None = None, repeats: int = 20,
                    warmup: int = 5, threads: int | None = None, cpu: str = "", gpu: str | None = None,
                    seed: int = 0, on_progress: Callable[[int], None] = lambda n: None,
                    clock: Callable[[], float] = time.perf_counter) -> LatencyProfile:
    """Time the blocks of ``spec``'s architecture at every head count and at ``mlp_widths`` (default: 1 and 8
    evenly spaced widths), plus the fixed parts, at each batch size; see the module docstring.

    ``tokens`` (default: the model's own count) sets the blocks' and the head's input; the
    patch embedding always runs on the model's own input size. ``threads`` sets torch's
    (or onnxruntime's) intra-op threads. ``on_progress`` advances once per round.
    ``clock`` is wall-clock time, what a device's latency is; ``time.process_time`` on one
    thread (the CPU time spent, whatever else shares the cores) lets a benchmark test the
    table's sum rule apart from a shared machine's scheduling.
    """
    import torch

    batch_sizes = tuple(sorted(set(batch_sizes)))
    if not batch_sizes or batch_sizes[0] < 1 or repeats < 1 or warmup < 0:
        raise UsageError("need batch sizes >= 1, repeats >= 1 and warmup >= 0")
    if runtime not in ("torch", "onnxruntime"):
        raise UsageError(f"unknown runtime '{runtime}': torch or onnxruntime")
    arch = unpruned_architecture(spec)
    full = arch.blocks[0]
    tokens = arch.tokens if tokens is None else tokens
    if tokens < 1:
        raise UsageError(f"--tokens must be at least 1, got {tokens}")
    grid = default_mlp_widths(full.mlp_hidden) if mlp_widths is None else tuple(sorted(set(mlp_widths)))
    if not grid or grid[0] < 1 or grid[-1] > full.mlp_hidden:
        raise UsageError(f"MLP widths must lie in 1..{full.mlp_hidden} (the architecture's), got {list(grid)}")
    previous_threads = torch.get_num_threads()
    threads = threads or previous_threads
    torch.set_num_threads(threads)
    try:
        return _measure(spec, arch, batch_sizes, runtime, device, tokens, grid, repeats, warmup, threads, cpu, gpu,
                        seed, on_progress, clock)
    finally:
        torch.set_num_threads(previous_threads)


def _measure(spec: ModelSpec, arch: Architecture, batch_sizes: tuple[int, ...], runtime: str, device: str, tokens: int,
             grid: tuple[int, ...], repeats: int, warmup: int, threads: int, cpu: str, gpu: str | None, seed: int,
             on_progress: Callable[[int], None], clock: Callable[[], float]) -> LatencyProfile:
    """The timing itself, once the options are checked (see :func:`measure_profile`)."""
    import torch

    full = arch.blocks[0]
    generator = torch.Generator().manual_seed(seed)
    images = {b: torch.randn(b, *arch.input_size, generator=generator) for b in batch_sizes}
    hidden = {b: torch.randn(b, tokens, arch.dim, generator=generator) for b in batch_sizes}

    # configuration key -> (module, per-batch input, divisor); modules are built the way prune builds them
    attn_keys = [("attn", h) for h in range(1, full.heads + 1)]
    mlp_keys = [("mlp", m) for m in grid]
    configs = {}
    for key in [("block", 0), *attn_keys, *mlp_keys]:
        heads, mlp = (0, 0) if key[0] == "block" else (key[1], 0) if key[0] == "attn" else (0, key[1])
        model = build_uniform(spec, BlockWidths(heads, full.head_dim, mlp), device)
        configs[key] = (model.blocks, hidden, len(model.blocks))
        if key[0] == "block":   # the fixed parts come from the same build
            stem, tail = _stem_and_tail(model)
            configs[("embed", 0)] = (stem, images, 1)
            configs[("head", 0)] = (tail, hidden, 1)
    runners = {key: _runner(module, inputs, runtime, device, threads, clock)
               for key, (module, inputs, _) in configs.items()}

    times = {(key, b): [] for key in configs for b in batch_sizes}
    for round_ in range(warmup + repeats):
        for key, run in runners.items():
            for b in batch_sizes:
                run(b)
                if round_ >= warmup:   # timed right after an untimed run of the same: warm, as in a stream of inputs
                    times[key, b].append(run(b) / configs[key][2])
        on_progress(1)

    def medians(key) -> tuple[float, ...]:
        return tuple(statistics.median(times[key, b]) for b in batch_sizes)

    unpruned = replace(spec, blocks=arch.blocks, token_merging=None)
    return LatencyProfile(
        model=model_fingerprint(unpruned, arch.blocks), runtime=runtime, runtime_version=_runtime_version(runtime),
        threads=threads, device=device, cpu=cpu, gpu=gpu, batch_sizes=batch_sizes, tokens=tokens,
        repeats=repeats, warmup=warmup, embed_ms=medians(("embed", 0)), head_ms=medians(("head", 0)),
        block_ms=medians(("block", 0)),
        attn=BranchTable(tuple(h for _, h in attn_keys), np.array([medians(k) for k in attn_keys])),
        mlp=BranchTable(grid, np.array([medians(k) for k in mlp_keys])),
    )


def _stem_and_tail(model):
    """The model's patch embedding (+ position embedding) and its final norm + classifier, as modules."""
    import torch

    from tapvits_cli.models.families import vit

    sequence = vit.block_sequence(model)

    class Part(torch.nn.Module):
        def __init__(self, function):
            super().__init__()
            self.owner, self.function = model, function   # registered, so ONNX export sees the weights

        def forward(self, x):
            return self.function(x)

    return Part(sequence.stem).eval(), Part(sequence.tail).eval()


def _runner(module, inputs: dict, runtime: str, device: str, threads: int,
            clock: Callable[[], float]) -> Callable[[int], float]:
    """``run(batch) -> milliseconds`` of one forward pass of ``module`` on ``inputs[batch]``."""
    if runtime == "onnxruntime":
        return _onnx_runner(module, inputs, threads, clock)
    import torch

    module = module.to(device).eval()
    placed = {b: x.to(device) for b, x in inputs.items()}
    on_gpu = torch.device(device).type == "cuda"

    def run(batch: int) -> float:
        with torch.inference_mode():
            if on_gpu:
                torch.cuda.synchronize()
            start = clock()
            module(placed[batch])
            if on_gpu:
                torch.cuda.synchronize()
            return (clock() - start) * 1000.0

    return run


def _onnx_runner(module, inputs: dict, threads: int, clock: Callable[[], float]) -> Callable[[int], float]:
    """The module exported with torch's ONNX exporter (batch axis symbolic), run on onnxruntime's CPU provider."""
    import io
    import warnings

    import torch

    from tapvits_cli.errors import ExportError
    from tapvits_cli.models.onnx_export import DEFAULT_OPSET, require_onnx

    _, onnxruntime = require_onnx()
    example = next(iter(inputs.values()))
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module.cpu().eval(), (example,), buffer, dynamo=False, opset_version=DEFAULT_OPSET,
                              input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
            raise ExportError(f"torch could not export a block to ONNX ({reason})") from None
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    arrays = {b: x.numpy() for b, x in inputs.items()}

    def run(batch: int) -> float:
        start = clock()
        session.run(None, {"x": arrays[batch]})
        return (clock() - start) * 1000.0

    return run


def _runtime_version(runtime: str) -> str:
    if runtime == "onnxruntime":
        import onnxruntime

        return onnxruntime.__version__
    import torch

    return torch.__version__
