"""Smoke check of the custom-op library under whichever onnxruntime runs this script.

    PYTHONPATH=<repo>/python python -m scattermoe_testing.smoke [--lib PATH]

Loads the library with SessionOptions.register_custom_ops_library, runs ScatterMoE (f32, f16,
bf16, int32 and int64 indices, capacity with CapacityMask), ParallelLinear (f32, f16, bf16), two
stacked ScatterMoE layers and the ParallelLinear composition against the numpy reference, checks
inferred output shapes (ORT >= 1.24), the out-of-range index error and an unsupported attribute. Prints one JSON line
and exits 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def run_checks(lib: str, seed: int = 0) -> dict:
    """Runs every check; returns {"onnxruntime", "lib", "checks": {name: "ok ..." | "FAILED: ..."}, "ok"}."""
    from types import SimpleNamespace

    from scattermoe_testing import data, graphs, ort_utils
    from scattermoe_testing import reference as R
    import onnxruntime

    args = SimpleNamespace(lib=str(lib))
    rng = np.random.default_rng(seed)
    results: dict = {"onnxruntime": onnxruntime.__version__, "lib": args.lib, "checks": {}}
    ok = True

    def check(name, fn):
        nonlocal ok
        try:
            results["checks"][name] = fn()
        except Exception as e:  # noqa: BLE001
            ok = False
            results["checks"][name] = f"FAILED: {type(e).__name__}: {e}"

    T, d, f, E, k = 37, 24, 40, 8, 2

    def moe(dtype, index_dtype, capacity):
        feeds = data.moe_inputs(rng, T=T, d=d, f=f, E=E, k=k, b_in=True, b_out=True)
        feeds["routing_indices"] = feeds["routing_indices"].astype(index_dtype)
        if capacity is not None:
            feeds["capacity"] = np.array(capacity, np.int64)
        model = graphs.scatter_moe_model(d=d, f=f, E=E, k=k, dtype=dtype, index_dtype=index_dtype, b_in=True, b_out=True,
                                         capacity=capacity is not None, kept=capacity is not None,
                                         x_shape=[T, d], routing_shape=[T, k])
        sess = ort_utils.session(model, args.lib)
        outs = ort_utils.run(sess, feeds)
        r = {n: R.round_to(v, dtype) if v.dtype == np.float32 else v for n, v in feeds.items()}
        want, want_kept = R.scatter_moe(r["X"], r["routing_weights"], r["routing_indices"], r["w_in"], r["w_out"],
                                        r["b_in"], r["b_out"], capacity)
        err = R.assert_close(outs[0], want, dtype, f"ScatterMoE {dtype}")
        if capacity is not None:
            np.testing.assert_array_equal(outs[1], want_kept)
        return f"ok rel_err={err:.2e}"

    for dtype in ("f32", "f16", "bf16"):
        for index_dtype in ("int64", "int32"):
            check(f"scatter_moe_{dtype}_{index_dtype}", lambda dt=dtype, it=index_dtype: moe(dt, it, None))
    check("scatter_moe_capacity", lambda: moe("f32", "int64", 5))

    def pl(dtype):
        ri = data.routing(rng, T, E, k)
        feeds = {"X": rng.standard_normal((T, d)).astype(np.float32), "routing_indices": ri,
                 "W": rng.standard_normal((E, f, d)).astype(np.float32), "gates": data.routing_weights(rng, T, k)}
        model = graphs.parallel_linear_model(d_in=d, d_out=f, E=E, k=k, dtype=dtype, gates=True)
        (y,) = ort_utils.run(ort_utils.session(model, args.lib), feeds)
        r = {n: R.round_to(v, dtype) if v.dtype == np.float32 else v for n, v in feeds.items()}
        err = R.assert_close(y, R.parallel_linear(r["X"], ri, r["W"], None, r["gates"]), dtype)
        return f"ok rel_err={err:.2e}"

    for dtype in ("f32", "f16", "bf16"):
        check(f"parallel_linear_{dtype}", lambda dt=dtype: pl(dt))

    def inferred_shapes():
        got = {}
        for dtype in ("f32", "bf16"):
            model = graphs.scatter_moe_model(d=d, f=f, E=E, k=k, dtype=dtype, x_shape=[T, d], routing_shape=[T, k])
            got[f"ScatterMoE {dtype}"] = ort_utils.session(model, args.lib).get_outputs()[0].shape
        model = graphs.parallel_linear_model(d_in=d, d_out=f, E=E, k=k, grouped_out=1, x_shape=[T, d], routing_shape=[T, k])
        got["ParallelLinear grouped_out"] = ort_utils.session(model, args.lib).get_outputs()[0].shape
        want = {"ScatterMoE f32": [T, d], "ScatterMoE bf16": [T, d], "ParallelLinear grouped_out": [T * k, f]}
        assert got == want, f"inferred output shapes {got}, expected {want}"
        return "ok"

    def stacked():
        """Two ScatterMoE layers with a residual add: the second node's X comes out of the graph."""
        feeds = data.moe_inputs(rng, T=T, d=d, f=f, E=E, k=k)
        for i in range(2):
            extra = data.moe_inputs(rng, T=1, d=d, f=f, E=E, k=k)
            feeds[f"w_in_{i}"], feeds[f"w_out_{i}"] = extra["w_in"], extra["w_out"]
        model = graphs.stacked_moe_model(d=d, f=f, E=E, k=k, layers=2, x_shape=[T, d], routing_shape=[T, k])
        (y,) = ort_utils.run(ort_utils.session(model, args.lib), feeds)
        h = feeds["X"].astype(np.float64)
        for i in range(2):
            h = h + R.scatter_moe(h, feeds["routing_weights"], feeds["routing_indices"], feeds[f"w_in_{i}"],
                                  feeds[f"w_out_{i}"])[0]
        return f"ok rel_err={R.assert_close(y, h, 'f32', 'stacked'):.2e}"

    check("stacked_scatter_moe_layers", stacked)

    def composed():
        """ScatterMoE next to PL(grouped_out=1) -> silu-GLU -> PL(grouped_in=1, gates)."""
        feeds = data.moe_inputs(rng, T=T, d=d, f=f, E=E, k=k)
        model = graphs.composed_moe_model(d=d, f=f, E=E, k=k)
        y_moe, y_pl = ort_utils.run(ort_utils.session(model, args.lib), feeds)
        want = R.scatter_moe(feeds["X"], feeds["routing_weights"], feeds["routing_indices"], feeds["w_in"],
                             feeds["w_out"])[0]
        R.assert_close(y_moe, want, "f32", "ScatterMoE")
        return f"ok rel_err={R.assert_close(y_pl, want, 'f32', 'ParallelLinear chain'):.2e}"

    check("parallel_linear_composition", composed)

    # The library declares no shape-inference function before ORT 1.24 (src/ort_ops/mod.rs: older
    # runtimes crash on a node with an optional input left out in the middle), so output shapes are
    # only checked from 1.24 on.
    ort_version = tuple(int(p) for p in onnxruntime.__version__.split(".")[:2])
    if ort_version >= (1, 24):
        check("inferred_output_shapes", inferred_shapes)
    else:
        results["checks"]["inferred_output_shapes"] = "skipped: no custom-op shape inference before ORT 1.24"

    def bad_index():
        feeds = data.moe_inputs(rng, T=4, d=d, f=f, E=E, k=k)
        feeds["routing_indices"][2, 1] = E
        sess = ort_utils.session(graphs.scatter_moe_model(d=d, f=f, E=E, k=k), args.lib)
        try:
            ort_utils.run(sess, feeds)
        except Exception as e:  # noqa: BLE001
            want = f"ScatterMoE: input 'routing_indices' holds {E} at [2, 1], outside [0, {E}) (the number of experts)"
            assert want in str(e), str(e)
            return "ok"
        raise AssertionError("no error for an out-of-range expert index")

    check("index_out_of_range", bad_index)

    def bad_attr():
        try:
            ort_utils.session(graphs.scatter_moe_model(d=d, f=f, E=E, k=k, activation="swish"), args.lib)
        except Exception as e:  # noqa: BLE001
            assert "ScatterMoE: attribute 'activation' has unsupported value 'swish'" in str(e), str(e)
            return "ok"
        raise AssertionError("activation='swish' accepted")

    check("bad_attribute", bad_attr)

    results["ok"] = ok
    return results


def main(argv=None) -> int:
    from scattermoe_testing import ort_utils

    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", default=str(ort_utils.library_path()))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    results = run_checks(args.lib, args.seed)
    print(json.dumps(results))
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
