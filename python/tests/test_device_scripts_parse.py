"""The device-side scripts (tests/gpu, bench) run only on the GPU machine, where a syntax error costs a
call of device time: here every one of them must at least parse (Python: compile to bytecode; shell:
`bash -n`)."""

from __future__ import annotations

import py_compile
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DIRS = ("tests/gpu", "bench")
PY = sorted(p for d in DIRS for p in (ROOT / d).rglob("*.py") if "results" not in p.parts)
SH = sorted(p for d in DIRS for p in (ROOT / d).rglob("*.sh") if "results" not in p.parts)


def test_there_are_scripts_to_check():
    assert len(PY) > 10 and len(SH) > 3, (len(PY), len(SH))


@pytest.mark.parametrize("path", PY, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_script_compiles(path: Path, tmp_path: Path):
    py_compile.compile(str(path), cfile=str(tmp_path / "x.pyc"), doraise=True)


@pytest.mark.parametrize("path", SH, ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_script_parses(path: Path):
    r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
