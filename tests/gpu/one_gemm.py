"""Launch one grouped GEMM of a layer shape with each given kernel config and time it (CUDA events,
median of 20), for quick kernel experiments and for ncu (`ncu -k regex:NAME -c 1 python3 ...`).
usage: python3 tests/gpu/one_gemm.py --shape mixtral --tokens 4096 --gemm g1 --cfgs 128x128,wgmma_ws
--shape, --tokens and --gemm also take comma-separated lists (every combination, one process);
--fatbin-dir too (A/B of kernel builds: each config is timed with each build in turn, --rounds times)."""
import argparse
import math
import os

import torch

from smoe_cuda import Kernels

SHAPES = {"mixtral": (4096, 14336, 8, 2), "qwen3": (2048, 768, 128, 8), "fine": (1024, 512, 64, 8)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fatbin-dir", default="target/scattermoe-kernels")
    ap.add_argument("--shape", default="mixtral")
    ap.add_argument("--tokens", default="4096")
    ap.add_argument("--gemm", default="g1")
    ap.add_argument("--cfgs", default="128x128,wgmma_ws")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--grid", type=int, default=None, help="force the grid size (default: the library's)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--routing", default="random", choices=["random", "balanced"],
                    help="balanced: token t takes experts (t*k + j) % E, so every expert has exactly T*k/E rows")
    a = ap.parse_args()
    dirs = a.fatbin_dir.split(",")
    K = [(os.path.basename(d.rstrip("/")) if len(dirs) > 1 else "", Kernels(d)) for d in dirs]
    for shape in a.shape.split(","):
        for T in (int(t) for t in a.tokens.split(",")):
            for gemm in a.gemm.split(","):
                one(K, a, shape, T, gemm)
                torch.cuda.empty_cache()


def one(builds, a, shape, T, gemm):
    K = builds[0][1]
    d, f, E, k = SHAPES[shape]
    dt = torch.bfloat16
    torch.manual_seed(0)
    x = torch.randn(T, d, device="cuda", dtype=dt)
    if a.routing == "balanced":
        ri = ((torch.arange(T, device="cuda")[:, None] * k + torch.arange(k, device="cuda")[None, :]) % E).to(torch.int32).contiguous()
    else:
        ri = torch.rand(T, E, device="cuda").topk(k, dim=1).indices.to(torch.int32).contiguous()
    bufs = K.alloc_forward(T, k, E, d, f, dt)
    K.routing(ri, E, bufs)
    cnt = torch.bincount(ri.flatten().long(), minlength=E)
    print(f"{shape} T={T} routing={a.routing}: rows per expert {int(cnt.min())}..{int(cnt.max())}, "
          f"128-row tiles {int(((cnt + 127) // 128).sum())}, 256-row pair units {int(((cnt + 255) // 256).sum())}", flush=True)
    if gemm.startswith("g1"):
        # g1: gathered rows of x, gated silu (the layer's first GEMM); g1plain: same product with a
        # plain output (no GLU, twice the columns); g1grouped: rows already grouped (no gather).
        w = torch.randn(E, 2 * f, d, device="cuda", dtype=dt) / math.sqrt(d)
        if gemm == "g1plain":
            bufs["H"] = torch.empty(T * k, 2 * f, device="cuda", dtype=dt)
            args = (x, w, None, bufs["H"], bufs["sidx"], bufs["offsets"], None, k, T * k, 0, 1, "none", 0)
        elif gemm == "g1grouped":
            xg = torch.randn(T * k, d, device="cuda", dtype=dt)
            args = (xg, w, None, bufs["H"], bufs["sidx"], bufs["offsets"], None, k, T * k, 1, 1, "silu", 1)
        else:
            args = (x, w, None, bufs["H"], bufs["sidx"], bufs["offsets"], None, k, T * k, 0, 1, "silu", 1)
        flops = 2 * T * k * d * 2 * f
    else:
        w = torch.randn(E, d, f, device="cuda", dtype=dt) / math.sqrt(f)
        bufs["H"].normal_()
        args = (bufs["H"], w, None, bufs["O"], bufs["sidx"], bufs["offsets"], None, k, T * k, 1, 1, "none", 0)
        flops = 2 * T * k * f * d
    ref = None
    for _ in range(a.rounds):
        for cfg in a.cfgs.split(","):
            for tag, K in builds:
                out = args[3]
                out.fill_(float("nan"))
                K.gemm(*args, cfg=cfg, grid=a.grid)
                torch.cuda.synchronize()
                res = out.float().clone()
                err = 0.0 if ref is None else ((res - ref).abs().max() / ref.abs().max()).item()
                ref = res if ref is None else ref
                ts = []
                for _ in range(a.reps):
                    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    e0.record()
                    K.gemm(*args, cfg=cfg, grid=a.grid)
                    e1.record()
                    torch.cuda.synchronize()
                    ts.append(e0.elapsed_time(e1))
                ms = sorted(ts)[len(ts) // 2]
                label = f"{tag}:{cfg}" if tag else cfg
                print(f"{shape} T={T} {gemm} {label:24s} {ms:8.3f} ms  {flops / ms / 1e9:7.1f} TFLOP/s  "
                      f"nan={bool(torch.isnan(res).any())} rel.diff vs first={err:.2e}", flush=True)


if __name__ == "__main__":
    main()
