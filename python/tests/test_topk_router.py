"""TopKRouter (docs/op-spec.md) on ONNX Runtime's CPU execution provider, against the float64
reference of the contract and against the ONNX graph it stands for (Softmax / Sigmoid, TopK,
ReduceSum, Div) run by ONNX Runtime itself: same experts in the same order, weights within the
dtype's tolerance. Awkward inputs: one token, no token, k = 1 and k = E, E = 1 and 1024, exact
ties (both tie rules), saturated sigmoids, NaN and -inf logits, leading batch dimensions."""

import numpy as np
import pytest

from scattermoe_testing import graphs, ort_utils
from scattermoe_testing import reference as R

SCORINGS = ("softmax", "topk_softmax", "sigmoid", "identity")


def as_scores(logits, scoring):
    """`identity` reads scores the graph computed (a Softmax's, in 16 bits): positive, so that a
    normalising sum never cancels (a sum near 0 would make any two summation orders disagree)."""
    return np.abs(logits) + np.float32(1 / 64) if scoring == "identity" else logits


def grid_logits(rng, shape, ties: bool = True):
    """Logits on a 1/64 grid in [-4, 4] (exact in float16 and bfloat16, and far enough apart that
    every implementation ranks them alike); with `ties`, a quarter of each row repeats another
    entry of the row exactly."""
    x = rng.integers(-256, 257, size=shape).astype(np.float32) / 64
    if ties:
        E = shape[-1]
        flat = x.reshape(-1, E)
        for row in flat:
            n = max(1, E // 4)
            src, dst = rng.integers(0, E, n), rng.integers(0, E, n)
            row[dst] = row[src]
    return x


def run_op(lib, logits, k, dtype="f32", **attrs):
    model = graphs.topk_router_model(E=logits.shape[-1], k=k, dtype=dtype, rank=logits.ndim, **attrs)
    return ort_utils.run(ort_utils.session(model, lib), {"logits": logits})


def check(w, i, logits, k, dtype, what, **attrs):
    want_w, want_i = R.topk_router(R.round_to(logits, dtype), k, **attrs)
    np.testing.assert_array_equal(i, want_i, err_msg=f"indices: {what}")
    R.assert_close(w, want_w, dtype, f"weights: {what}")


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("scoring", SCORINGS)
@pytest.mark.parametrize("normalize", [0, 1])
@pytest.mark.parametrize("tie_break", ["lower_index", "higher_index"])
def test_against_the_reference(lib, rng, dtype, scoring, normalize, tie_break):
    for T, E, k in [(37, 8, 2), (1, 128, 8), (5, 1, 1), (16, 64, 64), (9, 257, 4), (3, 1024, 8)]:
        logits = as_scores(grid_logits(rng, (T, E)), scoring)
        w, i = run_op(lib, logits, k, dtype, scoring=scoring, normalize=normalize, tie_break=tie_break)
        assert w.shape == (T, k) and i.shape == (T, k) and i.dtype == np.int64
        check(w, i, logits, k, dtype, f"T={T} E={E} k={k}", scoring=scoring, normalize=normalize, tie_break=tie_break)


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("scoring", SCORINGS)
@pytest.mark.parametrize("normalize", [0, 1])
@pytest.mark.parametrize("tie_break", ["lower_index", "higher_index"])
def test_same_as_the_onnx_router_it_replaces(lib, rng, dtype, scoring, normalize, tie_break):
    """The node against ONNX Runtime running the graph it stands for, on fresh normal logits (ties
    where the dtype rounds two logits alike, which float16 and bfloat16 often do)."""
    T, E, k = 64, 32, 4
    logits = as_scores(rng.standard_normal((T, E)).astype(np.float32) * 2, scoring)
    attrs = dict(scoring=scoring, normalize=normalize, tie_break=tie_break)
    w, i = run_op(lib, logits, k, dtype, **attrs)
    ref = graphs.router_graph_model(E=E, k=k, dtype=dtype, **attrs)
    gw, gi = ort_utils.run(ort_utils.session(ref), {"logits": logits})
    np.testing.assert_array_equal(i, gi, err_msg="indices differ from the ONNX graph's")
    R.assert_close(w, gw, dtype, "weights against the ONNX graph's")


def test_ties_follow_the_tie_rule(lib):
    logits = np.array([[1.0, 3.0, 3.0, 0.5, 3.0]], np.float32)
    _, lo = run_op(lib, logits, 3, tie_break="lower_index")
    _, hi = run_op(lib, logits, 3, tie_break="higher_index")
    np.testing.assert_array_equal(lo, [[1, 2, 4]])
    np.testing.assert_array_equal(hi, [[4, 2, 1]])


def test_saturated_sigmoids_tie(lib):
    """sigmoid(20) and sigmoid(30) are both 1 in float32: a tie, by the contract (scores in float32)."""
    logits = np.array([[20.0, -1.0, 30.0, 25.0]], np.float32)
    w, i = run_op(lib, logits, 2, scoring="sigmoid")
    np.testing.assert_array_equal(i, [[0, 2]])
    np.testing.assert_allclose(w, [[1.0, 1.0]])


def test_nan_ranks_last_and_minus_infinity_is_a_score(lib):
    logits = np.array([[np.nan, -np.inf, 0.5, np.nan, 2.0]], np.float32)
    w, i = run_op(lib, logits, 3, scoring="topk_softmax")
    np.testing.assert_array_equal(i, [[4, 2, 1]])
    np.testing.assert_allclose(w[0, 2], 0.0)
    _, i = run_op(lib, logits, 5, scoring="topk_softmax")
    np.testing.assert_array_equal(i, [[4, 2, 1, 0, 3]])  # the NaNs last, by index
    w, i = run_op(lib, np.full((1, 4), -np.inf, np.float32), 2, scoring="softmax")
    np.testing.assert_array_equal(i, [[0, 1]])  # all -inf: every expert is a candidate; weights NaN
    assert np.isnan(w).all()


def test_leading_dimensions_and_no_tokens(lib, rng):
    logits = grid_logits(rng, (2, 3, 16))
    w, i = run_op(lib, logits, 3, "f16", normalize=1)
    assert w.shape == (2, 3, 3) and i.shape == (2, 3, 3)
    check(w, i, logits, 3, "f16", "[2, 3, 16]", normalize=1)
    w, i = run_op(lib, np.zeros((0, 16), np.float32), 3)
    assert w.shape == (0, 3) and i.shape == (0, 3)


@pytest.mark.parametrize("attrs,message", [
    (dict(k=9), "TopKRouter: attribute 'k' = 9 is more than the 8 experts of input 'logits'"),
    (dict(k=0), "TopKRouter: attribute 'k' must be in [1, 2147483647], got 0"),
    (dict(k=2, scoring="softplus"), "TopKRouter: attribute 'scoring' has unsupported value 'softplus' (supported: softmax, topk_softmax, sigmoid, identity)"),
    (dict(k=2, tie_break="random"), "TopKRouter: attribute 'tie_break' has unsupported value 'random' (supported: lower_index, higher_index)"),
    (dict(k=2, normalize=2), "TopKRouter: attribute 'normalize' must be 0 or 1, got 2"),
])
def test_bad_attributes_are_named(lib, attrs, message):
    model = graphs.topk_router_model(E=8, **attrs)
    with pytest.raises(Exception) as e:
        ort_utils.run(ort_utils.session(model, lib), {"logits": np.zeros((2, 8), np.float32)})
    assert message in str(e.value)


def test_bad_inputs_are_named(lib):
    outs = [("routing_weights", "f32", None), ("routing_indices", "int64", None)]
    model = graphs.op_model("TopKRouter", [("logits", "int64", [2, 8])], outs, {"k": 2})
    with pytest.raises(Exception) as e:
        ort_utils.run(ort_utils.session(model, lib), {"logits": np.zeros((2, 8), np.int64)})
    assert "TopKRouter: input 'logits' has element type int64; supported: float32, float16, bfloat16" in str(e.value)
    model = graphs.op_model("TopKRouter", [("logits", "f32", [8])], outs, {"k": 2})
    with pytest.raises(Exception) as e:
        ort_utils.run(ort_utils.session(model, lib), {"logits": np.zeros(8, np.float32)})
    assert "TopKRouter: input 'logits' must have rank >= 2, got shape [8]" in str(e.value)
