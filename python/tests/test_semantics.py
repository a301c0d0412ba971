"""The plugin against the float64 numpy reference of docs/op-spec.md: capacity, swiglu_oai, GLU
layouts, attribute defaults, ParallelLinear, the ParallelLinear composition of ScatterMoE, leading
batch dimensions, int32 indices, T = 0."""

import numpy as np
import pytest

from scattermoe_testing import data, graphs, ort_utils
from scattermoe_testing import reference as R

D, F = 24, 40


def _rounded(feeds, dtype):
    return {n: R.round_to(v, dtype) if v.dtype == np.float32 else v for n, v in feeds.items()}


def _ref_moe(feeds, dtype, capacity=None, **attrs):
    r = _rounded(feeds, dtype)
    return R.scatter_moe(r["X"], r["routing_weights"], r["routing_indices"], r["w_in"], r["w_out"], r.get("b_in"),
                         r.get("b_out"), capacity, **attrs)


# --------------------------------------------------------------------------------------------
# capacity
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("order", ["slot_major", "token_major", None])
@pytest.mark.parametrize("C", [0, 1, 5, 12, 10**6])
def test_capacity(lib, rng, dtype, order, C):
    T, E, k = 64, 8, 2
    feeds = data.moe_inputs(rng, T=T, d=D, f=F, E=E, k=k, b_in=True, b_out=True)
    # skew the router: half the tokens pick expert 3 first, so it is oversubscribed for C < 32
    feeds["routing_indices"][: T // 2] = data.routing(rng, T // 2, E, k, "one_expert")
    feeds["capacity"] = np.array(C, np.int64)
    model = graphs.scatter_moe_model(d=D, f=F, E=E, k=k, dtype=dtype, b_in=True, b_out=True, capacity=True, kept=True,
                                     capacity_order=order)
    y, kept = ort_utils.run(ort_utils.session(model, lib), feeds)
    want_y, want_kept = _ref_moe(feeds, dtype, C, capacity_order=order or "slot_major")
    np.testing.assert_array_equal(kept, want_kept, err_msg=f"kept (C={C}, order={order})")
    if C == 0:
        assert not kept.any() and not y.any(), "C = 0 drops every assignment: Y must be all zero"
    if C == 10**6:
        assert kept.all()
    R.assert_close(y, want_y, dtype, f"Y with capacity {C} ({order})")


def test_capacity_orders_differ(lib, rng):
    """The two orders keep different assignments on the same oversubscribed routing."""
    T, E, k, C = 16, 4, 2, 3
    feeds = data.moe_inputs(rng, T=T, d=D, f=F, E=E, k=k)
    feeds["capacity"] = np.array([C], np.int64)  # a [1] tensor is accepted like a scalar
    kept = {}
    for order in ("slot_major", "token_major"):
        model = graphs.scatter_moe_model(d=D, f=F, E=E, k=k, capacity=True, capacity_shape=[1], kept=True,
                                         capacity_order=order)
        y, kept[order] = ort_utils.run(ort_utils.session(model, lib), feeds)
        want_y, want_kept = _ref_moe(feeds, "f32", C, capacity_order=order)
        np.testing.assert_array_equal(kept[order], want_kept, err_msg=order)
        R.assert_close(y, want_y, "f32", order)
    assert (kept["slot_major"] != kept["token_major"]).any(), "routing too tame to tell the orders apart"


def test_capacity_initializer_int32_indices_and_kept_without_capacity(lib, rng):
    T, E, k = 64, 8, 2
    feeds = data.moe_inputs(rng, T=T, d=D, f=F, E=E, k=k)
    feeds["routing_indices"] = feeds["routing_indices"].astype(np.int32)
    model = graphs.scatter_moe_model(d=D, f=F, E=E, k=k, index_dtype="int32", capacity=True, kept=True,
                                     initializers={"capacity": np.array(6, np.int64)}, capacity_order="token_major")
    y, kept = ort_utils.run(ort_utils.session(model, lib), feeds)
    want_y, want_kept = _ref_moe(feeds, "f32", 6, capacity_order="token_major")
    np.testing.assert_array_equal(kept, want_kept)
    R.assert_close(y, want_y, "f32")
    # no capacity input: unlimited
    model = graphs.scatter_moe_model(d=D, f=F, E=E, k=k, index_dtype="int32")
    (y,) = ort_utils.run(ort_utils.session(model, lib), feeds)
    R.assert_close(y, _ref_moe(feeds, "f32")[0], "f32")


@pytest.mark.parametrize("index_dtype", ["int32", "int64"])
@pytest.mark.parametrize("order", ["slot_major", "token_major", None])
def test_capacity_mask_op(lib, rng, index_dtype, order):
    """CapacityMask alone: a bool tensor shaped like routing_indices, batch dims kept."""
    B, S, E, k, C = 4, 25, 8, 2, 9
    ri = data.routing(rng, B * S, E, k, "topk")
    ri[::2, 0] = 5  # oversubscribe expert 5
    ri = ri.reshape(B, S, k).astype(index_dtype)
    model = graphs.capacity_mask_model(E=E, k=k, index_dtype=index_dtype, routing_shape=["B", "S", k],
                                       capacity_order=order)
    sess = ort_utils.session(model, lib)
    assert sess.get_outputs()[0].type == "tensor(bool)"
    (kept,) = ort_utils.run(sess, {"routing_indices": ri, "capacity": np.array(C, np.int64)})
    assert kept.dtype == np.bool_ and kept.shape == (B, S, k)
    want = R.kept_mask(ri.reshape(-1, k).astype(np.int64), E, C, order or "slot_major").reshape(B, S, k)
    np.testing.assert_array_equal(kept, want > 0)
    assert not kept.all()


# --------------------------------------------------------------------------------------------
# activations, GLU layouts, defaults
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("act", R.GATED_ONLY)
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("layout", graphs.GLU_LAYOUTS)
@pytest.mark.parametrize("alpha,limit", [(None, None), (1.0, 0.5), (2.5, 3.0)])
def test_clamped_swiglu(lib, rng, act, dtype, layout, alpha, limit):
    T, E, k = 64, 8, 2
    # a_scale 6: gate and up values well past the limit, so both clamps matter
    feeds = data.moe_inputs(rng, T=T, d=D, f=F, E=E, k=k, b_in=True, b_out=True, a_scale=6.0)
    model = graphs.scatter_moe_model(d=D, f=F, E=E, k=k, dtype=dtype, activation=act, glu_layout=layout,
                                     alpha=alpha, limit=limit, b_in=True, b_out=True)
    (y,) = ort_utils.run(ort_utils.session(model, lib), feeds)
    want, _ = _ref_moe(feeds, dtype, activation=act, glu_layout=layout,
                       alpha=1.702 if alpha is None else alpha, limit=7.0 if limit is None else limit)
    R.assert_close(y, want, dtype, f"{act} {layout} alpha={alpha} limit={limit}")


@pytest.mark.parametrize("layout", graphs.GLU_LAYOUTS)
@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh", "relu", "relu2"])
def test_glu_layouts(lib, rng, layout, act):
    T, E, k = 64, 8, 2
    feeds = data.moe_inputs(rng, T=T, d=D, f=F, E=E, k=k, b_in=True, a_scale=2.0)
    model = graphs.scatter_moe_model(d=D, f=F, E=E, k=k, activation=act, glu_layout=layout, b_in=True)
    (y,) = ort_utils.run(ort_utils.session(model, lib), feeds)
    R.assert_close(y, _ref_moe(feeds, "f32", activation=act, glu_layout=layout)[0], "f32", f"{act} {layout}")


@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh", "relu", "relu2"])
def test_plain_activations(lib, rng, act):
    T, E, k = 64, 8, 2
    feeds = data.moe_inputs(rng, T=T, d=D, f=F, E=E, k=k, gated=0, b_in=True, b_out=True, a_scale=2.0)
    model = graphs.scatter_moe_model(d=D, f=F, E=E, k=k, gated=0, activation=act, b_in=True, b_out=True)
    (y,) = ort_utils.run(ort_utils.session(model, lib), feeds)
    R.assert_close(y, _ref_moe(feeds, "f32", activation=act, gated=0)[0], "f32", act)


def test_attribute_defaults(lib, rng):
    """No attributes at all: silu, gated, gate_up, no capacity."""
    T, E, k = 64, 8, 2
    feeds = data.moe_inputs(rng, T=T, d=D, f=F, E=E, k=k)
    model = graphs.scatter_moe_model(d=D, f=F, E=E, k=k, gated=None)
    assert not model.graph.node[0].attribute
    (y,) = ort_utils.run(ort_utils.session(model, lib), feeds)
    R.assert_close(y, _ref_moe(feeds, "f32")[0], "f32", "defaults")


def test_duplicate_expert_counts_twice(lib, rng):
    """A token naming the same expert in both slots gets both contributions."""
    T, E, k = 5, 4, 2
    feeds = data.moe_inputs(rng, T=T, d=D, f=F, E=E, k=k)
    feeds["routing_indices"] = np.array([[1, 1], [0, 0], [3, 3], [2, 1], [1, 1]], np.int64)
    model = graphs.scatter_moe_model(d=D, f=F, E=E, k=k)
    (y,) = ort_utils.run(ort_utils.session(model, lib), feeds)
    R.assert_close(y, _ref_moe(feeds, "f32")[0], "f32", "duplicates")


# --------------------------------------------------------------------------------------------
# ParallelLinear
# --------------------------------------------------------------------------------------------

PL_MODES = [(gi, go, g) for gi in (0, 1) for go in (0, 1) for g in (False, True) if not (g and go)]


@pytest.mark.parametrize("grouped_in,grouped_out,gates", PL_MODES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype,index_dtype", [("f32", "int64"), ("bf16", "int32")])
def test_parallel_linear(lib, rng, grouped_in, grouped_out, gates, bias, dtype, index_dtype):
    T, E, k, d_in, d_out = 37, 8, 2, 24, 40
    ri = data.routing(rng, T, E, k, "topk").astype(index_dtype)
    feeds = {
        "X": rng.standard_normal((T * k if grouped_in else T, d_in)).astype(np.float32),
        "routing_indices": ri,
        "W": (rng.standard_normal((E, d_out, d_in)) / np.sqrt(d_in)).astype(np.float32),
        "b": rng.standard_normal((E, d_out)).astype(np.float32),
        "gates": data.routing_weights(rng, T, k),
    }
    model = graphs.parallel_linear_model(d_in=d_in, d_out=d_out, E=E, k=k, dtype=dtype, index_dtype=index_dtype,
                                         grouped_in=grouped_in, grouped_out=grouped_out, bias=bias, gates=gates)
    (y,) = ort_utils.run(ort_utils.session(model, lib), feeds)
    r = _rounded(feeds, dtype)
    want = R.parallel_linear(r["X"], ri, r["W"], r["b"] if bias else None, r["gates"] if gates else None,
                             grouped_in=grouped_in, grouped_out=grouped_out)
    expect_shape = (T, d_out) if gates else (T * k, d_out) if grouped_out else (T, k, d_out)
    assert y.shape == expect_shape
    R.assert_close(y, want, dtype, f"ParallelLinear gi={grouped_in} go={grouped_out} gates={gates} bias={bias}")


def test_parallel_linear_grouped_roundtrip(lib, rng):
    """grouped_out=1 then grouped_in=1 with an identity-like W returns rows in grouped order."""
    T, E, k, d = 10, 3, 2, 5
    ri = data.routing(rng, T, E, k, "topk")
    X = rng.standard_normal((T, d)).astype(np.float32)
    W = np.repeat(np.eye(d, dtype=np.float32)[None], E, axis=0)
    model = graphs.parallel_linear_model(d_in=d, d_out=d, E=E, k=k, grouped_out=1)
    (g,) = ort_utils.run(ort_utils.session(model, lib), {"X": X, "routing_indices": ri, "W": W})
    perm = R.grouped_order(ri)
    np.testing.assert_allclose(g, X[perm // k], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("act,gated,layout,biases", [
    ("silu", 1, "gate_up", False), ("gelu", 0, "gate_up", True), ("swiglu_oai", 1, "interleaved", True),
    ("gelu_tanh", 1, "up_gate", True),
])
def test_composition(lib, rng, dtype, act, gated, layout, biases):
    """ScatterMoE = PL(grouped_out=1) -> act -> PL(grouped_in=1, gates=routing_weights)."""
    T, E, k = 50, 8, 2
    feeds = data.moe_inputs(rng, T=T, d=D, f=F, E=E, k=k, gated=gated, b_in=biases, b_out=biases, a_scale=2.0)
    model = graphs.composed_moe_model(d=D, f=F, E=E, k=k, dtype=dtype, gated=gated, activation=act,
                                      glu_layout=layout, b_in=biases, b_out=biases)
    y_moe, y_pl = ort_utils.run(ort_utils.session(model, lib), feeds)
    want, _ = _ref_moe(feeds, dtype, activation=act, gated=gated, glu_layout=layout)
    R.assert_close(y_moe, want, dtype, "ScatterMoE")
    R.assert_close(y_pl, want, dtype, "ParallelLinear chain")
    R.assert_close(y_pl, y_moe, dtype, "ParallelLinear chain vs ScatterMoE")


@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("static", [True, False])
def test_stacked_layers(lib, rng, dtype, static):
    """Two ScatterMoE layers with residual adds: the second node's X is computed in the graph."""
    T, E, k, layers = 12, 8, 2, 2
    feeds = data.moe_inputs(rng, T=T, d=D, f=F, E=E, k=k)
    for i in range(layers):
        extra = data.moe_inputs(rng, T=1, d=D, f=F, E=E, k=k)
        feeds[f"w_in_{i}"], feeds[f"w_out_{i}"] = extra["w_in"], extra["w_out"]
    model = graphs.stacked_moe_model(d=D, f=F, E=E, k=k, layers=layers, dtype=dtype,
                                     x_shape=[T, D] if static else None, routing_shape=[T, k] if static else None)
    (y,) = ort_utils.run(ort_utils.session(model, lib), feeds)
    r = _rounded(feeds, dtype)
    h = r["X"].astype(np.float64)
    for i in range(layers):
        # the layer's input is rounded to T again in the graph
        y_i, _ = R.scatter_moe(R.round_to(h, dtype), r["routing_weights"], r["routing_indices"], r[f"w_in_{i}"],
                               r[f"w_out_{i}"])
        h = h + y_i
    R.assert_close(y, h, dtype, f"{layers} stacked layers")


# --------------------------------------------------------------------------------------------
# shapes: leading batch dims, T = 0
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("x_shape,r_shape", [
    ((3, 5), (3, 5)),      # X [B, S, d], routing [B, S, k]
    ((3, 5), (15,)),       # X [B, S, d], routing [B*S, k]
    ((15,), (5, 3)),       # X [T, d], routing [S, B, k]
    ((2, 3, 4), (2, 12)),  # rank-4 X
])
def test_leading_batch_dims(lib, rng, x_shape, r_shape):
    E, k = 8, 2
    T = int(np.prod(x_shape))
    feeds = data.moe_inputs(rng, T=T, d=D, f=F, E=E, k=k, b_in=True)
    feeds["X"] = feeds["X"].reshape(*x_shape, D)
    feeds["routing_weights"] = feeds["routing_weights"].reshape(*r_shape, k)
    feeds["routing_indices"] = feeds["routing_indices"].reshape(*r_shape, k)
    feeds["capacity"] = np.array(3, np.int64)
    sym_x = [f"x{i}" for i in range(len(x_shape))] + [D]
    sym_r = [f"r{i}" for i in range(len(r_shape))] + [k]
    model = graphs.scatter_moe_model(d=D, f=F, E=E, k=k, x_shape=sym_x, routing_shape=sym_r, b_in=True,
                                     capacity=True, kept=True)
    y, kept = ort_utils.run(ort_utils.session(model, lib), feeds)
    want_y, want_kept = _ref_moe(feeds, "f32", 3)
    assert y.shape == (*x_shape, D) and kept.shape == (*r_shape, k)
    np.testing.assert_array_equal(kept, want_kept)
    R.assert_close(y, want_y, "f32", f"X {x_shape} routing {r_shape}")


@pytest.mark.parametrize("grouped_out,gates", [(0, False), (0, True), (1, False)])
def test_parallel_linear_batch_dims(lib, rng, grouped_out, gates):
    B, S, E, k, d_in, d_out = 3, 4, 8, 2, 24, 16
    ri = data.routing(rng, B * S, E, k).reshape(B, S, k)
    feeds = {
        "X": rng.standard_normal((B, S, d_in)).astype(np.float32),
        "routing_indices": ri,
        "W": rng.standard_normal((E, d_out, d_in)).astype(np.float32),
        "gates": rng.random((B, S, k)).astype(np.float32),
    }
    model = graphs.parallel_linear_model(d_in=d_in, d_out=d_out, E=E, k=k, grouped_out=grouped_out, gates=gates,
                                         x_shape=["B", "S", d_in], routing_shape=["B", "S", k])
    (y,) = ort_utils.run(ort_utils.session(model, lib), feeds)
    want = R.parallel_linear(feeds["X"], ri, feeds["W"], None, feeds["gates"] if gates else None,
                             grouped_out=grouped_out)
    assert y.shape == ((B, S, d_out) if gates else (B * S * k, d_out) if grouped_out else (B, S, k, d_out))
    R.assert_close(y, want, "f32")


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_zero_tokens(lib, rng, dtype):
    """T = 0: empty outputs of the right shapes (ORT accepts empty tensors)."""
    E, k = 8, 2
    feeds = data.moe_inputs(rng, T=0, d=D, f=F, E=E, k=k, b_in=True, b_out=True)
    feeds["capacity"] = np.array(2, np.int64)
    model = graphs.scatter_moe_model(d=D, f=F, E=E, k=k, dtype=dtype, b_in=True, b_out=True, capacity=True, kept=True)
    y, kept = ort_utils.run(ort_utils.session(model, lib), feeds)
    assert y.shape == (0, D) and kept.shape == (0, k)
    # batch form [B, 0, d]
    feeds = {**feeds, "X": feeds["X"].reshape(4, 0, D), "routing_weights": feeds["routing_weights"].reshape(4, 0, k),
             "routing_indices": feeds["routing_indices"].reshape(4, 0, k)}
    model = graphs.scatter_moe_model(d=D, f=F, E=E, k=k, dtype=dtype, x_shape=["B", "S", D], routing_shape=["B", "S", k])
    (y,) = ort_utils.run(ort_utils.session(model, lib), feeds)
    assert y.shape == (4, 0, D)
    # ParallelLinear, each output form
    pl = {"X": np.zeros((0, D), np.float32), "routing_indices": np.zeros((0, k), np.int64),
          "W": rng.standard_normal((E, 16, D)).astype(np.float32), "gates": np.zeros((0, k), np.float32)}
    for go, g, shape in [(0, False, (0, k, 16)), (1, False, (0, 16)), (0, True, (0, 16))]:
        model = graphs.parallel_linear_model(d_in=D, d_out=16, E=E, k=k, dtype=dtype, grouped_out=go, gates=g)
        (y,) = ort_utils.run(ort_utils.session(model, lib), pl)
        assert y.shape == shape, (go, g)
