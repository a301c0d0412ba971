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


def _cli_env(lib: Path) -> dict:
    """The proof runs in the ONNX Runtime these tests use, with the plugin they load."""
    import os

    import onnxruntime as ort

    capi = Path(ort.__file__).parent / "capi"
    dylib = sorted(capi.glob("libonnxruntime.so*"))[0]
    return {**os.environ, "ORT_DYLIB_PATH": str(dylib), "SCATTERMOE_ORT_LIB": str(lib)}


def _tied_feeds(case: G.Case, w: dict, tokens: int, rng) -> dict:
    """Router logits with exact ties (three values, so most rows tie among their top k + 1)."""
    fd = G.feeds(case, w, tokens, rng)
    r = rng.integers(0, 3, (tokens, G.E)).astype(np.float32) * 0.5
    return {**fd, "router": G.as_feed(case.dtype, r)}


SIXTEEN = [c for c in CASES if c.dtype != "f32" and left_reason(c) is None]


@pytest.mark.skipif(not CLI.exists(), reason="target/release/scattermoe not built")
@pytest.mark.parametrize("case", SIXTEEN, ids=[c.id for c in SIXTEEN])
def test_16bit_moe_is_proven_and_matches_float64(case: G.Case, lib, rng, tmp_path: Path):
    """float16 and bfloat16 nodes are rewritten with the proof on (against the node computed in
    float32 on the same 16-bit values: ONNX Runtime 1.31 has no bfloat16 kernel and its float16
    one drops the experts' outputs without normalised weights), and the rewritten model matches
    the float64 evaluation of the node's semantics, ties in the router included."""
    w = G.weights(case, rng)
    src = tmp_path / "moe.onnx"
    src.write_bytes(G.build(case, w).SerializeToString())
    out = tmp_path / "moe.rw.onnx"
    r = subprocess.run([str(CLI), "rewrite", "--json", str(src), str(out)], capture_output=True, text=True, env=_cli_env(lib))
    assert r.returncode == 0, r.stderr + r.stdout
    report = json.loads(r.stdout)
    assert len(report["layers"]) == 1, report["rejected"]
    proof = report["layers"][0]["proof"]
    assert proof["float32_reference"] and proof["max_rel_err"] <= G.TOLERANCE[case.dtype], proof
    rewritten = _session(str(out), lib=lib)
    for tokens, make in ((1, None), (7, None), (33, None), (9, "one"), (16, "ties")):
        fd = _tied_feeds(case, w, tokens, rng) if make == "ties" else G.feeds(case, w, tokens, rng, one_expert=make == "one")
        f32 = _feeds_f32(case, fd)
        want = G.reference(case, w, f32["x"], f32["router"])
        got = _run(rewritten, fd)
        err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-6)
        assert err <= G.TOLERANCE[case.dtype], f"{tokens} tokens ({make or 'random'}): relative error {err:.3g}"


TIES = [G.Case("relu", k, norm, dtype=dtype) for k in (1, 2, 3) for norm in (None, 1) for dtype in ("f32", "f16")]


@pytest.mark.skipif(not CLI.exists(), reason="target/release/scattermoe not built")
@pytest.mark.parametrize("case", TIES, ids=[c.id for c in TIES])
def test_router_ties_go_to_the_higher_expert(case: G.Case, lib, rng, tmp_path: Path):
    """ONNX Runtime's CPU kernel gives a tie in the router's probabilities to the higher expert
    number (ONNX's TopK to the lower one): the float64 reference says so where the kernel can be
    trusted, and the rewritten model follows it."""
    w = G.weights(case, rng)
    model = G.build(case, w)
    src = tmp_path / "moe.onnx"
    src.write_bytes(model.SerializeToString())
    out = tmp_path / "moe.rw.onnx"
    r = subprocess.run([str(CLI), "rewrite", "--json", str(src), str(out)], capture_output=True, text=True, env=_cli_env(lib))
    assert r.returncode == 0, r.stderr + r.stdout
    assert len(json.loads(r.stdout)["layers"]) == 1
    kernel, rewritten = _session(model), _session(str(out), lib=lib)
    tol = G.TOLERANCE[case.dtype]
    fd = _tied_feeds(case, w, 40, rng)
    f32 = _feeds_f32(case, fd)
    want = G.reference(case, w, f32["x"], f32["router"])
    scale = np.abs(want).max()
    if case.dtype == "f32" or case.normalize == 1:
        # ONNX Runtime 1.31's float16 kernel returns zeros without normalised weights
        assert np.abs(_run(kernel, fd) - want).max() / scale <= tol, "the reference's tie order is not the kernel's"
    assert np.abs(_run(rewritten, fd) - want).max() / scale <= tol
