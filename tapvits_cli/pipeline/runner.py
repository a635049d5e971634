"""Step keys and outcomes: what decides whether a run's step is skipped, copied or run.

A step's key is the SHA-256 of what determines its output: the subcommand, its argument
tokens, the content hash of every input artifact, the fingerprint of every dataset and
the tapvits version. A step is skipped when the run directory records the same key and
still holds the file it wrote; else the stage cache may provide it; else it runs
(``schedule`` carries the steps out). State is saved after every step, so an interrupted
run resumes where it stopped (and ``finetune`` itself resumes from its per-epoch checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

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
