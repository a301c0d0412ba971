"""The independent reference itself: the per-expert loop graph (ORT, standard ops) agrees with the
float64 numpy reference of op-spec.md. Needs no library."""

import numpy as np
import pytest

from scattermoe_testing import data, graphs, ort_utils
from scattermoe_testing import reference as R

CASES = [
    # dtype, activation, gated, glu_layout, biases, E, k, T, pattern, scatter
    ("f32", "silu", 1, "gate_up", False, 8, 2, 64, "topk", "nd"),
    ("f32", "gelu", 0, "gate_up", True, 8, 2, 64, "topk", "elements"),
    ("f32", "gelu_tanh", 1, "up_gate", True, 8, 8, 3, "topk", "nd"),
    ("f32", "relu", 0, "gate_up", False, 1, 2, 17, "duplicates", "elements"),
    ("f32", "swiglu_oai", 1, "interleaved", True, 8, 2, 64, "one_expert", "nd"),
    ("f16", "silu", 1, "interleaved", True, 64, 8, 100, "topk", "nd"),
    ("f16", "gelu", 1, "up_gate", False, 8, 1, 1, "topk", "elements"),
    ("bf16", "gelu_tanh", 0, "gate_up", True, 8, 2, 64, "empty_expert", "nd"),
    ("bf16", "relu", 1, "gate_up", True, 8, 2, 64, "duplicates", "elements"),
    ("bf16", "swiglu_oai", 1, "up_gate", False, 8, 2, 64, "topk", "nd"),
    ("f32", "relu2", 0, "gate_up", True, 8, 2, 64, "topk", "nd"),
    ("f16", "relu2", 1, "interleaved", False, 8, 2, 17, "duplicates", "elements"),
    ("f32", "swiglu_limit", 1, "gate_up", True, 8, 2, 64, "empty_expert", "elements"),
    ("bf16", "swiglu_limit", 1, "interleaved", True, 8, 2, 64, "topk", "nd"),
]


@pytest.mark.parametrize("opset", [17, 18])
@pytest.mark.parametrize("dtype,act,gated,layout,biases,E,k,T,pattern,scatter", CASES)
def test_loop_graph_matches_numpy(rng, dtype, act, gated, layout, biases, E, k, T, pattern, scatter, opset):
    d, f = 24, 40
    feeds = data.moe_inputs(rng, T=T, d=d, f=f, E=E, k=k, gated=gated, b_in=biases, b_out=biases,
                            pattern=pattern, a_scale=2.5)
    limit, alpha = (1.3, 1.1) if act in R.GATED_ONLY else (7.0, 1.702)
    model = graphs.moe_loop_model(d=d, f=f, E=E, k=k, dtype=dtype, gated=gated, activation=act, glu_layout=layout,
                                  b_in=biases, b_out=biases, scatter=scatter, alpha=alpha, limit=limit, opset=opset)
    assert model.ir_version <= 10 and model.opset_import[0].version == opset
    (y,) = ort_utils.run(ort_utils.session(model), feeds)
    r = {n: R.round_to(v, dtype) if v.dtype == np.float32 else v for n, v in feeds.items()}
    want, _ = R.scatter_moe(r["X"], r["routing_weights"], r["routing_indices"], r["w_in"], r["w_out"],
                            r.get("b_in"), r.get("b_out"), activation=act, gated=gated, glu_layout=layout,
                            alpha=alpha, limit=limit)
    # the loop computes in float32 on rounded inputs: float32 accuracy whatever T is
    R.assert_close(y, want, "f32", f"loop graph {dtype} {act} gated={gated} {layout}")


def test_loop_graph_initializers_and_batch_dims(rng):
    """Weights as (pre-transposed, per-expert) initializers, int32 indices, X [B, S, d]."""
    d, f, E, k, B, S = 24, 40, 8, 2, 3, 5
    feeds = data.moe_inputs(rng, T=B * S, d=d, f=f, E=E, k=k, b_in=True, b_out=True)
    feeds["X"] = feeds["X"].reshape(B, S, d)
    feeds["routing_weights"] = feeds["routing_weights"].reshape(B, S, k)
    feeds["routing_indices"] = feeds["routing_indices"].reshape(B, S, k).astype(np.int32)
    inits = {n: feeds[n] for n in ("w_in", "w_out", "b_in", "b_out")}
    model = graphs.moe_loop_model(d=d, f=f, E=E, k=k, index_dtype="int32", x_shape=["B", "S", d],
                                  routing_shape=["B", "S", k], b_in=True, b_out=True, initializers=inits)
    assert not any(i.name in inits for i in model.graph.input)
    (y,) = ort_utils.run(ort_utils.session(model), feeds)
    want, _ = R.scatter_moe(feeds["X"], feeds["routing_weights"], feeds["routing_indices"], feeds["w_in"],
                            feeds["w_out"], feeds["b_in"], feeds["b_out"])
    assert y.shape == (B, S, d)
    R.assert_close(y, want, "f32", "loop graph with initializers")


def test_numpy_reference_capacity_by_hand():
    """The capacity rule on a hand-made routing (T=4, k=2, E=3, C=2)."""
    ri = np.array([[0, 1], [0, 2], [0, 1], [1, 0]])
    # slot_major ranks (j, t): slot 0 of t0..t3 -> experts 0,0,0,1 (t2's is expert 0's third);
    # then slot 1 -> 1,2,1,0 (t2's is expert 1's third, t3's expert 0's fourth)
    want_slot = np.array([[1, 1], [1, 1], [0, 0], [1, 0]], float)
    # token_major ranks (t, j): 0,1 | 0,2 | 0,1 | 1,0
    want_token = np.array([[1, 1], [1, 1], [0, 1], [0, 0]], float)
    np.testing.assert_array_equal(R.kept_mask(ri, 3, 2, "slot_major"), want_slot)
    np.testing.assert_array_equal(R.kept_mask(ri, 3, 2, "token_major"), want_token)
    np.testing.assert_array_equal(R.kept_mask(ri, 3, 0, "slot_major"), np.zeros((4, 2)))
    np.testing.assert_array_equal(R.kept_mask(ri, 3, None), np.ones((4, 2)))


def test_numpy_reference_grouped_order():
    ri = np.array([[2, 0], [0, 1], [2, 2]])
    # flat: 0:e2 1:e0 2:e0 3:e1 4:e2 5:e2 -> sorted by expert, stable: 1,2,3,0,4,5
    np.testing.assert_array_equal(R.grouped_order(ri), [1, 2, 3, 0, 4, 5])
    np.testing.assert_array_equal(R.grouped_positions(ri), [3, 0, 1, 2, 4, 5])
