"""Every path the docs cite exists (scripts/doc_paths.py), and the checker finds one that does not."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "doc_paths.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_every_cited_path_exists():
    r = run()
    assert r.returncode == 0, r.stdout + r.stderr


def test_missing_and_moved_paths(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "table.md").write_text("x")
    (tmp_path / "docs" / "results.md").write_text("`git show 960fe9a:tests/gpu/NOTES.md`\n")
    (tmp_path / "README.md").write_text(
        "The table: `bench/results/table.md`, raw runs `bench/results/run-{a,b}.log`.\n"
        "History: tests/gpu/NOTES.md. Gone: [the spec](src/spec.rs). Folders in prose: src/, tests/.\n"
    )
    (tmp_path / "bench" / "results" / "run-a.log").write_text("")
    q = '"' * 3  # a docstring of the made-up file, not of this one
    (tmp_path / "bench" / "tool.py").write_text(f'{q}Writes bench/results/table.md.{q}\nOUT = "bench/nowhere.md"  # a string, not a citation\n')
    r = run("--root", str(tmp_path))
    assert r.returncode == 1
    fails = [line for line in r.stdout.splitlines() if line.startswith("FAIL")]
    assert fails == [
        "FAIL: README.md cites bench/results/run-{a,b}.log, which does not exist",
        "FAIL: README.md cites src/spec.rs, which does not exist",
    ], r.stdout
