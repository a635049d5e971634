"""Step keys and outcomes: what decides whether a run's step is skipped, copied or run.

A step's key is the SHA-256 of what determines its output: the subcommand, its argument
tokens, the content hash of every input artifact, the fingerprint of every dataset, the
tapvits version and the code fingerprint (the package's sources and the computing
libraries' versions: a fix that leaves the version string alone must not let a result of
the old code pass as current from the cache). A step is skipped when the run directory
records the same key and still holds the file it wrote; else the stage cache may provide
it; else it runs (``schedule`` carries the steps out). State is saved after every step, so an interrupted
run resumes where it stopped (and ``finetune`` itself resumes from its per-epoch checkpoint).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

from tapvits_cli import __version__
from tapvits_cli.artifacts.digests import canonical_sha256
from tapvits_cli.pipeline.steps import DatasetArg, Input, Output, Step


# Distributions whose version can change a stage's numbers (run.md, "Steps and keys").
COMPUTING_LIBRARIES = ("h5py", "numpy", "onnxruntime", "safetensors", "scikit-learn", "timm", "torch")


@functools.cache
def code_fingerprint(package: Path = Path(__file__).resolve().parent.parent) -> str:
    """SHA-256 of the compact JSON of every ``*.py`` source of ``package`` (by path, as SHA-256)
    and the installed version of each computing library (null when absent)."""
    sources = {path.relative_to(package).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
               for path in package.rglob("*.py") if "__pycache__" not in path.parts}
    libraries = {}
    for name in COMPUTING_LIBRARIES:
        try:
            libraries[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            libraries[name] = None
    return canonical_sha256({"libraries": libraries, "sources": sources})


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
    return canonical_sha256({"stage": step.stage, "args": tokens, "tapvits": __version__,
                             "code": code_fingerprint()})
