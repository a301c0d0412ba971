"""One grouped GEMM alone, the skinny kernel (kernels/skinny_gemm.cu) against the mma.sync
configuration the choice takes without it, at decode token counts: per GEMM (GEMM1: gathered rows of
x, gated; GEMM2: grouped rows of h), W in bf16, fp8 (one scale per output channel, float32) and int4
(groups of 128 along the input, float32 scales, zero points), the time (CUDA events around the one
launch, median of --reps after --warmup launches, L2 flushed before every launch unless --no-flush:
the layer's weights are cold at decode, each layer's differ) and the bytes of the hit experts' W
(codes, scales and zero points) over that time.

usage: python3 tests/gpu/bench_skinny.py --fatbin-dir DIR [--shapes mixtral,qwen3,deepseek,gptoss]
       [--tokens 1,4,16,64,128] [--formats bf16,fp8,int4] [--gemms g1,g2] [--reps 50] [--out DIR]
Prints one line per (shape, tokens, GEMM, format); --out also writes bench_skinny.json there. Weights
are random (codes drawn directly, so a DeepSeek-V3 layer's 256 experts fit), the routing random top-k.
"""
import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from smoe_cuda import QW, Kernels  # noqa: E402

# d, f, E, k; GPT-OSS with biases and its clamped swiglu
SHAPES = {"mixtral": (4096, 14336, 8, 2), "qwen3": (2048, 768, 128, 8), "deepseek": (7168, 2048, 256, 8),
          "gptoss": (2880, 2880, 128, 4)}
# nominal DRAM bandwidth (GB/s) by device name, for the fraction of the floor
PEAK = {"H100": 3350.0, "H200": 4800.0}


def weight(E, N, K, fmt, dt):
    """W [E, N, K] in the format, random; its bytes per expert."""
    if fmt == "bf16":
        w = torch.randn(E, N, K, device="cuda", dtype=dt).mul_(1.0 / math.sqrt(K))  # in place: DeepSeek's W1 is 15 GB
        return w, N * K * 2
    if fmt == "fp8":
        codes = torch.randint(0, 256, (E, N, K), device="cuda", dtype=torch.uint8)
        codes.bitwise_and_(0xBF)  # exponent below 8: |code| <= 1.875, no NaN code
        scale = torch.full((E, N, 1), 1.0 / math.sqrt(K), device="cuda")
        return QW("fp8", codes, scale, None, (1, K), K), N * K + N * 4
    g = 128
    nbi = -(-K // g)
    codes = torch.randint(0, 256, (E, N, (K + 1) // 2), device="cuda", dtype=torch.uint8)
    scale = torch.full((E, N, nbi), 1.0 / (8 * math.sqrt(K)), device="cuda")
    zero = torch.randint(6, 10, (E, N, nbi), device="cuda", dtype=torch.uint8)
    return QW("u4", codes, scale, zero, (1, g), K), N * ((K + 1) // 2) + N * nbi * 5


def timed(fn, reps, warmup, flush):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        if flush is not None:
            flush.zero_()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        torch.cuda.synchronize()
        ts.append(e0.elapsed_time(e1))
    ts.sort()
    return ts[len(ts) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fatbin-dir", default="target/scattermoe-kernels")
    ap.add_argument("--shapes", default="mixtral,qwen3,deepseek,gptoss")
    ap.add_argument("--tokens", default="1,4,16,64,128")
    ap.add_argument("--formats", default="bf16,fp8,int4")
    ap.add_argument("--gemms", default="g1,g2")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--no-flush", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    K = Kernels(a.fatbin_dir)
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK.items() if k in name), None)
    flush = None if a.no_flush else torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    print(f"{name}: {K.sms} SMs; L2 {'not flushed' if flush is None else 'flushed (256 MiB written) before every launch'}; "
          f"median of {a.reps}; W GB/s = hit experts' W bytes (codes + scales + zero points) / time"
          + (f"; % of a nominal {peak:.0f} GB/s" if peak else ""), flush=True)
    print(f"{'shape':9s} {'T':>4s} {'gemm':4s} {'fmt':4s} {'R':>5s} | {'skinny ms':>9s} {'GB/s':>6s} {'%':>4s} | "
          f"{'mma cfg':8s} {'ms':>7s} {'GB/s':>6s} {'%':>4s} | {'speedup':>7s} {'rel.diff':>8s}", flush=True)
    rows = []
    dt = torch.bfloat16
    for shape in a.shapes.split(","):
        d, f, E, k = SHAPES[shape]
        oai = shape == "gptoss"
        for gemm in a.gemms.split(","):
            N, Kd = (2 * f, d) if gemm == "g1" else (d, f)
            for fmt in a.formats.split(","):
                torch.manual_seed(0)
                w, per_expert = weight(E, N, Kd, fmt, dt)
                bias = (0.1 * torch.randn(E, N, device="cuda")).to(dt) if oai else None
                run = K.qgemm if isinstance(w, QW) else K.gemm
                for T in (int(t) for t in a.tokens.split(",")):
                    ri = torch.rand(T, E, device="cuda").topk(k, dim=1).indices.to(torch.int32).contiguous()
                    bufs = K.alloc_forward(T, k, E, d, f, dt)
                    K.routing(ri, E, bufs)
                    hit = int(torch.unique(ri).numel())
                    nbytes = hit * per_expert
                    R = T * k / min(E, T * k)
                    if gemm == "g1":
                        x = torch.randn(T, d, device="cuda", dtype=dt)
                        act = "swiglu_oai" if oai else "silu"
                        args = (x, w, bias, bufs["H"], bufs["sidx"], bufs["offsets"], None, k, T * k, 0, 1, act, 1,
                                "interleaved" if oai else "gate_up")
                        out = bufs["H"]
                    else:
                        bufs["H"].normal_()
                        args = (bufs["H"], w, bias, bufs["O"], bufs["sidx"], bufs["offsets"], None, k, T * k, 1, 1, "none", 0)
                        out = bufs["O"]
                    # the choice without the skinny kernel
                    K.skinny_rows, K.quant_skinny_rows = -1.0, -1.0
                    base = K.pick_qcfg(T * k, E, Kd) if isinstance(w, QW) else K.pick_cfg(T * k, E, Kd, N)
                    restore_thresholds(K)
                    res = {}
                    for cfg in ("skinny", base):
                        out.fill_(float("nan"))
                        run(*args, cfg=cfg)
                        torch.cuda.synchronize()
                        res[cfg] = (timed(lambda: run(*args, cfg=cfg), a.reps, a.warmup, flush), out.float().clone())
                    (ts, ys), (tb, yb) = res["skinny"], res[base]
                    diff = ((ys - yb).abs().max() / yb.abs().max().clamp_min(1e-30)).item()
                    gbs = lambda t: nbytes / t / 1e6  # noqa: E731 (bytes / ms -> GB/s)
                    pct = lambda t: f"{100 * gbs(t) / peak:4.0f}" if peak else "   -"  # noqa: E731
                    print(f"{shape:9s} {T:4d} {gemm:4s} {fmt:4s} {R:5.1f} | {ts:9.4f} {gbs(ts):6.0f} {pct(ts)} | "
                          f"{base:8s} {tb:7.4f} {gbs(tb):6.0f} {pct(tb)} | {tb / ts:7.2f} {diff:8.1e}"
                          + ("  NaN!" if bool(torch.isnan(ys).any()) else ""), flush=True)
                    rows.append(dict(shape=shape, tokens=T, gemm=gemm, format=fmt, rows_per_expert=R, experts_hit=hit,
                                     w_bytes=nbytes, skinny_ms=ts, base_cfg=base, base_ms=tb, rel_diff=diff))
                    del bufs
                del w
                torch.cuda.empty_cache()
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "bench_skinny.json"), "w") as fh:
            json.dump(dict(device=name, flushed=flush is not None, reps=a.reps, time=time.time(), rows=rows), fh, indent=1)


def restore_thresholds(K):
    """The skinny thresholds of the catalogue (or of SMOE_SKINNY_ROWS / SMOE_QUANT_SKINNY_ROWS)."""
    from kernel_table import QUANT_SKINNY_ROWS, SKINNY_ROWS
    K.skinny_rows = float(os.environ.get("SMOE_SKINNY_ROWS", str(SKINNY_ROWS)))
    K.quant_skinny_rows = float(os.environ.get("SMOE_QUANT_SKINNY_ROWS", str(QUANT_SKINNY_ROWS)))


if __name__ == "__main__":
    main()
