"""The package's layers hold: import-linter's contracts (.importlinter) pass, with no import cycle.

README "Architecture" draws the layers; a future import against their direction fails here,
naming the import, instead of waiting for a maintainer to notice.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONTRACT_NAMES = ("layers", "logic-without-files", "no-cycles")
THIN = 80   # lines: a cli/ module longer than this says why in its docstring


def lint_imports(root: Path = ROOT) -> subprocess.CompletedProcess:
    """``lint-imports`` on the package under ``root`` with the contracts in ``root/.importlinter``."""
    executable = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if executable is None:
        pytest.fail("lint-imports is not installed: pip install import-linter (it is in the dev extra)")
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([executable, "--no-cache", str(root / ".importlinter")], cwd=root, env=environment,
                          capture_output=True, text=True)


def test_import_contracts_hold():
    result = lint_imports()
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert f"Contracts: {len(CONTRACT_NAMES)} kept, 0 broken." in result.stdout


@pytest.mark.parametrize("files,broken", [
    ({"selection/_probe.py": "from tapvits_cli.artifacts import plan\n"},
     "tapvits_cli.selection._probe -> tapvits_cli.artifacts.plan"),
    ({"data/_probe.py": "from tapvits_cli.models import units\n"}, "tapvits_cli.data._probe -> tapvits_cli.models.units"),
    ({"artifacts/_probe.py": "from tapvits_cli.gmm import fit\n"}, "tapvits_cli.artifacts._probe -> tapvits_cli.gmm.fit"),
    ({"selection/_probe.py": "from tapvits_cli.gmm import fit\n"}, "tapvits_cli.selection._probe -> tapvits_cli.gmm.fit"),
    ({"payloads/_probe.py": "from tapvits_cli.latency import measure\n"},
     "tapvits_cli.payloads._probe -> tapvits_cli.latency.measure"),
    ({"models/_probe.py": "from tapvits_cli.models import _echo\n", "models/_echo.py": "from tapvits_cli.models import _probe\n"},
     "No cycles are allowed in tapvits_cli.models"),
], ids=["logic-reads-files", "layer-upwards", "artifacts-import-logic", "logic-imports-other-logic",
         "payloads-import-logic", "cycle"])
def test_a_violation_fails(tmp_path, files, broken):
    """The contracts are live: each kind of violation, in a copy of the package, breaks them."""
    shutil.copytree(ROOT / "tapvits_cli", tmp_path / "tapvits_cli", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".importlinter", tmp_path / ".importlinter")
    for name, source in files.items():
        (tmp_path / "tapvits_cli" / name).write_text(source)
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert broken in " ".join(result.stdout.split()), result.stdout[-3000:]


def test_cli_modules_are_thin_or_say_why():
    """cli/ parses, calls a stage and renders; a longer module states its reason ("Longer than …")."""
    for path in sorted((ROOT / "tapvits_cli" / "cli").glob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > THIN:
            assert "longer" in (ast.get_docstring(ast.parse(text)) or "").lower(), \
                f"cli/{path.name} has {len(text.splitlines())} lines and its docstring does not say why"


READER_PREFIXES = ("read_", "load_", "open_", "verify_")


def test_readers_return_one_object_never_a_tuple():
    """artifacts/ readers return one object with named fields (``read_gmm`` → ``Gmm``), never a tuple
    whose order each caller must know (the convention of ``artifacts/__init__.py``)."""
    for path in sorted((ROOT / "tapvits_cli" / "artifacts").glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if not (isinstance(node, ast.FunctionDef) and node.name.startswith(READER_PREFIXES)):
                continue
            where = f"artifacts/{path.name}: {node.name}"
            assert node.returns is None or not ast.unparse(node.returns).lower().startswith("tuple"), where
            assert not any(isinstance(inner, ast.Return) and isinstance(inner.value, ast.Tuple)
                           for inner in ast.walk(node)), where
