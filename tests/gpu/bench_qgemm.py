"""One grouped GEMM alone with W quantized, at prefill token counts: wgmma_ws's quantized form (the
producer warpgroup converts the codes, gemm_hopper_ws.cuh "Quantized W") against the mma.sync forms
the choice took before it (kernels/quant_gemm.cu) and against the same GEMM with a bf16 W on the
16-bit choice (the wgmma kernels). Per GEMM (GEMM1: gathered rows of x, gated; GEMM2: grouped rows of
h), W in fp8 (one float32 scale per output channel) and int4 (groups of 128 along the input, float32
scales, zero points); weights and routing as tests/gpu/bench_skinny.py draws them.

Time: CUDA events around the one launch, median of --reps after --warmup launches, L2 flushed before
each (--no-flush: not). TFLOP/s = 2 * rows * N * K / time.

usage: python3 tests/gpu/bench_qgemm.py --fatbin-dir DIR [--shapes mixtral,qwen3] [--tokens 128,1024,4096]
       [--formats fp8,int4] [--gemms g1,g2] [--cfgs wgmma_ws,auto-mma] [--reps 20] [--out DIR]
--cfgs: quantized configurations to time; `auto-mma` is the mma.sync choice (pick_qcfg without the
wgmma form). Prints one line per (shape, tokens, GEMM, format); --out writes bench_qgemm.json.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_skinny import SHAPES, timed, weight  # noqa: E402
from smoe_cuda import Kernels  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fatbin-dir", default="target/scattermoe-kernels")
    ap.add_argument("--shapes", default="mixtral,qwen3")
    ap.add_argument("--tokens", default="128,1024,4096")
    ap.add_argument("--formats", default="fp8,int4")
    ap.add_argument("--gemms", default="g1,g2")
    ap.add_argument("--cfgs", default="wgmma_ws,auto-mma")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-flush", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    K = Kernels(a.fatbin_dir)
    name = torch.cuda.get_device_name()
    flush = None if a.no_flush else torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    cfgs = a.cfgs.split(",")
    print(f"{name}: {K.sms} SMs; L2 {'not flushed' if flush is None else 'flushed before every launch'}; "
          f"median of {a.reps}; ms (TFLOP/s); rel.diff = max|cfg - first cfg| / max|first cfg|", flush=True)
    print(f"{'shape':8s} {'T':>5s} {'gemm':4s} {'fmt':4s} {'R':>6s} | {'bf16 (choice)':>22s} | "
          + " | ".join(f"{c:>22s}" for c in cfgs) + " | rel.diff", flush=True)
    rows = []
    dt = torch.bfloat16
    for shape in a.shapes.split(","):
        d, f, E, k = SHAPES[shape]
        oai = shape == "gptoss"
        for gemm in a.gemms.split(","):
            N, Kd = (2 * f, d) if gemm == "g1" else (d, f)
            torch.manual_seed(0)
            wb, _ = weight(E, N, Kd, "bf16", dt)
            qws = {fmt: weight(E, N, Kd, fmt, dt)[0] for fmt in a.formats.split(",")}
            bias = (0.1 * torch.randn(E, N, device="cuda")).to(dt) if oai else None
            for T in (int(t) for t in a.tokens.split(",")):
                ri = torch.rand(T, E, device="cuda").topk(k, dim=1).indices.to(torch.int32).contiguous()
                bufs = K.alloc_forward(T, k, E, d, f, dt)
                K.routing(ri, E, bufs)
                R = T * k / min(E, T * k)
                flops = 2.0 * T * k * N * Kd
                if gemm == "g1":
                    x = torch.randn(T, d, device="cuda", dtype=dt)
                    act = "swiglu_oai" if oai else "silu"
                    args = lambda w: (x, w, bias, bufs["H"], bufs["sidx"], bufs["offsets"], None, k, T * k, 0, 1, act, 1,  # noqa: E731
                                      "interleaved" if oai else "gate_up")
                    out = bufs["H"]
                else:
                    bufs["H"].normal_()
                    args = lambda w: (bufs["H"], w, bias, bufs["O"], bufs["sidx"], bufs["offsets"], None, k, T * k, 1, 1,  # noqa: E731
                                      "none", 0)
                    out = bufs["O"]
                tb = timed(lambda: K.gemm(*args(wb)), a.reps, a.warmup, flush)
                bcfg = K.pick_cfg(T * k, E, Kd, N)
                for fmt, qw in qws.items():
                    res = {}
                    for c in cfgs:
                        cfg = c
                        if c == "auto-mma":
                            saved = K.quant_wgmma_rows
                            K.quant_wgmma_rows = float("inf")
                            cfg = K.pick_qcfg(T * k, E, Kd, qw.block[1])
                            K.quant_wgmma_rows = saved
                        out.fill_(float("nan"))
                        K.qgemm(*args(qw), cfg=cfg)
                        torch.cuda.synchronize()
                        res[c] = (cfg, timed(lambda: K.qgemm(*args(qw), cfg=cfg), a.reps, a.warmup, flush), out.float().clone())
                    y0 = res[cfgs[0]][2]
                    diff = max(((r[2] - y0).abs().max() / y0.abs().max().clamp_min(1e-30)).item() for r in res.values())
                    nan = any(bool(torch.isnan(r[2]).any()) for r in res.values())
                    cell = lambda cfg, t: f"{cfg:>9s} {t:6.3f} ({flops / t / 1e9:4.0f})"  # noqa: E731
                    print(f"{shape:8s} {T:5d} {gemm:4s} {fmt:4s} {R:6.1f} | {cell(bcfg, tb)} | "
                          + " | ".join(cell(r[0], r[1]) for r in res.values()) + f" | {diff:8.1e}" + ("  NaN!" if nan else ""),
                          flush=True)
                    rows.append(dict(shape=shape, tokens=T, gemm=gemm, format=fmt, rows_per_expert=R, bf16_cfg=bcfg, bf16_ms=tb,
                                     cfgs={c: dict(cfg=r[0], ms=r[1]) for c, r in res.items()}, rel_diff=diff, nan=nan))
                del bufs
            del wb, qws
            torch.cuda.empty_cache()
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "bench_qgemm.json"), "w") as fh:
            json.dump(dict(device=name, flushed=flush is not None, reps=a.reps, time=time.time(), rows=rows), fh, indent=1)


if __name__ == "__main__":
    main()
