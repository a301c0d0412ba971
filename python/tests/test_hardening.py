"""Hardening regressions in the plugin: an attribute of the wrong type is an error naming it (ORT's
typed getters fail on a mismatch, which used to read as "absent" and apply the default), huge
attribute values are refused instead of sizing allocations (TopKRouter's k of 2^31 and more too), and the capacity shape message says
what is allowed."""

import numpy as np
import onnx
import pytest
from onnx import helper

from scattermoe_testing import graphs

from test_errors import (E, K, MOE_INPUTS, PL_INPUTS, T, assert_mentions, bare, creation_error, moe_shapes,
                         pl_shapes, run_error)


def _retype(model: onnx.ModelProto, name: str, value) -> onnx.ModelProto:
    """The model with attribute `name` of its custom node replaced by one holding `value`."""
    node = next(n for n in model.graph.node if n.domain == "ai.scattermoe")
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(kept + [helper.make_attribute(name, value)])
    return model


WRONG_TYPES = [
    ("ScatterMoE", "gated", 1.0, "must be an int, got a float"),
    ("ScatterMoE", "gated", "1", "must be an int, got a string"),
    ("ScatterMoE", "activation", 3, "must be a string, got an int"),
    ("ScatterMoE", "alpha", 2, "must be a float, got an int"),
    ("ScatterMoE", "limit", "7", "must be a float, got a string"),
    ("ScatterMoE", "glu_layout", [1, 2], "must be a string, got a list of ints"),
    ("ParallelLinear", "grouped_in", 1.0, "must be an int, got a float"),
    ("ParallelLinear", "grouped_out", [1.0], "must be an int, got a list of floats"),
    ("CapacityMask", "num_experts", float(E), "must be an int, got a float"),
    ("CapacityMask", "capacity_order", 0, "must be a string, got an int"),
    ("TopKRouter", "k", 2.0, "must be an int, got a float"),
    ("TopKRouter", "scoring", 1, "must be a string, got an int"),
    ("TopKRouter", "normalize", "1", "must be an int, got a string"),
    ("TopKRouter", "tie_break", [0], "must be a string, got a list of ints"),
]


@pytest.mark.parametrize("op,name,value,part", WRONG_TYPES, ids=[f"{o}-{n}-{type(v).__name__}" for o, n, v, _ in WRONG_TYPES])
def test_attribute_of_the_wrong_type_is_an_error_naming_it(lib, op, name, value, part):
    if op == "ScatterMoE":
        model = bare(op, MOE_INPUTS, moe_shapes())
    elif op == "ParallelLinear":
        model = bare(op, PL_INPUTS, pl_shapes())
    elif op == "TopKRouter":
        model = graphs.topk_router_model(E=E, k=K)
    else:
        model = graphs.capacity_mask_model(E=E, k=K, routing_shape=[T, K])
    msg = creation_error(_retype(model, name, value), lib)
    assert_mentions(msg, f"{op}: attribute '{name}' {part}")


@pytest.mark.parametrize("num_experts", [2**31, 2**40, 2**62])
def test_capacity_mask_huge_num_experts_is_refused(lib, num_experts):
    # 2^40 used to size a Vec in capacity_keep: the host process aborted.
    model = graphs.capacity_mask_model(E=num_experts, k=K, routing_shape=[T, K])
    assert_mentions(creation_error(model, lib), "CapacityMask: attribute 'num_experts' must be in [1, 2147483647]",
                    str(num_experts))


@pytest.mark.parametrize("op", ["ScatterMoE", "CapacityMask"])
def test_capacity_of_shape_1x1_message_is_consistent(lib, op):
    if op == "ScatterMoE":
        shapes = {**moe_shapes(), "capacity": [1, 1]}
        model = bare(op, MOE_INPUTS, shapes, present=MOE_INPUTS)
    else:
        model = graphs.capacity_mask_model(E=E, k=K, routing_shape=[T, K], capacity_shape=[1, 1])
    msg = creation_error(model, lib)
    assert_mentions(msg, "input 'capacity' must be a scalar (shape []) or a 1-D tensor of one element (shape [1])",
                    "got shape [1, 1]")
    assert "hold one element" not in msg


@pytest.mark.parametrize("k", [2**31, 2**62])
def test_topk_router_huge_k_is_refused(lib, k):
    model = graphs.topk_router_model(E=E, k=k)
    assert_mentions(creation_error(model, lib), "TopKRouter: attribute 'k' must be in [1, 2147483647]", f"got {k}")
