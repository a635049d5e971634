"""Measuring a device's latency table (``tapvits profile``) on torch or onnxruntime.

Pure logic: no file I/O, no printing; progress through ``on_progress(n)``.

Every measurement runs real blocks built the way pruned models are built, and the clock
times the model's whole sequence of L blocks on a random (batch, tokens, dim) input,
divided by L. On torch the model factory rebuilds the architecture with every block at
one width (``set_block_widths``, which removes a branch of width 0 exactly as ``prune``
does). On onnxruntime the same blocks are ONNX graphs built with NumPy alone
(``latency/onnx_graphs.py``), so the device install, which has neither torch nor the
``onnx`` package, profiles too; the architecture then comes from the model file's header
(``latency/architecture.py``). Timing L blocks with their own weights rather than one
block L times keeps the memory traffic of the real model: at batch 1 a DeiT-Small
block's weights are read from memory, not from a cache that one repeated block would
keep warm. The patch embedding and the final norm with the classifier are timed the same
way, as the model runs them.

Configurations are interleaved: each round times every configuration once, so a load
that comes and goes on a shared machine spreads over all of them instead of skewing
one; the table keeps the median of the timed rounds. Each timed run directly follows an
untimed run of the same configuration and batch, so it finds caches and thread pools as
back-to-back inference leaves them (what a whole model's repeated timing measures),
not as the previous configuration left them.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import replace
from typing import Callable, Mapping, Sequence

import numpy as np

from tapvits_cli.errors import NotImplementedStageError, UsageError
from tapvits_cli.latency.architecture import Architecture, read_architecture
from tapvits_cli.models.spec import BlockWidths, ModelSpec
from tapvits_cli.payloads.latency_table import BranchTable, LatencyProfile, mlp_grids, model_fingerprint
from tapvits_cli.vocabulary import RUNTIMES

Runner = Callable[[int], float]   # run(batch) -> milliseconds of one forward pass


def unpruned_architecture(spec: ModelSpec) -> Architecture:
    """The architecture's own widths (whatever ``spec.blocks`` were pruned to), tokens and layout, from a
    ``meta`` build with timm (what :func:`~tapvits_cli.latency.architecture.read_architecture` reads off a
    file's header without torch)."""
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
    first = model.blocks[0]
    present = lambda module: not isinstance(module, torch.nn.Identity)   # noqa: E731 - timm's absent parts
    return Architecture(blocks=blocks, tokens=model.patch_embed.num_patches + model.num_prefix_tokens,
                        dim=model.embed_dim, input_size=(model.patch_embed.proj.in_channels, *model.patch_embed.img_size),
                        patch_size=model.patch_embed.patch_size[0], prefix_tokens=model.num_prefix_tokens,
                        class_token=model.cls_token is not None,
                        pos_embed_prefix=not model.no_embed_class or not model.num_prefix_tokens,
                        qkv_bias=first.attn.qkv.bias is not None, layer_scale=present(first.ls1),
                        global_pool=model.global_pool, final_norm=present(model.norm), fc_norm=present(model.fc_norm),
                        num_classes=model.num_classes, eps=model.blocks[0].norm1.eps)


def build_uniform(spec: ModelSpec, width: BlockWidths, device: str):
    """The model of ``spec`` with every block at ``width`` (fresh weights; no token merging)."""
    from tapvits_cli.models.factory import build_model

    uniform = replace(spec, blocks=(width,) * len(spec.blocks), token_merging=None)
    return build_model(uniform, device=device, source=spec.architecture)


def measure_profile(spec: ModelSpec, batch_sizes: Sequence[int], runtime: str = "torch", device: str = "cpu",
                    tokens: int | None = None, mlp_widths: Sequence[int] | None = None, mlp_alignment: int = 8,
                    repeats: int = 20, warmup: int = 5, threads: int | None = None, cpu: str = "",
                    gpu: str | None = None, seed: int = 0, on_progress: Callable[[int], None] = lambda n: None,
                    clock: Callable[[], float] = time.perf_counter,
                    tensors: Mapping[str, Sequence[int]] | None = None, source: str = "the model") -> LatencyProfile:
    """Time the blocks of ``spec``'s architecture at every head count and at the MLP widths of
    :func:`~tapvits_cli.payloads.latency_table.mlp_grids` (``mlp_widths``, default: the alignment and 8 evenly
    spaced multiples of it; at ``mlp_alignment`` > 1 also one neuron and one below each of them), plus the
    fixed parts, at each batch size; see the module docstring.

    ``tokens`` (default: the model's own count) sets the blocks' and the head's input; the
    patch embedding always runs on the model's own input size. ``threads`` sets torch's
    (or onnxruntime's) intra-op threads (default: torch's, or on onnxruntime the cores this
    process may use). ``on_progress`` advances once per round. ``clock`` is wall-clock
    time, what a device's latency is; ``time.process_time`` on one thread (the CPU time
    spent, whatever else shares the cores) lets a benchmark test the table's sum rule
    apart from a shared machine's scheduling. ``tensors`` (the model file's tensor names
    and shapes) is what the onnxruntime runtime reads the architecture from; torch is
    never imported on that runtime; ``source`` names the model in its errors.
    """
    batch_sizes = tuple(sorted(set(batch_sizes)))
    if not batch_sizes or batch_sizes[0] < 1 or repeats < 1 or warmup < 0:
        raise UsageError("need batch sizes >= 1, repeats >= 1 and warmup >= 0")
    if runtime not in RUNTIMES:
        raise UsageError(f"unknown runtime '{runtime}': torch or onnxruntime")
    if runtime == "onnxruntime":
        if tensors is None:
            raise ValueError("the onnxruntime runtime reads the architecture from the model's tensor shapes")
        arch = read_architecture(spec, tensors, source)
    else:
        arch = unpruned_architecture(spec)
    full = arch.blocks[0]
    tokens = arch.tokens if tokens is None else tokens
    if tokens < 1:
        raise UsageError(f"--tokens must be at least 1, got {tokens}")
    grid, unaligned = mlp_grids(full.mlp_hidden, mlp_alignment, mlp_widths)
    # configuration key -> width of every block; ("block", 0) is the emptied block E
    widths = {("block", 0): BlockWidths(0, full.head_dim, 0),
              **{("attn", h): BlockWidths(h, full.head_dim, 0) for h in range(1, full.heads + 1)},
              **{(kind, m): BlockWidths(0, full.head_dim, m)
                 for kind, ms in (("mlp", grid), ("mlp_unaligned", unaligned or ())) for m in ms}}
    depth = len(arch.blocks)
    if runtime == "onnxruntime":
        threads = threads or _available_cores()
        runners = _onnx_runners(arch, widths, batch_sizes, tokens, threads, seed, clock)
        medians = _time(runners, depth, batch_sizes, repeats, warmup, on_progress)
        version = _onnxruntime().__version__
    else:
        import torch

        previous_threads = torch.get_num_threads()
        threads = threads or previous_threads
        torch.set_num_threads(threads)
        try:
            runners = _torch_runners(spec, arch, widths, batch_sizes, tokens, device, seed, clock)
            medians = _time(runners, depth, batch_sizes, repeats, warmup, on_progress)
        finally:
            torch.set_num_threads(previous_threads)
        version = torch.__version__

    unpruned = replace(spec, blocks=arch.blocks, token_merging=None)
    return LatencyProfile(
        model=model_fingerprint(unpruned, arch.blocks), runtime=runtime, runtime_version=version,
        threads=threads, device=device, cpu=cpu, gpu=gpu, batch_sizes=batch_sizes, tokens=tokens,
        repeats=repeats, warmup=warmup, embed_ms=medians[("embed", 0)], head_ms=medians[("head", 0)],
        block_ms=medians[("block", 0)], attn=_branch(medians, "attn", range(1, full.heads + 1)),
        mlp=_branch(medians, "mlp", grid), mlp_alignment=mlp_alignment,
        mlp_unaligned=None if unaligned is None else _branch(medians, "mlp_unaligned", unaligned),
    )


def _branch(medians: Mapping[tuple[str, int], tuple[float, ...]], kind: str, widths) -> BranchTable:
    """The table of the configurations ``(kind, w)`` for ``w`` in ``widths``."""
    widths = tuple(widths)
    return BranchTable(widths, np.array([medians[kind, w] for w in widths]))


def _time(runners: Mapping[tuple[str, int], Runner], depth: int, batch_sizes: tuple[int, ...], repeats: int,
          warmup: int, on_progress: Callable[[int], None]) -> dict[tuple[str, int], tuple[float, ...]]:
    """Per configuration, the median milliseconds at each batch size (block configurations: per block of
    ``depth``), over interleaved rounds, each timed run right after an untimed one (module docstring)."""
    times = {(key, b): [] for key in runners for b in batch_sizes}
    for round_ in range(warmup + repeats):
        for key, run in runners.items():
            divisor = 1 if key[0] in ("embed", "head") else depth
            for b in batch_sizes:
                run(b)
                if round_ >= warmup:   # timed right after an untimed run of the same: warm, as in a stream of inputs
                    times[key, b].append(run(b) / divisor)
        on_progress(1)
    return {key: tuple(statistics.median(times[key, b]) for b in batch_sizes) for key in runners}


def _torch_runners(spec: ModelSpec, arch: Architecture, widths: Mapping[tuple[str, int], BlockWidths],
                   batch_sizes: tuple[int, ...], tokens: int, device: str, seed: int,
                   clock: Callable[[], float]) -> dict[tuple[str, int], Runner]:
    """Each configuration as the model factory builds it (fresh weights); the fixed parts from the emptied build."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    images = {b: torch.randn(b, *arch.input_size, generator=generator) for b in batch_sizes}
    hidden = {b: torch.randn(b, tokens, arch.dim, generator=generator) for b in batch_sizes}
    runners = {}
    for key, width in widths.items():
        model = build_uniform(spec, width, device)
        runners[key] = _torch_runner(model.blocks, hidden, device, clock)
        if key[0] == "block":   # the fixed parts come from the same build
            stem, tail = _stem_and_tail(model)
            runners[("embed", 0)] = _torch_runner(stem, images, device, clock)
            runners[("head", 0)] = _torch_runner(tail, hidden, device, clock)
    return runners


def _stem_and_tail(model):
    """The model's patch embedding (+ position embedding) and its final norm + classifier, as modules."""
    import torch

    from tapvits_cli.models.families import vit

    sequence = vit.block_sequence(model)

    class Part(torch.nn.Module):
        def __init__(self, function):
            super().__init__()
            self.owner, self.function = model, function   # registered, so .to(device) moves the model's weights

        def forward(self, x):
            return self.function(x)

    return Part(sequence.stem).eval(), Part(sequence.tail).eval()


def _torch_runner(module, inputs: dict, device: str, clock: Callable[[], float]) -> Runner:
    """``run(batch) -> milliseconds`` of one forward pass of ``module`` on ``inputs[batch]``."""
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


def _onnx_runners(arch: Architecture, widths: Mapping[tuple[str, int], BlockWidths], batch_sizes: tuple[int, ...],
                  tokens: int, threads: int, seed: int, clock: Callable[[], float]) -> dict[tuple[str, int], Runner]:
    """Each configuration as an ONNX graph of all L blocks with their own random weights, plus the fixed parts,
    each in its own :func:`onnx_session`."""
    from tapvits_cli.latency.onnx_graphs import blocks_graph, random_weights, stem_graph, tail_graph

    rng = np.random.default_rng(seed)
    images = {b: rng.standard_normal((b, *arch.input_size), dtype=np.float32) for b in batch_sizes}
    hidden = {b: rng.standard_normal((b, tokens, arch.dim), dtype=np.float32) for b in batch_sizes}
    depth = len(arch.blocks)

    def runner(graph: bytes, inputs: dict) -> Runner:
        session = onnx_session(graph, threads)
        name = session.get_inputs()[0].name

        def run(batch: int) -> float:
            start = clock()
            session.run(None, {name: inputs[batch]})
            return (clock() - start) * 1000.0

        return run

    # one graph at a time: its serialized copy is dropped once its session holds the weights
    runners = {key: runner(blocks_graph(arch, (width,) * depth, tokens, random_weights(seed)), hidden)
               for key, width in widths.items()}
    runners[("embed", 0)] = runner(stem_graph(arch, random_weights(seed)), images)
    runners[("head", 0)] = runner(tail_graph(arch, tokens, random_weights(seed)), hidden)
    return runners


def onnx_session(graph: bytes, threads: int):
    """An onnxruntime session of ``graph`` on the CPU provider with ``threads`` intra-op threads that do not
    spin between runs.

    Every session owns a thread pool, and by default its threads spin for a while after
    each run, waiting for more work. Where several sessions take turns in one process, the
    threads of the one just run spin on the cores the next one is timed on: a DeiT-Tiny-
    shaped profile predicted its own unpruned model at batch 32 as 60-72 ms, which runs
    whole in 24-28 ms; without spinning it predicted 25-32 ms.
    """
    onnxruntime = _onnxruntime()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


def _available_cores() -> int:
    """The cores this process may run on (Linux affinity; elsewhere the machine's count)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity else os.cpu_count() or 1


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        from tapvits_cli.errors import DataUnavailableError

        raise DataUnavailableError("--runtime onnxruntime needs onnxruntime: pip install onnxruntime") from None
    return onnxruntime
