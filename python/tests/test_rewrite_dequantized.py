"""Expert weights through DequantizeLinear (scattermoe_testing.qdq): every fixture of models/ and
models/families/, its experts quantized under two schemes each (int8, uint8, int4, uint4, fp8;
per tensor, per channel, per expert, one block a row, blocks along the input or the output; with
and without zero points), is rewritten with the proof on into a node that reads the codes, scales
and zero points, and the rewritten model matches the quantized graph in ONNX Runtime at the
fixture's token counts. The layout is also checked without the quantized kernels: the node's
inputs dequantized by the op's definition (`qdq.op_weight`) and run by the float kernels give the
same outputs. A scale per input channel is left with its reason.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest

from scattermoe_testing import ort_utils, qdq
from test_ort_moe_matrix import _cli_env

ROOT = Path(__file__).resolve().parents[2]
CLI = ROOT / "target" / "release" / "scattermoe"
MODELS = ROOT / "models"

SCHEMES = [qdq.Scheme("int8", "channel"), qdq.Scheme("int4", "block_in", 16), qdq.Scheme("uint8", "row", zero=True),
           qdq.Scheme("fp8", "block_out", 16), qdq.Scheme("uint4", "block_in", 16, True), qdq.Scheme("int8", "tensor"),
           qdq.Scheme("int8", "expert")]

# fixtures whose quantized variant is left, and why (the first two are left unquantized too)
LEFT = {
    "zaya_moe": "without a reduction",
    "jetmoe_moe_ts": "without a reduction",
    "openai_privacy_filter_f16": "gives float16 weights while the experts compute in float32",
}

# (fixture, scheme) pairs left with the reason: DeepSeek-V2's tiny experts are 16 wide, so a block of
# 16 along the output axis is the whole axis, one scale per input channel: a layout the op does not take
LEFT_CASES = {
    ("deepseek_v2_tf4_57", "fp8-block_out16"): "column-wise layout",
}

# fixtures whose quantized graph ONNX Runtime's CPU provider cannot run (JetMoE in float16: no float16
# ScatterND with a reduction), so nothing here can run the original: their rewrite must be proven
# against the region's float32 twin (src/rewrite/prove/twin.rs), and the op's layout is still checked
# against the dequantized float twin of the rewritten model below
TWIN_ONLY = {"jetmoe_moe_f16"}


def _fixtures() -> list[Path]:
    out = []
    for p in sorted(MODELS.glob("*.onnx")) + sorted((MODELS / "families").glob("*.onnx")):
        if p.with_suffix(".npz").exists() and len(onnx.load(str(p), load_external_data=False).graph.input) == 1:
            out.append(p)
    return out


FIXTURES = _fixtures()
CASES = [(p, SCHEMES[(i + j) % len(SCHEMES)]) for i, p in enumerate(FIXTURES) for j in (0, 3)]


def _session(m, lib=None):
    import onnxruntime as ort

    so = ort_utils.session_options(lib)
    # DequantizeLinear-fed MatMuls as written (not fused into MatMulNBits with int8 activations)
    so.add_session_config_entry("session.disable_quant_qdq", "1")
    data = m.SerializeToString() if hasattr(m, "SerializeToString") else m
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def _compare(a, b, z, tol) -> list[float]:
    name = a.get_inputs()[0].name
    errs = []
    for t in (1, 7, 16):
        x = z[f"x_{t}"]
        try:
            want = a.run(None, {name: x})[0].astype(np.float64)
        except Exception:  # noqa: BLE001 - traced loops run only where every expert is hit
            continue
        got = b.run(None, {name: x})[0].astype(np.float64)
        err = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-9))
        assert err <= tol, f"{t} tokens: relative error {err:.3g} > {tol}"
        errs.append(err)
    assert errs, "the quantized graph runs at none of the token counts"
    return errs


@pytest.mark.skipif(not CLI.exists(), reason="target/release/scattermoe not built")
@pytest.mark.parametrize("src,scheme", CASES, ids=[f"{p.stem}-{s.id}" for p, s in CASES])
def test_dequantized_experts_are_rewritten_and_match(src: Path, scheme: qdq.Scheme, lib, tmp_path: Path):
    m = onnx.load(str(src))
    q = qdq.quantize_model(m, scheme)
    qpath, out = tmp_path / "q.onnx", tmp_path / "q.rw.onnx"
    onnx.save(q, str(qpath))
    r = subprocess.run([str(CLI), "rewrite", "--allow-none", "--json", str(qpath), str(out)], capture_output=True, text=True, env=_cli_env(lib))
    assert r.returncode == 0, r.stderr + r.stdout
    report = json.loads(r.stdout)
    why = LEFT.get(src.stem) or LEFT_CASES.get((src.stem, scheme.id))
    if why:
        assert report["layers"] == [] and any(why in x["reason"] for x in report["rejected"]), report
        return
    assert report["layers"], report["rejected"]
    for layer in report["layers"]:
        assert layer["quantized"] and layer["proof"], layer
    tol = 1e-2 if q.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 else 1e-4
    z = np.load(src.with_suffix(".npz"))
    if src.stem in TWIN_ONLY:
        assert all(layer["proof"]["reference"] == "region_float32" for layer in report["layers"]), report["layers"]
        twin = qdq.float_twin(onnx.load(str(out)), q.graph.input[0].type.tensor_type.elem_type)
        _compare(_session(twin, lib), _session(str(out), lib), z, tol)
        return
    original = _session(q)
    _compare(original, _session(str(out), lib), z, tol)
    # the layout by the op's definition, on the float kernels
    twin = qdq.float_twin(onnx.load(str(out)), q.graph.input[0].type.tensor_type.elem_type)
    _compare(original, _session(twin, lib), z, tol)


@pytest.mark.skipif(not CLI.exists(), reason="target/release/scattermoe not built")
@pytest.mark.parametrize("name", ["mixtral_bmm", "dense_einsum", "megablocks"])
def test_a_scale_per_input_channel_is_left(name: str, lib, tmp_path: Path):
    q = qdq.quantize_model(onnx.load(str(MODELS / f"{name}.onnx")), qdq.Scheme("int8", "in_channel", zero=True))
    src = tmp_path / "q.onnx"
    onnx.save(q, str(src))
    r = subprocess.run([str(CLI), "rewrite", "--allow-none", "--json", str(src), str(tmp_path / "o.onnx")], capture_output=True, text=True,
                       env=_cli_env(lib))
    report = json.loads(r.stdout)
    assert report["layers"] == [] and any("one scale per input channel" in x["reason"] for x in report["rejected"]), report


def test_the_weights_found_are_the_experts():
    """qdq.expert_weights finds every fixture's stacked expert weights (and not the router's)."""
    m = onnx.load(str(MODELS / "mixtral.onnx"))
    found = {w.name: (w.out_axis, w.in_axis, w.expert_axis) for w in qdq.expert_weights(m)}
    assert found == {"m.experts.gate_up_proj": (1, 2, 0), "m.experts.down_proj": (1, 2, 0)}
    m = onnx.load(str(MODELS / "megablocks.onnx"))
    assert {w.name: (w.out_axis, w.in_axis, w.expert_axis) for w in qdq.expert_weights(m)} == {"m.w1": (2, 1, 0), "m.w2": (2, 1, 0)}


@pytest.mark.skipif(not CLI.exists(), reason="target/release/scattermoe not built")
@pytest.mark.parametrize("act,code,layout", [("silu", "int4", "block_in"), ("relu", "uint8", "channel"), ("swiglu", "fp8", "tensor"),
                                             ("gelu", "int8", "row"), ("identity", "int8", "channel")])
def test_moe_nodes_with_dequantized_weights(act: str, code: str, layout: str, lib, rng, tmp_path: Path):
    """com.microsoft.MoE reading its fc1/fc2 through DequantizeLinear ([E, rows, in] stacks, the
    op's layout): the node reads the codes; identity (negated weights) is left with the reason."""
    from onnx import helper, numpy_helper

    from scattermoe_testing import ort_moe_graphs as M

    case = M.Case(act, 2, 1, fusion=1 if act == "swiglu" else None)
    w = M.weights(case, rng)
    m = M.build(case, w)
    g = m.graph
    scheme = qdq.Scheme(code, layout, 8)
    nodes = []
    for name in ("fc1", "fc2"):
        t = next(x for x in g.initializer if x.name == name)
        codes, scale, zp, attrs = qdq.quantize_weight(numpy_helper.to_array(t).astype(np.float64), qdq.Weight(name, 1, 2, 0), scheme, rng)
        g.initializer.remove(t)
        g.initializer.extend([numpy_helper.from_array(codes, name + "_q"), numpy_helper.from_array(np.asarray(scale, np.float32), name + "_s")])
        nodes.append(helper.make_node("DequantizeLinear", [name + "_q", name + "_s"], [name], **attrs))
    for n in reversed(nodes):
        g.node.insert(0, n)
    m = qdq.raise_opset(m, 21)
    src, out = tmp_path / "moe.onnx", tmp_path / "moe.rw.onnx"
    onnx.save(m, str(src))
    r = subprocess.run([str(CLI), "rewrite", "--allow-none", "--json", str(src), str(out)], capture_output=True, text=True, env=_cli_env(lib))
    report = json.loads(r.stdout)
    if act == "identity":
        assert report["layers"] == [] and any("through DequantizeLinear" in x["reason"] for x in report["rejected"]), report
        return
    assert len(report["layers"]) == 1 and report["layers"][0]["quantized"], report
    original, rewritten = _session(m), _session(str(out), lib)
    for tokens in (1, 7, 33):
        fd = M.feeds(case, w, tokens, rng)
        want = original.run(None, fd)[0].astype(np.float64)
        got = rewritten.run(None, fd)[0].astype(np.float64)
        # relu over two tiny experts can zero a lone token's output: then the rewrite must be zero too
        scale = np.abs(want).max()
        err = np.abs(got - want).max() / scale if scale > 0 else np.abs(got).max()
        assert err <= 1e-4, f"{tokens} tokens: relative error {err:.3g}"


@pytest.mark.skipif(not CLI.exists(), reason="target/release/scattermoe not built")
def test_the_tensorrt_target_fills_or_names_its_holes(lib, tmp_path: Path):
    """TensorRT's parser cannot pass an absent input before a present one (docs/tensorrt.md): with
    `--target tensorrt` a quantized node gets a capacity no expert reaches, zero biases, and the
    default zero point written out where the next weight has one; it matches the quantized graph
    in ONNX Runtime. A weight in T before a quantized one (no scale to give) is left, saying so."""
    m = onnx.load(str(MODELS / "mixtral.onnx"))
    # w_in int8 symmetric (its zero point is the op's default, so absent), w_out uint8 with one
    q = qdq.quantize_model(m, qdq.Scheme("int8", "channel"), only=["m.experts.gate_up_proj"])
    q = qdq.quantize_model(q, qdq.Scheme("uint8", "channel", zero=True), only=["m.experts.down_proj"])
    src, out = tmp_path / "q.onnx", tmp_path / "q.trt.onnx"
    onnx.save(q, str(src))
    r = subprocess.run([str(CLI), "rewrite", "--target", "tensorrt", "--json", str(src), str(out)], capture_output=True, text=True,
                       env=_cli_env(lib))
    assert r.returncode == 0, r.stderr + r.stdout
    rw = onnx.load(str(out))
    [node] = [n for n in rw.graph.node if n.op_type == "ScatterMoE"]
    assert len(node.input) == 12 and all(node.input), list(node.input)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in rw.graph.initializer}
    assert inits[node.input[7]].item() == np.iinfo(np.int64).max  # capacity: unlimited
    assert {a.name: a.s for a in node.attribute}["capacity_order"] == b"token_major"
    assert not inits[node.input[5]].any() and not inits[node.input[6]].any()  # zero biases
    assert (inits[node.input[10]] == 128).all()  # w_in's default zero point, written out
    assert node.input[11] not in inits or inits[node.input[11]].dtype == np.uint8
    z = np.load(MODELS / "mixtral.npz")
    _compare(_session(q), _session(str(out), lib), z, 1e-4)

    # w_in in T, w_out quantized: w_in_scale cannot be given, so the layer is left with the reason
    q = qdq.quantize_model(m, qdq.Scheme("int8", "channel"), only=["m.experts.down_proj"])
    onnx.save(q, str(src))
    r = subprocess.run([str(CLI), "rewrite", "--target", "tensorrt", "--allow-none", "--json", "--force", str(src), str(out)], capture_output=True,
                       text=True, env=_cli_env(lib))
    report = json.loads(r.stdout)
    assert report["layers"] == [] and any("cannot leave w_in_scale out" in x["reason"] for x in report["rejected"]), report
    # the ONNX Runtime target takes it
    r = subprocess.run([str(CLI), "rewrite", "--json", str(src), str(out), "--force"], capture_output=True, text=True, env=_cli_env(lib))
    assert r.returncode == 0 and json.loads(r.stdout)["layers"], r.stderr


@pytest.mark.skipif(not CLI.exists(), reason="target/release/scattermoe not built")
def test_a_quantized_moa_map_projection_is_left_for_tensorrt(lib, tmp_path: Path):
    """JetMoE's MoA `map` projection has no gates; with a quantized W its scale would follow an
    absent `gates`, which TensorRT's parser cannot pass and no value can stand for (gates change
    what ParallelLinear computes): left for the TensorRT target with that reason, rewritten for
    ONNX Runtime; the rest of the model is rewritten for both and matches the quantized graph."""
    q = qdq.quantize_model(onnx.load(str(MODELS / "families" / "jetmoe_lm.onnx")), qdq.Scheme("int8", "channel"))
    src, out = tmp_path / "q.onnx", tmp_path / "q.trt.onnx"
    onnx.save(q, str(src))
    r = subprocess.run([str(CLI), "rewrite", "--target", "tensorrt", "--json", "--verify", str(src), str(out)], capture_output=True,
                       text=True, env=_cli_env(lib))
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert [x["family"] for x in rep["layers"]].count("jetmoe_moa") == 2 and [x["family"] for x in rep["layers"]].count("jetmoe") == 2, rep["layers"]
    assert sum("cannot leave ParallelLinear's 'gates' out" in x["reason"] for x in rep["rejected"]) == 2, rep["rejected"]
    r = subprocess.run([str(CLI), "rewrite", "--json", "--force", str(src), str(out)], capture_output=True, text=True, env=_cli_env(lib))
    assert r.returncode == 0 and [x["family"] for x in json.loads(r.stdout)["layers"]].count("jetmoe_moa") == 4, r.stderr
