"""Smoke check of the custom-op library under whichever onnxruntime runs this script.

    PYTHONPATH=<repo>/python python -m scattermoe_testing.smoke [--lib PATH]

Loads the library with SessionOptions.register_custom_ops_library, runs ScatterMoE (f32, f16,
bf16, int32 and int64 indices, capacity), ParallelLinear and CapacityMask against the numpy
reference, checks inferred output shapes and the out-of-range index error. Prints one JSON line
and exits 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def main(argv=None) -> int:
    from scattermoe_testing import data, graphs, ort_utils
    from scattermoe_testing import reference as R

    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", default=str(ort_utils.library_path()))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    import onnxruntime

    rng = np.random.default_rng(args.seed)
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
        shape = sess.get_outputs()[0].shape
        outs = ort_utils.run(sess, feeds)
        r = {n: R.round_to(v, dtype) if v.dtype == np.float32 else v for n, v in feeds.items()}
        want, want_kept = R.scatter_moe(r["X"], r["routing_weights"], r["routing_indices"], r["w_in"], r["w_out"],
                                        r["b_in"], r["b_out"], capacity)
        err = R.assert_close(outs[0], want, dtype, f"ScatterMoE {dtype}")
        if capacity is not None:
            np.testing.assert_array_equal(outs[1], want_kept)
        assert list(shape) == [T, d], f"inferred output shape {shape}"
        return f"ok rel_err={err:.2e}"

    for dtype in ("f32", "f16", "bf16"):
        for index_dtype in ("int64", "int32"):
            check(f"scatter_moe_{dtype}_{index_dtype}", lambda dt=dtype, it=index_dtype: moe(dt, it, None))
    check("scatter_moe_capacity", lambda: moe("f32", "int64", 5))

    def pl():
        ri = data.routing(rng, T, E, k)
        feeds = {"X": rng.standard_normal((T, d)).astype(np.float32), "routing_indices": ri,
                 "W": rng.standard_normal((E, f, d)).astype(np.float32), "gates": data.routing_weights(rng, T, k)}
        model = graphs.parallel_linear_model(d_in=d, d_out=f, E=E, k=k, gates=True)
        (y,) = ort_utils.run(ort_utils.session(model, args.lib), feeds)
        err = R.assert_close(y, R.parallel_linear(feeds["X"], ri, feeds["W"], None, feeds["gates"]), "f32")
        return f"ok rel_err={err:.2e}"

    check("parallel_linear", pl)

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
    print(json.dumps(results))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
