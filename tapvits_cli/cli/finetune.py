"""``tapvits finetune``: fine-tune a model artifact, or train a timm model from random initialisation."""

from __future__ import annotations

from dataclasses import replace

import click

from tapvits_cli.cli.create_model import parse_model_args
from tapvits_cli.cli.options import CURRENT, FiniteFloat, WritingCommand, global_options
from tapvits_cli.cli.output import emit, log, progress_bar
from tapvits_cli.errors import IncompatibleArtifactError, UsageError

DEFAULT_DISTILL_WEIGHT = 0.5
CHECKPOINT_SUFFIX = ".ckpt"


@click.command("finetune", cls=WritingCommand, short_help="Fine-tune a model artifact (optionally distilling a teacher), or train one from scratch.")
@click.argument("model_file", required=False, type=click.Path(exists=True, dir_okay=False))
@click.option("--model", "architecture", metavar="NAME",
              help="Train from random initialisation: a timm architecture name (instead of MODEL_FILE).")
@click.option("-a", "--arg", "model_args", multiple=True, metavar="KEY=VALUE",
              help="timm keyword argument for --model, repeatable; num_classes defaults to the data's.")
@click.option("--data", required=True, metavar="REF", help="Training data: a dataset reference (see `tapvits dataset`).")
@click.option("--metric-set", type=click.Path(exists=True, dir_okay=False),
              help="Train only on this metric set's fine-tuning samples (their ids index --data).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Model artifact to write (.safetensors).")
@click.option("--epochs", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--max-steps", type=click.IntRange(min=1), help="Stop after this many optimizer steps (the schedule spans them).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Global batch size, summed over torchrun processes.")
@click.option("--lr", type=FiniteFloat(), default=5e-4, show_default=True, help="Peak learning rate (AdamW).")
@click.option("--min-lr", type=FiniteFloat(), default=1e-6, show_default=True, help="Learning rate at the end of the cosine decay.")
@click.option("--weight-decay", type=FiniteFloat(), default=0.05, show_default=True, help="AdamW weight decay (not on biases and norms).")
@click.option("--warmup", type=FiniteFloat(), default=0.1, show_default=True, help="Linear warm-up, as a fraction of all steps.")
@click.option("--warmup-steps", type=click.IntRange(min=0), help="Linear warm-up in steps (overrides --warmup).")
@click.option("--label-smoothing", type=FiniteFloat(), default=0.1, show_default=True)
@click.option("--augment", default="", metavar="LIST",
              help="Batch augmentation: crop (pad by 1/8 of the image, crop back), crop=PIXELS, flip (not for digits).")
@click.option("--grad-clip", type=FiniteFloat(), help="Clip the global gradient norm to this value.")
@click.option("--teacher", type=click.Path(exists=True, dir_okay=False),
              help="Model artifact to distil from (e.g. the unpruned model).")
@click.option("--distill-weight", type=FiniteFloat(),
              help=f"λ in (1−λ)·CE + λ·T²·KL(teacher‖student) [default with --teacher: {DEFAULT_DISTILL_WEIGHT}].")
@click.option("--temperature", type=FiniteFloat(), default=4.0, show_default=True, help="Distillation temperature T.")
@click.option("--checkpoint-dir", type=click.Path(file_okay=False),
              help=f"Keep a checkpoint here after every epoch [default: OUTPUT{CHECKPOINT_SUFFIX}, deleted on success].")
@click.option("--no-checkpoint", is_flag=True, help="Write no checkpoint (an interrupted run starts over).")
@click.option("--resume", is_flag=True,
              help="Require a checkpoint to continue from (a matching one is used even without this flag).")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True, help="DataLoader worker processes.")
@click.option("--log-every", type=click.IntRange(min=1), default=50, show_default=True,
              help="Read the loss back every N steps (for the progress line).")
@global_options
def command(model_file: str | None, architecture: str | None, model_args: tuple[str, ...], data: str,
            metric_set: str | None, output: str, epochs: int, max_steps: int | None, batch_size: int, lr: float,
            min_lr: float, weight_decay: float, warmup: float, warmup_steps: int | None, label_smoothing: float,
            augment: str, grad_clip: float | None, teacher: str | None, distill_weight: float | None,
            temperature: float, checkpoint_dir: str | None, no_checkpoint: bool, resume: bool, workers: int,
            log_every: int) -> None:
    """Fine-tune MODEL_FILE on --data, or train --model NAME from random initialisation.

    AdamW with linear warm-up and cosine decay, label smoothing, optional batch
    augmentation and response distillation from --teacher. Seeded (--seed): the same
    command gives the same weights. After each epoch a checkpoint is written; running the
    same command again continues an interrupted run to the same result. The last epoch's
    model is the result (no model selection). Under torchrun, every process trains on its
    share of each global batch (DistributedDataParallel; gloo on CPU, NCCL on CUDA).

    Examples:

    \b
      tapvits finetune pruned.safetensors --data fashion-mnist \\
          --metric-set device0.h5 --teacher base.safetensors -o device0.safetensors
      torchrun --standalone --nproc_per_node=2 -m tapvits_cli finetune \\
          --model vit_tiny_patch16_224 -a img_size=28 -a patch_size=4 -a in_chans=1 \\
          --data fashion-mnist --epochs 10 --augment crop -o base.safetensors
    """
    from tapvits_cli.artifacts.files import sha256_file
    from tapvits_cli.artifacts.header import LineageEntry
    from tapvits_cli.artifacts.model import load_model, write_model
    from tapvits_cli.data import open_dataset
    from tapvits_cli.models.factory import describe_model
    from tapvits_cli.runtime import seed_everything
    from tapvits_cli.training.augment import Augmentation
    from tapvits_cli.training.distributed import process_group
    from tapvits_cli.training.loop import TrainConfig, train

    if (model_file is None) == (architecture is None):
        raise UsageError("give either a MODEL_FILE to fine-tune or --model NAME to train from random initialisation")
    if model_args and architecture is None:
        raise UsageError("-a/--arg sets keyword arguments of --model; a model artifact carries its own")
    if distill_weight is not None and teacher is None:
        raise UsageError("--distill-weight needs --teacher")
    if no_checkpoint and (resume or checkpoint_dir):
        raise UsageError("--no-checkpoint excludes --resume and --checkpoint-dir")

    with process_group(CURRENT.device) as processes:
        if not processes.is_main:
            CURRENT.verbosity, CURRENT.progress = -1, False
        dataset = open_dataset(data)
        inputs = {"data": LineageEntry(dataset.fingerprint(), "dataset", str(dataset.ref))}
        positions = None
        if metric_set:
            positions = _metric_set_positions(metric_set, dataset)
            inputs["metric-set"] = LineageEntry(sha256_file(metric_set), "metric-set", _name(metric_set))

        seed_everything(CURRENT.seed)
        model, spec, preprocessing = _student(model_file, architecture, model_args, dataset)
        if model_file:
            inputs["model"] = LineageEntry(sha256_file(model_file), "model", _name(model_file))
            origin = {}
        else:
            origin = {"architecture": spec.architecture, "kwargs": dict(spec.kwargs)}
        num_classes = spec.num_classes
        labels = dataset.labels if positions is None else dataset.labels[positions]
        if int(labels.max()) >= num_classes:
            raise IncompatibleArtifactError(f"the model has {num_classes} classes, but {dataset.ref} has label "
                                            f"{int(labels.max())}; train a model with num_classes ≥ {int(labels.max()) + 1}")

        teacher_model = None
        if teacher:
            teacher_model, teacher_spec, _ = load_model(teacher)
            _check_teacher(teacher, teacher_spec, num_classes, preprocessing)
            inputs["teacher"] = LineageEntry(sha256_file(teacher), "model", _name(teacher))
            distill_weight = DEFAULT_DISTILL_WEIGHT if distill_weight is None else distill_weight

        config = TrainConfig(
            epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup_fraction=warmup,
            warmup_steps=warmup_steps, min_lr=min_lr, label_smoothing=label_smoothing,
            augmentation=Augmentation.parse(augment, preprocessing.input_size[1]),
            distill_weight=distill_weight or 0.0, temperature=temperature, grad_clip=grad_clip,
            max_steps=max_steps, seed=CURRENT.seed)
        plan = config.plan(len(labels))
        params = {**origin, **config.to_params()}
        run = {"params": params, "inputs": {role: entry.sha256 for role, entry in inputs.items()}}

        directory = None if no_checkpoint else (checkpoint_dir or output + CHECKPOINT_SUFFIX)
        start_state = _resume_state(directory, run, resume) if directory else None
        done = int(start_state["step"]) if start_state else 0

        def on_epoch_end(state: dict) -> None:
            if processes.is_main and directory:
                from tapvits_cli.artifacts.checkpoint import write_checkpoint

                write_checkpoint(directory, state, run)

        with progress_bar("finetune" if model_file else "train", plan.total_steps - done) as advance:
            def on_step(step: int, loss: float | None) -> None:
                advance(1, None if loss is None else f"epoch {(step - 1) // plan.steps_per_epoch + 1}/{plan.epochs} loss {loss:.4f}")

            result = train(model, dataset, preprocessing, config, positions=positions, teacher=teacher_model,
                           start_state=start_state, device=processes.device, num_workers=workers,
                           log_every=log_every, on_step=on_step, on_epoch_end=on_epoch_end)
        if not processes.is_main:
            return

        spec = replace(describe_model(result.model, spec.architecture, spec.kwargs, spec.class_names),
                       preprocessing=preprocessing.to_dict())
        final = result.history[-1]
        params.update({
            "data": str(dataset.ref), "train_samples": plan.samples, "steps": plan.total_steps,
            "device": processes.device, "world_size": processes.world_size,
            "final_train_loss": final["loss"], "final_train_accuracy": final["accuracy"],
            "epoch_losses": [entry["loss"] for entry in result.history],
            "images_per_second": result.images_per_second,
        })
        path = write_model(output, result.model, spec, params, inputs)
        if directory and not checkpoint_dir:
            from tapvits_cli.artifacts.checkpoint import remove_checkpoint

            remove_checkpoint(directory)
        for entry in result.history:
            log(f"epoch {entry['epoch']}: loss {entry['loss']:.4f}, train accuracy {entry['accuracy']:.1%}, "
                f"lr {entry['lr']:.3g}, {entry['images_per_second']:.0f} images/s", level=1)
        speed = f", {result.images_per_second:.0f} images/s" if result.images_per_second else ""
        log(f"{plan.total_steps} steps on {plan.samples} samples: final train loss {final['loss']:.4f}, "
            f"train accuracy {final['accuracy']:.1%}{speed}")
        emit({"output": str(path), "kind": "model", "steps": plan.total_steps, "final_train_loss": final["loss"],
              "final_train_accuracy": final["accuracy"], "images_per_second": result.images_per_second},
             str(path))


def _name(path: str) -> str:
    return click.format_filename(path, shorten=True)


def _student(model_file: str | None, architecture: str | None, model_args: tuple[str, ...], dataset):
    """``(module, spec, preprocessing)`` of the model to train: an artifact's, or a fresh one
    (seeded, ``num_classes`` and class names from the data unless given)."""
    from tapvits_cli.artifacts.model import load_model
    from tapvits_cli.data.preprocess import Preprocessing
    from tapvits_cli.models.factory import create_model, describe_model

    if model_file:
        model, spec, _ = load_model(model_file)
    else:
        kwargs = parse_model_args(model_args)
        kwargs.setdefault("num_classes", dataset.num_classes)
        model = create_model(architecture, kwargs)
        spec = describe_model(model, architecture, kwargs)
    if spec.class_names is None and spec.num_classes == dataset.num_classes:
        spec = replace(spec, class_names=tuple(dataset.class_names))
    return model, spec, Preprocessing.from_dict(spec.preprocessing)


def _metric_set_positions(path: str, dataset):
    """Positions in ``dataset`` of the metric set's fine-tuning samples; ids only mean something in its pool."""
    from tapvits_cli.artifacts.metric_set import read_metric_set

    metric_set = read_metric_set(path)
    if metric_set.pool["fingerprint"] != dataset.fingerprint():
        raise IncompatibleArtifactError(
            f"{path} selects from '{metric_set.pool['reference']}', not from '{dataset.ref}' (dataset fingerprints "
            f"differ); pass --data {metric_set.pool['reference']}")
    return metric_set.positions_in(dataset, metric_set.finetune_ids)


def _check_teacher(path: str, spec, num_classes: int, preprocessing) -> None:
    if spec.num_classes != num_classes:
        raise IncompatibleArtifactError(f"teacher {path} has {spec.num_classes} classes, the student {num_classes}; "
                                        "distillation needs the same classes")
    from tapvits_cli.data.preprocess import Preprocessing

    if Preprocessing.from_dict(spec.preprocessing) != preprocessing:
        raise IncompatibleArtifactError(f"teacher {path} expects other input preprocessing than the student "
                                        f"({spec.preprocessing} vs {preprocessing.to_dict()})")


def _resume_state(directory: str, run: dict, required: bool) -> dict | None:
    """The checkpoint state to continue from, if ``directory`` holds one of this very run."""
    from tapvits_cli.artifacts.checkpoint import checkpoint_path, read_checkpoint

    found = read_checkpoint(directory)
    if found is None:
        if required:
            raise UsageError(f"--resume: no checkpoint in {directory}")
        return None
    stored, state = found
    if stored != run:
        differing = sorted({f"{part}.{key}" for part in ("params", "inputs")
                            for key in set(stored.get(part, {})) | set(run[part])
                            if stored.get(part, {}).get(key) != run[part].get(key)})
        raise IncompatibleArtifactError(
            f"{checkpoint_path(directory)} belongs to another run (differs in {', '.join(differing) or 'format'}); "
            "use another --checkpoint-dir or delete it to start afresh")
    log(f"resuming from {checkpoint_path(directory)} after epoch {state['epoch']} (step {state['step']})")
    return state
