"""The crate's layout rules (scripts/layout.py): floors, import cycles, file sizes; and the checker
itself, on a made-up tree that breaks each rule."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "layout.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def test_the_crate_keeps_its_floors_and_sizes():
    r = run()
    assert r.returncode == 0, r.stdout + r.stderr
    # the tree is printed with line counts, and the arrows between top-level modules
    assert "spec/" in r.stdout and "mod.rs" in r.stdout
    assert "rewrite (floor 4) ->" in r.stdout


def write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_a_clean_made_up_tree_passes(tmp_path):
    write(tmp_path, {
        "src/lib.rs": "pub mod spec;\npub mod cpu;\npub mod rewrite;\n",
        "src/spec/mod.rs": "pub mod values;\npub use values::Activation;\n",
        "src/spec/values.rs": "use super::*;\npub enum Activation {}\n",
        "src/cpu/mod.rs": "// crate::rewrite named in a comment is no import\nuse crate::spec::{self, Activation};\n",
        "src/rewrite/mod.rs": "use crate::{cpu, spec::values::Activation};\nfn f() { let s = \"crate::bin\"; }\n",
        # a runtime crate: its own `crate::rewrite` is not the crate's rewriter
        "plugins/rt/src/lib.rs": "mod rewrite;\nuse crate::rewrite::X;\nuse scattermoe::{cpu, spec::Activation};\n",
        "plugins/rt/src/rewrite.rs": "use super::*;\npub struct X;\n",
    })
    r = run("--root", str(tmp_path), "--quiet")
    assert r.returncode == 0, r.stdout


def test_each_broken_rule_is_named(tmp_path):
    write(tmp_path, {
        "src/lib.rs": "pub mod spec;\npub mod cpu;\npub mod rewrite;\npub mod gadgets;\n",
        # the ground reaching up, through a fully qualified call inside a `use` tree's braces
        "src/spec/mod.rs": "use crate::{onnx_free, cpu::kernels};\n",
        # two siblings naming each other
        "src/cpu/mod.rs": "mod a;\nmod b;\n",
        "src/cpu/a.rs": "use super::b::X;\npub struct Y;\n",
        "src/cpu/b.rs": "pub struct X;\nfn f() { let _ = super::a::Y; }\n",
        "src/cpu/kernels.rs": "\n" * 601,
        "src/rewrite/mod.rs": "",
        "src/gadgets/mod.rs": "",
        # a runtime crate reaching up to the rewriter, and one of its files too long
        "plugins/rt/src/lib.rs": "fn f() { scattermoe::rewrite::rewrite(); }\n",
        "plugins/rt/src/big.rs": "\n" * 601,
    })
    r = run("--root", str(tmp_path), "--quiet")
    assert r.returncode == 1
    out = r.stdout
    assert "'spec' (floor 0) imports 'cpu::kernels' (floor 1), a higher floor" in out, out
    assert "import cycle between cpu::a, cpu::b" in out, out
    assert "src/cpu/kernels.rs has 601 lines, over 600" in out, out
    assert "top-level module 'gadgets' has no floor" in out, out
    assert "'plugins/rt' (floor 3) imports 'scattermoe::rewrite' (floor 4), a higher floor" in out, out
    assert "plugins/rt/src/big.rs has 601 lines, over 600" in out, out
