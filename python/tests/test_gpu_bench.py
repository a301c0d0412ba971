"""The GPU benchmark's CPU-side parts (bench/gpu_bench.py, bench/peers): the layers it measures, the
report's derived columns (ratios to the floor, the kernels' per-part breakdown), which rows
--repeat-close times again, the merge of several runs' JSON, and the whole `--dry-run` (ONNX models of
toy layers on ORT's CPU EP, and with torch the device run's own code on the CPU: bench/peers/cpu_smoke.py).

The dry run's torch part runs in the Python named by SCATTERMOE_TORCH_PYTHON (or .venv-torch/bin/python);
without one it runs in this Python and skips the torch side, saying so.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from scattermoe_testing import ort_utils

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

import gpu_bench  # noqa: E402
from peers import breakdown, report  # noqa: E402
from peers.layers import SHAPES  # noqa: E402


def test_layers_of_issue_17():
    ds, oss = SHAPES["deepseek_v3"], SHAPES["gpt_oss"]
    assert ds.dims == (7168, 2048, 256, 8) and not ds.bias and ds.activation == "silu" and ds.glu == "gate_up"
    assert round(ds.expert_bytes() / 1e9, 1) == 22.5  # the issue's 22.5 GB
    assert oss.dims == (2880, 2880, 128, 4) and oss.bias and oss.glu == "interleaved"
    assert oss.scattermoe_attrs() == dict(activation="swiglu_oai", gated=1, glu_layout="interleaved", alpha=1.702, limit=7.0)
    # biases count in the floor's bytes
    assert oss.expert_bytes(1) == (3 * 2880 * 2880 + 2 * 2880 + 2880) * 2
    # every layer over the default threshold binds ScatterMoE's weights as inputs: DeepSeek-V3 only
    assert [n for n, l in SHAPES.items() if l.expert_bytes() > 8 * 2**30] == ["deepseek_v3"]


def _row(**cols):
    return dict(shape="qwen3", tokens=1024, floor=0.5, notes={}, **cols)


@pytest.mark.parametrize("ours, peer, close", [(1.0, 1.04, True), (1.0, 0.96, True), (1.0, 1.06, False), (1.06, 1.0, False)])
def test_close_pairs_within_five_percent_either_side(ours, peer, close):
    r = _row(**{"ours/ORT": ours, "ORT MoE": peer, "ours/ORT+router": 0.1, "kernels": 0.1})
    pairs = report.close_pairs(r)
    # our own other columns (router form, kernels) are never the peer
    assert [(o, p) for o, p, _ in pairs] == ([("ours/ORT", "ORT MoE")] if close else [])


def test_close_pairs_compare_the_fastest_peer_per_timing_kind():
    r = _row(**{"ours/ORT": 1.0, "ORT MoE": 2.0, "grouped_mm": 1.03, "kernels/graph": 0.80, "grouped_mm/graph": 0.90,
                "Triton/graph": 0.81})
    assert [(o, p) for o, p, _ in report.close_pairs(r)] == [("ours/ORT", "grouped_mm"), ("kernels/graph", "Triton/graph")]
    assert report.close_pairs(_row(**{"ours/ORT": 1.0})) == []  # no peer measured: nothing to repeat
    assert {gpu_bench.peer_of(k) for k in ("kernels/graph", "Triton/graph", "ORT MoE")} == {"kernels", "triton", "ortmoe"}


def test_main_table_has_floor_ratios_and_parts():
    r = _row(**{"ours/ORT": 0.75, "kernels/graph": 0.6,
                "kernels_parts": {"routing": 9.04, "G1": 301.4, "G2": 150.6, "comb": 20.2}, "kernels_cfgs": "32x64/skinny"})
    lines = report.table([r]).splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    cells = dict(zip(head, [c.strip() for c in lines[2].strip("|").split("|")]))
    assert cells["ours/ORT / floor"] == "1.50x" and cells["kernels (graph) / floor"] == "1.20x"
    assert cells["routing/G1/G2/comb us"] == "9.0/301/151/20"
    assert cells["G1/G2 kernel"] == "32x64/skinny"
    assert lines[1].count("|") == len(head) + 1
    assert breakdown.cell({"routing": 1.0}) == "-" and report.floor_ratio(_row(), "ours/ORT") == "-"


def test_repeats_table_and_render_merge(tmp_path):
    r = _row(**{"ours/ORT": 1.0, "ORT MoE": 1.02})
    r["close"] = report.close_pairs(r)
    r["repeat"] = {"ours/ORT": 0.98, "ORT MoE": 1.05}
    text = report.repeats_table([r])
    assert "| qwen3 | 1024 | ours/ORT / ORT MoE | 1.000 / 1.020 | 0.980 | 0.980 / 1.050 | 0.933 |" in text
    assert report.repeats_table([_row(**{"ours/ORT": 1.0})]) == ""
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    report.write_json(a, {"device": "X"}, [r, dict(_row(**{"ours/ORT": 2.0}), shape="deepseek_v3", notes={"Triton": "why"})])
    report.write_json(b, {"device": "X"}, [dict(_row(**{"Triton": 3.0}), shape="deepseek_v3")])
    args = gpu_bench.argparse.Namespace(render=[str(a), str(b)], out=str(tmp_path / "out"), name="h100-gpu_bench")
    os.makedirs(args.out)
    assert gpu_bench.render(args) == 0
    rows = json.loads((tmp_path / "out" / "h100-gpu_bench.json").read_text())["rows"]
    assert [x["shape"] for x in rows] == ["qwen3", "deepseek_v3"]  # in the order of SHAPES
    ds = rows[1]
    assert ds["Triton"] == 3.0 and ds["ours/ORT"] == 2.0 and "Triton" not in ds["notes"]  # measured later: no why
    md = (tmp_path / "out" / "h100-gpu_bench.md").read_text()
    assert "## Repeats of the close rows" in md and "0.980 / 1.050" in md


def test_render_repeats_from_a_second_call(tmp_path):
    first = [_row(**{"ours/ORT": 1.0, "ORT MoE": 1.03, "grouped_mm": 2.0}), dict(_row(**{"ours/ORT": 1.0, "ORT MoE": 1.5}), tokens=16)]
    again = [_row(**{"ours/ORT": 0.97, "ORT MoE": 1.01}), dict(_row(**{"ours/ORT": 0.9, "ORT MoE": 1.4}), tokens=16)]
    for name, rows in (("main", first), ("again", again)):
        report.write_json(tmp_path / f"{name}.json", {}, rows)
    args = gpu_bench.argparse.Namespace(render=[str(tmp_path / "main.json")], render_repeats=[str(tmp_path / "again.json")],
                                        out=str(tmp_path), name="t", close=0.05)
    assert gpu_bench.render(args) == 0
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    by_t = {r["tokens"]: r for r in rows}
    assert by_t[1024]["ours/ORT"] == 1.0 and by_t[1024]["repeat"] == {"ours/ORT": 0.97, "ORT MoE": 1.01}  # pass 1 kept
    assert "repeat" not in by_t[16]  # 1.5x apart: not close, not repeated


def _torch_python():
    for cand in (os.environ.get("SCATTERMOE_TORCH_PYTHON"), str(ROOT / ".venv-torch" / "bin" / "python")):
        if cand and Path(cand).exists():
            if subprocess.run([cand, "-c", "import torch, transformers, onnx, onnxruntime"], capture_output=True).returncode == 0:
                return cand
    return None


def test_dry_run(tmp_path):
    lib = ort_utils.library_path()
    if not lib.exists() and os.environ.get("SCATTERMOE_ALLOW_MISSING_LIB") == "1":
        pytest.skip(f"no library at {lib}")
    py = _torch_python() or sys.executable
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    p = subprocess.run([py, str(BENCH / "gpu_bench.py"), "--dry-run", "--out", str(tmp_path), "--lib", str(lib)],
                       capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    fails = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert not fails, "\n".join(fails)
    # the GPT-OSS form of com.microsoft.MoE computes the layer (float32, CPU EP), clamp exercised
    assert any(line.startswith("ok   ortmoe f32 on ORT") for line in out.splitlines())
    assert "the float64 reference clamps" in out
    if py != sys.executable:
        assert "ok   Bench.run on the CPU: 6 rows" in out
    md = (tmp_path / "gpu_bench.md").read_text()
    for shape in SHAPES:
        assert f"| {shape} | 16384 |" in md


def test_vllm_column_on_the_cpu():
    """bench/peers/vllm_check.py: the vLLM column's alignment and whole forward (vLLM's Triton kernel in Triton's
    interpreter) against float64, when a torch Python and vLLM's files (scripts/gpu/vllm-carry.sh) are here."""
    vdir = ROOT / ".carry" / "vllm"
    py = _torch_python()
    if py is None or not (vdir / "vllm").is_dir():
        pytest.skip("needs a torch Python (SCATTERMOE_TORCH_PYTHON) and .carry/vllm (scripts/gpu/vllm-carry.sh)")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONUNBUFFERED="1")
    # Triton 3.6's interpreter converts one-element arrays to scalars, which numpy 2.4 refuses; a numpy
    # below 2.4 installed apart (pip install --target DIR "numpy<2.4") is put first on the path.
    extra = os.environ.get("SCATTERMOE_TRITON_NUMPY")
    if extra:
        env["PYTHONPATH"] = extra + os.pathsep + env.get("PYTHONPATH", "")
    ver = subprocess.run([py, "-c", "import numpy; print(numpy.__version__)"], capture_output=True, text=True, env=env).stdout
    major_minor = re.match(r"(\d+)\.(\d+)", ver.strip())  # none: numpy missing, and the check below says so
    if major_minor and tuple(map(int, major_minor.groups())) >= (2, 4):
        pytest.skip(f"the torch Python has numpy {ver.strip()}: Triton's interpreter needs numpy < 2.4 "
                    "(SCATTERMOE_TRITON_NUMPY: a folder with one, from pip install --target)")
    p = subprocess.run([py, str(BENCH / "peers" / "vllm_check.py"), "--vllm-dir", str(vdir)], capture_output=True,
                       text=True, timeout=1200, env=env, cwd=ROOT)
    out = p.stdout + p.stderr
    assert p.returncode == 0 and "0 failed" in out, out[-4000:]
