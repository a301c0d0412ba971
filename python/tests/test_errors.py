"""Every error of docs/op-spec.md a user can hit: the message names the op, the input or attribute
and the bad value. Inconsistent shapes fail when the session is created if shapes are static,
when it runs if they are symbolic."""

import math

import numpy as np
import pytest

from scattermoe_testing import graphs, ort_utils

T, D, F, E, K = 4, 24, 40, 8, 2

MOE_INPUTS = ["X", "routing_weights", "routing_indices", "w_in", "w_out", "b_in", "b_out", "capacity"]
PL_INPUTS = ["X", "routing_indices", "W", "b", "gates"]


def moe_shapes(gated=1):
    n = 2 * F if gated else F
    return {"X": [T, D], "routing_weights": [T, K], "routing_indices": [T, K], "w_in": [E, n, D],
            "w_out": [E, D, F], "b_in": [E, n], "b_out": [E, D], "capacity": []}


def pl_shapes():
    return {"X": [T, D], "routing_indices": [T, K], "W": [E, F, D], "b": [E, F], "gates": [T, K]}


DEFAULT_TYPES = {"routing_indices": "int64", "capacity": "int64"}


def bare(op, names, shapes, types=None, attrs=None, present=None, symbolic=False):
    """A one-node model; `present` lists the inputs given (others absent), `symbolic` names every dim."""
    types = {**DEFAULT_TYPES, **(types or {})}
    present = present if present is not None else names[:5] if op == "ScatterMoE" else names[:3]
    specs = []
    for nm in names:
        if nm not in present:
            specs.append(None)
            continue
        shape = shapes[nm]
        if symbolic:
            shape = [f"{nm}_{i}" for i in range(len(shape))]
        specs.append((nm, types.get(nm, "f32"), shape))
    outs = [("Y", "f32", None)]
    return graphs.op_model(op, specs, outs, attrs or {})


def feeds(names, shapes, types=None, present=None, values=None, rng=None):
    types = {**DEFAULT_TYPES, **(types or {})}
    rng = rng or np.random.default_rng(0)
    np_t = {"f32": np.float32, "f16": np.float16, "f64": np.float64, "int32": np.int32, "int64": np.int64}
    out = {}
    for nm in present:
        shape = shapes[nm]
        if nm == "routing_indices":
            out[nm] = (np.arange(int(np.prod(shape))).reshape(shape) % E).astype(np_t[types[nm]])
        elif nm == "capacity":
            out[nm] = np.full(shape, 3, dtype=np_t[types[nm]])
        else:
            out[nm] = rng.standard_normal(shape).astype(np_t[types.get(nm, "f32")])
    out.update(values or {})
    return out


def creation_error(model, lib) -> str:
    with pytest.raises(Exception) as ei:
        ort_utils.session(model, lib)
    return str(ei.value)


def run_error(model, lib, feed) -> str:
    sess = ort_utils.session(model, lib)  # symbolic shapes: the session must build
    with pytest.raises(Exception) as ei:
        sess.run(None, feed)
    return str(ei.value)


def any_error(model, lib, feed) -> str:
    """The error at session creation or, failing that, at run time."""
    try:
        sess = ort_utils.session(model, lib)
    except Exception as e:  # noqa: BLE001
        return str(e)
    with pytest.raises(Exception) as ei:
        sess.run(None, feed)
    return str(ei.value)


def assert_mentions(msg: str, *parts: str):
    for p in parts:
        assert p in msg, f"error message lacks {p!r}:\n{msg}"


# --------------------------------------------------------------------------------------------
# routing indices out of range (run time, every dtype of I, both ops)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [E, E + 5, -1, -(2**31)])
@pytest.mark.parametrize("index_dtype", ["int32", "int64"])
@pytest.mark.parametrize("op", ["ScatterMoE", "ParallelLinear", "CapacityMask"])
def test_index_out_of_range(lib, op, index_dtype, bad):
    t, j = 2, 1
    if op == "ScatterMoE":
        names, shapes, present = MOE_INPUTS, moe_shapes(), MOE_INPUTS[:5]
    elif op == "ParallelLinear":
        names, shapes, present = PL_INPUTS, pl_shapes(), PL_INPUTS[:3]
    else:
        names, shapes, present = ["routing_indices", "capacity"], {"routing_indices": [T, K], "capacity": []}, None
    types = {"routing_indices": index_dtype}
    if op == "CapacityMask":
        model = graphs.capacity_mask_model(E=E, k=K, index_dtype=index_dtype, routing_shape=[T, K])
        present = ["routing_indices", "capacity"]
    else:
        model = bare(op, names, shapes, types, present=present)
    feed = feeds(names, shapes, types, present)
    feed["routing_indices"][t, j] = bad
    msg = run_error(model, lib, feed)
    assert_mentions(msg, f"{op}: input 'routing_indices' holds {bad} at [{t}, {j}], outside [0, {E}) (the number of experts)")


# --------------------------------------------------------------------------------------------
# inconsistent shapes: static -> session creation, symbolic -> run time
# --------------------------------------------------------------------------------------------

MOE_SHAPE_CASES = {
    # name: (changes to the shapes, inputs present, message fragments)
    "d_w_in": ({"w_in": [E, 2 * F, D + 1]}, None, ["'w_in'", "d = 24"]),
    "d_w_out": ({"w_out": [E, D + 1, F]}, None, ["'w_out'", "d = 24"]),
    "E": ({"w_out": [E - 1, D, F]}, None, ["'w_in'", "'w_out'", "number of experts"]),
    "k": ({"routing_weights": [T, K + 1]}, None, ["'routing_weights'", "'routing_indices'"]),
    "f": ({"w_in": [E, 2 * F - 2, D]}, None, ["'w_in'", str(2 * F - 2)]),
    "tokens": ({"X": [T + 1, D]}, None, ["'X'", "'routing_indices'", "tokens"]),
    "b_in": ({"b_in": [E, 2 * F + 1]}, MOE_INPUTS[:6], ["'b_in'"]),
    "b_out_E": ({"b_out": [E + 1, D]}, MOE_INPUTS[:7], ["'b_out'"]),
    "capacity_2": ({"capacity": [2]}, MOE_INPUTS, ["'capacity'"]),
    "w_in_rank": ({"w_in": [2 * F, D]}, None, ["'w_in'", "rank"]),
    "X_rank": ({"X": [D]}, None, ["'X'", "rank"]),
    "k_zero": ({"routing_weights": [T, 0], "routing_indices": [T, 0]}, None, ["'routing_indices'", "k"]),
}


@pytest.mark.parametrize("case", list(MOE_SHAPE_CASES))
def test_scatter_moe_static_shape_mismatch_fails_at_session_creation(lib, case):
    changes, present, parts = MOE_SHAPE_CASES[case]
    shapes = {**moe_shapes(), **changes}
    model = bare("ScatterMoE", MOE_INPUTS, shapes, present=present)
    msg = creation_error(model, lib)
    assert_mentions(msg, "ScatterMoE: ", *parts)


@pytest.mark.parametrize("case", [c for c in MOE_SHAPE_CASES if c not in ("w_in_rank", "X_rank")])
def test_scatter_moe_symbolic_shape_mismatch_fails_at_run(lib, case):
    changes, present, parts = MOE_SHAPE_CASES[case]
    shapes = {**moe_shapes(), **changes}
    present = present or MOE_INPUTS[:5]
    model = bare("ScatterMoE", MOE_INPUTS, shapes, present=present, symbolic=True)
    msg = run_error(model, lib, feeds(MOE_INPUTS, shapes, present=present))
    assert_mentions(msg, "ScatterMoE: ", *[p for p in parts if p not in ("d = 24",)])


def test_gated_zero_with_gated_weights(lib):
    """gated = 0 wants w_in [E, f, d]; a [E, 2f, d] w_in is refused."""
    model = bare("ScatterMoE", MOE_INPUTS, moe_shapes(gated=1), attrs={"gated": 0, "activation": "relu"})
    assert_mentions(creation_error(model, lib), "ScatterMoE: ", "'w_in'", "not gated")


def test_output_allocated_with_another_type_is_an_error_not_garbage(lib):
    """An attribute without a value (`gated` of type INT, no `i`) makes ONNX Runtime's type
    inference for the node fail, and ORT then allocates Y with the type the graph declares
    (float32) while the inputs make the op compute float16: the kernel must refuse, not write
    float16 results into a float32 buffer."""
    from onnx import AttributeProto

    types = {"X": "f16", "routing_weights": "f16", "w_in": "f16", "w_out": "f16"}
    model = bare("ScatterMoE", MOE_INPUTS, moe_shapes(gated=0), types=types, attrs={"activation": "relu"})
    a = AttributeProto()
    a.name, a.type = "gated", AttributeProto.INT
    model.graph.node[0].attribute.append(a)
    feed = feeds(MOE_INPUTS, moe_shapes(gated=0), types=types, present=MOE_INPUTS[:5])
    assert_mentions(any_error(model, lib, feed), "allocated as float32", "computes float16")


PL_SHAPE_CASES = {
    "d_in": ({"W": [E, F, D + 1]}, None, {}, ["'W'", "d_in"]),
    "tokens": ({"X": [T + 1, D]}, None, {}, ["'X'", "'routing_indices'"]),
    "grouped_rows": ({"X": [T * K + 1, D]}, None, {"grouped_in": 1}, ["'X'", f"T*k = {T * K}"]),
    "b": ({"b": [E, F + 1]}, PL_INPUTS[:4], {}, ["'b'"]),
    "gates_shape": ({"gates": [T, K + 1]}, PL_INPUTS, {}, ["'gates'"]),
    "gates_grouped_out": ({}, PL_INPUTS, {"grouped_out": 1}, ["'gates'", "grouped_out"]),
}


@pytest.mark.parametrize("case", list(PL_SHAPE_CASES))
def test_parallel_linear_static_shape_mismatch_fails_at_session_creation(lib, case):
    changes, present, attrs, parts = PL_SHAPE_CASES[case]
    shapes = {**pl_shapes(), **changes}
    model = bare("ParallelLinear", PL_INPUTS, shapes, present=present, attrs=attrs)
    assert_mentions(creation_error(model, lib), "ParallelLinear: ", *parts)


@pytest.mark.parametrize("case", [c for c in PL_SHAPE_CASES if c != "gates_grouped_out"])
def test_parallel_linear_symbolic_shape_mismatch_fails_at_run(lib, case):
    changes, present, attrs, parts = PL_SHAPE_CASES[case]
    shapes = {**pl_shapes(), **changes}
    present = present or PL_INPUTS[:3]
    model = bare("ParallelLinear", PL_INPUTS, shapes, present=present, attrs=attrs, symbolic=True)
    msg = run_error(model, lib, feeds(PL_INPUTS, shapes, present=present))
    assert_mentions(msg, "ParallelLinear: ", *parts)


# --------------------------------------------------------------------------------------------
# element types
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("symbolic", [False, True])
def test_float64_is_refused_clearly(lib, symbolic):
    types = {n: "f64" for n in ("X", "routing_weights", "w_in", "w_out")}
    model = bare("ScatterMoE", MOE_INPUTS, moe_shapes(), types=types, symbolic=symbolic)
    msg = any_error(model, lib, feeds(MOE_INPUTS, moe_shapes(), types, MOE_INPUTS[:5]))
    assert "ScatterMoE" in msg and ("float64" in msg or "double" in msg), msg


def test_float64_parallel_linear(lib):
    types = {"X": "f64", "W": "f64"}
    model = bare("ParallelLinear", PL_INPUTS, pl_shapes(), types=types)
    msg = any_error(model, lib, feeds(PL_INPUTS, pl_shapes(), types, PL_INPUTS[:3]))
    assert "ParallelLinear" in msg and ("float64" in msg or "double" in msg), msg


def test_mixed_float_types(lib):
    types = {"w_in": "f16"}
    model = bare("ScatterMoE", MOE_INPUTS, moe_shapes(), types=types)
    msg = any_error(model, lib, feeds(MOE_INPUTS, moe_shapes(), types, MOE_INPUTS[:5]))
    assert_mentions(msg, "ScatterMoE: ", "'w_in' is float16", "'X' is float32", "all float inputs must share one element type")


def test_float_indices(lib):
    types = {"routing_indices": "f32"}
    model = bare("ScatterMoE", MOE_INPUTS, moe_shapes(), types=types)
    msg = any_error(model, lib, feeds(MOE_INPUTS, moe_shapes(), types, MOE_INPUTS[:5]))
    assert_mentions(msg, "ScatterMoE: ", "'routing_indices'", "float32", "int32, int64")


def test_int32_capacity(lib):
    types = {"capacity": "int32"}
    model = bare("ScatterMoE", MOE_INPUTS, moe_shapes(), types=types, present=MOE_INPUTS)
    msg = any_error(model, lib, feeds(MOE_INPUTS, moe_shapes(), types, MOE_INPUTS))
    assert_mentions(msg, "ScatterMoE: ", "'capacity'", "int32", "int64")


# --------------------------------------------------------------------------------------------
# attributes (always known: session creation)
# --------------------------------------------------------------------------------------------

MOE_ATTR_CASES = {
    "activation_swish": ({"activation": "swish"},
                         ["attribute 'activation' has unsupported value 'swish'", "silu", "gelu_tanh", "relu2", "swiglu_oai",
                          "swiglu_limit"]),
    "gated_2": ({"gated": 2}, ["'gated'", "2"]),
    "gated_minus_1": ({"gated": -1}, ["'gated'", "-1"]),
    "glu_layout": ({"glu_layout": "gateup"}, ["attribute 'glu_layout' has unsupported value 'gateup'", "interleaved"]),
    "capacity_order": ({"capacity_order": "random"}, ["attribute 'capacity_order' has unsupported value 'random'"]),
    "swiglu_not_gated": ({"activation": "swiglu_oai", "gated": 0}, ["'swiglu_oai'", "'gated'"]),
    "swiglu_limit_not_gated": ({"activation": "swiglu_limit", "gated": 0}, ["'swiglu_limit'", "'gated'"]),
    "swiglu_limit_limit_zero": ({"activation": "swiglu_limit", "limit": 0.0}, ["'limit'", "0"]),
    "limit_zero": ({"activation": "swiglu_oai", "limit": 0.0}, ["'limit'", "0"]),
    "limit_negative": ({"activation": "swiglu_oai", "limit": -1.5}, ["'limit'", "-1.5"]),
    "alpha_inf": ({"activation": "swiglu_oai", "alpha": math.inf}, ["'alpha'"]),
    "alpha_nan": ({"activation": "swiglu_oai", "alpha": math.nan}, ["'alpha'"]),
}


@pytest.mark.parametrize("case", list(MOE_ATTR_CASES))
def test_scatter_moe_attribute_errors(lib, case):
    attrs, parts = MOE_ATTR_CASES[case]
    gated = attrs.get("gated", 1)
    model = bare("ScatterMoE", MOE_INPUTS, moe_shapes(gated=1 if gated not in (0,) else 0), attrs=attrs)
    assert_mentions(creation_error(model, lib), "ScatterMoE: ", *parts)


@pytest.mark.parametrize("attrs,parts", [
    ({"grouped_in": 2}, ["'grouped_in'", "2"]),
    ({"grouped_out": 5}, ["'grouped_out'", "5"]),
])
def test_parallel_linear_attribute_errors(lib, attrs, parts):
    model = bare("ParallelLinear", PL_INPUTS, pl_shapes(), attrs=attrs)
    assert_mentions(creation_error(model, lib), "ParallelLinear: ", *parts)


@pytest.mark.parametrize("E_attr,parts", [(None, ["'num_experts'"]), (0, ["'num_experts'", "0"])])
def test_capacity_mask_num_experts(lib, E_attr, parts):
    model = graphs.capacity_mask_model(E=E_attr, k=K, routing_shape=[T, K])
    assert_mentions(creation_error(model, lib), "CapacityMask: ", *parts)


def test_capacity_mask_bad_order(lib):
    model = graphs.capacity_mask_model(E=E, k=K, routing_shape=[T, K], capacity_order="fifo")
    assert_mentions(creation_error(model, lib), "CapacityMask: ", "attribute 'capacity_order' has unsupported value 'fifo'")


# --------------------------------------------------------------------------------------------
# values and arity
# --------------------------------------------------------------------------------------------


def test_negative_capacity(lib):
    model = bare("ScatterMoE", MOE_INPUTS, moe_shapes(), present=MOE_INPUTS)
    feed = feeds(MOE_INPUTS, moe_shapes(), present=MOE_INPUTS, values={"capacity": np.array(-1, np.int64)})
    assert_mentions(run_error(model, lib, feed), "ScatterMoE: input 'capacity' must be >= 0, got -1")


def test_capacity_mask_negative_capacity(lib):
    model = graphs.capacity_mask_model(E=E, k=K, routing_shape=[T, K])
    feed = {"routing_indices": np.zeros((T, K), np.int64), "capacity": np.array(-3, np.int64)}
    assert_mentions(run_error(model, lib, feed), "CapacityMask: input 'capacity' must be >= 0, got -3")


def test_required_input_absent(lib):
    """w_out written as an empty name."""
    model = bare("ScatterMoE", MOE_INPUTS, moe_shapes(), present=["X", "routing_weights", "routing_indices", "w_in", "b_in"])
    msg = creation_error(model, lib)
    # ORT itself refuses an empty name for a required input: "... input 4 is marked single but has an empty string"
    assert "ScatterMoE" in msg and ("'w_out'" in msg or "input 4" in msg), msg


def test_too_many_inputs(lib):
    # 8 inputs of the op's own and 4 for quantized weights (test_quantized_ops.py): 13 is one too many
    specs = [(nm, DEFAULT_TYPES.get(nm, "f32"), moe_shapes()[nm]) for nm in MOE_INPUTS] + [(f"extra{i}", "f32", [1]) for i in range(5)]
    model = graphs.op_model("ScatterMoE", specs, [("Y", "f32", None)])
    msg = creation_error(model, lib)
    assert "ScatterMoE" in msg and "13" in msg, msg


def test_too_few_inputs(lib):
    specs = [(nm, DEFAULT_TYPES.get(nm, "f32"), moe_shapes()[nm]) for nm in MOE_INPUTS[:4]]
    model = graphs.op_model("ScatterMoE", specs, [("Y", "f32", None)])
    msg = creation_error(model, lib)
    assert "ScatterMoE" in msg and ("4" in msg or "w_out" in msg), msg


def test_capacity_mask_capacity_with_two_elements(lib):
    model = graphs.capacity_mask_model(E=E, k=K, routing_shape=[T, K], capacity_shape=[2])
    assert_mentions(creation_error(model, lib), "CapacityMask: ", "'capacity'")


def test_parallel_linear_weight_rank(lib):
    shapes = {**pl_shapes(), "W": [F, D]}
    model = bare("ParallelLinear", PL_INPUTS, shapes)
    assert_mentions(creation_error(model, lib), "ParallelLinear: ", "'W'", "rank")
