"""com.microsoft.QMoE in every attribute combination (scattermoe_testing.ort_qmoe_graphs): the
float64 reference written from the node's semantics matches ONNX Runtime 1.31's CPU kernel
wherever that kernel computes the dequantized product; each combination the rewriter takes is
rewritten with the proof on and matches the reference (and ONNX Runtime) at 1, 7 and 33 tokens,
with every token on one expert and with tied logits; the others are left with the reason the
rewriter gives, and ONNX Runtime's behaviour behind each reason is asserted, so a runtime that
changes shows up here.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from scattermoe_testing import ort_qmoe_graphs as Q
from test_ort_moe_matrix import _cli_env, _feeds_f32, _run, _session

ROOT = Path(__file__).resolve().parents[2]
CLI = ROOT / "target" / "release" / "scattermoe"
CASES = Q.enumerate_cases()


def ort_refuses(c: Q.Case) -> str | None:
    """Why ONNX Runtime's CPU kernel will not run the case, or None."""
    if c.dtype == "bf16":
        return "Could not find an implementation"
    if c.gated and c.fusion != 1:
        return "only supports interleaved SwiGLU"
    if c.bits_fc is not None and len(set(c.bits_fc)) > 1:
        return "Mixed-width QMoE execution is not yet implemented"
    return None


def int8_activations(c: Q.Case) -> bool:
    """The CPU kernel quantizes the activations to int8 (MLAS's QNBit kernels): 8-bit block-wise
    experts, and 4-bit block-wise ones at accuracy_level 4."""
    return c.block > 0 and (c.bits == 8 or (c.bits == 4 and c.accuracy_level == 4))


def lut_gemm(c: Q.Case) -> bool:
    """2-bit block-wise experts: MLAS's LUT GEMM where the shape allows (activations quantized
    too), the dequantized product elsewhere; the rewriter leaves them all."""
    return c.block > 0 and c.bits == 2


def left_reason(c: Q.Case) -> str | None:
    """The reason the rewriter must give for leaving the case, or None when it rewrites it."""
    if c.sparse_mixer == 1:
        return "use_sparse_mixer = 1"
    if c.quant_type == "fp8":
        return "quant_type 'fp8'"  # the CPU kernel reads the uint8 codes as integers, CUDA as float8
    if c.bits_fc is not None and len(set(c.bits_fc)) > 1:
        return "mixed widths"
    if int8_activations(c):
        return "int8-quantized activations"
    if lut_gemm(c):
        return "LUT GEMM"
    if c.gated and c.fusion != 1:
        return "swiglu_fusion"
    if c.gated and (c.beta or 0.0) == 0.0 and c.limit is not None:
        return "computes clamp(up) without an offset"
    if c.activation == "identity" and c.bits == 2:
        return "identity activation on 2-bit experts"
    return None


def _feeds(c: Q.Case, tokens: int, rng, **kw) -> tuple[dict, dict]:
    fd = Q.feeds(c, tokens, rng, **kw)
    return fd, _feeds_f32(c, fd)


def _reference(c: Q.Case, w: dict, f32: dict) -> np.ndarray:
    return Q.reference(c, w, f32["x"], f32["router"], f32.get("rw"))


def _err(got, want) -> float:
    return float(np.abs(np.asarray(got).reshape(want.shape) - want).max() / max(np.abs(want).max(), 1e-6))


@pytest.mark.skipif(not CLI.exists(), reason="target/release/scattermoe not built")
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_qmoe_combination(case: Q.Case, lib, rng, tmp_path: Path):
    w = Q.weights(case, rng)
    model = Q.build(case, w)
    src = tmp_path / "qmoe.onnx"
    src.write_bytes(model.SerializeToString())
    tol = Q.TOLERANCE[case.dtype]

    # ONNX Runtime's kernel: refuses what the reasons say, and otherwise matches the reference
    # where it computes the dequantized product (and differs where it does not)
    refused = ort_refuses(case)
    kernel = None
    try:
        kernel = _session(model)
        fd, f32 = _feeds(case, 9, rng)
        got = _run(kernel, fd)
        assert refused is None, f"ONNX Runtime now runs a case it refused ({refused}): extend the rewriter's checks"
        if case.gated and case.fusion != 1:
            pass
        else:
            err = _err(got, _reference(case, w, f32))
            if int8_activations(case):
                assert 1e-3 < err < 5e-2, f"int8 activations: error {err:.3g} against the dequantized product"
            elif lut_gemm(case):
                assert err < 5e-2, f"2-bit blocks: error {err:.3g} against the dequantized product"
            else:
                assert err <= tol, f"the reference is not ONNX Runtime's kernel: relative error {err:.3g}"
    except Exception as e:  # noqa: BLE001 - ONNX Runtime's refusal is the fact under test
        if refused is None or isinstance(e, AssertionError):
            raise
        assert refused in str(e), str(e)
        kernel = None

    out = tmp_path / "qmoe.rw.onnx"
    r = subprocess.run([str(CLI), "rewrite", "--allow-none", "--json", str(src), str(out)], capture_output=True, text=True, env=_cli_env(lib))
    assert r.returncode == 0, r.stderr + r.stdout
    report = json.loads(r.stdout)
    reason = left_reason(case)
    if reason is not None:
        assert report["layers"] == [], report
        assert any(reason in x["reason"] for x in report["rejected"]), report["rejected"]
        return
    assert len(report["layers"]) == 1, report["rejected"]
    proof = report["layers"][0]["proof"]
    assert proof["max_rel_err"] <= tol, proof
    # ONNX Runtime has no bfloat16 QMoE kernel: the proof runs the node in float32 on the same values
    assert proof["float32_reference"] == (case.dtype == "bf16"), proof
    rewritten = _session(str(out), lib=lib)
    for tokens, kw in ((1, {}), (7, {}), (33, {}), (9, {"one_expert": True}), (16, {"ties": True})):
        fd, f32 = _feeds(case, tokens, rng, **kw)
        got = _run(rewritten, fd)
        err = _err(got, _reference(case, w, f32))
        assert err <= tol, f"{tokens} tokens {kw}: relative error {err:.3g} against the reference"
        if kernel is not None:
            err = _err(got, _run(kernel, fd).reshape(-1, Q.D))
            assert err <= tol, f"{tokens} tokens {kw}: relative error {err:.3g} against ONNX Runtime's kernel"


def test_the_matrix_covers_what_the_rewriter_takes():
    """Every bit width, block and zero-point choice is among the rewritten cases, in float32 and
    float16, with router weights and biases."""
    taken = [c for c in CASES if left_reason(c) is None and ort_refuses(c) is None]
    assert {(c.bits, c.block > 0, c.zero, c.dtype) for c in taken} >= {(b, blk, z, d) for b, blk in ((4, False), (4, True), (2, False))
                                                                       for z in (False, True) for d in ("f32", "f16")}
    assert any(c.bits == 8 and c.block == 0 and c.zero for c in taken)
    assert any(c.router_weights and c.normalize == 1 for c in taken) and any(c.router_weights and not c.normalize for c in taken)
    assert len(taken) >= 60, len(taken)
