"""Devices from an inbox: whatever GMM files devices uploaded, instead of a list in the recipe.

A cloud that serves devices receives their files by the hundred; a recipe entry
``{inbox: FOLDER_OR_GLOB}`` makes the run take every device that arrived. A folder means
its ``*.safetensors`` files; a glob names the GMM files itself. The device's name is the
file name up to its first dot (``phone-17.gmm.safetensors`` is ``phone-17``), and
``NAME.profile.json`` beside it is the latency profile the device sent, when it sent one.

Uploads are hostile input like any other: a file that is not a valid GMM artifact, a
profile that is not a valid profile, a name that is not a device name or one already
taken is reported and skipped, and every other device goes on. Checks that need the
run's own artifacts (the extractor a GMM was fitted with) happen in the device's own
steps, where a mismatch fails that device only.
"""

from __future__ import annotations

import dataclasses
import glob
from dataclasses import dataclass
from pathlib import Path

from tapvits_cli.errors import TapvitsError, UsageError
from tapvits_cli.pipeline.recipe import Device, Recipe
from tapvits_cli.vocabulary import NAME_PATTERN

PROFILE_SUFFIX = ".profile.json"


@dataclass(frozen=True)
class Rejected:
    """An upload the run skipped, and why (one line)."""

    file: str
    reason: str


def _uploads(inbox: str) -> list[Path]:
    if Path(inbox).is_dir():
        return sorted(p for p in Path(inbox).glob("*.safetensors") if p.is_file())
    return sorted(Path(p) for p in glob.glob(inbox) if Path(p).is_file() and not p.endswith(PROFILE_SUFFIX))


def _check(gmm: Path, profile: Path | None) -> str | None:
    """Why the device's files cannot be used, or None."""
    from tapvits_cli.artifacts.gmm import read_gmm
    from tapvits_cli.artifacts.profile import read_profile

    for path, read in ((gmm, read_gmm), (profile, read_profile)):
        if path is None:
            continue
        try:
            read(path)
        except TapvitsError as exc:
            return str(exc)
        except OSError as exc:
            return f"{path}: cannot be read ({exc.strerror or exc})"
    return None


def take_inboxes(recipe: Recipe) -> tuple[Recipe, list[Rejected]]:
    """``recipe`` with the valid devices of its inboxes appended to its listed ones, and the uploads skipped."""
    if not recipe.inboxes:
        return recipe, []
    devices = list(recipe.devices)
    taken = {device.name for device in devices}
    rejected: list[Rejected] = []
    for inbox in recipe.inboxes:
        for gmm in _uploads(inbox):
            name = gmm.name.split(".", 1)[0]
            profile = gmm.with_name(name + PROFILE_SUFFIX)
            profile = profile if profile.is_file() else None
            if not NAME_PATTERN.match(name):
                reason = f"{name!r} is not a device name (letters, digits, '_', '.' or '-')"
            elif name in taken:
                reason = f"device name '{name}' is already taken"
            else:
                reason = _check(gmm, profile)
            if reason is not None:
                rejected.append(Rejected(str(gmm), reason))
                continue
            taken.add(name)
            devices.append(Device(name=name, gmm=str(gmm), profile=None if profile is None else str(profile)))
    if not devices:
        raise UsageError(f"recipe: no devices: the inbox {', '.join(recipe.inboxes)} holds no valid device files"
                         + (f" ({len(rejected)} skipped)" if rejected else ""))
    return dataclasses.replace(recipe, devices=tuple(devices), inboxes=()), rejected
