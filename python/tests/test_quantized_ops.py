"""Quantized expert weights through ONNX Runtime's CPU execution provider (docs/op-spec.md,
"Quantized expert weights"): ScatterMoE and ParallelLinear nodes with fp8 / 8-bit / 4-bit weights
against the float64 numpy reference of the spec's formula, and the documented errors for bad
inputs (at session creation for static shapes, at run time otherwise), never a crash."""

import numpy as np
import pytest

from scattermoe_testing import data, ort_utils
from scattermoe_testing import quant as Q
from scattermoe_testing import reference as R

# (format, block, scale in float32?, zero point?): the forms the tests run
FORMS = {
    "fp8_channel_f32scale": ("fp8", None, True, False),
    "fp8_128x128_tscale": ("fp8", (128, 128), False, False),
    "int8_group32_zp": ("int8", (1, 32), True, True),
    "int8_channel": ("int8", None, False, False),
    "int4_group32_zp": ("int4", (1, 32), True, True),
    "int4_group64_tscale": ("int4", (1, 64), False, False),
    "int4_2x8_zp": ("int4", (2, 8), False, True),
    "int4_channel_tscale": ("int4", None, False, False),
}


def qweight(rng, form, E, out, inn, dtype):
    fmt, block, scale_f32, zp = FORMS[form]
    return Q.random_weight(rng, fmt, block, E, out, inn, 1.0 / np.sqrt(inn), "f32" if scale_f32 else dtype, zp)


def run_moe(lib, rng, dtype, w_in, w_out, *, T=9, d=45, f=37, E=5, k=2, routing="empty_expert", attrs=None, bias=True):
    """Builds and runs one ScatterMoE node; returns (Y, the float64 reference). The default
    routing leaves an expert without tokens."""
    n = 2 * f
    feeds = data.moe_inputs(rng, T=T, d=d, f=f, E=E, k=k, b_in=bias, b_out=bias, pattern=routing)
    weights, wants = {}, {}
    for port, w, shape in (("w_in", w_in, (E, n, d)), ("w_out", w_out, (E, d, f))):
        if w is None:  # in T
            weights[port] = feeds[port]
            wants[port] = R.round_to(feeds[port], dtype)
        else:
            weights[port] = w
            wants[port] = Q.dequantize(w[1] if isinstance(w, tuple) else w)
            assert wants[port].shape == shape
    attrs = {**Q.quant_attrs(w_in, w_out), **(attrs or {})}
    floats = [("X", None), ("routing_weights", None)] + ([("b_in", None), ("b_out", None)] if bias else [])
    model = Q.one_node_model("ScatterMoE", floats, weights, dtype, attrs, Q.MOE_PORTS)
    run_feeds = {nm: feeds[nm] for nm in ("X", "routing_weights", "routing_indices", "b_in", "b_out") if nm in feeds}
    for port, w in weights.items():
        if isinstance(w, tuple):  # graph inputs
            run_feeds[port] = w[1].codes
            run_feeds[port + "_scale"] = w[1].scale.astype(np.float32 if w[1].scale_dtype == "f32" else np.float16)
            if w[1].zero_point is not None:
                run_feeds[port + "_zero_point"] = w[1].zero_point
    sess = ort_utils.session(model, lib)
    (y,) = sess.run(None, run_feeds)
    r = {nm: R.round_to(v, dtype) for nm, v in feeds.items() if v.dtype == np.float32}
    ref_attrs = {a: v for a, v in (attrs or {}).items() if a in ("activation", "gated", "glu_layout")}
    want, _ = R.scatter_moe(r["X"], r["routing_weights"], feeds["routing_indices"], wants["w_in"], wants["w_out"],
                            r.get("b_in"), r.get("b_out"), **ref_attrs)
    return y, want


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("form", list(FORMS))
def test_scatter_moe_quantized(lib, rng, dtype, form):
    E, d, f = 5, 45, 37  # d odd: a 4-bit w_in has a padding nibble a row; every group partial at the end
    if FORMS[form][1] == (128, 128):
        d, f = 150, 136  # 2-D blocks with partial blocks on both sides
    w_in = qweight(rng, form, E, 2 * f, d, dtype)
    w_out = qweight(rng, form, E, d, f, dtype)
    y, want = run_moe(lib, rng, dtype, w_in, w_out, d=d, f=f, E=E)
    R.assert_close(y, want, dtype, f"ScatterMoE {form} {dtype}")


@pytest.mark.parametrize("routing", ["one_expert", "single"])
def test_scatter_moe_quantized_awkward_routings(lib, rng, routing):
    """All tokens on one expert (the others have none); one token."""
    T = 1 if routing == "single" else 16
    w_in = qweight(rng, "int4_group32_zp", 6, 48, 33, "f32")
    w_out = qweight(rng, "fp8_channel_f32scale", 6, 33, 24, "f32")
    y, want = run_moe(lib, rng, "f32", w_in, w_out, T=T, d=33, f=24, E=6, routing="one_expert" if routing == "one_expert" else "topk")
    R.assert_close(y, want, "f32", routing)


def test_one_projection_quantized(lib, rng):
    for dtype in ("f32", "bf16"):
        w = qweight(rng, "int4_group32_zp", 4, 74, 45, dtype)
        y, want = run_moe(lib, rng, dtype, w, None, E=4)
        R.assert_close(y, want, dtype, f"w_in quantized, w_out in T ({dtype})")
        w = qweight(rng, "fp8_128x128_tscale", 4, 45, 37, dtype)
        y, want = run_moe(lib, rng, dtype, None, w, E=4)
        R.assert_close(y, want, dtype, f"w_in in T, w_out quantized ({dtype})")


def test_quantized_weights_as_graph_inputs(lib, rng):
    """Weights that are not constant initializers (read as given on every run)."""
    w_in = qweight(rng, "int4_group32_zp", 5, 74, 45, "f32")
    w_out = qweight(rng, "int4_channel_tscale", 5, 45, 37, "f16")
    y, want = run_moe(lib, rng, "f16", ("input", w_in), ("input", w_out))
    R.assert_close(y, want, "f16", "graph inputs")


def test_activations_and_layouts(lib, rng):
    for attrs in ({"activation": "gelu", "gated": 0}, {"glu_layout": "interleaved"}, {"glu_layout": "up_gate", "activation": "relu2"}):
        gated = attrs.get("gated", 1)
        f = 37
        n = 2 * f if gated else f
        w_in = qweight(rng, "int4_2x8_zp", 5, n, 45, "f32")
        w_out = qweight(rng, "int4_2x8_zp", 5, 45, f, "f32")  # one weight_bits and block_size a node
        feeds_attrs = dict(attrs)
        y, want = run_moe_gated(lib, rng, w_in, w_out, feeds_attrs, gated)
        R.assert_close(y, want, "f32", str(attrs))


def run_moe_gated(lib, rng, w_in, w_out, attrs, gated):
    if gated:
        return run_moe(lib, rng, "f32", w_in, w_out, attrs=attrs)
    # not gated: w_in is [E, f, d]
    return run_moe_plain(lib, rng, w_in, w_out, attrs)


def run_moe_plain(lib, rng, w_in, w_out, attrs):
    T, d, f, E, k = 9, 45, 37, 5, 2
    feeds = data.moe_inputs(rng, T=T, d=d, f=f, E=E, k=k, gated=0)
    attrs = {**Q.quant_attrs(w_in, w_out), **attrs}
    model = Q.one_node_model("ScatterMoE", [("X", None), ("routing_weights", None)], {"w_in": w_in, "w_out": w_out}, "f32", attrs,
                             Q.MOE_PORTS)
    (y,) = ort_utils.session(model, lib).run(None, {n: feeds[n] for n in ("X", "routing_weights", "routing_indices")})
    want, _ = R.scatter_moe(feeds["X"], feeds["routing_weights"], feeds["routing_indices"], Q.dequantize(w_in), Q.dequantize(w_out),
                            activation=attrs.get("activation", "silu"), gated=0)
    return y, want


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("form", ["int4_group32_zp", "fp8_channel_f32scale", "int8_group32_zp"])
@pytest.mark.parametrize("case", ["scattered", "grouped_out", "grouped_in", "gates", "grouped_in_gates"])
def test_parallel_linear_quantized(lib, rng, dtype, form, case):
    T, k, E, d_in, d_out = 11, 2, 4, 45, 29
    grouped_in = int(case.startswith("grouped_in"))
    grouped_out = int(case == "grouped_out")
    gates = case.endswith("gates")
    rows = T * k if grouped_in else T
    X = rng.standard_normal((rows, d_in)).astype(np.float32)
    ri = data.routing(rng, T, E, k, "empty_expert")
    b = rng.standard_normal((E, d_out)).astype(np.float32) * 0.1
    g = rng.uniform(0.1, 1.0, (T, k)).astype(np.float32)
    w = qweight(rng, form, E, d_out, d_in, dtype)
    floats = [("X", None), ("b", None)] + ([("gates", None)] if gates else [])
    attrs = {**Q.quant_attrs(w), "grouped_in": grouped_in, "grouped_out": grouped_out}
    model = Q.one_node_model("ParallelLinear", floats, {"W": w}, dtype, attrs, Q.LINEAR_PORTS)
    run_feeds = {"X": X, "routing_indices": ri, "b": b}
    if gates:
        run_feeds["gates"] = g
    (y,) = ort_utils.session(model, lib).run(None, run_feeds)
    rd = lambda v: R.round_to(v, dtype)  # noqa: E731
    want = R.parallel_linear(rd(X), ri, Q.dequantize(w), rd(b), rd(g) if gates else None, grouped_in=grouped_in, grouped_out=grouped_out)
    R.assert_close(y, want, dtype, f"ParallelLinear {form} {case} {dtype}")


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


def moe_error(lib, weights, attrs=None, feeds=None, extra_inits=(), rename=None):
    """The error a ScatterMoE node with these weights raises, at session creation or at run time.
    `rename` rewires node inputs (port name -> tensor name)."""
    model = Q.one_node_model("ScatterMoE", [("X", [4, 24]), ("routing_weights", [4, 2])], weights, "f32", attrs or {}, Q.MOE_PORTS,
                             extra_inits)
    for old, new in (rename or {}).items():
        node = model.graph.node[-1]
        node.input[list(node.input).index(old)] = new
    with pytest.raises(Exception) as e:
        sess = ort_utils.session(model, lib)
        rng = np.random.default_rng(0)
        base = {"X": rng.standard_normal((4, 24)).astype(np.float32), "routing_weights": np.ones((4, 2), np.float32),
                "routing_indices": np.array([[0, 1], [2, 3], [4, 5], [6, 7]], np.int64)}
        sess.run(None, {**base, **(feeds or {})})
    return str(e.value)


def w_plain(shape):
    return np.full(shape, 0.01, np.float32)


def test_a_quantized_weight_needs_its_scale(lib, rng):
    E, d, f = 8, 24, 20
    fp8 = Q.random_weight(rng, "fp8", None, E, 2 * f, d, 0.1)
    # the codes as an initializer, no scale input
    msg = moe_error(lib, {"w_in": w_plain((E, 2 * f, d)), "w_out": w_plain((E, d, f))}, extra_inits=[Q._raw_tensor("w_in_codes", Q.FP8, fp8.codes)],
                    rename={"w_in": "w_in_codes"})
    assert "ScatterMoE: input 'w_in' is float8e4m3fn and needs input 'w_in_scale'" in msg, msg


def test_documented_errors(lib, rng):
    E, d, f = 8, 24, 20
    wo = w_plain((E, d, f))

    def qw(fmt, block=None, zp=False, out=2 * f, inn=d, scale_dtype="f32"):
        return Q.random_weight(rng, fmt, block, E, out, inn, 0.1, scale_dtype, zp)

    # a zero point for an fp8 weight
    w = qw("fp8")
    w.zero_point = np.zeros(w.scale.shape, np.uint8)
    assert "input 'w_in_zero_point' is given but input 'w_in' is float8e4m3fn, which has no zero point" in moe_error(lib, {"w_in": w, "w_out": wo})
    # weight_bits other than 4 or 8
    assert "ScatterMoE: attribute 'weight_bits' must be 4 or 8, got 3" in moe_error(lib, {"w_in": qw("int8"), "w_out": wo}, {"weight_bits": 3})
    # a rank-3 scale without block_size
    msg = moe_error(lib, {"w_in": qw("int8", (1, 8)), "w_out": wo})
    assert "input 'w_in_scale' has rank 3 (block scales) and needs attribute 'block_size'" in msg, msg
    # block_size not two positive integers
    msg = moe_error(lib, {"w_in": qw("int8", (1, 8)), "w_out": wo}, {"block_size": [1, 8, 1]})
    assert "attribute 'block_size' must be two positive integers [block_out, block_in], got [1, 8, 1]" in msg, msg
    # a scale of the wrong shape for its block size
    msg = moe_error(lib, {"w_in": qw("int8", (1, 8)), "w_out": wo}, {"block_size": [1, 16]})
    assert "input 'w_in_scale' [8, 40, 3] must be [E, ceil(n / 1), ceil(d / 16)] = [8, 40, 2] (block_size [1, 16])" in msg, msg
    # a 4-bit weight whose last dimension is not ceil(in / 2)
    w = qw("int4")
    w.codes = np.zeros((E, 2 * f, d), np.uint8)
    msg = moe_error(lib, {"w_in": w, "w_out": wo}, {"weight_bits": 4})
    assert "input 'w_in' [8, 40, 24] is 4-bit (weight_bits = 4): its last dimension must be ceil(d / 2) = 12 for d = 24, got 24" in msg, msg
    # a scale whose type is neither T nor float32
    msg = moe_error(lib, {"w_in": qw("fp8", scale_dtype="f16"), "w_out": wo})
    assert "input 'w_in_scale' has element type float16; a scale must be float32 or T (float32" in msg, msg
    # a zero point of another shape than its scale
    w = qw("int8", zp=True)
    w.zero_point = np.zeros((E, 2 * f, 1), np.uint8)
    msg = moe_error(lib, {"w_in": w, "w_out": wo})
    assert "input 'w_in_zero_point' [8, 40, 1] must have the shape of 'w_in_scale' [8, 40]" in msg, msg
    # a weight of another element type (int8)
    msg = moe_error(lib, {"w_in": w_plain((E, 2 * f, d)), "w_out": wo}, extra_inits=[Q._raw_tensor("w8", 3, np.zeros((E, 2 * f, d), np.int8))],
                    rename={"w_in": "w8"})
    assert "ScatterMoE: input 'w_in' has element type int8; supported: float32, float16, bfloat16 (T), float8e4m3fn, uint8 (quantized)" in msg, msg
    # a zero point that is not uint8
    w = qw("int8", zp=True)
    msg = moe_error(lib, {"w_in": w, "w_out": wo}, extra_inits=[Q._raw_tensor("z8", 3, w.zero_point.astype(np.int8))],
                    rename={"w_in_zero_point": "z8"})
    assert "input 'w_in_zero_point' has element type int8; it must be uint8" in msg, msg


def test_scale_for_a_weight_in_t(lib):
    E, d, f = 8, 24, 20
    from onnx import TensorProto, helper

    from scattermoe_testing import graphs
    inits = [Q.float_tensor("w_in", np.full((E, 2 * f, d), 0.01), "f32"), Q.float_tensor("w_out", np.full((E, d, f), 0.01), "f32"),
             Q.float_tensor("s", np.ones((E, 2 * f)), "f32")]
    node = helper.make_node("ScatterMoE", ["X", "rw", "ri", "w_in", "w_out", "", "", "", "s"], ["Y"], domain=graphs.DOMAIN)
    gin = [helper.make_tensor_value_info("X", TensorProto.FLOAT, [4, d]), helper.make_tensor_value_info("rw", TensorProto.FLOAT, [4, 2]),
           helper.make_tensor_value_info("ri", TensorProto.INT64, [4, 2])]
    model = graphs._finish([node], gin, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits, "m", 17)
    with pytest.raises(Exception) as e:
        ort_utils.session(model, lib)
    assert "ScatterMoE: input 'w_in_scale' is given but input 'w_in' is float32, not quantized" in str(e.value), str(e.value)


def test_run_time_errors_with_symbolic_shapes(lib, rng):
    """Shapes known only at run time: the same messages, from the run, and no crash."""
    E, d, f = 8, 24, 20
    w = Q.random_weight(rng, "int4", (1, 8), E, 2 * f, d, 0.1, "f32", True)
    from onnx import TensorProto, helper

    from scattermoe_testing import graphs
    node = helper.make_node("ScatterMoE", ["X", "rw", "ri", "w_in", "w_out", "", "", "", "s", "", "z"], ["Y"], domain=graphs.DOMAIN,
                            weight_bits=4, block_size=[1, 8])
    gin = [helper.make_tensor_value_info(n, t, s) for n, t, s in (
        ("X", TensorProto.FLOAT, ["T", "d"]), ("rw", TensorProto.FLOAT, ["T", 2]), ("ri", TensorProto.INT64, ["T", 2]),
        ("w_in", TensorProto.UINT8, ["E", "n", "dd"]), ("s", TensorProto.FLOAT, ["E", "n", "g"]), ("z", TensorProto.UINT8, ["E", "n", "g2"]))]
    inits = [Q.float_tensor("w_out", np.full((E, d, f), 0.01), "f32")]
    model = graphs._finish([node], gin, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits, "m", 17)
    sess = ort_utils.session(model, lib)
    feeds = {"X": rng.standard_normal((4, d)).astype(np.float32), "rw": np.ones((4, 2), np.float32),
             "ri": np.array([[0, 1], [2, 3], [4, 5], [6, 7]], np.int64), "w_in": w.codes, "s": w.scale, "z": w.zero_point}
    (y,) = sess.run(None, feeds)  # the good inputs run
    want, _ = R.scatter_moe(feeds["X"], feeds["rw"], feeds["ri"], Q.dequantize(w), np.full((E, d, f), 0.01))
    R.assert_close(y, want, "f32", "symbolic shapes")
    for name, bad, expect in (
        ("s", w.scale[:, :, :2], "input 'w_in_scale' [8, 40, 2] must be [E, ceil(n / 1), ceil(d / 8)] = [8, 40, 3]"),
        ("z", w.zero_point[:, :, :1], "input 'w_in_zero_point' [8, 40, 1] must have the shape of 'w_in_scale' [8, 40, 3]"),
        ("w_in", np.zeros((E, 2 * f, 11), np.uint8), "its last dimension must be ceil(d / 2) = 12 for d = 24, got 11"),
    ):
        with pytest.raises(Exception) as e:
            sess.run(None, {**feeds, name: bad})
        assert expect in str(e.value), str(e.value)
    (y2,) = sess.run(None, feeds)  # still runs after the errors
    np.testing.assert_array_equal(y, y2)
