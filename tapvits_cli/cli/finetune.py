"""``tapvits finetune``: fine-tune a model artifact, or train a timm model from random initialisation.

Longer than most subcommands for its many training options and their ``--help``; the work
is ``stages.finetune``.
"""

from __future__ import annotations

import math

import click

from tapvits_cli.cli.options import FiniteFloat, WritingCommand, checked_by, global_options
from tapvits_cli.cli.output import emit
from tapvits_cli.stages.finetune import CHECKPOINT_SUFFIX, DEFAULT_DISTILL_WEIGHT
from tapvits_cli.vocabulary import MAX_WORKERS


def _augmentation(text: str) -> None:
    """``--augment`` read as ``finetune`` reads it, for images of the largest size a dataset may have
    (the model's own size, which bounds the crop padding, is checked again when it is known)."""
    from tapvits_cli.data.sources import MAX_IMAGE_PIXELS
    from tapvits_cli.training.augment import Augmentation

    Augmentation.parse(text, math.isqrt(MAX_IMAGE_PIXELS))


@click.command("finetune", cls=WritingCommand,
               renamed={"--warmup": "--warmup-fraction", "--temperature": "--distill-temperature",
                        "--metric-set": "--finetune-set"},
               short_help="Fine-tune a model artifact (optionally distilling a teacher), or train one from scratch.")
@click.argument("model_file", required=False, type=click.Path(exists=True, dir_okay=False))
@click.option("--model", "architecture", metavar="NAME",
              help="Train from random initialisation: a timm architecture name (instead of MODEL_FILE).")
@click.option("-a", "--arg", "model_args", multiple=True, metavar="KEY=VALUE",
              help="timm keyword argument for --model, repeatable; num_classes defaults to the data's.")
@click.option("--data", metavar="REF",
              help="Training data: a dataset reference (see `tapvits dataset`) [default with --finetune-set: the pool "
                   "it was selected from]; its fingerprint must match that pool's.")
@click.option("--finetune-set", type=click.Path(exists=True, dir_okay=False), metavar="FILE",
              help="Train only on the fine-tuning set of this metric-set artifact from `tapvits select`.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Model artifact to write (.safetensors).")
@click.option("--epochs", type=click.IntRange(min=1), default=3, show_default=True,
              help="Passes over the training samples (--max-steps can stop earlier).")
@click.option("--max-steps", type=click.IntRange(min=1), help="Stop after this many optimizer steps (the schedule spans them).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Global batch size, summed over torchrun processes.")
# --lr at most 1e30: the optimizer's state is float32, and 1e39 overflowed inside AdamW (exit 1)
@click.option("--lr", type=FiniteFloat(max=1e30), default=5e-4, show_default=True, help="Peak learning rate (AdamW).")
@click.option("--min-lr", type=FiniteFloat(), default=1e-6, show_default=True, help="Learning rate at the end of the cosine decay.")
@click.option("--weight-decay", type=FiniteFloat(), default=0.05, show_default=True, help="AdamW weight decay (not on biases and norms).")
@click.option("--warmup-fraction", type=FiniteFloat(0, 1), default=0.1, show_default=True,
              help="Linear warm-up, as a fraction of all steps.")
@click.option("--warmup-steps", type=click.IntRange(min=0), help="Linear warm-up in steps (overrides --warmup-fraction).")
@click.option("--label-smoothing", type=FiniteFloat(), default=0.1, show_default=True,
              help="Cross-entropy target: 1 − ε on the true class, ε spread evenly over all classes (0: one-hot).")
@click.option("--augment", default="", metavar="LIST", callback=checked_by(_augmentation),
              help="Batch augmentation: crop (pad by 1/8 of the image, crop back), crop=PIXELS, flip (not for digits).")
@click.option("--grad-clip", type=FiniteFloat(), help="Clip the global gradient norm to this value.")
@click.option("--teacher", type=click.Path(exists=True, dir_okay=False),
              help="Model artifact to distil from (e.g. the unpruned model).")
@click.option("--distill-weight", type=FiniteFloat(),
              help=f"λ in (1−λ)·CE + λ·T²·KL(teacher‖student) [default with --teacher: {DEFAULT_DISTILL_WEIGHT}].")
@click.option("--distill-temperature", type=FiniteFloat(0, 1000.0, min_open=True), default=4.0, show_default=True,
              help="Temperature T that softens teacher and student outputs for distillation.")
@click.option("--checkpoint-dir", type=click.Path(file_okay=False),
              help=f"Keep a checkpoint here after every epoch [default: OUTPUT{CHECKPOINT_SUFFIX}, deleted on success].")
@click.option("--no-checkpoint", is_flag=True, help="Write no checkpoint (an interrupted run starts over).")
@click.option("--resume", is_flag=True,
              help="Require a checkpoint to continue from (a matching one is used even without this flag).")
@click.option("--workers", type=click.IntRange(0, MAX_WORKERS), default=0, show_default=True, help="DataLoader worker processes.")
@click.option("--log-every", type=click.IntRange(min=1), default=50, show_default=True,
              help="Read the loss back every N steps (for the progress line).")
@global_options
def command(model_file: str | None, architecture: str | None, model_args: tuple[str, ...], data: str | None,
            finetune_set: str | None, output: str, epochs: int, max_steps: int | None, batch_size: int, lr: float,
            min_lr: float, weight_decay: float, warmup_fraction: float, warmup_steps: int | None, label_smoothing: float,
            augment: str, grad_clip: float | None, teacher: str | None, distill_weight: float | None,
            distill_temperature: float, checkpoint_dir: str | None, no_checkpoint: bool, resume: bool, workers: int,
            log_every: int) -> None:
    """Fine-tune MODEL_FILE on --data (or the fine-tuning set --finetune-set), or train --model NAME
    from random initialisation.

    AdamW with linear warm-up and cosine decay, label smoothing, optional batch
    augmentation and response distillation from --teacher. Seeded (--seed): the same
    command gives the same weights. After each epoch a checkpoint is written; running the
    same command again continues an interrupted run to the same result. The last epoch's
    model is the result (no model selection). Under torchrun, every process trains on its
    share of each global batch (DistributedDataParallel; gloo on CPU, NCCL on CUDA).

    Examples:

    \b
      tapvits finetune pruned.safetensors --finetune-set device0.h5 \\
          --teacher base.safetensors -o device0.safetensors
      torchrun --standalone --nproc_per_node=2 -m tapvits_cli finetune \\
          --model vit_tiny_patch16_224 -a img_size=28 -a patch_size=4 -a in_chans=1 \\
          --data fashion-mnist --epochs 10 --augment crop -o base.safetensors
    """
    from tapvits_cli.cli.stage_call import run_stage
    from tapvits_cli.stages import finetune

    result = run_stage(finetune)
    if result.output is not None:   # only the main process of a torchrun writes and reports
        emit(result.document, result.output)

