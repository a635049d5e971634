"""``validate``: check artifacts against the protocol, each against its kind's rules (``artifacts.kinds``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tapvits_cli.errors import TapvitsError
from tapvits_cli.stages.common import argument


@dataclass(frozen=True, kw_only=True)
class Options:
    paths: tuple[str, ...] = argument()
    seed: int = 0
    device: str = "auto"


@dataclass(frozen=True)
class Result:
    results: list[dict[str, Any]]     # per path: "path", "valid", then "kind" and "version", or "error"
    failure: TapvitsError | None      # the first file's failure, if any


def run(options: Options) -> Result:
    from tapvits_cli.artifacts.kinds import validate_artifact

    results, failure = [], None
    for path in options.paths:
        try:
            artifact = validate_artifact(path)
        except TapvitsError as exc:
            results.append({"path": path, "valid": False, "error": str(exc)})
            failure = failure or exc
            continue
        header = artifact.header
        results.append({"path": path, "valid": True, "kind": header.kind, "version": header.version})
    return Result(results, failure)
