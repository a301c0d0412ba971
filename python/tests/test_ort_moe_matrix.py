"""com.microsoft.MoE in every attribute combination (scattermoe_testing.ort_moe_graphs): each one
ONNX Runtime's CPU kernel runs is rewritten and matches ONNX Runtime's own output at 1, 7 and 33
tokens (and with every token on one expert), or is left with the reason the rewriter gives for it.

Exceptions, each checked here:
- ONNX Runtime's CPU kernel refuses fc3, bfloat16 and swiglu_fusion other than 1 (asserted, so a
  runtime that starts running them shows up here). bfloat16 graphs are still rewritten; they are
  compared with ONNX Runtime running the same graph in float32 (same rounded weights and inputs).
- ONNX Runtime 1.31's float16 kernel returns zeros when normalize_routing_weights is not 1 (a
  defect of the runtime); there the reference is the graph's float32 twin, as for bfloat16.
"""

from __future__ import annotations

import ctypes
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from scattermoe_testing import ort_moe_graphs as G
from scattermoe_testing import ort_utils

ROOT = Path(__file__).resolve().parents[2]
CLI = ROOT / "target" / "release" / "scattermoe"
CASES = G.enumerate_cases()


def ort_refuses(c: G.Case) -> str | None:
    """Why ONNX Runtime's CPU kernel will not run the case, or None."""
    if c.fc3:
        return "FC3 is not implemented"
    if c.dtype == "bf16":
        return "Could not find an implementation"
    if c.gated and c.fusion != 1:
        return "only supports interleaved SwiGLU"
    return None


def left_reason(c: G.Case) -> str | None:
    """The reason the rewriter must give for leaving the case, or None when it must rewrite it."""
    # in the order the rewriter checks them
    if c.sparse_mixer == 1:
        return "use_sparse_mixer = 1"
    if c.fc3:
        return "fc3"
    if c.gated and c.fusion != 1:
        return "swiglu_fusion"
    if c.gated and (c.beta or 0.0) == 0.0 and c.limit is not None:
        return "computes clamp(up) without an offset"
    return None


def _assert_attributes_carry_values(path: Path):
    """Every int/float/string attribute of every node is written with its value (a zero included):
    ONNX Runtime reads one without it as having no value."""
    import onnx

    field = {onnx.AttributeProto.INT: "i", onnx.AttributeProto.FLOAT: "f", onnx.AttributeProto.STRING: "s"}
    for n in onnx.load(str(path), load_external_data=False).graph.node:
        for a in n.attribute:
            if a.type in field:
                assert a.HasField(field[a.type]), f"{n.op_type} '{n.name}': attribute '{a.name}' has no value"


def _session(model, lib=None):
    return ort_utils.session(model, lib=lib, threads=1)


def _f32_twin(c: G.Case, w: dict) -> tuple:
    t = G.Case(**{**c.__dict__, "dtype": "f32"})
    return t, G.build(t, w)


def _as_f32(y) -> np.ndarray:
    if hasattr(y, "numpy"):
        y = y.numpy()
    y = np.asarray(y)
    if y.dtype == np.uint16:  # bfloat16 bits
        y = (y.astype(np.uint32) << 16).view(np.float32)
    return y.astype(np.float64)


def _ortvalue_f32(y) -> np.ndarray:
    if y.data_type() == "tensor(bfloat16)":
        # numpy has no bfloat16: read the bits from the CPU buffer
        n = int(np.prod(y.shape()))
        bits = np.ctypeslib.as_array((ctypes.c_uint16 * n).from_address(y.data_ptr())).copy()
        return _as_f32(bits.reshape(y.shape()))
    return _as_f32(y.numpy())


def _run(sess, feeds: dict) -> np.ndarray:
    names = [o.name for o in sess.get_outputs()]
    if any(hasattr(v, "data_ptr") for v in feeds.values()):  # OrtValues (bfloat16)
        import onnxruntime as ort

        ins = {k: v if hasattr(v, "data_ptr") else ort.OrtValue.ortvalue_from_numpy(v) for k, v in feeds.items()}
        y = sess.run_with_ort_values(names, ins)[0]
        return _ortvalue_f32(y)
    return _as_f32(sess.run(names, feeds)[0])


def _feeds_f32(c: G.Case, fd: dict) -> dict:
    out = {}
    for k, v in fd.items():
        if hasattr(v, "data_ptr"):
            v = _ortvalue_f32(v)
        out[k] = np.asarray(v, np.float32)
    return out


@pytest.mark.skipif(not CLI.exists(), reason="target/release/scattermoe not built")
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_ort_moe_combination(case: G.Case, lib, rng, tmp_path: Path):
    w = G.weights(case, rng)
    model = G.build(case, w)
    src = tmp_path / "moe.onnx"
    src.write_bytes(model.SerializeToString())

    refused = ort_refuses(case)
    ref_sess = None
    try:
        ref_sess = _session(model)
        _run(ref_sess, G.feeds(case, w, 3, rng))
        assert refused is None, f"ONNX Runtime now runs a case it refused ({refused}): extend the rewriter's checks"
    except Exception as e:  # noqa: BLE001 - ONNX Runtime's refusal is the fact under test
        if refused is None:
            raise
        assert refused in str(e), str(e)
        ref_sess = None

    out = tmp_path / "moe.rw.onnx"
    r = subprocess.run([str(CLI), "rewrite", "--no-prove", "--allow-none", str(src), str(out), "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    reason = left_reason(case)
    if reason is not None:
        assert report["layers"] == [], report
        assert any(reason in x["reason"] for x in report["rejected"]), report["rejected"]
        return
    assert len(report["layers"]) == 1, report["rejected"]
    _assert_attributes_carry_values(out)
    rewritten = _session(str(out), lib=lib)
    twin = None
    if ref_sess is None or case.dtype != "f32":
        _, tm = _f32_twin(case, w)
        twin = _session(tm)
    tol = G.TOLERANCE[case.dtype]
    for tokens, one_expert in ((1, False), (7, False), (33, False), (9, True)):
        fd = G.feeds(case, w, tokens, rng, one_expert=one_expert)
        got = _run(rewritten, fd)
        want = _run(ref_sess, fd) if ref_sess is not None else None
        if want is None or (case.dtype == "f16" and case.normalize != 1):
            # bfloat16 (not run by ONNX Runtime's CPU kernel), or float16 without normalised
            # routing weights, where ONNX Runtime 1.31's kernel drops the experts' outputs
            want = _run(twin, _feeds_f32(case, fd))
        scale = max(np.abs(want).max(), 1e-6)
        err = np.abs(got - want).max() / scale
        assert err <= tol, f"{tokens} tokens{' (one expert)' if one_expert else ''}: relative error {err:.3g} > {tol}"
