"""The skinny kernel (kernels/skinny_gemm.cu) on the GPU, for test_kernels.py --only skinny: the cases
its structure makes awkward, each against the float64 reference (the generic groups, pl / fwd /
quant, run it too, as one configuration among the others).

  exact  the dequantization bit for bit through the skinny kernel: one-hot rows of X read W back
         (one product per output, exact), every format x block form x scale type x zero point, with K
         on the fast path (16-byte loads, one scale per chunk) and on the element-wise one
  pl     the GEMM's modes (scattered / grouped in and out, bias, row scale) on 16-bit and quantized
         W; 37 rows per expert (5 units of 8 rows over the same W rows), N not a multiple of 32, K
         with a partial last k-step and K on the element-wise path
  fwd    whole forwards with both GEMMs on the skinny kernel: every activation, gated (every
         glu_layout) and plain, K long enough for several unrolled batches per warp, odd sizes, one
         token, experts with no row, all rows on one expert
  qfwd   the same with quantized W, every format, block forms on both paths

Where a case's K takes which path (kernels/skinny_gemm.cu's header): 16-bit W K % 8 == 0; quantized
K % 8 == 0, stored bytes per row % 16 == 0, one block along K or block_in a multiple of the chunk (16
elements for 8-bit codes, 32 for 4-bit); anything else the element-wise path.
"""
import math

import torch

import quant_cases
from quant_cases import DT, block_name, dequant_t, quantize, random_weight, relerr

CFG = "skinny"
CHUNK = {"fp8": 16, "u8": 16, "u4": 32}


def path(fmt, K, block):
    """"fast" or "plain": the path the kernel takes for this W."""
    if fmt is None:
        return "fast" if K % 8 == 0 else "plain"
    kb = K if fmt != "u4" else (K + 1) // 2
    bi = block[1] if block else K
    one_block = bi >= K
    return "fast" if K % 8 == 0 and kb % 16 == 0 and (one_block or bi % CHUNK[fmt] == 0) else "plain"


def test_exact(K_, report_exact):
    """Dequantization bit for bit through the skinny kernel (as quant_cases.test_exact): X = one-hot
    rows, so each output is one W element, which must be (q - z) * s in float32 rounded to T."""
    E, N = 3, 72  # N: two whole units of 32 W rows and a partial one
    i = 0
    for dtype in (torch.float16, torch.bfloat16):
        for fmt in quant_cases.FORMATS:
            for sdt in (dtype, torch.float32):
                for block in quant_cases.BLOCKS:
                    for zp in ((False, True) if fmt != "fp8" else (False,)):
                        # a fast K (several k-steps, a partial last one for 4-bit), then an element-wise one
                        for K in ((1056, 201) if i % 2 else (4160, 96)):
                            q, _ = quantize(random_weight(E, N, K, fmt), fmt, block, sdt, zp)
                            codes = torch.randint(0, 256, q.data.shape, device="cuda", dtype=torch.uint8)
                            if fmt == "fp8":
                                codes[(codes & 0x7F) == 0x7F] = 0x7E
                            q.data = codes
                            X = torch.eye(K, device="cuda", dtype=dtype).repeat(E, 1)
                            ri = torch.arange(E, device="cuda", dtype=torch.int32).repeat_interleave(K).view(-1, 1)
                            b = K_.alloc_routing(E * K, 1, E)
                            K_.routing(ri, E, b)
                            Y = torch.full((E * K, N), float("nan"), device="cuda", dtype=dtype)
                            K_.qgemm(X, q, None, Y, b["sidx"], b["offsets"], None, 1, E * K, 0, 0, cfg=CFG)
                            torch.cuda.synchronize()
                            want = dequant_t(q, dtype).transpose(1, 2).reshape(E * K, N)
                            report_exact(f"skinny exact {DT[dtype]} {fmt} scale {DT[sdt]} {block_name(block)}"
                                         f"{' zp' if zp else ''} K={K} {path(fmt, K, block)}", torch.equal(Y, want))
                        i += 1


def test_pl(K_, report, linear_ref, make_routing, TOL):
    """The GEMM's modes: scattered in / out with the row scale and bias, grouped in / out; 300 tokens
    over 16 experts (37 rows each: several 8-row units per W block), 16-bit and quantized W."""
    T, E, k = 300, 16, 2
    forms = [(None, None), ("fp8", None), ("u8", (1, 64)), ("u4", (1, 128)), ("u4", (1, 48)), ("fp8", (128, 128))]
    for dtype in (torch.float16, torch.bfloat16):
        for fmt, block in forms:
            for Kd, N in ((4104, 72), (200, 136), (101, 36), (1056, 40)):
                ri = make_routing(T, E, k)
                b = K_.alloc_routing(T, k, E)
                K_.routing(ri, E, b)
                w = random_weight(E, N, Kd, fmt)
                if fmt is None:
                    q, W64 = w.to(dtype), w.to(dtype)
                    gemm = K_.gemm
                else:
                    q, W64 = quantize(w, fmt, block, torch.float32 if fmt == "fp8" else dtype, fmt == "u4")
                    gemm = K_.qgemm
                bias = (0.1 * torch.randn(E, N, device="cuda")).to(dtype)
                rw = torch.rand(T, k, device="cuda").to(dtype)
                flat = ri.view(-1).long()
                tag = f"{DT[dtype]} {fmt or 'T'} {block_name(block) if fmt else ''} K={Kd} N={N} {path(fmt, Kd, block)}"
                x = torch.randn(T, Kd, device="cuda").to(dtype)
                Y = torch.full((T * k, N), float("nan"), device="cuda", dtype=dtype)
                gemm(x, q, bias, Y, b["sidx"], b["offsets"], rw.view(-1), k, T * k, 0, 0, cfg=CFG)
                xr = x.double()[torch.arange(T * k, device="cuda") // k]
                ref = linear_ref(xr, W64, bias, flat, "none", 0, "gate_up", 0, 0) * rw.double().view(-1, 1)
                report(f"skinny PL in=0 out=0 scaled {tag}", relerr(Y, ref), TOL[dtype])
                xg = torch.randn(T * k, Kd, device="cuda").to(dtype)
                Y.fill_(float("nan"))
                gemm(xg, q, None, Y, b["sidx"], b["offsets"], None, k, T * k, 1, 1, cfg=CFG)
                sidx = b["sidx"].long()
                ref = linear_ref(xg.double(), W64, None, flat[sidx], "none", 0, "gate_up", 0, 0)
                report(f"skinny PL in=1 out=1 {tag}", relerr(Y, ref), TOL[dtype])
                Y.fill_(float("nan"))
                gemm(xg, q, bias, Y, b["sidx"], b["offsets"], None, k, T * k, 1, 0, act="gelu", cfg=CFG)
                ref = torch.empty_like(ref)
                ref[sidx] = linear_ref(xg.double(), W64, bias, flat[sidx], "gelu", 0, "gate_up", 0, 0)
                report(f"skinny PL in=1 out=0 gelu {tag}", relerr(Y, ref), TOL[dtype])


SK_FWD_CASES = [
    # name, T, E, k, d, f, gated, bias, act, layout, routing mode
    ("one token long K", 1, 8, 2, 4104, 264, 1, 1, "silu", "gate_up", "random"),
    ("one token plain gelu", 1, 8, 2, 512, 1000, 0, 1, "gelu", "gate_up", "random"),
    ("16 tokens swiglu_oai interleaved", 16, 8, 2, 2048, 200, 1, 1, "swiglu_oai", "interleaved", "random"),
    ("one expert 37 rows", 37, 64, 1, 256, 72, 1, 1, "silu", "up_gate", "one"),
    ("most empty gelu_tanh", 64, 256, 2, 200, 72, 1, 1, "gelu_tanh", "interleaved", "sparse"),
    ("odd d=30 f=5 relu2", 10, 4, 2, 30, 5, 1, 1, "relu2", "gate_up", "dup"),
    ("swiglu_limit up_gate", 8, 16, 4, 1000, 100, 1, 0, "swiglu_limit", "up_gate", "random"),
    ("plain relu2", 5, 8, 2, 264, 40, 0, 1, "relu2", "gate_up", "random"),
    ("plain relu odd d=101", 7, 8, 2, 101, 37, 0, 0, "relu", "gate_up", "dup"),
    ("E1 k1 one row", 1, 1, 1, 64, 16, 1, 1, "silu", "gate_up", "random"),
    ("E128 k8 Qwen3-like", 4, 128, 8, 2048, 768, 1, 0, "silu", "gate_up", "random"),
]
ACT_PARAMS = {"swiglu_limit": (1.0, 0.5)}


def test_fwd(K_, report, forward_ref, make_routing, make_weights, TOL):
    for dtype in (torch.float16, torch.bfloat16):
        for (name, T, E, k, d, f, gated, bias, act, layout, mode) in SK_FWD_CASES:
            n = 2 * f if gated else f
            ri = make_routing(T, E, k, mode, torch.int64 if T % 2 else torch.int32)
            rw = torch.softmax(torch.randn(T, k, device="cuda"), -1).to(dtype)
            x = torch.randn(T, d, device="cuda").to(dtype)
            w1, w2, b1, b2 = make_weights(E, n, d, f, dtype, bias)
            alpha, limit = ACT_PARAMS.get(act, (1.702, 7.0))
            ref = forward_ref(x, rw, ri, w1, w2, b1, b2, act, gated, layout, alpha, limit, None)
            for cfg in (CFG, None):
                bufs = K_.alloc_forward(T, k, E, d, f, dtype)
                for key in ("H", "O", "Y"):
                    bufs[key].fill_(float("nan"))
                y = K_.forward(x, rw, ri, w1, w2, b1, b2, bufs, act, gated, layout, alpha, limit, cfg1=cfg, cfg2=cfg)
                torch.cuda.synchronize()
                paths = f"{path(None, d, None)}/{path(None, f, None)}"
                report(f"skinny fwd {name} T={T} E={E} k={k} d={d} f={f} {DT[dtype]} {cfg or 'auto'} {paths}",
                       relerr(y, ref), TOL[dtype])


SK_QFWD_CASES = [
    # name, T, E, k, d, f, routing mode
    ("one token", 1, 8, 2, 1056, 256, "random"),
    ("16 tokens", 16, 8, 2, 512, 192, "random"),
    ("one expert 20 rows", 20, 16, 1, 256, 128, "one"),
    ("most empty", 64, 64, 2, 256, 128, "sparse"),
    ("d=200 f=72", 9, 8, 2, 200, 72, "dup"),
    ("d=201 f=37", 5, 4, 2, 201, 37, "dup"),
]
SK_QFORMS = (
    # format, block, zero point (the same form for both weights)
    ("fp8", None, False), ("fp8", (128, 128), False), ("fp8", (1, 48), False),
    ("u8", (1, 64), True), ("u8", (1, 20), False),
    ("u4", (1, 32), True), ("u4", (1, 128), False), ("u4", (1, 48), True), ("u4", (3, 7), False),
)


def test_quant_fwd(K_, report, forward_ref, make_routing, TOL):
    for dtype in (torch.float16, torch.bfloat16):
        for (name, T, E, k, d, f, mode) in SK_QFWD_CASES:
            ri = make_routing(T, E, k, mode)
            rw = torch.softmax(torch.randn(T, k, device="cuda"), -1).to(dtype)
            x = torch.randn(T, d, device="cuda").to(dtype)
            for fi, (fmt, block, zp) in enumerate(SK_QFORMS):
                sdt = torch.float32 if fi % 2 else dtype
                b1 = (0.1 * torch.randn(E, 2 * f, device="cuda")).to(dtype)
                q1, W1 = quantize(torch.randn(E, 2 * f, d, device="cuda") / math.sqrt(d), fmt, block, sdt, zp)
                q2, W2 = quantize(torch.randn(E, d, f, device="cuda") / math.sqrt(f), fmt, block, sdt, zp)
                ref = forward_ref(x, rw, ri, W1, W2, b1, None, "silu", 1, "gate_up", 0, 0, None)
                bufs = K_.alloc_forward(T, k, E, d, f, dtype)
                for key in ("H", "O", "Y"):
                    bufs[key].fill_(float("nan"))
                y = K_.forward(x, rw, ri, q1, q2, b1, None, bufs, "silu", 1, "gate_up", cfg1=CFG, cfg2=CFG)
                torch.cuda.synchronize()
                paths = f"{path(fmt, d, block)}/{path(fmt, f, block)}"
                report(f"skinny qfwd {name} T={T} E={E} k={k} d={d} f={f} {DT[dtype]} {fmt} {block_name(block)}"
                       f"{' zp' if zp else ''} scale {DT[sdt]} {paths}", relerr(y, ref), TOL[dtype])


def sanitize(K_, make_routing, make_weights, small=False):
    """Small launches of the skinny kernel's entry points, both paths, every format (no references);
    a bad routing index must stay in bounds. small (racecheck): bfloat16, 16-bit, fp8 and 4-bit W, one
    shape with several k-steps per warp and units per CTA (the reduction buffer is reused)."""
    shapes = ((37, 8, 2, 264, 72), (10, 4, 2, 30, 5), (70, 3, 1, 201, 40))
    if small:
        shapes = ((37, 8, 2, 1056, 72),)
    for dtype in ((torch.bfloat16,) if small else (torch.float16, torch.bfloat16)):
        for (T, E, k, d, f) in shapes:
            ri = make_routing(T, E, k, "dup")
            x = torch.randn(T, d, device="cuda").to(dtype)
            rw = torch.rand(T, k, device="cuda").to(dtype)
            w1, w2, b1, b2 = make_weights(E, 2 * f, d, f, dtype, 1)
            forms = [None] + ([("fp8", None, False), ("u4", (1, 32), True)] if small else
                              [("fp8", (128, 128), False), ("u8", (1, 64), True), ("u4", (1, 32), True), ("u4", (3, 7), True)])
            for form in forms:
                if form is None:
                    q1, q2 = w1, w2
                else:
                    fmt, block, zp = form
                    sdt = torch.float32 if zp else dtype
                    q1, _ = quantize(torch.randn(E, 2 * f, d, device="cuda"), fmt, block, sdt, zp)
                    q2, _ = quantize(torch.randn(E, d, f, device="cuda"), fmt, block, sdt, zp)
                bufs = K_.alloc_forward(T, k, E, d, f, dtype)
                K_.forward(x, rw, ri, q1, q2, b1, b2, bufs, "silu", 1, "interleaved", cfg1=CFG, cfg2=CFG)
                if small:
                    continue
                Y = torch.empty(T * k, 2 * f, device="cuda", dtype=dtype)
                g = K_.gemm if form is None else K_.qgemm
                g(x, q1, b1, Y, bufs["sidx"], bufs["offsets"], rw.view(-1), k, T * k, 0, 0, cfg=CFG)
                bad = ri.clone()
                bad.view(-1)[0] = 1000
                K_.forward(x, rw, bad, q1, q2, b1, b2, bufs, "gelu", 1, "gate_up", cfg1=CFG, cfg2=CFG)
    torch.cuda.synchronize()
    print("sanitize skinny: all launches done", flush=True)
