"""`tapvits finetune` and the training loop: learning, determinism, resuming, distillation, DDP."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tapvits_cli.errors import ExitCode
from tests.conftest import TINY_VIT, TINY_VIT_KWARGS, model_args
from tests.test_protocol_examples import assert_one_line_failure

SCRATCH = ["--model", TINY_VIT, *model_args(TINY_VIT_KWARGS)]
SMALL = "digits:sample=320"          # 10 steps of 32 per epoch


def weights(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def header(path):
    from tapvits_cli.artifacts.kinds import read_artifact

    return read_artifact(path)


def test_trains_from_scratch_to_a_sensible_train_accuracy(tmp_path, tapvits):
    from tapvits_cli.artifacts.model import load_model
    from tapvits_cli.data import open_dataset
    from tapvits_cli.data.preprocess import Preprocessing, iterate_batches

    out = tmp_path / "scratch.safetensors"
    result = tapvits("finetune", *SCRATCH, "--data", "digits", "--epochs", "10", "--batch-size", "32",
                     "--lr", "1e-2", "--label-smoothing", "0", "-o", out)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"{out}\n"
    loaded = load_model(out)
    model, spec, artifact = loaded.module, loaded.spec, loaded.artifact
    dataset = open_dataset("digits")
    preprocessing = Preprocessing.from_dict(spec.preprocessing)
    with torch.no_grad():
        correct = sum(int((model(x).argmax(-1) == y).sum()) for _, x, y in iterate_batches(dataset, preprocessing, 512))
    assert correct / len(dataset) > 0.8            # 0.91 with seed 0; chance is 0.1
    params = artifact.header.params
    assert params["epoch_losses"][-1] < params["epoch_losses"][0] - 1.0
    assert params["world_size"] == 1 and params["seed"] == 0 and params["steps"] == 10 * (1433 // 32)
    assert spec.class_names == tuple(str(d) for d in range(10))
    assert artifact.header.inputs["data"].sha256 == dataset.fingerprint()
    assert not (tmp_path / "scratch.safetensors.ckpt").exists()   # the default checkpoint goes on success


def _train(config, seed_model=0, **kwargs):
    from tapvits_cli.data import open_dataset
    from tapvits_cli.data.preprocess import Preprocessing
    from tapvits_cli.models.factory import create_model
    from tapvits_cli.training.loop import train

    torch.manual_seed(seed_model)
    model = create_model(TINY_VIT, TINY_VIT_KWARGS)
    return train(model, open_dataset(SMALL), Preprocessing.from_model(model), config, **kwargs)


def test_seeded_runs_are_identical_and_the_seed_matters():
    from tapvits_cli.training.augment import Augmentation
    from tapvits_cli.training.loop import TrainConfig

    config = TrainConfig(epochs=2, batch_size=32, lr=1e-3, augmentation=Augmentation(1, True))
    first, second = (_train(config).model.state_dict() for _ in range(2))
    other = _train(TrainConfig(epochs=2, batch_size=32, lr=1e-3, augmentation=Augmentation(1, True), seed=1)).model
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["head.weight"], other.state_dict()["head.weight"])


def test_resume_after_an_interrupted_epoch_gives_the_uninterrupted_weights(tmp_path, tapvits, monkeypatch):
    import tapvits_cli.artifacts.checkpoint as checkpoint

    args = [*SCRATCH, "--data", SMALL, "--epochs", "3", "--batch-size", "32", "--lr", "1e-3", "--augment", "crop"]
    reference = tmp_path / "reference.safetensors"
    assert tapvits("finetune", *args, "--no-checkpoint", "-o", reference).exit_code == 0

    write = checkpoint.write_checkpoint

    def write_then_interrupt(directory, state, run):
        write(directory, state, run)
        if state["epoch"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "write_checkpoint", write_then_interrupt)
    out = tmp_path / "resumed.safetensors"
    interrupted = tapvits("finetune", *args, "-o", out)
    assert interrupted.exit_code == ExitCode.INTERRUPTED and not out.exists()
    assert checkpoint.read_checkpoint(f"{out}.ckpt").state["epoch"] == 1
    monkeypatch.setattr(checkpoint, "write_checkpoint", write)
    resumed = tapvits("finetune", *args, "-o", out)
    assert resumed.exit_code == 0, resumed.stderr
    assert "resuming" in resumed.stderr and "after epoch 1" in resumed.stderr
    expected, got = weights(reference), weights(out)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert header(out).header.params["epoch_losses"] == header(reference).header.params["epoch_losses"]


def test_a_checkpoint_of_another_run_is_refused(tmp_path, tapvits):
    directory = tmp_path / "ckpt"
    args = [*SCRATCH, "--data", SMALL, "--epochs", "1", "--batch-size", "32", "--checkpoint-dir", directory]
    first, again = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert tapvits("finetune", *args, "--resume", "-o", first).exit_code == ExitCode.USAGE   # nothing to resume
    assert tapvits("finetune", *args, "-o", first).exit_code == 0
    assert (directory / "finetune-checkpoint.pt").is_file()                             # kept: it was asked for
    refused = tapvits("finetune", *args, "--lr", "1e-3", "-o", again)
    assert refused.exit_code == ExitCode.INCOMPATIBLE and "params.lr" in refused.stderr
    repeated = tapvits("finetune", *args, "--resume", "-o", again)                      # finished: nothing left to train
    assert repeated.exit_code == 0, repeated.stderr
    assert header(again).metadata["model.weights_sha256"] == header(first).metadata["model.weights_sha256"]


def _nan_weights(state):
    state["model"] = {name: torch.full_like(t, float("nan")) if t.is_floating_point() else t
                      for name, t in state["model"].items()}


@pytest.mark.parametrize("tamper, reason", [
    (_nan_weights, "hold NaN or infinite values"),      # the last epoch's state: written out with no step taken
    (lambda s: s["model"].pop("head.bias"), "names and shapes"),
    (lambda s: s.update(epoch="1"), "epoch and step must be integers"),
    (lambda s: s.update(step=-1), "epoch and step must be integers"),
    (lambda s: s.update(history=5), "history must be a list"),
    (lambda s: s.update(optimizer={"state": 1, "param_groups": "x"}), "optimizer or scheduler state does not fit"),
    (lambda s: s.update(run="[1]"), "its run record is not"),
], ids=["nan-weights", "missing-weight", "epoch-text", "negative-step", "history-number", "optimizer-garbage",
        "run-record-list"])
def test_a_tampered_checkpoint_is_refused_and_writes_no_model(tamper, reason, tmp_path, tapvits):
    """A checkpoint's run identity says nothing of its content: the state itself is checked before use."""
    directory = tmp_path / "ckpt"
    args = [*SCRATCH, "--data", SMALL, "--epochs", "1", "--batch-size", "32", "--checkpoint-dir", directory]
    assert tapvits("finetune", *args, "-o", tmp_path / "first.safetensors").exit_code == 0
    path = directory / "finetune-checkpoint.pt"
    state = torch.load(path, weights_only=True)
    tamper(state)
    torch.save(state, path)
    out = tmp_path / "again.safetensors"
    result = tapvits("finetune", *args, "-o", out)
    assert_one_line_failure(result, ExitCode.INVALID_ARTIFACT)   # no "resuming from …" before the refusal
    assert reason in result.stderr and not out.exists()


def test_distillation_from_a_teacher_changes_the_result(tmp_path, tapvits, tiny_model_file):
    teacher = tmp_path / "teacher.safetensors"
    assert tapvits("finetune", *SCRATCH, "--data", SMALL, "--epochs", "1", "--batch-size", "32", "--seed", "5",
                   "--no-checkpoint", "-o", teacher).exit_code == 0
    args = [tiny_model_file, "--data", SMALL, "--epochs", "1", "--batch-size", "32", "--no-checkpoint"]
    plain, distilled, zero = (tmp_path / f"{n}.safetensors" for n in ("plain", "distilled", "zero"))
    assert tapvits("finetune", *args, "-o", plain).exit_code == 0
    result = tapvits("finetune", *args, "--teacher", teacher, "--distill-temperature", "2", "-o", distilled)
    assert result.exit_code == 0, result.stderr
    assert tapvits("finetune", *args, "--teacher", teacher, "--distill-weight", "0", "-o", zero).exit_code == 0
    sha = {p: header(p).metadata["model.weights_sha256"] for p in (plain, distilled, zero)}
    assert sha[plain] == sha[zero] != sha[distilled]
    made = header(distilled).header
    assert made.params["distill_weight"] == 0.5 and made.params["temperature"] == 2.0
    assert set(made.inputs) == {"data", "model", "teacher"}


def test_distillation_loss_is_scaled_kl():
    from tapvits_cli.training.distill import distillation_loss, training_loss

    student, teacher, labels = torch.randn(6, 4), torch.randn(6, 4), torch.arange(6) % 4
    p, q = torch.softmax(teacher / 3, -1), torch.softmax(student / 3, -1)
    expected = 9 * (p * (p.log() - q.log())).sum(-1).mean()
    assert torch.allclose(distillation_loss(student, teacher, 3.0), expected, atol=1e-6)
    assert distillation_loss(teacher, teacher, 3.0).abs() < 1e-6
    ce = torch.nn.functional.cross_entropy(student, labels)
    assert torch.allclose(training_loss(student, labels, 0.0, teacher, 0.25, 3.0), 0.75 * ce + 0.25 * expected)


def test_training_options_are_honoured(tmp_path, tapvits, tiny_model_file):
    out = tmp_path / "options.safetensors"
    result = tapvits("finetune", tiny_model_file, "--data", SMALL, "--batch-size", "32", "--max-steps", "7",
                     "--label-smoothing", "0.2", "--augment", "crop=2,flip", "--grad-clip", "1.0",
                     "--warmup-steps", "2", "--weight-decay", "0", "--no-checkpoint", "--json", "-o", out)
    assert result.exit_code == 0, result.stderr
    assert result.json()["steps"] == 7
    params = header(out).header.params
    assert params["augmentation"] == ["crop=2", "flip"] and params["label_smoothing"] == 0.2
    assert params["grad_clip"] == 1.0 and params["warmup_steps"] == 2 and params["max_steps"] == 7
    bad = tapvits("finetune", tiny_model_file, "--data", SMALL, "--augment", "rotate", "-o", out)
    assert bad.exit_code == ExitCode.USAGE and "rotate" in bad.stderr


def test_augmentation_translates_and_mirrors_whole_batches():
    from tapvits_cli.training.augment import Augmentation, augment_batch

    images = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    fill = torch.tensor([-1.0])
    centre = torch.tensor([[1, 1], [1, 1]])
    assert torch.equal(augment_batch(images, centre, None, 1, fill), images)
    shifted = augment_batch(images, torch.tensor([[0, 2], [1, 1]]), torch.tensor([False, True]), 1, fill)
    assert torch.equal(shifted[0, 0, 1:, :3], images[0, 0, :3, 1:])       # content moves down and left
    assert (shifted[0, 0, 0] == -1).all() and (shifted[0, 0, :, 3] == -1).all()
    assert torch.equal(shifted[1], images[1].flip(-1))
    assert Augmentation.parse("crop", 28) == Augmentation(3, False)
    offsets, flips = Augmentation(2, True).draw_epoch(0, 0, steps=3, global_batch=8)
    assert offsets.shape == (3, 8, 2) and offsets.min() >= 0 and offsets.max() <= 4 and flips.shape == (3, 8)


def test_schedule_warms_up_linearly_then_decays_to_the_floor():
    from tapvits_cli.training.schedule import WarmupCosine, warmup_cosine

    shape = WarmupCosine(total_steps=10, warmup_steps=4, floor=0.1)
    assert [shape(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert shape(9) > shape(10) == pytest.approx(0.1)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler, rates = warmup_cosine(optimizer, 10, 4, 1e-4), []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[3] == rates[4] == pytest.approx(1e-3) and all(a > b for a, b in zip(rates[4:], rates[5:]))


def test_processes_share_each_global_batch():
    from tapvits_cli.training.sampling import GlobalBatchSampler

    single = list(GlobalBatchSampler(100, 32, seed=4))
    halves = [list(GlobalBatchSampler(100, 32, seed=4, rank=r, world_size=2)) for r in range(2)]
    assert len(single) == 3 and all(len(batch) == 32 for batch in single)
    assert [a + b for a, b in zip(*halves)] == single
    assert len({i for batch in single for i in batch}) == 96


def test_a_pruned_model_keeps_its_widths(tmp_path, tapvits):
    from tapvits_cli.artifacts.model import read_model_spec, write_model
    from tapvits_cli.models.factory import create_model, describe_model
    from tapvits_cli.models.families.vit import set_block_widths
    from tapvits_cli.models.spec import BlockWidths

    model = create_model(TINY_VIT, TINY_VIT_KWARGS)
    widths = (BlockWidths(2, 8, 30), BlockWidths(1, 8, 17))
    set_block_widths(model, widths)
    pruned, out = tmp_path / "pruned.safetensors", tmp_path / "tuned.safetensors"
    write_model(pruned, model, describe_model(model, TINY_VIT, TINY_VIT_KWARGS), {})
    result = tapvits("finetune", pruned, "--data", SMALL, "--epochs", "1", "--batch-size", "32", "-o", out)
    assert result.exit_code == 0, result.stderr
    assert read_model_spec(out).spec.blocks == widths
    assert tapvits("validate", out).exit_code == 0


def test_two_processes_train_the_model_of_one(tmp_path, tapvits):
    """torchrun with 2 gloo processes of 16 images each = 1 process with batches of 32."""
    args = [*SCRATCH, "--data", SMALL, "--epochs", "1", "--batch-size", "32", "--lr", "1e-3", "--no-checkpoint"]
    single, double = tmp_path / "single.safetensors", tmp_path / "double.safetensors"
    assert tapvits("finetune", *args, "-o", single).exit_code == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TAPVITS_DEVICE": "cpu"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "tapvits_cli", "finetune", *map(str, args), "-o", str(double)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout == f"{double}\n"                    # rank 1 prints nothing
    assert header(double).header.params["world_size"] == 2
    initial = tmp_path / "initial.safetensors"
    assert tapvits("create-model", TINY_VIT, *model_args(TINY_VIT_KWARGS), "-o", initial).exit_code == 0
    start, expected, got = weights(initial), weights(single), weights(double)
    moved = max(float((expected[k] - start[k]).abs().max()) for k in start)
    differs = max(float((expected[k] - got[k]).abs().max()) for k in start)
    assert differs < 5e-5 and moved > 100 * differs, (moved, differs)


@pytest.mark.parametrize("args, message", [
    ([], "either a MODEL_FILE"),
    ([*SCRATCH, "--batch-size", "4096"], "fewer than one batch"),
    ([*SCRATCH, "--distill-weight", "0.3"], "needs --teacher"),
    ([*SCRATCH, "--lr", "-1"], "learning rate"),
    ([*SCRATCH, "--no-checkpoint", "--resume"], "excludes"),
])
def test_bad_options_fail_clearly(tmp_path, tapvits, args, message):
    out = tmp_path / "x.safetensors"
    result = tapvits("finetune", *args, "--data", SMALL, "-o", out)
    assert result.exit_code == ExitCode.USAGE and message in result.stderr, result.stderr
    assert result.stdout == "" and not out.exists()


def test_incompatible_models_are_refused(tmp_path, tapvits, tiny_model_file):
    five = tmp_path / "five.safetensors"
    kwargs = {**TINY_VIT_KWARGS, "num_classes": 5}
    assert tapvits("create-model", TINY_VIT, *model_args(kwargs), "-o", five).exit_code == 0
    out = tmp_path / "x.safetensors"
    wrong_teacher = tapvits("finetune", tiny_model_file, "--teacher", five, "--data", SMALL, "-o", out)
    assert wrong_teacher.exit_code == ExitCode.INCOMPATIBLE and "5 classes" in wrong_teacher.stderr
    too_few_classes = tapvits("finetune", five, "--data", SMALL, "-o", out)
    assert too_few_classes.exit_code == ExitCode.INCOMPATIBLE and "label 9" in too_few_classes.stderr
    both = tapvits("finetune", tiny_model_file, *SCRATCH, "--data", SMALL, "-o", out)
    assert both.exit_code == ExitCode.USAGE
    assert not out.exists()


def test_a_finetune_set_restricts_training_to_its_samples_from_the_pool_it_records(tmp_path, tapvits,
                                                                                    tiny_model_file):
    from tapvits_cli.artifacts.metric_set import write_metric_set
    from tapvits_cli.data import open_dataset
    from tapvits_cli.selection import Selection

    pool = open_dataset("digits")
    ids = pool.ids[pool.labels < 3]                          # ascending: the pool's own order
    rows = len(ids)
    selection = Selection(positions=np.arange(rows), log_likelihood=np.linspace(0.0, -1.0, rows),
                          component=np.zeros(rows, np.int32), columns={"ids": ids, "labels": pool.labels[ids]},
                          metric_size=64, finetune_size=rows, strategy="topk")
    metric_set = tmp_path / "device.h5"
    write_metric_set(metric_set, selection, pool.provenance(), "0" * 64, "0" * 64, {})
    args = [tiny_model_file, "--epochs", "1", "--batch-size", "32", "--no-checkpoint"]
    restricted, same_samples = tmp_path / "restricted.safetensors", tmp_path / "indices.safetensors"
    result = tapvits("finetune", *args, "--finetune-set", metric_set, "-o", restricted)   # no --data: its pool
    assert result.exit_code == 0, result.stderr
    indices = ",".join(map(str, ids))
    assert tapvits("finetune", *args, "--data", f"digits:indices={indices}", "-o", same_samples).exit_code == 0
    made = header(restricted).header
    assert made.params["train_samples"] == rows and set(made.inputs) == {"data", "model", "metric-set"}
    assert made.params["data"] == "digits:split=train"
    assert header(restricted).metadata["model.weights_sha256"] == header(same_samples).metadata["model.weights_sha256"]
    old_spelling = tapvits("finetune", *args, "--data", "digits", "--metric-set", metric_set, "-o", restricted)
    assert old_spelling.exit_code == 0 and "--metric-set is deprecated" in old_spelling.stderr
    assert header(restricted).metadata["model.weights_sha256"] == header(same_samples).metadata["model.weights_sha256"]
    other_pool = tapvits("finetune", *args, "--data", "digits:split=test", "--finetune-set", metric_set, "-o", restricted)
    assert other_pool.exit_code == ExitCode.INCOMPATIBLE and "--data digits:split=train" in other_pool.stderr
    no_data = tapvits("finetune", *args, "-o", restricted)
    assert no_data.exit_code == ExitCode.USAGE and "--finetune-set FILE" in no_data.stderr
