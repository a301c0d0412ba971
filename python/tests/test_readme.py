"""The README's snippets are the code that runs: the Rust one is examples/load_plugin.rs (compiled
with the tests) and loads a rewritten model here; the Python one is run by test_wheel.py."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_the_readme_rust_example_is_the_compiled_example():
    blocks = re.findall(r"```rust\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) == 1, blocks
    src = (ROOT / "examples/load_plugin.rs").read_text()
    body = src.split("// README begin\n")[1].split("    // README end")[0]
    lines = [line[4:] if line.startswith("    ") else line for line in body.splitlines()]
    assert blocks[0].strip() == "\n".join(lines).strip()


def test_the_example_loads_a_rewritten_model(tmp_path):
    exe = ROOT / "target/release/examples/load_plugin"
    if not exe.exists():
        pytest.skip("target/release/examples/load_plugin is not built (cargo test --release builds it)")
    out = tmp_path / "m.onnx"
    cli = ROOT / "target/release/scattermoe"
    subprocess.run([str(cli), "rewrite", str(ROOT / "models/mixtral.onnx"), str(out), "--quiet"], check=True)
    run = subprocess.run([str(exe), str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().endswith("1 inputs, 1 outputs"), run.stdout
