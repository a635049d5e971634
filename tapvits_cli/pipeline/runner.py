"""Carry out a run's steps, skipping those whose inputs and parameters are unchanged.

A step's key is the SHA-256 of what determines its output: the subcommand, its argument
tokens, the content hash of every input artifact, the fingerprint of every dataset and
the tapvits version. A step is skipped when the run directory records the same key and
still holds the file it wrote; else the stage cache may provide it; else it runs. State
is saved after every step, so an interrupted run resumes where it stopped (and
``finetune`` itself resumes from its per-epoch checkpoint).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

from tapvits_cli import __version__
from tapvits_cli.artifacts.digests import canonical_sha256
from tapvits_cli.pipeline.steps import DatasetArg, Input, Output, Step


@dataclass(frozen=True)
class StepOutcome:
    step: Step
    source: str          # "ran", "skipped" (unchanged) or "cache"
    seconds: float       # time the step took when it ran: now, in an earlier run, or in the run that cached it


def step_key(step: Step, input_sha256: Callable[[Input], str], dataset_fingerprint: Callable[[str], str]) -> str:
    tokens = []
    for token in step.args:
        if isinstance(token, Input):
            tokens.append({"artifact": input_sha256(token)})
        elif isinstance(token, Output):
            tokens.append("<output>")
        elif isinstance(token, DatasetArg):
            tokens.append({"dataset": dataset_fingerprint(token.reference)})
        else:
            tokens.append(token)
    return canonical_sha256({"stage": step.stage, "args": tokens, "tapvits": __version__})


def execute(steps: Sequence[Step], run_directory, invoke: Callable[[Step], None],
            dataset_fingerprint: Callable[[str], str], force: bool = False,
            on_event: Callable[[str, Step, StepOutcome | None], None] = lambda event, step, outcome: None,
            ) -> list[StepOutcome]:
    """Run ``steps`` in order through ``invoke``; ``on_event`` hears "start" and "done" for each."""

    def input_sha256(token: Input) -> str:
        return run_directory.sha256(token.path if token.external else run_directory.path(token.path))

    outcomes = []
    for step in steps:
        key = step_key(step, input_sha256, dataset_fingerprint)
        if not force and run_directory.finished(step.id, step.output, key):
            outcome = StepOutcome(step, "skipped", run_directory.seconds(step.id) or 0.0)
        elif not force and (cached_seconds := run_directory.restore_from_cache(key, step.output)) is not None:
            run_directory.record(step.id, step.output, key, cached_seconds, "cache")
            outcome = StepOutcome(step, "cache", cached_seconds)
        else:
            run_directory.forget(step.id)
            on_event("start", step, None)
            started = time.perf_counter()
            invoke(step)
            seconds = time.perf_counter() - started
            run_directory.record(step.id, step.output, key, seconds, "ran")
            run_directory.store_in_cache(key, step.output, seconds)
            outcome = StepOutcome(step, "ran", seconds)
        outcomes.append(outcome)
        on_event("done", step, outcome)
    return outcomes
