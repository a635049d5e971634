"""The training loop shared by fine-tuning and training from random initialisation.

AdamW (no weight decay on biases, norms and timm's ``no_weight_decay`` tensors), linear
warm-up then cosine decay per step, cross-entropy with label smoothing, optional response
distillation from a teacher, optional batch augmentation. Deterministic given the seed:

- sample order: :mod:`.sampling`, seeded by (seed, epoch);
- augmentation: :mod:`.augment`, seeded by (seed, epoch), drawn per global batch;
- torch's global generator (dropout, drop-path) is re-seeded at each epoch from
  (seed, epoch, process rank).

Nothing carries over between epochs but the model, optimizer and scheduler states, which
is why a run resumed from an epoch-end state ends with the very weights of an
uninterrupted run. Under ``torch.distributed`` (initialised by the caller) the model is
wrapped in DistributedDataParallel and each process trains on its slice of every global
batch; the result matches one process with the same global batch, to rounding, as long
as the model has no stochastic layers (those draw from per-process generators).

The loop stays lean: no host synchronisation per step (losses accumulate on the device
and are read every ``log_every`` steps and at epoch ends), whole batches are fetched and
preprocessed at once.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from tapvits_cli.data.dataset import Dataset
from tapvits_cli.data.preprocess import Preprocessing, TorchImageDataset
from tapvits_cli.errors import InvalidArtifactError, ParameterError, UsageError
from tapvits_cli.training.augment import Augmentation, augment_batch
from tapvits_cli.training.distill import training_loss
from tapvits_cli.training.sampling import GlobalBatchSampler
from tapvits_cli.training.schedule import warmup_cosine


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines the trained weights (besides model, data and teacher)."""

    epochs: int = 3
    batch_size: int = 64                  # global: summed over all processes
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_fraction: float = 0.1          # of all steps; warmup_steps, when set, wins
    warmup_steps: int | None = None
    min_lr: float = 1e-6
    label_smoothing: float = 0.1
    augmentation: Augmentation = field(default_factory=Augmentation)
    distill_weight: float = 0.0           # λ in (1 − λ)·CE + λ·T²·KL; needs a teacher when > 0
    temperature: float = 4.0
    grad_clip: float | None = None        # max global gradient norm
    max_steps: int | None = None          # cap on optimizer steps (the schedule spans the capped run)
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, "epochs must be at least 1"),
            (self.batch_size >= 1, "batch size must be at least 1"),
            (self.lr > 0, "learning rate must be positive"),
            (self.weight_decay >= 0, "weight decay must not be negative"),
            (0 <= self.warmup_fraction < 1, "warm-up fraction must lie in [0, 1)"),
            (self.warmup_steps is None or self.warmup_steps >= 0, "warm-up steps must not be negative"),
            (0 <= self.min_lr <= self.lr, "minimum learning rate must lie in [0, lr]"),
            (0 <= self.label_smoothing < 1, "label smoothing must lie in [0, 1)"),
            (0 <= self.distill_weight <= 1, "distillation weight must lie in [0, 1]"),
            (self.temperature > 0, "temperature must be positive"),
            (self.grad_clip is None or self.grad_clip > 0, "gradient clipping norm must be positive"),
            (self.max_steps is None or self.max_steps >= 1, "max steps must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)

    def to_params(self) -> dict[str, Any]:
        """JSON-ready, as artifact headers and checkpoints record it."""
        params = asdict(self)
        params["augmentation"] = self.augmentation.describe()
        return params

    def plan(self, samples: int) -> "TrainPlan":
        steps_per_epoch = samples // self.batch_size
        if steps_per_epoch == 0:
            raise UsageError(f"the training set has {samples} samples, fewer than one batch of {self.batch_size}; "
                             "lower --batch-size")
        total = self.epochs * steps_per_epoch
        if self.max_steps is not None:
            total = min(total, self.max_steps)
        warmup = self.warmup_steps if self.warmup_steps is not None else round(self.warmup_fraction * total)
        return TrainPlan(samples, steps_per_epoch, total, math.ceil(total / steps_per_epoch), min(warmup, total - 1))


@dataclass(frozen=True)
class TrainPlan:
    samples: int
    steps_per_epoch: int
    total_steps: int
    epochs: int
    warmup_steps: int


@dataclass
class TrainResult:
    model: torch.nn.Module                 # the trained, unwrapped module, in eval mode
    plan: TrainPlan
    history: list[dict[str, float]]        # one entry per epoch: epoch, step, loss, accuracy, lr, images_per_second
    images_per_second: float | None        # over the epochs this call ran (None if it ran none)

    @property
    def final_loss(self) -> float:
        return self.history[-1]["loss"]


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices only: timm's grouping plus the model's own exemptions."""
    from timm.optim import param_groups_weight_decay

    exempt = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    return param_groups_weight_decay(model, weight_decay=weight_decay, no_weight_decay_list=exempt)


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, 3, rank]).generate_state(1, np.uint64)[0])


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _summed_over_processes(loss: torch.Tensor, world_size: int) -> float:
    """The step's loss summed over all processes, so that every process takes the same decision on it."""
    total = loss.detach().clone()
    if world_size > 1:
        torch.distributed.all_reduce(total)
    return total.item()


def _require_finite(loss: float, step: int, epoch: int) -> None:
    """Stop a run whose loss is NaN or infinite: every later step, checkpoint and the saved model would be too.

    At the first step no update has happened yet, so a non-finite loss comes from the
    model (or teacher) itself; later it means the optimisation diverged. Only values all
    processes share are checked under torchrun (the first step's all-reduced loss, the
    epoch totals), so that they all stop together instead of waiting on each other.
    """
    if math.isfinite(loss):
        return
    if step == 1:
        raise InvalidArtifactError(f"the training loss is {loss} at the first step, before any update: the model "
                                   "(or the teacher) gives non-finite outputs on this data; no model written")
    raise ParameterError(f"training diverged: the loss became {loss} by step {step} (epoch {epoch + 1}); lower "
                         "{lr} or set {grad_clip}; no model written")


def train(model: torch.nn.Module, dataset: Dataset, preprocessing: Preprocessing, config: TrainConfig, *,
          positions=None, teacher: torch.nn.Module | None = None, start_state: dict | None = None,
          device: str | torch.device = "cpu", num_workers: int = 0, log_every: int = 50,
          on_step: Callable[[int, float | None], None] | None = None,
          on_epoch_end: Callable[[dict], None] | None = None,
          on_resume: Callable[[dict], None] | None = None) -> TrainResult:
    """Train ``model`` in place on ``dataset`` (restricted to ``positions``) and return it.

    ``start_state`` is a state given earlier to ``on_epoch_end``: training continues after
    that epoch. ``on_step(step, loss)`` runs after every optimizer step, with the step's
    loss every ``log_every`` steps (None otherwise, to avoid a device sync per step).
    ``on_epoch_end(state)`` receives ``{"epoch", "step", "model", "optimizer", "scheduler",
    "history"}`` (plain dicts of tensors and numbers; the tensors are live, save or copy
    them before returning); it is where a caller writes checkpoints, and it may raise to
    stop the run. ``on_resume(start_state)`` runs once ``start_state`` has loaded, so a
    caller says "resuming" only of a state that fits.
    """
    from torch.nn.parallel import DistributedDataParallel

    rank, world_size = _world()
    if config.batch_size % world_size:
        raise UsageError(f"batch size {config.batch_size} must be divisible by the {world_size} processes")
    if config.distill_weight > 0 and teacher is None:
        raise UsageError("a distillation weight needs a teacher model")
    data = TorchImageDataset(dataset, preprocessing, positions)
    plan = config.plan(len(data))
    device = torch.device(device)
    model.to(device)
    if teacher is not None:
        teacher.to(device).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=config.lr)
    scheduler = warmup_cosine(optimizer, plan.total_steps, plan.warmup_steps, config.min_lr)
    first_epoch, step, history = 0, 0, []
    if start_state is not None:
        try:
            model.load_state_dict(start_state["model"])
            optimizer.load_state_dict(start_state["optimizer"])
            scheduler.load_state_dict(start_state["scheduler"])
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InvalidArtifactError(f"the checkpoint's optimizer or scheduler state does not fit this run "
                                       f"({reason}); delete it to start afresh") from None
        first_epoch, step, history = int(start_state["epoch"]), int(start_state["step"]), list(start_state["history"])
        if on_resume is not None:
            on_resume(start_state)
    network = model
    if world_size > 1:
        network = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    sampler = GlobalBatchSampler(len(data), config.batch_size, config.seed, rank, world_size)
    loader = torch.utils.data.DataLoader(data, batch_sampler=sampler, num_workers=num_workers,
                                         pin_memory=device.type == "cuda", persistent_workers=num_workers > 0)
    mine = slice(sampler.offset, sampler.offset + sampler.local_batch)
    augmentation = config.augmentation
    black = torch.tensor([-m / s for m, s in zip(preprocessing.mean, preprocessing.std)], device=device)
    distilling = teacher is not None and config.distill_weight > 0
    run_images, run_seconds = 0, 0.0

    for epoch in range(first_epoch, plan.epochs):
        batches = min(plan.steps_per_epoch, plan.total_steps - step)
        sampler.set_epoch(epoch, batches)
        torch.manual_seed(_epoch_seed(config.seed, epoch, rank))
        if augmentation.enabled:
            offsets, flips = augmentation.draw_epoch(config.seed, epoch, batches, config.batch_size)
            offsets = torch.from_numpy(offsets[:, mine]).to(device)
            flips = torch.from_numpy(flips[:, mine]).to(device) if augmentation.hflip else None
        network.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.float64, device=device)
        started = time.perf_counter()
        for index, (images, labels) in enumerate(loader):
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            if augmentation.enabled:
                images = augment_batch(images, offsets[index], None if flips is None else flips[index],
                                       augmentation.crop_padding, black)
            logits = network(images)
            teacher_logits = None
            if distilling:
                with torch.no_grad():
                    teacher_logits = teacher(images)
            loss = training_loss(logits, labels, config.label_smoothing, teacher_logits,
                                 config.distill_weight, config.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            loss_sum += loss.detach()
            correct += (logits.detach().argmax(-1) == labels).sum()
            logged = loss.item() if step % log_every == 0 else None
            if step == 1:
                _require_finite(_summed_over_processes(loss, world_size), step, epoch)
            elif logged is not None and world_size == 1:   # one process: stop at once, not at the epoch's end
                _require_finite(logged, step, epoch)
            if on_step is not None:
                on_step(step, logged)
        totals = torch.stack([loss_sum, correct])
        if world_size > 1:
            torch.distributed.all_reduce(totals)
        loss_total, correct_total = totals.tolist()     # the epoch's one host sync
        seconds = time.perf_counter() - started
        images = batches * config.batch_size
        run_images, run_seconds = run_images + images, run_seconds + seconds
        _require_finite(loss_total, step, epoch)   # before a checkpoint could keep the damage
        history.append({"epoch": epoch + 1, "step": step, "loss": loss_total / (batches * world_size),
                        "accuracy": correct_total / images, "lr": scheduler.get_last_lr()[0],
                        "images_per_second": images / seconds if seconds > 0 else 0.0})
        if on_epoch_end is not None:
            on_epoch_end({"epoch": epoch + 1, "step": step, "model": model.state_dict(),
                          "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                          "history": history})
    model.eval()
    return TrainResult(model, plan, history, run_images / run_seconds if run_seconds > 0 else None)
