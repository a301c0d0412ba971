"""The end-to-end benchmark (bench/e2e) on its --tiny path: ONNX Runtime's CPU execution provider and
torch on the CPU, every width shrunk. The path the device run takes (build, dynamo export with past
keys and values, `scattermoe rewrite`, the cut without MoE, sessions, greedy decode through IO
binding, the checking copies' per-layer readings, the check, the report) runs end to end: in float32
and in float16 the check passes on the rewritten model; it fails, naming the layer, when one expert
of that model is spoiled; a bfloat16 export that ONNX Runtime refuses to load is said to be so, naming
the node, not a crash; and every torch op of the check's trace runs on the stream ORT runs on.

The benchmark needs torch, transformers and onnxscript, which the test venv does not carry: it runs
in the Python named by SCATTERMOE_TORCH_PYTHON (or .venv-torch/bin/python in the repository), and is
skipped where there is none. The builder test also needs onnxruntime-genai: in that Python, or in the
one named by SCATTERMOE_BUILDER_PYTHON (which runs the builder).
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
BUILDER_PY = os.environ.get("SCATTERMOE_BUILDER_PYTHON")
GENAI = GENAI or bool(BUILDER_PY)
pytestmark = [
    pytest.mark.skipif(PY is None, reason="no Python with torch, transformers, onnxscript and onnxruntime (SCATTERMOE_TORCH_PYTHON)"),
    pytest.mark.skipif(not CLI.exists(), reason="target/release/scattermoe not built"),
]


def _run(args, lib, timeout=240):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    extra = ["--builder-python", BUILDER_PY] if BUILDER_PY else []
    p = subprocess.run([PY, str(E2E), *args, "--tiny", "--cli", str(CLI), "--lib", str(lib), *extra], capture_output=True, text=True,
                       timeout=timeout, env=env, cwd=ROOT)
    return p.returncode, p.stdout + p.stderr


def _result(work: Path, model: str, dtype: str = "float32") -> dict:
    return json.loads((work / "results" / f"{model}-{dtype}.json").read_text())


def test_tiny_mixtral_runs_end_to_end_and_the_check_names_the_layer_of_a_spoiled_expert(tmp_path: Path, lib):
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
    chk = res["checks"]["rewritten vs export"]
    assert chk["ok"] and chk["tokens_equal"] and chk["steps"] == 33, chk
    assert chk["max_rel_err"] <= 1e-4 and [x["layer"] for x in chk["layers"]] == [0, 1], chk
    assert all(x["max_rel_err"] <= 1e-4 and x["positions"] == 8 + 32 for x in chk["layers"]), chk
    assert res["checks"]["export vs torch"]["ok"], res["checks"]["export vs torch"]  # the export's fidelity, same weights
    md = (out / "e2e.md").read_text()
    assert "| export + scattermoe rewrite (ORT + op library) |" in md and "| rewritten vs export | ok | identical at all 33 rows" in md
    assert json.loads((out / "e2e.json").read_text())[0]["model"] == "mixtral"

    # the same prepared model, one expert of its rewrite's second MoE layer spoiled (w_out x 1.5): the run fails, naming layer 1
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copytree(work / "mixtral-float32", bad / "mixtral-float32", symlinks=True)
    rc, log = _run(["all", "--models", "mixtral", "--columns", "export,rewritten", "--spoil", "1.5", "--spoil-layer", "1", "--work",
                    str(bad), "--out", str(tmp_path / "bad-out")], lib)
    assert rc == 3, log[-3000:]
    assert "CHECK FAILED: mixtral" in log
    chk = _result(bad, "mixtral")["checks"]["rewritten vs export"]
    assert not chk["ok"] and "MoE layer 1 differs first" in chk["why"], chk
    assert chk["layers"][0]["max_rel_err"] <= 1e-4 < chk["layers"][1]["max_rel_err"], chk


def test_tiny_gptoss_float16_passes(tmp_path: Path, lib):
    work, out = tmp_path / "work", tmp_path / "out"
    rc, log = _run(["all", "--dtype", "fp16", "--models", "gptoss", "--columns", "export,rewritten,torch", "--no-builder", "--work",
                    str(work), "--out", str(out)], lib)
    assert rc == 0, log[-3000:]
    res = _result(work, "gptoss", "float16")
    chk = res["checks"]["rewritten vs export"]
    assert chk["ok"] and chk["tol"] == 2e-2 and chk["max_rel_err"] < 2e-2 and len(chk["layers"]) == 2, chk
    assert res["checks"]["export vs torch"]["max_rel_err"] < 2e-2, res["checks"]["export vs torch"]


def test_tiny_bfloat16_export_is_reported_not_runnable_naming_the_node(tmp_path: Path, lib):
    work, out = tmp_path / "work", tmp_path / "out"
    rc, log = _run(["all", "--dtype", "bf16", "--models", "gptoss", "--columns", "export,rewritten", "--no-builder", "--work", str(work),
                    "--out", str(out)], lib)
    assert rc == 3, log[-3000:]  # nothing was checked: the run says so and fails
    assert "Traceback" not in log, log[-3000:]
    res = _result(work, "gptoss", "bfloat16")
    for col in ("export", "rewritten"):
        why = res["columns"][col]["not_runnable"]
        assert "node 'node_topk__1' (TopK) takes tensor(bfloat16)" in why and "DTYPE=fp16" in why, why
    assert res["checks"]["rewritten vs export"]["not_checked"], res["checks"]
    assert "| rewritten vs export | not checked |" in (out / "e2e.md").read_text()


STREAM_PROBE = r"""
import sys
sys.path.insert(0, "bench/e2e")
import torch
from torch.overrides import TorchFunctionMode
import measure

inside = [False]
outside = []

class Dev:
    kind = "cuda"
    def ctx(self):
        class C:
            def __enter__(s): inside[0] = True
            def __exit__(s, *a): inside[0] = False
        return C()
    def sync(self):
        pass

class Watch(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if not inside[0]:
            outside.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))

class Dec:
    def __init__(s, first):
        s.ids = first.clone()
    def step(s):
        lg = torch.randn(1, 10)
        s.ids.copy_(lg.argmax(-1, keepdim=True))
        return lg

class Col:
    def take_extras(s):
        return []
    def prefill(s, ids):
        return torch.randn(1, 10), None
    def decoder(s, state, first, n):
        return Dec(first)

prompt = torch.zeros(1, 4, dtype=torch.int64)
with Watch():
    measure.greedy_trace(Col(), Dev(), prompt, 5)
    measure.greedy_trace(Col(), Dev(), prompt, 5, force=[1, 2, 3, 4, 5])
print("OUTSIDE", sorted(set(outside)))
"""


def test_every_torch_op_of_the_check_trace_runs_on_the_ort_stream():
    # ORT's run returns before its work is done: a logit read or a token written from another stream than the
    # one ORT runs on sees an earlier step (the first device run's picks were one step behind)
    p = subprocess.run([PY, "-c", STREAM_PROBE], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "OUTSIDE []" in p.stdout, p.stdout


@pytest.mark.skipif(not GENAI, reason="onnxruntime-genai not importable by the torch Python")
def test_tiny_gptoss_builder_columns(tmp_path: Path, lib):
    work, out = tmp_path / "work", tmp_path / "out"
    rc, log = _run(["all", "--models", "gptoss", "--columns", "builder,builder_rw,torch", "--work", str(work), "--out", str(out)], lib,
                   timeout=400)
    assert rc == 0, log[-3000:]
    res = _result(work, "gptoss")
    for col in ("builder", "builder_rw"):
        assert "error" not in res["columns"][col], res["columns"][col]
    chk = res["checks"]["builder_rw vs builder"]
    assert chk["ok"] and chk["steps"] == 33 and len(chk["layers"]) == 2, chk
    # the builder's graph, decoded through GroupQueryAttention's shared buffer, computes the model torch computes
    assert res["checks"]["builder vs torch"]["ok"], res["checks"]
