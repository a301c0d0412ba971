"""TopKRouter's `expert_scale` input (docs/op-spec.md, "TopKRouter"): each chosen expert's weight
multiplied by its expert's value, after the normalisation and before `scale` (Gemma 4's
`per_expert_scale[top_k_index]`), on ONNX Runtime's CPU execution provider:

- against the numpy reference of the contract (test_topk_router_groups.router_reference, weights in
  float64) times the table at the chosen experts: every dtype, the table float32 or T, [E] or
  [1, E], with and without a bias before it (the bias slot then the empty name), every scoring,
  normalize on and off, a scale after it; rows whose choice a float32 rounding could change are
  drawn again;
- against ONNX Runtime running Gemma 4's router as torch's TorchScript and dynamo exporters write
  it (`Gather` on axis 0, `GatherND` of the indices unsqueezed);
- the error messages for a table of the wrong size, rank or type."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from scattermoe_testing import graphs, ort_utils
from scattermoe_testing import reference as R

from test_errors import any_error, assert_mentions
from test_topk_router_groups import assert_weights, fragile_rows, router_reference


def expert_scale_table(rng, E: int, dtype: str) -> np.ndarray:
    """Values as a learned per-expert scale has them (around 1), some negative, one 0; exact in
    `dtype`."""
    t = rng.uniform(0.5, 1.5, E).astype(np.float32)
    t[rng.choice(E, max(1, E // 8), replace=False)] *= -1
    t[rng.integers(E)] = 0.0
    return R.round_to(t, dtype)


def router_model(E: int, k: int, dtype: str, table_dtype: str, table_shape, with_bias: bool, **attrs):
    """One TopKRouter node reading logits (float32 Cast to `dtype`), maybe a float32 bias, and the
    expert scale (graph input float32, Cast to T where `table_dtype` is "T")."""
    et = graphs.elem_type(dtype)
    ins = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["T", E]),
           helper.make_tensor_value_info("es", TensorProto.FLOAT, table_shape)]
    nodes, x, es = [], "logits", "es"
    if et != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", ["logits"], ["logits_t"], to=et))
        x = "logits_t"
        if table_dtype == "T":
            nodes.append(helper.make_node("Cast", ["es"], ["es_t"], to=et))
            es = "es_t"
    bias = ""
    if with_bias:
        ins.append(helper.make_tensor_value_info("bias", TensorProto.FLOAT, [E]))
        bias = "bias"
    nodes.append(helper.make_node("TopKRouter", [x, bias, es], ["w", "routing_indices"], domain=graphs.DOMAIN, k=k, **attrs))
    nodes.append(helper.make_node("Cast", ["w"], ["routing_weights"], to=TensorProto.FLOAT))
    outs = [helper.make_tensor_value_info("routing_weights", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("routing_indices", TensorProto.INT64, None)]
    return graphs._finish(nodes, ins, outs, [], "topk_router_expert_scale", graphs.DEFAULT_OPSET)


CASES = [
    # scoring, normalize, scale, bias
    ("softmax", 1, 1.0, False),  # Gemma 4
    ("softmax", 0, 2.5, False),
    ("sigmoid", 1, 2.5, True),
    ("sigmoid", 0, 1.0, True),
    ("topk_softmax", 0, 1.0, False),
    ("topk_softmax", 1, 0.5, False),
]


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("table_dtype", ["f32", "T"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-n{c[1]}-s{c[2]}-b{int(c[3])}" for c in CASES])
def test_against_the_reference(lib, rng, dtype, table_dtype, case):
    scoring, normalize, scale, with_bias = case
    for E, k, T in ((8, 2, 1), (128, 8, 37), (100, 7, 64), (1024, 32, 5)):
        table = expert_scale_table(rng, E, dtype if table_dtype == "T" else "f32")
        bias = R.round_to(rng.uniform(-0.25, 0.25, E).astype(np.float32), "f32") if with_bias else None
        attrs = dict(scoring=scoring, normalize=normalize)
        logits = R.round_to(rng.integers(-256, 257, size=(T, E)).astype(np.float32) / 64, dtype)
        keep = ~fragile_rows(logits, k, bias, attrs)
        logits = logits[keep] if keep.any() else logits[:1]
        shape = [E] if E % 2 == 0 else [1, E]
        model = router_model(E, k, dtype, table_dtype, shape, with_bias, scale=scale, **attrs)
        feeds = {"logits": logits, "es": table.reshape(shape)}
        if with_bias:
            feeds["bias"] = bias
        w, i = ort_utils.run(ort_utils.session(model, lib), feeds)
        want_w, want_i, _ = router_reference(logits, k, bias, **attrs)
        want_w = want_w * table.astype(np.float64)[want_i] * scale
        what = f"{scoring} normalize {normalize} scale {scale} bias {with_bias} E {E} k {k} {dtype} table {table_dtype}"
        np.testing.assert_array_equal(i, want_i, err_msg=f"indices: {what}")
        assert_weights(w, want_w, dtype, f"weights: {what}")


def gemma4_router(E: int, k: int, table: np.ndarray, gather: str, with_node: bool = True):
    """Gemma 4's router after its projection, as the exporters write it: Softmax in float32, TopK,
    the k weights divided by their sum, times per_expert_scale gathered at the chosen experts
    (`Gather` on axis 0: TorchScript; `GatherND` of the indices unsqueezed: dynamo); beside it, one
    TopKRouter node with the same table."""
    inits = [numpy_helper.from_array(table, "pes"), numpy_helper.from_array(np.array([k], np.int64), "k"),
             numpy_helper.from_array(np.array([-1], np.int64), "ax")]
    nodes = [helper.make_node("Softmax", ["x"], ["s"], axis=-1), helper.make_node("TopK", ["s", "k"], ["v", "i"], axis=-1),
             helper.make_node("ReduceSum", ["v", "ax"], ["sum"], keepdims=1), helper.make_node("Div", ["v", "sum"], ["n"])]
    if gather == "Gather":
        nodes.append(helper.make_node("Gather", ["pes", "i"], ["es"], axis=0))
    else:
        nodes += [helper.make_node("Unsqueeze", ["i", "ax"], ["i1"]), helper.make_node("GatherND", ["pes", "i1"], ["es"])]
    nodes.append(helper.make_node("Mul", ["n", "es"], ["w"]))
    outs = [("w", TensorProto.FLOAT), ("i", TensorProto.INT64)]
    if with_node:
        nodes.append(helper.make_node("TopKRouter", ["x", "", "pes"], ["w2", "i2"], domain=graphs.DOMAIN, k=k, normalize=1))
        outs += [("w2", TensorProto.FLOAT), ("i2", TensorProto.INT64)]
    X = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", E])
    return graphs._finish(nodes, [X], [helper.make_tensor_value_info(n, t, None) for n, t in outs], inits,
                          "gemma4_router", graphs.DEFAULT_OPSET)


@pytest.mark.parametrize("gather", ["Gather", "GatherND"])
def test_gemma4_router_graph_equals_the_node(lib, rng, gather):
    E, k = 128, 8  # Gemma 4 26B-A4B
    table = expert_scale_table(rng, E, "f32")
    x = rng.standard_normal((257, E)).astype(np.float32) * 3
    x[::5, 7] += 60.0  # expert 7 dominates: the other weights underflow to 0
    w, i, w2, i2 = ort_utils.run(ort_utils.session(gemma4_router(E, k, table, gather), lib), {"x": x})
    np.testing.assert_array_equal(i, i2)
    np.testing.assert_allclose(w2, w, rtol=1e-6, atol=1e-7)


def _error(lib, table_type: str, table_shape, E: int = 8):
    ins = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, E]),
           helper.make_tensor_value_info("es", graphs.elem_type(table_type), table_shape)]
    feed = {"logits": np.zeros([2, E], np.float32), "es": np.zeros(table_shape, np.float32)}
    nodes = [helper.make_node("TopKRouter", ["logits", "", "es"], ["w", "routing_indices"], domain=graphs.DOMAIN, k=2),
             helper.make_node("Cast", ["w"], ["routing_weights"], to=TensorProto.FLOAT)]
    outs = [helper.make_tensor_value_info("routing_weights", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("routing_indices", TensorProto.INT64, None)]
    return any_error(graphs._finish(nodes, ins, outs, [], "topk_router_es_error", graphs.DEFAULT_OPSET), lib, feed)


BAD_TABLES = [
    (("f32", [9]), "TopKRouter: input 'expert_scale' has [9] values but input 'logits' has [2, 8] experts"),
    (("f32", [2, 8]), "TopKRouter: input 'expert_scale' must have shape [E] or [1, E], got [2, 8]"),
    (("int64", [8]), "TopKRouter: input 'expert_scale' has element type int64; a scale must be float32 or T (float32, the type of 'logits')"),
    (("f16", [8]), "TopKRouter: input 'expert_scale' has element type float16; a scale must be float32 or T (float32, the type of 'logits')"),
]


@pytest.mark.parametrize("table,message", BAD_TABLES, ids=[f"table-{i}" for i in range(len(BAD_TABLES))])
def test_bad_expert_scale_is_named(lib, table, message):
    assert_mentions(_error(lib, *table), message)
