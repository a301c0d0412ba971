"""The library loads through onnxruntime's SessionOptions.register_custom_ops_library and runs a
model, in this interpreter's onnxruntime (1.31, .venv) and in the oldest one we claim (1.20, run
in a subprocess with .venv-ort120/bin/python; made by scripts/setup-python.sh)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scattermoe_testing import data, graphs, ort_utils, smoke
from scattermoe_testing import reference as R

REPO = Path(__file__).resolve().parents[2]
ORT120_PYTHON = REPO / ".venv-ort120" / "bin" / "python"


def _report(results: dict) -> str:
    return json.dumps(results, indent=1)


def test_register_custom_ops_library_and_run(lib, rng):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.register_custom_ops_library(str(lib))
    T, d, f, E, k = 16, 24, 40, 8, 2
    feeds = data.moe_inputs(rng, T=T, d=d, f=f, E=E, k=k)
    model = graphs.scatter_moe_model(d=d, f=f, E=E, k=k)
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, feeds)
    want, _ = R.scatter_moe(feeds["X"], feeds["routing_weights"], feeds["routing_indices"], feeds["w_in"], feeds["w_out"])
    R.assert_close(y, want, "f32")


def test_smoke_checks_current_ort(lib):
    results = smoke.run_checks(str(lib))
    assert results["ok"], _report(results)


def test_smoke_checks_ort_1_20(lib):
    if not ORT120_PYTHON.exists():
        pytest.fail(f"{ORT120_PYTHON.relative_to(REPO)} is missing: run scripts/setup-python.sh")
    env = {**os.environ, "PYTHONPATH": str(REPO / "python"), "SCATTERMOE_ORT_LIB": str(lib)}
    proc = subprocess.run(
        [str(ORT120_PYTHON), "-m", "scattermoe_testing.smoke", "--lib", str(lib)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"no result from the ORT 1.20 run (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    results = json.loads(lines[-1])
    assert results["onnxruntime"].startswith("1.20."), results["onnxruntime"]
    assert results["ok"] and proc.returncode == 0, _report(results)
