"""The registry of artifact kinds: what ``inspect`` and ``validate`` dispatch on.

Each kind module registers a :class:`KindSpec` with its container format, the newest
format version this tapvits writes and reads, a deep validator and a summariser.
Summaries are plain data (figures and tables) so the CLI renders every kind the same
way, as a human table or as JSON.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from tapvits_cli.artifacts.containers import ArtifactFile, open_file
from tapvits_cli.errors import IncompatibleArtifactError, InvalidArtifactError


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Any]]

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "columns": self.columns, "rows": self.rows}


def bar(fraction: float, width: int = 10) -> str:
    """A text bar for a table cell, e.g. 0.7 -> ███████░░░ (inspect shows ratios per layer this way)."""
    filled = int(round(max(0.0, min(1.0, fraction)) * width))
    return "█" * filled + "░" * (width - filled)


@dataclass
class Summary:
    figures: dict[str, Any] = field(default_factory=dict)
    tables: list[Table] = field(default_factory=list)


@dataclass(frozen=True)
class KindSpec:
    name: str
    format: str
    version: int
    validate: Callable[[ArtifactFile], None]
    summarize: Callable[[ArtifactFile], Summary]
    description: str


_REGISTRY: dict[str, KindSpec] = {}
# Modules that register a kind on import; each stage issue adds its kinds here.
_KIND_MODULES = (
    "tapvits_cli.artifacts.model",
    "tapvits_cli.artifacts.features",
    "tapvits_cli.artifacts.gmm",
    "tapvits_cli.artifacts.metric_set",
    "tapvits_cli.artifacts.scores",
    "tapvits_cli.artifacts.plan",
    "tapvits_cli.artifacts.report",
    "tapvits_cli.artifacts.profile",
)


def register(spec: KindSpec) -> KindSpec:
    _REGISTRY[spec.name] = spec
    return spec


def all_kinds() -> dict[str, KindSpec]:
    for module in _KIND_MODULES:
        importlib.import_module(module)
    return dict(_REGISTRY)


def read_artifact(path: str | os.PathLike, expect: str | Sequence[str] | None = None) -> ArtifactFile:
    """Open any artifact and check kind, container and version before anything is loaded.

    ``expect`` restricts the accepted kinds (a command given the wrong artifact fails
    with the "incompatible artifact" exit code, naming both kinds).
    """
    artifact = open_file(path)
    kinds = all_kinds()
    kind = artifact.header.kind
    if kind not in kinds:
        raise InvalidArtifactError(f"{path}: unknown artifact kind '{kind}'; known kinds: {', '.join(sorted(kinds))}")
    spec = kinds[kind]
    if artifact.format != spec.format:
        raise InvalidArtifactError(f"{path}: a {kind} artifact must be {spec.format}, this file is {artifact.format}")
    artifact.header.check_readable(spec.version, str(path))
    wanted = (expect,) if isinstance(expect, str) else tuple(expect or ())
    if wanted and kind not in wanted:
        raise IncompatibleArtifactError(f"{path}: expected a {' or '.join(wanted)} artifact, got a {kind} artifact")
    return artifact


def validate_artifact(path: str | os.PathLike) -> ArtifactFile:
    """Every check the protocol defines for the file's kind; raises on the first failure."""
    artifact = read_artifact(path)
    all_kinds()[artifact.header.kind].validate(artifact)
    return artifact


def summarize_artifact(path: str | os.PathLike) -> tuple[ArtifactFile, Summary]:
    artifact = read_artifact(path)
    return artifact, all_kinds()[artifact.header.kind].summarize(artifact)
