"""timm keyword arguments written as ``KEY=VALUE`` text (``-a`` of create-model and finetune, recipes).

Torch-free, so the command line parses them before any heavy import.
"""

from __future__ import annotations

from tapvits_cli.errors import UsageError


def parse_model_args(pairs: tuple[str, ...]) -> dict:
    """``KEY=VALUE`` pairs to timm keyword arguments; values are YAML scalars/lists (28, 0.1, true, [1,2])."""
    import yaml

    kwargs = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip().isidentifier():
            raise UsageError(f"model argument '{pair}' is not KEY=VALUE")
        try:
            if _has_alias(yaml.compose(raw, Loader=yaml.SafeLoader)):
                raise UsageError(f"model argument '{key.strip()}': YAML anchors and aliases are not accepted")
            kwargs[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except (yaml.YAMLError, RecursionError):
            raise UsageError(f"model argument '{pair[:80]}': value is not a YAML scalar or list") from None
        if not _finite(kwargs[key.strip()]):
            raise UsageError(f"model argument '{pair}': NaN and infinity are not allowed")
    return kwargs


def _has_alias(node) -> bool:
    """Whether a composed YAML value reuses a node (an alias): a keyword argument never needs one, and
    nine levels of ten aliases each expand to 10⁹ values that every later walk would visit."""
    seen, pending = set(), [node]
    while pending:
        current = pending.pop()
        if current is None:
            continue
        if id(current) in seen:
            return True
        seen.add(id(current))
        if isinstance(current.value, list):
            for item in current.value:
                pending.extend(item if isinstance(item, tuple) else (item,))
    return False


def _finite(value) -> bool:
    """No NaN or infinity anywhere in a YAML value (``.nan`` and ``.inf`` are valid YAML floats)."""
    import math

    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_finite(v) for v in value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    return True
