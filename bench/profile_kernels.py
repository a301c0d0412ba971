"""Where the GPU time of one layer forward goes, kernel by kernel, for the ORT columns of the
benchmark (our op through ORT's CUDA EP, ORT's com.microsoft.MoE) and our kernels launched directly.

torch.profiler records every kernel the process launches through CUPTI, ORT's included, so the same
report covers both ops. Each column runs --runs forwards (input set 0, synchronised, then a 2 ms
sleep so runs are told apart by the gap); --blocks blocks per column, taken in turn, so a drift of the
clocks (the H200 runs at its power limit here) falls on every column alike. Printed per column: the
GPU span of a run (first kernel start to last kernel end, median), the summed kernel time per run, the
idle time inside the span, and each kernel's mean time and share.

--sustain S: then each column runs back to back for S seconds (no sleeps: the steady state of the
benchmark's host timing) while nvidia-smi samples power and SM clock every 100 ms; printed per column:
ms per forward, mean power, mean SM clock, and the energy per forward (mean power x time). At the
power limit, the column that needs less energy per forward is the faster one.

usage (device machine, the benchmark's environment: bench/run_gpu_bench.sh sets it up):
  python3 bench/profile_kernels.py --shape mixtral --tokens 4096 [--peers ours,ortmoe,kernels]
(--shape: any layer of gpu_bench.py, deepseek_v3 and gpt_oss included)
"""
import argparse
import collections
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import gpu_bench  # noqa: E402


def columns(b, st, T, sets):
    """{column: callable running one forward on input set 0}."""
    torch, s = b.torch, sets[0]
    cols = {}
    for peer, key in (("ours", "ours/ORT"), ("ortmoe", "ORT MoE")):
        if peer in b.peers and f"sess_{peer}" in st:
            sess = st[f"sess_{peer}"]
            io = b.bind_set(sess, s, b.session_inputs(st, peer), shared=st["w"])
            cols[key] = lambda sess=sess, io=io: sess.run_with_iobinding(io)
    if "kernels" in b.peers and b.kernels is not None:
        bufs = b.kernels.alloc_forward(T, st["k"], st["E"], st["d"], st["f"], torch.bfloat16)
        cols["kernels"] = lambda: b.kernels_forward(st, s, bufs)
    return cols


def profile_block(torch, fn, runs):
    """Kernel events [(name, start_us, end_us)] of `runs` forwards of fn."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            fn()
            torch.cuda.synchronize()
            time.sleep(0.002)
    evs = []
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start:
            evs.append((e.name, e.time_range.start, e.time_range.end))
    return sorted(evs, key=lambda v: v[1])


def split_runs(evs, gap_us=1000.0):
    runs, cur, last_end = [], [], None
    for ev in evs:
        if cur and ev[1] - last_end > gap_us:
            runs.append(cur)
            cur = []
        cur.append(ev)
        last_end = ev[2] if last_end is None else max(last_end, ev[2])
    if cur:
        runs.append(cur)
    return runs


def report(key, runs):
    spans = [r[-1][2] - r[0][1] if r else 0.0 for r in runs]
    busy = [sum(e[2] - e[1] for e in r) for r in runs]
    per = collections.defaultdict(list)
    for r in runs:
        for name, t0, t1 in r:
            per[name].append(t1 - t0)
    n = max(1, len(runs))
    span, kern = statistics.median(spans), statistics.median(busy)
    print(f"\n{key}: {len(runs)} runs; GPU span per run {span / 1e3:.3f} ms (median; min {min(spans) / 1e3:.3f}, "
          f"max {max(spans) / 1e3:.3f}), kernel time {kern / 1e3:.3f} ms, idle inside the span {(span - kern) / 1e3:.3f} ms")
    for name, ds in sorted(per.items(), key=lambda kv: -sum(kv[1])):
        tot = sum(ds) / n
        print(f"  {tot / 1e3:8.3f} ms/run  {100 * tot / max(kern, 1e-9):5.1f}%  x{len(ds) / n:4.1f}  "
              f"mean {statistics.mean(ds):9.1f} us  {name[:300]}")


def sustain(torch, key, fn, seconds):
    """Back-to-back forwards for `seconds` while nvidia-smi samples power and clocks (first 0.5 s of
    the samples dropped: the sampler starting up and the clocks settling)."""
    cmd = ["nvidia-smi", "--query-gpu=power.draw,clocks.sm,temperature.gpu", "--format=csv,noheader,nounits",
           "-lms", "100"]
    smi = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    time.sleep(0.3)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        torch.cuda.synchronize()
        n += 1
    dt = time.perf_counter() - t0
    smi.terminate()
    out, _ = smi.communicate()
    rows = []
    for line in out.splitlines():
        try:
            rows.append([float(v) for v in line.split(",")])
        except ValueError:
            continue
    rows = rows[5:-1] if len(rows) > 8 else rows
    if not rows:
        print(f"{key}: {1e3 * dt / n:.3f} ms per forward over {n}; no nvidia-smi samples")
        return
    watts = statistics.mean(r[0] for r in rows)
    mhz = statistics.mean(r[1] for r in rows)
    ms = 1e3 * dt / n
    print(f"{key:10s} sustained {seconds:.0f} s: {ms:.3f} ms per forward ({n} forwards), {watts:.0f} W, SM clock "
          f"{mhz:.0f} MHz (min {min(r[1] for r in rows):.0f}), {max(r[2] for r in rows):.0f} C max, "
          f"{watts * ms:.0f} mJ per forward", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", default=os.path.join(REPO, ".carry/ort/libscattermoe_ort.so"))
    ap.add_argument("--fatbin-dir", default=os.path.join(REPO, "target/scattermoe-kernels"))
    ap.add_argument("--triton-dir", default=os.path.join(REPO, ".carry/scattermoe"))
    ap.add_argument("--shape", default="mixtral", choices=list(gpu_bench.SHAPES))
    ap.add_argument("--tokens", default="4096")
    ap.add_argument("--peers", default="ours,ortmoe,kernels")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--sustain", type=float, default=0, help="seconds of back-to-back forwards per column and round")
    ap.add_argument("--sustain-rounds", type=int, default=2)
    ap.add_argument("--shared-weights-gb", type=float, default=8.0, help="as gpu_bench.py's")
    a = ap.parse_args()
    a.budget, a.settle, a.time_limit, a.hard_extra, a.verbose = 0.3, 0.0, 1e9, 0, True
    b = gpu_bench.Bench(a)
    torch = b.torch
    st = b.prepare_shape(a.shape)
    for T in map(int, a.tokens.split(",")):
        sets = b.workload.make_sets(T, st["d"], st["E"], st["k"], seed=1000 + T)
        cols = columns(b, st, T, sets)
        print(f"\n=== {a.shape}, {T} tokens: columns {', '.join(cols)}; {a.blocks} blocks of {a.runs} runs each", flush=True)
        for fn in cols.values():
            for _ in range(a.warmup):
                fn()
        torch.cuda.synchronize()
        evs = {key: [] for key in cols}
        for blk in range(a.blocks):
            for key, fn in (cols.items() if blk % 2 == 0 else reversed(list(cols.items()))):
                evs[key].append(profile_block(torch, fn, a.runs))
        for key in cols:
            runs = [r for blk in evs[key] for r in split_runs(blk)]
            report(key, runs)
        if a.sustain > 0:
            print()
            for rnd in range(a.sustain_rounds):
                for key, fn in (cols.items() if rnd % 2 == 0 else reversed(list(cols.items()))):
                    sustain(torch, key, fn, a.sustain)
        del sets
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
