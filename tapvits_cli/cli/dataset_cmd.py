"""``tapvits dataset REF``: what a dataset reference selects, before any stage uses it."""

from __future__ import annotations

import click

from tapvits_cli.cli.options import CURRENT, global_options
from tapvits_cli.cli.output import emit


@click.command("dataset", short_help="Show what a dataset reference selects: samples, classes, fingerprint.")
@click.argument("reference")
@global_options
def command(reference: str) -> None:
    """Resolve a dataset REFERENCE and describe the selection: samples, image shape,
    classes and the fingerprint that artifacts record.

    \b
    REFERENCE = SOURCE[:KEY=VALUE]...  (options apply in this order)
      split=train|test|all   the source's own split
      classes=0,3,5-7        keep these labels
      dirichlet=A:part=K/N   part K of N non-IID parts (Dirichlet concentration A)
      fold=K/N               fold K of a stratified N-way partition
      indices=0-99,120       keep these positions of the selection so far
      sample=N               a seeded random N of the selection so far
      seed=S                 seed of dirichlet/part, fold and sample (default 0)

    \b
    SOURCE is one of:
      digits                 scikit-learn's 8x8 digits (1,433 train, 364 test), offline
      fashion-mnist          Debian's dataset-fashion-mnist (60,000 train, 10,000 test)
      FILE.npz               arrays x, y and/or x_train, y_train, x_test, y_test
      FILE.h5 / FILE.hdf5    datasets images, labels (root, or train/ and test/ groups)
      DIRECTORY              one subfolder of images per class (or train/ and test/);
                             plain files only, no links out of it, at most 4096x4096 pixels

    The full rules (defaults, canonical form, fingerprint) are in protocol/datasets.md.

    \b
    Examples:
      tapvits dataset digits
      tapvits dataset "fashion-mnist:split=test:classes=0,1:fold=1/2"
      tapvits dataset "fashion-mnist:split=test:dirichlet=0.1:part=2/5:fold=0/2"
    """
    from tapvits_cli.cli.stage_call import run_stage
    from tapvits_cli.stages import dataset

    document = run_stage(dataset).document
    if CURRENT.json:
        emit(document)
        return
    from tapvits_cli.reporting.terminal import printable

    lines = [f"{key}: {document[key]}" for key in ("reference", "samples", "image_shape", "num_classes", "fingerprint")]
    lines += [f"  class {name}: {n}" for name, n in document["class_counts"].items()]
    emit(document, "\n".join(printable(line, one_line=True) for line in lines))   # a class name is one line
