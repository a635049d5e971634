"""The README's runnable commands run as written, and the README stands alone.

A ```bash block preceded by a ``<!-- runnable ... -->`` comment line is run with bash
(-e, -u, pipefail) in an empty directory, with this environment's ``tapvits`` first on
the PATH. Only quick blocks on digits are marked; the others need Fashion-MNIST, files
the reader brings (checkpoints) or minutes of training.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
RUNNABLE = re.compile(r"^<!-- runnable\b[^>]*-->\n```bash\n(.*?)^```", re.MULTILINE | re.DOTALL)


def runnable_blocks(text: str) -> list[str]:
    return RUNNABLE.findall(text)


def test_the_marker_finds_only_marked_blocks():
    text = "```bash\nfalse\n```\n<!-- runnable -->\n```bash\necho one\n```\n<!-- runnable: why -->\n```bash\necho two\n```\n"
    assert runnable_blocks(text) == ["echo one\n", "echo two\n"]


@pytest.mark.parametrize("index", range(len(runnable_blocks(README.read_text()))))
def test_runnable_readme_block(index, tmp_path):
    block = runnable_blocks(README.read_text())[index]
    environment = {key: value for key, value in os.environ.items() if not key.startswith("TAPVITS_")}
    environment.update(PATH=os.pathsep.join([str(Path(sys.executable).parent), environment.get("PATH", "")]),
                       OMP_NUM_THREADS="1", TAPVITS_DEVICE="cpu")
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=environment,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"README block {index} failed:\n{block}\n{result.stderr[-3000:]}"


def test_readme_has_a_runnable_block_and_stands_alone():
    text = README.read_text()
    assert runnable_blocks(text), "no README block is marked runnable"
    assert "../shared" not in text and "METHOD.md" not in text
    assert "## How it works" in text
