"""The end-to-end benchmark (bench/e2e) on its --tiny path: ONNX Runtime's CPU execution provider and
torch on the CPU, every width shrunk. The path the device run takes (build, dynamo export with past
keys and values, `scattermoe rewrite`, the cut without MoE, sessions, greedy decode through IO
binding, the check, the report) runs end to end; the check passes on the rewritten model and fails
when that model is spoiled.

The benchmark needs torch, transformers and onnxscript, which the test venv does not carry: it runs
in the Python named by SCATTERMOE_TORCH_PYTHON (or .venv-torch/bin/python in the repository), and is
skipped where there is none. The builder test also needs onnxruntime-genai in that Python.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLI = ROOT / "target" / "release" / "scattermoe"
E2E = ROOT / "bench" / "e2e" / "e2e.py"


PROBE = """
import importlib.util as u
import torch, transformers, onnxscript, onnxruntime
print("genai" if u.find_spec("onnxruntime_genai") else "no-genai")
"""


def _torch_python() -> tuple[str | None, bool]:
    """(the Python the benchmark runs in, whether it has onnxruntime-genai), probed once."""
    for cand in (os.environ.get("SCATTERMOE_TORCH_PYTHON"), str(ROOT / ".venv-torch" / "bin" / "python")):
        if cand and Path(cand).exists():
            p = subprocess.run([cand, "-c", PROBE], capture_output=True, text=True)
            if p.returncode == 0:
                return cand, p.stdout.strip().endswith("genai") and not p.stdout.strip().endswith("no-genai")
    return None, False


PY, GENAI = _torch_python()
pytestmark = [
    pytest.mark.skipif(PY is None, reason="no Python with torch, transformers, onnxscript and onnxruntime (SCATTERMOE_TORCH_PYTHON)"),
    pytest.mark.skipif(not CLI.exists(), reason="target/release/scattermoe not built"),
]


def _run(args, lib, timeout=240):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.run([PY, str(E2E), *args, "--tiny", "--cli", str(CLI), "--lib", str(lib)], capture_output=True, text=True,
                       timeout=timeout, env=env, cwd=ROOT)
    return p.returncode, p.stdout + p.stderr


def _result(work: Path, model: str) -> dict:
    return json.loads((work / "results" / f"{model}-float32.json").read_text())


def test_tiny_mixtral_runs_end_to_end_and_the_check_catches_a_spoiled_rewrite(tmp_path: Path, lib):
    work, out = tmp_path / "work", tmp_path / "out"
    rc, log = _run(["all", "--models", "mixtral", "--columns", "export,rewritten,torch", "--work", str(work), "--out", str(out)], lib)
    assert rc == 0, log[-3000:]
    res = _result(work, "mixtral")
    prep = json.loads((work / "mixtral-float32" / "prepared.json").read_text())
    assert prep["rewrite"]["layers"] == 2 and prep["nomoe"]["cut"] == 2
    for col in ("export", "rewritten", "torch"):
        rec = res["columns"][col]
        assert "error" not in rec, rec
        for phase in ("prefill", "decode_b1", "decode_b4"):
            assert rec[phase]["ms"] > 0, (col, phase)
        assert set(rec["moe_share"]) == {"decode_b1", "decode_b4"}
    check = res["checks"]["rewritten vs export"]
    assert check["ok"] and check["tokens_equal"] and check["steps"] == 33, check
    assert check["max_rel_err"] <= 1e-4
    md = (out / "e2e.md").read_text()
    assert "| export + scattermoe rewrite (ORT + op library) |" in md and "identical at all 33 steps" in md
    assert json.loads((out / "e2e.json").read_text())[0]["model"] == "mixtral"

    # the same prepared model, its rewrite spoiled (first MoE output x 1.01): the run must fail, loudly
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copytree(work / "mixtral-float32", bad / "mixtral-float32", symlinks=True)
    rc, log = _run(["all", "--models", "mixtral", "--columns", "export,rewritten", "--spoil", "1.01", "--work", str(bad),
                    "--out", str(tmp_path / "bad-out")], lib)
    assert rc == 3, log[-3000:]
    assert "CHECK FAILED: mixtral" in log
    check = _result(bad, "mixtral")["checks"]["rewritten vs export"]
    assert not check["ok"] and "logits differ" in check["why"], check


@pytest.mark.skipif(not GENAI, reason="onnxruntime-genai not importable by the torch Python")
def test_tiny_gptoss_builder_columns(tmp_path: Path, lib):
    work, out = tmp_path / "work", tmp_path / "out"
    rc, log = _run(["all", "--models", "gptoss", "--columns", "builder,builder_rw,torch", "--work", str(work), "--out", str(out)], lib,
                   timeout=400)
    assert rc == 0, log[-3000:]
    res = _result(work, "gptoss")
    for col in ("builder", "builder_rw"):
        assert "error" not in res["columns"][col], res["columns"][col]
    assert res["checks"]["builder_rw vs builder"]["ok"], res["checks"]
    # the builder's graph, decoded through GroupQueryAttention's shared buffer, computes the model torch computes
    assert res["checks"]["torch vs builder"]["ok"], res["checks"]
