"""The static checks CI runs, so that `pytest` alone is the whole gate."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.parametrize("tool", [["ruff", "check", "."], ["mypy"]], ids=["ruff", "mypy"])
def test_static_check(tool: list[str]) -> None:
    if shutil.which(tool[0]) is None:
        pytest.fail(f"{tool[0]} is not installed; install the dev extra: pip install -e '.[dev]'")
    out = subprocess.run([sys.executable, "-m", *tool], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
