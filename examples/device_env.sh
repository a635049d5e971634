#!/usr/bin/env bash
# The device's virtual environment: tapvits' device install and nothing else (no extras, so
# no torch and no timm), as `pip install tapvits` leaves it on an edge device.
#   bash examples/device_env.sh            prints the environment's directory, creating it first
#   bash examples/device_env.sh CMD ARGS   runs CMD with the environment's bin/ first on PATH
#
# It lives outside the clone, in ~/.cache/tapvits/device-venv-<hash of pyproject.toml and
# .ci/constraints.txt> (override with TAPVITS_DEVICE_VENV), so every run and every clone
# reuses it while the dependencies are unchanged. The first run installs them from the
# package registry, pinned by .ci/constraints.txt; later runs reinstall only tapvits
# itself, and only when this clone's package sources changed (it is a plain install, not
# an editable one: the device runs a built package). Concurrent callers wait on a lock.
# Exit 75 when the environment cannot be created (no registry, no venv module), so a
# caller can tell a missing environment from a failing command.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
hash="$(cat "$repo/pyproject.toml" "$repo/.ci/constraints.txt" | sha256sum | cut -c1-12)"
venv="${TAPVITS_DEVICE_VENV:-$HOME/.cache/tapvits/device-venv-$hash}"
python="${PYTHON:-python3}"

unavailable() { echo "device_env: $1" >&2; exit 75; }

# A clean copy of what the package is built from: an in-tree build would reuse stale build/ files.
package_copy() {
  local copy
  copy="$(mktemp -d)"
  cp -r "$repo/pyproject.toml" "$repo/README.md" "$repo/tapvits_cli" "$copy/"
  find "$copy" -name __pycache__ -prune -exec rm -rf {} +
  echo "$copy"
}

sources="$(cd "$repo" && find pyproject.toml tapvits_cli -type f ! -path '*__pycache__*' ! -name '*.pyc' -print0 \
  | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)"

mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"
flock 9
if [ ! -f "$venv/.tapvits-installed" ]; then
  echo "device_env: creating $venv (the device install: downloads onnxruntime, scikit-learn, ...)" >&2
  rm -rf "$venv"
  "$python" -m venv "$venv" 2>/dev/null || unavailable "'$python -m venv' failed: install Python's venv module"
  copy="$(package_copy)"
  if ! "$venv/bin/python" -m pip install -q --upgrade -c "$repo/.ci/constraints.txt" pip "setuptools>=68" wheel >&2 \
      || ! "$venv/bin/python" -m pip install -q -c "$repo/.ci/constraints.txt" "$copy" >&2; then
    rm -rf "$venv" "$copy"
    unavailable "pip could not install the device environment (is the package registry reachable?)"
  fi
  rm -rf "$copy"
  echo "$sources" > "$venv/.tapvits-sources"
  touch "$venv/.tapvits-installed"
fi
# Reinstall tapvits (not its dependencies) when this clone's package sources differ from the installed ones.
if [ "$(cat "$venv/.tapvits-sources" 2>/dev/null)" != "$sources" ]; then
  copy="$(package_copy)"
  "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation --force-reinstall "$copy" >&2
  rm -rf "$copy"
  echo "$sources" > "$venv/.tapvits-sources"
fi
flock -u 9
if [ $# -eq 0 ]; then
  echo "$venv"
else
  export PATH="$venv/bin:$PATH" VIRTUAL_ENV="$venv"
  exec "$@"
fi
