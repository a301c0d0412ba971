"""The rewriter's output passes onnx's checker and keeps the input's IR version and opsets.

Runs `target/release/scattermoe rewrite` (built by scripts/test.sh) on every fixture in models/.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import onnx
import pytest

ROOT = Path(__file__).resolve().parents[2]
CLI = ROOT / "target" / "release" / "scattermoe"
FIXTURES = sorted((ROOT / "models").glob("*.onnx"))


@pytest.mark.skipif(not CLI.exists(), reason="target/release/scattermoe not built")
@pytest.mark.parametrize("model", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_rewritten_fixture_passes_checker_and_keeps_ir_and_opsets(model: Path, tmp_path: Path):
    out = tmp_path / model.name
    r = subprocess.run([str(CLI), "rewrite", "--no-prove", str(model), str(out), "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert '"layers":[{' in r.stdout, r.stdout
    src, dst = onnx.load(model), onnx.load(out)
    onnx.checker.check_model(dst)
    assert dst.ir_version == src.ir_version
    src_ops = {(o.domain, o.version) for o in src.opset_import}
    dst_ops = {(o.domain, o.version) for o in dst.opset_import}
    assert src_ops <= dst_ops and ("ai.scattermoe", 1) in dst_ops
    assert sum(1 for n in dst.graph.node if n.domain == "ai.scattermoe" and n.op_type == "ScatterMoE") == 1
    # nothing unused is left behind
    used = {i for n in dst.graph.node for i in n.input} | {o.name for o in dst.graph.output}
    assert all(t.name in used for t in dst.graph.initializer)
