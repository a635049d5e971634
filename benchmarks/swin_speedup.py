"""Issue 7 benchmark: real CPU speedup of physically pruned Swin, next to its MACs ratio.

A ``swin_tiny_patch4_window7_224``-shaped model (4 stages of widths 96…768, depths
2, 2, 6, 2, windows of 7×7) at 224×224 with random weights, measured exactly as
``speedup.py`` measures ViTs (its functions run here): budgets 0.9 … 0.5 of the parameters
× the ``kl``, ``uniform`` and ``global`` strategies on seeded random scores, pruned by the
code `tapvits prune` runs, timed at batch 1 and 32 in interleaved rounds against the
unpruned model (speedup = ratio of the fastest rounds). Target: latency speedup
≥ 0.85 × the MACs ratio at batch 32 (window partitioning, shifts, norms and patch merging
do not shrink with the heads and neurons, so Swin keeps more unpruned work than ViT).

    bash .ci/env python benchmarks/swin_speedup.py [--repeats 5] [--warmup 1]

A batch-32 forward pass of swin_tiny takes about 2.3 s on 2 idle cores (8–18 s when the
cores are shared, which makes the ratios meaningless): the default 5 rounds after 1
warm-up took 6.5 minutes.
Writes benchmarks/results/swin_speedup.json and .md.
"""

from __future__ import annotations

from speedup import arguments, measure, write_results

MODELS = {"swin-tiny": "swin_tiny_patch4_window7_224"}


def main() -> None:
    args = arguments(__doc__.splitlines()[0], "swin-tiny", repeats=5).parse_args()
    rows = measure({label: MODELS[label] for label in args.models.split(",")}, args)
    write_results(rows, args, "swin_speedup", target=0.85)


if __name__ == "__main__":
    main()
