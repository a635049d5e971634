"""Devices from an inbox: whatever GMM files devices uploaded, instead of a list in the recipe.

A cloud that serves devices receives their files by the hundred; a recipe entry
``{inbox: FOLDER_OR_GLOB}`` makes the run take every device that arrived. A folder means
its ``*.safetensors`` files; a glob names the GMM files itself. The device's name is the
file name up to its first dot (``phone-17.gmm.safetensors`` is ``phone-17``), and
``NAME.profile.json`` beside it is the latency profile the device sent, when it sent one.

Uploads are hostile input like any other: a file that is not a valid GMM artifact, a
profile that is not a valid profile, a link or anything else that is not a plain file, a
name that is not a device name or one already taken (ignoring case) is reported and
skipped, and every other device goes on. Checks that need the
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
    """Every entry the inbox names, plain files or not: what is not one is reported, never dropped unsaid."""
    if Path(inbox).is_dir():
        return sorted(Path(inbox).glob("*.safetensors"))
    return sorted(Path(p) for p in glob.glob(inbox) if not p.endswith(PROFILE_SUFFIX))


def _not_a_file(path: Path) -> str | None:
    """Why an upload is not a plain file, or None. A link is refused even when it leads to one:
    it may lead anywhere the run can read, and what it names may change under the run."""
    if path.is_symlink():
        return f"{path}: a symbolic link, not an uploaded file"
    if not path.is_file():
        return f"{path}: not a plain file"
    return None


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
    taken = {device.name.casefold() for device in devices}
    rejected: list[Rejected] = []
    for inbox in recipe.inboxes:
        for gmm in _uploads(inbox):
            name = gmm.name.split(".", 1)[0]
            profile = gmm.with_name(name + PROFILE_SUFFIX)
            profile = profile if profile.exists() or profile.is_symlink() else None
            if not NAME_PATTERN.match(name):
                reason = f"{name!r} is not a device name (letters, digits, '_', '.' or '-')"
            elif name.casefold() in taken:   # devices/Phone and devices/phone are one folder on some file systems
                reason = f"device name '{name}' is already taken (names are compared ignoring case)"
            else:
                reason = _not_a_file(gmm) or (profile and _not_a_file(profile)) or _check(gmm, profile)
            if reason is not None:
                rejected.append(Rejected(str(gmm), reason))
                continue
            taken.add(name.casefold())
            devices.append(Device(name=name, gmm=str(gmm), profile=None if profile is None else str(profile)))
    if not devices:
        raise UsageError(f"recipe: no devices: the inbox {', '.join(recipe.inboxes)} holds no valid device files"
                         + (f" ({len(rejected)} skipped)" if rejected else ""))
    return dataclasses.replace(recipe, devices=tuple(devices), inboxes=()), rejected
