"""The plugin's ScatterMoE against ORT running the same layer as a per-expert loop of standard ops.

The matrix is sampled, not the full product: every (dtype, k, E) combination once, with T,
activation, biases, routing pattern, index type, weight placement and scatter form rotating so that
every value of every axis appears, plus hand-picked awkward cases. Inputs are fresh each run
(seed printed on failure). Tolerance: max|a-b|/max|b| <= 1e-4 f32, 1e-2 f16, 3e-2 bf16.
"""

import itertools

import numpy as np
import pytest

from scattermoe_testing import data, graphs, ort_utils
from scattermoe_testing import reference as R

DTYPES = ["f32", "f16", "bf16"]
KS = [1, 2, 8]
ES = [1, 8, 64]
TS = [1, 3, 64, 1000]
ACTS = [  # (activation, gated)
    ("silu", 1), ("gelu", 0), ("gelu_tanh", 1), ("relu", 0), ("swiglu_oai", 1),
    ("silu", 0), ("gelu", 1), ("gelu_tanh", 0), ("relu", 1),
    ("relu2", 0), ("swiglu_limit", 1), ("relu2", 1),
]
BIASES = [(False, False), (True, True), (True, False), (False, True)]
PATTERNS = ["topk", "empty_expert", "one_expert"]
LAYOUTS = ["gate_up", "up_gate", "interleaved"]


def _case(dtype, k, E, T, act, gated, b_in, b_out, pattern, index_dtype="int64", weights="inputs",
          scatter="nd", layout="gate_up", d=24, f=40, rw="softmax", opset=17):
    if pattern == "empty_expert" and k >= E:
        pattern = "topk"  # topk with k > E draws with repeats (E = 1: every slot on expert 0)
    return dict(dtype=dtype, k=k, E=E, T=T, act=act, gated=gated, b_in=b_in, b_out=b_out, pattern=pattern,
                index_dtype=index_dtype, weights=weights, scatter=scatter, layout=layout, d=d, f=f, rw=rw, opset=opset)


def _matrix():
    cases = []
    for i, (dtype, k, E) in enumerate(itertools.product(DTYPES, KS, ES)):
        act, gated = ACTS[(i + i // 9) % len(ACTS)]
        cases.append(_case(
            dtype, k, E,
            T=TS[(i + i // 9) % len(TS)],
            act=act, gated=gated,
            b_in=BIASES[(i // 2 + i) % 4][0], b_out=BIASES[(i // 2 + i) % 4][1],
            pattern=PATTERNS[(i // 3 + i) % 3],
            index_dtype=["int64", "int32"][i % 2],
            weights=["inputs", "inputs", "initializers"][i % 3],
            scatter=["nd", "elements"][(i // 2) % 2],
            layout=LAYOUTS[(i // 5) % 3],
            opset=[17, 18][(i // 3) % 2],
        ))
    # awkward cases
    cases += [
        _case("bf16", 8, 64, 1000, "silu", 1, True, True, "one_expert"),           # every token on one expert
        _case("f32", 1, 8, 1000, "silu", 1, False, False, "one_expert"),           # k = 1: all on one expert, 7 empty
        _case("f16", 1, 64, 3, "gelu", 1, True, False, "topk"),                    # nearly every expert empty
        _case("f32", 8, 8, 64, "relu", 0, False, True, "topk"),                    # every token on every expert
        _case("f16", 2, 8, 64, "swiglu_oai", 1, True, True, "duplicates"),         # a token names an expert twice
        _case("f32", 2, 1, 64, "gelu_tanh", 0, True, True, "duplicates"),          # E = 1, both slots expert 0
        _case("f32", 2, 8, 64, "silu", 1, True, True, "topk", rw="normal"),        # signed routing weights
        _case("bf16", 2, 8, 1000, "gelu", 0, False, False, "empty_expert", weights="initializers"),
        _case("f32", 2, 8, 3, "silu", 1, False, False, "topk", d=1, f=1),          # d = f = 1
        _case("f32", 2, 8, 64, "silu", 1, True, True, "topk", d=17, f=29),         # odd widths
        _case("f16", 2, 8, 64, "gelu_tanh", 1, False, True, "topk", d=130, f=70, layout="interleaved"),
        _case("f32", 8, 64, 1000, "swiglu_oai", 1, True, True, "topk", layout="interleaved", weights="initializers"),
        _case("f32", 1, 1, 1, "relu", 1, False, False, "topk"),                    # the smallest layer
        _case("f32", 2, 8, 3, "relu2", 0, True, True, "topk", d=1, f=1),           # relu2, d = f = 1
        _case("bf16", 8, 64, 1000, "relu2", 0, False, True, "one_expert", d=17, f=29),
        _case("f16", 2, 8, 64, "swiglu_limit", 1, True, True, "duplicates", layout="interleaved"),
        _case("f32", 8, 64, 1000, "swiglu_limit", 1, False, False, "empty_expert", d=130, f=70, layout="up_gate",
              weights="initializers"),
    ]
    return cases


CASES = _matrix()


def _id(c):
    return (f"{c['dtype']}-k{c['k']}-E{c['E']}-T{c['T']}-{c['act']}{'-gated' if c['gated'] else ''}"
            f"{'-bin' if c['b_in'] else ''}{'-bout' if c['b_out'] else ''}-{c['pattern']}-{c['index_dtype']}"
            f"-{c['weights']}-{c['scatter']}-{c['layout']}-d{c['d']}f{c['f']}{'-rwnormal' if c['rw'] != 'softmax' else ''}"
            f"-opset{c['opset']}")


def test_matrix_covers_every_axis_value():
    seen = {key: {c[key] for c in CASES} for key in ("dtype", "k", "E", "T", "act", "gated", "index_dtype", "weights",
                                                       "scatter", "layout", "pattern", "opset")}
    assert seen["dtype"] == set(DTYPES) and seen["k"] == set(KS) and seen["E"] == set(ES) and seen["T"] == set(TS)
    assert {a for a, _ in ACTS} <= seen["act"] and seen["gated"] == {0, 1}
    assert {(c["b_in"], c["b_out"]) for c in CASES} == set(BIASES)
    assert {"topk", "empty_expert", "one_expert", "duplicates"} <= seen["pattern"]
    assert seen["index_dtype"] == {"int32", "int64"} and seen["weights"] == {"inputs", "initializers"}
    assert seen["layout"] == set(LAYOUTS) and seen["opset"] == {17, 18}


@pytest.mark.parametrize("c", CASES, ids=[_id(c) for c in CASES])
def test_scatter_moe_vs_loop_graph(lib, rng, c):
    dtype, act, gated = c["dtype"], c["act"], c["gated"]
    limit, alpha = {"swiglu_oai": (2.0, 1.702), "swiglu_limit": (1.5, 1.0)}.get(act, (7.0, 1.702))
    feeds = data.moe_inputs(rng, T=c["T"], d=c["d"], f=c["f"], E=c["E"], k=c["k"], gated=gated, b_in=c["b_in"],
                            b_out=c["b_out"], pattern=c["pattern"], weights=c["rw"], a_scale=2.0)
    if c["pattern"] == "empty_expert" and c["T"] > 0:
        assert len(np.unique(feeds["routing_indices"])) < c["E"]
    inits = {n: feeds[n] for n in ("w_in", "w_out", "b_in", "b_out") if n in feeds} if c["weights"] == "initializers" else None
    common = dict(d=c["d"], f=c["f"], E=c["E"], k=c["k"], dtype=dtype, index_dtype=c["index_dtype"], gated=gated,
                  b_in=c["b_in"], b_out=c["b_out"], initializers=inits, opset=c["opset"])
    plugin = graphs.scatter_moe_model(activation=act, glu_layout=c["layout"], alpha=alpha, limit=limit, **common)
    loop = graphs.moe_loop_model(activation=act, glu_layout=c["layout"], alpha=alpha, limit=limit,
                                 scatter=c["scatter"], **common)
    (want,) = ort_utils.run(ort_utils.session(loop), feeds)
    (got,) = ort_utils.run(ort_utils.session(plugin, lib), feeds)
    R.assert_close(got, want, dtype, f"ScatterMoE vs loop graph [{_id(c)}]")
