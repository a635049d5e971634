"""``finetune``: fine-tune a model artifact, or train a timm model from random initialisation.

Besides the training itself this stage owns the checkpoint policy: a checkpoint after
every epoch (by default in ``OUTPUT.ckpt``, deleted on success), used again only by the
very same run (same parameters, same inputs), so running the same command after an
interruption continues it to the same result.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from tapvits_cli.errors import IncompatibleArtifactError, InvalidArtifactError, UsageError
from tapvits_cli.stages import feedback
from tapvits_cli.stages.common import argument, artifact_lineage, dataset_lineage, open_selected_pool, option

DEFAULT_DISTILL_WEIGHT = 0.5
CHECKPOINT_SUFFIX = ".ckpt"


@dataclass(frozen=True, kw_only=True)
class Options:
    model_file: str | None = argument(None)
    architecture: str | None = option("--model", recipe=False)
    model_args: tuple[str, ...] = option("-a", (), multiple=True, recipe=False)
    data: str | None = option("--data", recipe=False)   # default: the pool the fine-tuning set records
    finetune_set: str | None = option("--finetune-set", recipe=False)
    output: str = option("-o", recipe=False)
    epochs: int = option("--epochs", 3)
    max_steps: int | None = option("--max-steps")
    batch_size: int = option("--batch-size", 64)
    lr: float = option("--lr", 5e-4)
    min_lr: float = option("--min-lr", 1e-6)
    weight_decay: float = option("--weight-decay", 0.05)
    warmup_fraction: float = option("--warmup-fraction", 0.1)
    warmup_steps: int | None = option("--warmup-steps")
    label_smoothing: float = option("--label-smoothing", 0.1)
    augment: str = option("--augment", "")
    grad_clip: float | None = option("--grad-clip")
    teacher: str | None = option("--teacher", recipe=False)
    distill_weight: float | None = option("--distill-weight")
    distill_temperature: float = option("--distill-temperature", 4.0)
    checkpoint_dir: str | None = option("--checkpoint-dir", recipe=False)
    no_checkpoint: bool = option("--no-checkpoint", False, recipe=False)
    resume: bool = option("--resume", False, recipe=False)
    workers: int = option("--workers", 0)
    log_every: int = option("--log-every", 50)
    seed: int = 0
    device: str = "auto"


@dataclass(frozen=True)
class Result:
    output: str | None          # None in a torchrun process other than the main one (it writes nothing)
    document: dict[str, Any]


def check_options(options: Options) -> None:
    if (options.model_file is None) == (options.architecture is None):
        raise UsageError("give either a MODEL_FILE to fine-tune or --model NAME to train from random initialisation")
    if options.model_args and options.architecture is None:
        raise UsageError("-a/--arg sets keyword arguments of --model; a model artifact carries its own")
    if options.distill_weight is not None and options.teacher is None:
        raise UsageError("--distill-weight needs --teacher")
    if options.no_checkpoint and (options.resume or options.checkpoint_dir):
        raise UsageError("--no-checkpoint excludes --resume and --checkpoint-dir")
    if options.data is None and options.finetune_set is None:
        raise UsageError("give the training data: --data REF, or --finetune-set FILE (which records its pool)")


def run(options: Options) -> Result:
    from tapvits_cli.artifacts.model import load_model, write_model
    from tapvits_cli.models.factory import describe_model
    from tapvits_cli.runtime import seed_everything
    from tapvits_cli.training.augment import Augmentation
    from tapvits_cli.training.distributed import process_group
    from tapvits_cli.training.loop import TrainConfig, train

    check_options(options)
    with process_group(options.device) as processes:
        if not processes.is_main:
            feedback.silence()
        metric_set = None
        if options.finetune_set:
            from tapvits_cli.artifacts.metric_set import read_metric_set

            metric_set = read_metric_set(options.finetune_set)
        dataset = open_selected_pool(options.data, metric_set, options.finetune_set)
        inputs = {"data": dataset_lineage(dataset)}
        positions = None
        if metric_set is not None:
            positions = metric_set.positions_in(dataset, metric_set.finetune_ids)
            inputs["metric-set"] = artifact_lineage(options.finetune_set, "metric-set")

        seed_everything(options.seed)
        model, spec, preprocessing = _student(options, dataset)
        if options.model_file:
            inputs["model"] = artifact_lineage(options.model_file, "model")
            origin = {}
        else:
            origin = {"architecture": spec.architecture, "kwargs": dict(spec.kwargs)}
        num_classes = spec.num_classes
        labels = dataset.labels if positions is None else dataset.labels[positions]
        if int(labels.max()) >= num_classes:
            raise IncompatibleArtifactError(f"the model has {num_classes} classes, but {dataset.ref} has label "
                                            f"{int(labels.max())}; train a model with num_classes ≥ {int(labels.max()) + 1}")

        teacher_model, distill_weight = None, options.distill_weight
        if options.teacher:
            teacher = load_model(options.teacher)
            teacher_model = teacher.module
            _check_teacher(options.teacher, teacher.spec, num_classes, preprocessing)
            inputs["teacher"] = artifact_lineage(options.teacher, "model")
            distill_weight = DEFAULT_DISTILL_WEIGHT if distill_weight is None else distill_weight

        config = TrainConfig(
            epochs=options.epochs, batch_size=options.batch_size, lr=options.lr, weight_decay=options.weight_decay,
            warmup_fraction=options.warmup_fraction, warmup_steps=options.warmup_steps, min_lr=options.min_lr,
            label_smoothing=options.label_smoothing,
            augmentation=Augmentation.parse(options.augment, preprocessing.input_size[1]),
            distill_weight=distill_weight or 0.0, temperature=options.distill_temperature, grad_clip=options.grad_clip,
            max_steps=options.max_steps, seed=options.seed)
        plan = config.plan(len(labels))
        params = {**origin, **config.to_params()}
        run_identity = {"params": params, "inputs": {role: entry.sha256 for role, entry in inputs.items()}}

        directory = None if options.no_checkpoint else (options.checkpoint_dir or options.output + CHECKPOINT_SUFFIX)
        start_state = resume_state(directory, run_identity, options.resume, model, plan) if directory else None
        done = int(start_state["step"]) if start_state else 0

        def on_epoch_end(state: dict) -> None:
            if processes.is_main and directory:
                from tapvits_cli.artifacts.checkpoint import write_checkpoint

                write_checkpoint(directory, state, run_identity)

        with feedback.progress("finetune" if options.model_file else "train", plan.total_steps - done) as advance:
            def on_step(step: int, loss: float | None) -> None:
                advance(1, None if loss is None else
                        f"epoch {(step - 1) // plan.steps_per_epoch + 1}/{plan.epochs} loss {loss:.4f}")

            def on_resume(state: dict) -> None:
                from tapvits_cli.artifacts.checkpoint import checkpoint_path

                feedback.log(f"resuming from {checkpoint_path(directory)} after epoch {state['epoch']} "
                             f"(step {state['step']})")

            result = train(model, dataset, preprocessing, config, positions=positions, teacher=teacher_model,
                           start_state=start_state, device=processes.device, num_workers=options.workers,
                           log_every=options.log_every, on_step=on_step, on_epoch_end=on_epoch_end,
                           on_resume=on_resume)
        if not processes.is_main:
            return Result(None, {})

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
        path = write_model(options.output, result.model, spec, params, inputs)
        if directory and not options.checkpoint_dir:
            from tapvits_cli.artifacts.checkpoint import remove_checkpoint

            remove_checkpoint(directory)
        for entry in result.history:
            feedback.log(f"epoch {entry['epoch']}: loss {entry['loss']:.4f}, train accuracy {entry['accuracy']:.1%}, "
                         f"lr {entry['lr']:.3g}, {entry['images_per_second']:.0f} images/s", level=1)
        speed = f", {result.images_per_second:.0f} images/s" if result.images_per_second else ""
        feedback.log(f"{plan.total_steps} steps on {plan.samples} samples: final train loss {final['loss']:.4f}, "
                     f"train accuracy {final['accuracy']:.1%}{speed}")
        return Result(str(path), {"output": str(path), "kind": "model", "steps": plan.total_steps,
                                  "final_train_loss": final["loss"], "final_train_accuracy": final["accuracy"],
                                  "images_per_second": result.images_per_second})


def _student(options: Options, dataset):
    """``(module, spec, preprocessing)`` of the model to train: an artifact's, or a fresh one
    (seeded, ``num_classes`` and class names from the data unless given)."""
    from tapvits_cli.artifacts.model import load_model
    from tapvits_cli.data.preprocess import Preprocessing
    from tapvits_cli.models.arguments import parse_model_args
    from tapvits_cli.models.factory import create_model, describe_model

    if options.model_file:
        loaded = load_model(options.model_file)
        model, spec = loaded.module, loaded.spec
    else:
        kwargs = parse_model_args(options.model_args)
        kwargs.setdefault("num_classes", dataset.num_classes)
        model = create_model(options.architecture, kwargs)
        spec = describe_model(model, options.architecture, kwargs)
    if spec.class_names is None and spec.num_classes == dataset.num_classes:
        spec = replace(spec, class_names=tuple(dataset.class_names))
    return model, spec, Preprocessing.from_dict(spec.preprocessing)


def _check_teacher(path: str, spec, num_classes: int, preprocessing) -> None:
    if spec.num_classes != num_classes:
        raise IncompatibleArtifactError(f"teacher {path} has {spec.num_classes} classes, the student {num_classes}; "
                                        "distillation needs the same classes")
    from tapvits_cli.data.preprocess import Preprocessing

    if Preprocessing.from_dict(spec.preprocessing) != preprocessing:
        raise IncompatibleArtifactError(f"teacher {path} expects other input preprocessing than the student "
                                        f"({spec.preprocessing} vs {preprocessing.to_dict()})")


def resume_state(directory: str, run_identity: dict, required: bool, model, plan) -> dict | None:
    """The checkpoint state to continue from, if ``directory`` holds one of this very run
    (the same parameters and input hashes); another run's checkpoint is an error, not a silent restart.

    Its identity says nothing of its content, so the state is checked too (:func:`_check_state`):
    a checkpoint of the last epoch is written out as the model with no step taken in between.
    """
    from tapvits_cli.artifacts.checkpoint import checkpoint_path, read_checkpoint

    found = read_checkpoint(directory)
    if found is None:
        if required:
            raise UsageError(f"--resume: no checkpoint in {directory}")
        return None
    stored, state = found.run, found.state
    if stored != run_identity:
        differing = sorted({f"{part}.{key}" for part in ("params", "inputs")
                            for key in set(stored.get(part, {})) | set(run_identity[part])
                            if stored.get(part, {}).get(key) != run_identity[part].get(key)})
        raise IncompatibleArtifactError(
            f"{checkpoint_path(directory)} belongs to another run (differs in {', '.join(differing) or 'format'}); "
            "use another --checkpoint-dir or delete it to start afresh")
    _check_state(state, model, plan, checkpoint_path(directory))
    return state


def _check_state(state: dict, model, plan, path) -> None:
    """Counters within the run's plan, and model weights of the model's names and shapes, all finite.

    The optimizer and scheduler states are checked as they load (``train`` refuses one that
    does not fit); the model's weights are the part that reaches the output unchanged.
    """
    import torch

    def integer(key: str, limit: int) -> bool:
        value = state.get(key)
        return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= limit

    problem = None
    if not (integer("epoch", plan.epochs) and integer("step", plan.total_steps)):
        problem = f"epoch and step must be integers within the run's {plan.epochs} epochs and {plan.total_steps} steps"
    elif not isinstance(state.get("history"), list) or not all(isinstance(e, dict) for e in state["history"]):
        problem = "history must be a list of records"
    elif not all(isinstance(state.get(key), dict) for key in ("model", "optimizer", "scheduler")):
        problem = "model, optimizer and scheduler states are missing"
    else:
        expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        weights = state["model"]
        if set(weights) != set(expected) or not all(isinstance(t, torch.Tensor) and tuple(t.shape) == expected[name]
                                                    for name, t in weights.items()):
            problem = "its model weights do not have this model's names and shapes"
        elif not all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point()):
            problem = "its model weights hold NaN or infinite values"
    if problem:
        raise InvalidArtifactError(f"{path}: unusable checkpoint ({problem}); delete it to start afresh")
