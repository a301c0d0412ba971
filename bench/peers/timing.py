"""How the columns are timed, and the ceilings the floor is computed from.

host_ms_interleaved  per column, the median wall time of one call + torch.cuda.synchronize(), calls
          cycling over the input sets (what a Python caller waits for: launches, host work, the EP's
          end-of-run sync); the columns of a cell are timed in turn over a few rounds, so that a drift of
          the GPU's clocks (it runs at its power limit) or of the host falls on every column alike
          instead of on whichever was timed last; each slice can follow a settling time of untimed
          calls of the same column (settle_s), so that it is not timed in the power and clock state
          the previous column left
graph_ms  one CUDA graph holding one forward per input set, replayed between CUDA events; median
          replay time / number of sets (device time; launch overhead removed), as tests/gpu/bench_forward.py
"""
import itertools
import statistics
import time

import torch


def cycle(fns):
    """One callable that calls fns[0], fns[1], ... in turn."""
    it = itertools.cycle(fns)
    return lambda: next(it)()


def host_ms_interleaved(named, budget_s=0.3, rounds=5, min_reps=5, max_reps=300, warmup=3, settle_s=0.0):
    """named: [(name, fn)]. Every fn gets budget_s of timing in all, in `rounds` slices taken in turn
    (the order reversed every other round). With settle_s > 0, each slice is preceded by settle_s
    seconds of untimed calls of the same fn, so that it is timed at its own steady state rather than
    in the power and clock state the previous column left. Returns ({name: median ms}, {name:
    exception} for those that raised; a failed fn is dropped from the later rounds)."""
    samples = {n: [] for n, _ in named}
    failed = {}

    def guarded(n, body):
        try:
            body()
        except Exception as e:  # noqa: BLE001 - reported per column
            failed[n] = e

    for n, fn in named:
        guarded(n, lambda fn=fn: [fn() for _ in range(warmup)])
    torch.cuda.synchronize()
    per_round = max(1, -(-min_reps // rounds))
    for r in range(rounds):
        for n, fn in (named if r % 2 == 0 else named[::-1]):
            if n in failed:
                continue
            ts = samples[n]

            def timed(fn=fn, ts=ts):
                end = time.perf_counter() + settle_s
                while time.perf_counter() < end:
                    fn()
                    torch.cuda.synchronize()
                end = time.perf_counter() + budget_s / rounds
                start = len(ts)
                while len(ts) - start < per_round or (len(ts) < max_reps and time.perf_counter() < end):
                    t0 = time.perf_counter()
                    fn()
                    torch.cuda.synchronize()
                    ts.append(time.perf_counter() - t0)

            guarded(n, timed)
    return {n: statistics.median(ts) * 1e3 for n, ts in samples.items() if ts and n not in failed}, failed


def graph_ms(fns, budget_s=0.3, min_reps=5, max_reps=100):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up off the capture: module loads, Triton compiles, allocator
        for _ in range(2):
            for fn in fns:
                fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for fn in fns:
            fn()
    g.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    g.replay()
    torch.cuda.synchronize()
    reps = int(max(min_reps, min(max_reps, budget_s / max(time.perf_counter() - t0, 1e-6))))
    events = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        events.append((a, b))
    torch.cuda.synchronize()
    ms = statistics.median(a.elapsed_time(b) for a, b in events) / len(fns)
    del g
    return ms


def _best_event_ms(fn, iters, rounds=5):
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(rounds):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(iters):
            fn()
        b.record()
        torch.cuda.synchronize()
        best = min(best, a.elapsed_time(b) / iters)
    return best


def _matmul_rate(n=8192):
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    return 2 * n**3 / (_best_event_ms(lambda: torch.mm(a, b, out=c), iters=10) / 1e3)


def _copy_rate(nbytes=2 << 30):
    x = torch.empty(nbytes // 2, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    return 2 * nbytes / (_best_event_ms(lambda: y.copy_(x), iters=5) / 1e3)  # read + write


def ceilings():
    """(bf16 matmul FLOP/s from an 8192^3 product, copy bytes/s from a 2 GiB device-to-device copy);
    best of 5 rounds, so that the floor built from them is a lower bound."""
    flops, bw = _matmul_rate(), _copy_rate()
    torch.cuda.empty_cache()
    return flops, bw
