"""The float8 x float8 experiment (tests/gpu/f8x8.cu): is wgmma's e4m3 form, with the activations
quantized per row on the fly, fast enough for issue 18's prefill target (the fp8 layer at least 1.4x
faster than bf16 at 4096 and 16384 tokens)? Checks first, then times.

Checks (against float64 torch, the same quantized operands; fails the run on any miss):
  - the row quantizer: codes bit for bit against torch's e4m3 rounding of X * (448 / amax) in float32,
    scales exactly amax / 448; rows of zeros; one row; K not a multiple of the block;
  - the GEMM: GEMM1 (gathered rows, gated, each GLU layout, silu and swiglu_oai with a bias) and GEMM2
    (grouped rows, plain, a row scale), awkward routings (one token, an expert with no rows, every row on
    one expert, E = 128 and k = 8), K a multiple of 16 and K that is not (the element-wise path), N not a
    multiple of the tile, float16 and bfloat16 outputs; tolerance 1e-2 of the largest reference value
    (float32 accumulation of exact products: the error is the output's rounding to T and the order
    of the sums).

Times (CUDA events around one launch, median of --reps, L2 flushed before each): per shape, token count
and GEMM, the bf16 GEMM on the 16-bit choice (the wgmma kernels), the fp8 x fp8 GEMM, and the row
quantizer of its input (GEMM1: X, T rows; GEMM2: H, T*k rows). TFLOP/s = 2 * rows * N * K / time.
The speed-up is bf16 / (f8x8 + quantizer).

usage: python3 tests/gpu/bench_f8x8.py --fatbin-dir DIR --f8-fatbin FILE [--check-only]
       [--shapes mixtral,qwen3] [--tokens 1024,4096,16384] [--reps 20] [--out DIR]
"""
import argparse
import ctypes
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_skinny import SHAPES, timed  # noqa: E402
from smoe_cuda import ACT, GLU, Arg, Kernels  # noqa: E402
from test_kernels import FAILS, glu_ref, make_routing, relerr, report, routing_ref  # noqa: E402

SMEM, THREADS, BM, BN = 197632, 384, 128, 256
TNAME = {torch.float16: "f16", torch.bfloat16: "bf16"}


class F8:
    """The experiment's two kernels, loaded next to the library's modules."""

    def __init__(self, K, path):
        self.K = K
        K.load_module("f8x8", path)

    def quant_rows(self, X, Q, s):
        R, Kd = X.shape
        if R == 0:
            return
        f = self.K.fn("f8x8", f"scattermoe_f8x8_quant_rows_{TNAME[X.dtype]}")
        self.K.launch(f, (R,), (256,), 0, [Arg.ptr(X), Arg.ptr(Q), Arg.ptr(s), ctypes.c_int(R), ctypes.c_int(Kd)])

    def gemm(self, Q, s, W8, ws, bias, Y, sidx, offsets, row_scale, k, n_assign, grouped_in, grouped_out,
             act="none", gated=0, layout="gate_up", alpha=1.702, limit=7.0, grid=None):
        E, N, Kd = W8.shape
        f = self.K.fn("f8x8", f"scattermoe_f8x8_gemm_{TNAME[Y.dtype]}", SMEM)
        Nout = N // 2 if gated else N
        BNo = BN // 2 if gated else BN
        units = ((n_assign + BM - 1) // BM + min(E, n_assign)) * ((Nout + BNo - 1) // BNo)
        if grid is None:
            grid = max(1, min(units, self.K.sms * max(1, self.K.occupancy(f, THREADS, SMEM))))
        ci, cf = ctypes.c_int, ctypes.c_float
        args = [Arg.ptr(Q), Arg.ptr(W8), Arg.ptr(bias), Arg.ptr(Y), Arg.ptr(sidx), Arg.ptr(offsets),
                Arg.ptr(row_scale), ci(k), ci(N), ci(Kd), ci(E), ci(grouped_in), ci(grouped_out),
                ci(ACT[act]), ci(gated), ci(GLU[layout]), cf(alpha), cf(limit),
                Arg.ptr(ws), Arg.ptr(None), ci(int(ws.dtype == torch.float32)), ci(1), ci(Kd), Arg.ptr(s)]
        self.K.launch(f, (grid,), (THREADS,), SMEM, args)


def quant_ref(X):
    """torch's float32 version of the quantizer's contract: (codes as uint8, scales)."""
    x = X.float()
    a = x.abs().amax(dim=1)
    inv = torch.where(a > 0, 448.0 / a, torch.ones_like(a))
    s = torch.where(a > 0, a / 448.0, torch.ones_like(a))
    q = (x * inv[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q.view(torch.uint8), s


def fp8_weight(E, N, Kd):
    w = torch.randn(E, N, Kd, device="cuda") / math.sqrt(Kd)
    s = (w.abs().amax(dim=2) / 448).clamp_min(1e-6)
    q = (w / s[:, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q.view(torch.uint8).contiguous(), s.float().contiguous()


def check(K, F):
    gen = torch.Generator(device="cuda").manual_seed(7)
    # the quantizer
    for dt in (torch.float16, torch.bfloat16):
        for R, Kd in ((1, 64), (37, 200), (300, 4096), (5, 14336)):
            X = (torch.randn(R, Kd, device="cuda", generator=gen) * 3).to(dt)
            if R > 2:
                X[1].zero_()
            Q = torch.empty(R, Kd, dtype=torch.uint8, device="cuda")
            s = torch.empty(R, dtype=torch.float32, device="cuda")
            F.quant_rows(X, Q, s)
            qr, sr = quant_ref(X)
            same = bool(torch.equal(Q, qr)) and bool(torch.equal(s, sr))
            report(f"quant_rows {TNAME[dt]} R={R} K={Kd} codes and scales identical", 0.0 if same else 1.0, 0.0)
    # the GEMM
    cases = []
    for dt in (torch.float16, torch.bfloat16):
        for (T, E, k, mode) in ((1, 8, 2, "random"), (37, 8, 2, "sparse"), (300, 8, 2, "one"), (700, 128, 8, "random")):
            for (d, f) in ((272, 160), (200, 96), (1024, 384)):
                cases.append((dt, T, E, k, mode, d, f))
    for (dt, T, E, k, mode, d, f) in cases:
        ri = make_routing(T, E, k, mode, gen=gen)
        offsets, sidx, _ = routing_ref(ri, E)
        offsets, sidx = offsets.int().contiguous(), sidx.int().contiguous()
        flat = ri.reshape(-1).long()
        x = torch.randn(T, d, device="cuda", generator=gen).to(dt)
        Xq = torch.empty(T, d, dtype=torch.uint8, device="cuda")
        sx = torch.empty(T, dtype=torch.float32, device="cuda")
        F.quant_rows(x, Xq, sx)
        x64 = Xq.view(torch.float8_e4m3fn).double() * sx.double()[:, None]
        for layout, act, bias in (("gate_up", "silu", False), ("interleaved", "swiglu_oai", True), ("up_gate", "gelu", False)):
            W8, ws = fp8_weight(E, 2 * f, d)
            w64 = W8.view(torch.float8_e4m3fn).double() * ws.double()[:, :, None]
            b = (0.1 * torch.randn(E, 2 * f, device="cuda", generator=gen)).to(dt) if bias else None
            H = torch.zeros(T * k, f, dtype=dt, device="cuda")
            F.gemm(Xq, sx, W8, ws, b, H, sidx, offsets, None, k, T * k, 0, 1, act, 1, layout)
            ref = torch.zeros(T * k, f, dtype=torch.float64, device="cuda")
            tok = sidx.long() // k
            e_of = flat[sidx.long()]
            for e in torch.unique(e_of).tolist():
                rows = (e_of == e).nonzero().squeeze(1)
                a = x64[tok[rows]] @ w64[e].t()
                if b is not None:
                    a = a + b[e].double()
                ref[rows] = glu_ref(a, act, layout, 1.702, 7.0)
            report(f"g1 {TNAME[dt]} T={T} E={E} k={k} {mode} d={d} f={f} {layout} {act}{' bias' if bias else ''}",
                   relerr(H, ref), 1e-2)
        # GEMM2: grouped rows of H (quantized per row), plain, a row scale, scattered store
        Hin = torch.randn(T * k, f, device="cuda", generator=gen).to(dt)
        Hq = torch.empty(T * k, f, dtype=torch.uint8, device="cuda")
        sh = torch.empty(T * k, dtype=torch.float32, device="cuda")
        F.quant_rows(Hin, Hq, sh)
        h64 = Hq.view(torch.float8_e4m3fn).double() * sh.double()[:, None]
        W8, ws = fp8_weight(E, d, f)
        w64 = W8.view(torch.float8_e4m3fn).double() * ws.double()[:, :, None]
        rs = torch.rand(T * k, device="cuda", generator=gen).to(dt)
        O = torch.zeros(T * k, d, dtype=dt, device="cuda")
        F.gemm(Hq, sh, W8, ws, None, O, sidx, offsets, rs, k, T * k, 1, 0)
        ref = torch.zeros(T * k, d, dtype=torch.float64, device="cuda")
        e_of = flat[sidx.long()]
        for e in torch.unique(e_of).tolist():
            rows = (e_of == e).nonzero().squeeze(1)
            ref[sidx.long()[rows]] = (h64[rows] @ w64[e].t()) * rs.double()[sidx.long()[rows]][:, None]
        report(f"g2 {TNAME[dt]} T={T} E={E} k={k} {mode} d={d} f={f} row_scale", relerr(O, ref), 1e-2)


def bench(K, F, a):
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    dt = torch.bfloat16
    rows_out = []
    print(f"{torch.cuda.get_device_name()}: {K.sms} SMs; L2 flushed before every launch; median of {a.reps}; "
          f"ms (TFLOP/s); speed-up = bf16 / (f8x8 + quant)", flush=True)
    print(f"{'shape':8s} {'T':>6s} {'gemm':4s} | {'bf16':>16s} | {'f8x8':>16s} | {'quant':>7s} | speed-up", flush=True)
    for shape in a.shapes.split(","):
        d, f, E, k = SHAPES[shape]
        for gemm in ("g1", "g2"):
            N, Kd = (2 * f, d) if gemm == "g1" else (d, f)
            torch.manual_seed(0)
            wb = torch.randn(E, N, Kd, device="cuda", dtype=dt).mul_(1.0 / math.sqrt(Kd))
            W8, ws = fp8_weight(E, N, Kd)
            for T in (int(t) for t in a.tokens.split(",")):
                ri = torch.rand(T, E, device="cuda").topk(k, dim=1).indices.to(torch.int32).contiguous()
                bufs = K.alloc_forward(T, k, E, d, f, dt)
                K.routing(ri, E, bufs)
                R = T if gemm == "g1" else T * k
                src = torch.randn(R, Kd, device="cuda", dtype=dt)
                Q = torch.empty(R, Kd, dtype=torch.uint8, device="cuda")
                s = torch.empty(R, dtype=torch.float32, device="cuda")
                out = bufs["H"] if gemm == "g1" else bufs["O"]
                if gemm == "g1":
                    gb = lambda: K.gemm(src, wb, None, out, bufs["sidx"], bufs["offsets"], None, k, T * k, 0, 1, "silu", 1)  # noqa: E731
                    g8 = lambda: F.gemm(Q, s, W8, ws, None, out, bufs["sidx"], bufs["offsets"], None, k, T * k, 0, 1, "silu", 1)  # noqa: E731
                else:
                    gb = lambda: K.gemm(src, wb, None, out, bufs["sidx"], bufs["offsets"], None, k, T * k, 1, 1)  # noqa: E731
                    g8 = lambda: F.gemm(Q, s, W8, ws, None, out, bufs["sidx"], bufs["offsets"], None, k, T * k, 1, 1)  # noqa: E731
                F.quant_rows(src, Q, s)
                tb = timed(gb, a.reps, 3, flush)
                t8 = timed(g8, a.reps, 3, flush)
                tq = timed(lambda: F.quant_rows(src, Q, s), a.reps, 3, flush)
                fl = 2.0 * T * k * N * Kd
                sp = tb / (t8 + tq)
                print(f"{shape:8s} {T:6d} {gemm:4s} | {tb:7.3f} ({fl / tb / 1e9:5.0f}) | {t8:7.3f} ({fl / t8 / 1e9:5.0f}) | "
                      f"{tq:7.3f} | {sp:5.2f}x", flush=True)
                rows_out.append(dict(shape=shape, tokens=T, gemm=gemm, bf16_ms=tb, f8x8_ms=t8, quant_ms=tq, speedup=sp))
                del bufs
            del wb, W8
            torch.cuda.empty_cache()
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "bench_f8x8.json"), "w") as fh:
            json.dump(dict(device=torch.cuda.get_device_name(), rows=rows_out), fh, indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fatbin-dir", default="target/scattermoe-kernels")
    ap.add_argument("--f8-fatbin", required=True)
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--shapes", default="mixtral,qwen3")
    ap.add_argument("--tokens", default="1024,4096,16384")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    K = Kernels(a.fatbin_dir)
    F = F8(K, a.f8_fatbin)
    check(K, F)
    torch.cuda.synchronize()
    print(f"checks: {len(FAILS)} failed", flush=True)
    if FAILS or a.check_only:
        sys.exit(1 if FAILS else 0)
    bench(K, F, a)


if __name__ == "__main__":
    main()
