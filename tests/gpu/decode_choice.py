"""The small-tile kernel choice at decode, from tests/gpu/bench_forward.py's records: for every GEMM of
every row, the time of each forced configuration, the choice before the skinny kernel's 16-bit rules
(the mma.sync tiles only), the choice now (src/cuda/forward/selection.rs `pick_cfg`, as
tests/gpu/choice.py mirrors it) and the fastest.

usage: python3 tests/gpu/decode_choice.py RECORD.json [...]   (bench/results/decode/README.md)
Runs anywhere (no GPU): it only reads the records."""
import ast
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import choice  # noqa: E402


def bench_shapes():
    """d, f, E, k per shape: tests/gpu/bench_forward.py's SHAPES, read from its source (it imports torch)."""
    src = open(os.path.join(os.path.dirname(__file__), "bench_forward.py")).read()
    for node in ast.parse(src).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "SHAPES":
            return ast.literal_eval(node.value)
    raise SystemExit("bench_forward.py has no SHAPES")


SHAPES = bench_shapes()

CFGS = ("32x32", "32x64", "32x64s6", "skinny")


def tiles(n_assign, E, K):
    """The choice without the skinny kernel's 16-bit rules (the mma.sync tiles at up to 16 rows per
    expert on sm_90a)."""
    return choice.choose(n_assign, E, K, hopper=True)


def now(n_assign, E, N, K):
    return choice.pick_cfg(n_assign, E, K, N, hopper=True)


def main():
    tot = {"before": 0.0, "now": 0.0, "best": 0.0}
    layers = []
    print(f"{'shape':12s} {'T':>3s} gemm {'K':>5s} {'R':>4s} {'W MiB':>7s} | {'before':>15s} | {'now':>15s} | {'fastest':>15s} | now/before")
    for path in sys.argv[1:]:
        for r in json.load(open(path)):
            d, f, E, k = SHAPES[r["shape"]]
            T = r["T"]
            n = T * k
            fixed = r["stage_route"] * 1e3 + r["stage_comb"] * 1e3
            layer = {"before": fixed, "now": fixed}
            for g, N, K in (("g1", 2 * f, d), ("g2", d, f)):
                us = {c: r[f"{g}_{c}"] * 1e3 for c in CFGS if f"{g}_{c}" in r}
                if set(us) != set(CFGS):
                    continue
                b, w = tiles(n, E, K), now(n, E, N, K)
                best = min(us, key=us.get)
                for key, c in (("before", b), ("now", w), ("best", best)):
                    tot[key] += us[c]
                layer["before"] += us[b]
                layer["now"] += us[w]
                R = choice.rows_per_expert(n, E)
                mib = min(E, n) * N * K * 2 / 2**20
                print(f"{r['shape']:12s} {T:3d} {g:4s} {K:5d} {R:4.0f} {mib:7.0f} | {b:8s} {us[b]:6.1f} | {w:8s} {us[w]:6.1f} | "
                      f"{best:8s} {us[best]:6.1f} | {us[w] / us[b]:.3f}")
            if len(layer) == 2 and f"g2_{CFGS[0]}" in r:
                layers.append((r["shape"], T, layer["before"], layer["now"]))
    print(f"sum over the GEMMs, us: before {tot['before']:.0f}, now {tot['now']:.0f}, fastest {tot['best']:.0f}")
    print("\nthe layer (routing + GEMM1 + GEMM2 + combine, each stage timed alone), us:")
    print(f"{'shape':12s} {'T':>3s} {'before':>8s} {'now':>8s} now/before")
    for shape, T, b, w in layers:
        print(f"{shape:12s} {T:3d} {b:8.1f} {w:8.1f} {w / b:.3f}")


if __name__ == "__main__":
    main()
