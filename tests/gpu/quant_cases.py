"""Quantized expert weights on the GPU (kernels/quant_gemm.cu), for test_kernels.py --only quant.

Weights are quantized here as the contract stores them (docs/op-spec.md, "Quantized expert
weights"): fp8 e4m3fn, uint8 and uint8-packed 4-bit codes, scales per output channel, per group
along the input or per 2-D block (in T or float32), zero points given or left to the default. The
reference dequantizes in float64 by the formula W = (q - z) * s and computes the layer in float64.

  exact  the dequantization itself, bit for bit: one-hot rows of X read W back through the GEMM
         (one product per output, exact), against (q - z) * s in float32 rounded to T
  pl     the GEMM's modes (scattered / grouped in and out, bias, row scale), each tile
  fwd    the whole forward (both GEMMs quantized, or one), awkward shapes: one token, experts with
         no token, all tokens on one expert, K not a multiple of the group, partial 2-D blocks,
         4-bit rows of odd length (their pad nibble set, to show it is ignored)
"""
import math

import torch

from kernel_table import QUANT_CFGS
from smoe_cuda import QW

FORMATS = ("fp8", "u8", "u4")
# every configuration with quantized forms (kernels/manifest.toml; test_kernels.py --cfgs narrows it)
TILES = tuple(QUANT_CFGS)
DEFAULT_ZERO = {"u8": 128, "u4": 8}
DT = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32"}


def block_name(block):
    return "channel" if block is None else f"{block[0]}x{block[1]}"


def quantize(w, fmt, block=None, scale_dtype=torch.float32, zero_point=False):
    """w [E, N, K] float on the device -> (QW, W64): the stored weight and its float64 dequantized
    value by the contract's formula. block (bo, bi), or None for one scale per output channel."""
    E, N, K = w.shape
    bo, bi = block if block else (1, K)
    nbo, nbi = -(-N // bo), -(-K // bi)
    wp = torch.zeros(E, nbo * bo, nbi * bi, device=w.device)
    wp[:, :N, :K] = w.float()
    blocks = wp.view(E, nbo, bo, nbi, bi)
    amax = blocks.abs().amax(dim=(2, 4))
    mn, mx = blocks.amin(dim=(2, 4)), blocks.amax(dim=(2, 4))

    def expand(t):  # [E, nbo, nbi] -> [E, N, K]
        return t.repeat_interleave(bo, 1).repeat_interleave(bi, 2)[:, :N, :K]

    zero = None
    if fmt == "fp8":
        s = (amax / 448).clamp_min(1e-6).to(scale_dtype)
        q = (w.float() / expand(s.float())).clamp(-448, 448).to(torch.float8_e4m3fn)
        data = q.view(torch.uint8).contiguous()
        qv, zv = q.double(), 0.0
    else:
        levels = 255 if fmt == "u8" else 15
        if zero_point:
            s = ((mx - mn) / levels).clamp_min(1e-6).to(scale_dtype)
            zero = torch.round(-mn / s.float()).clamp(0, levels).to(torch.uint8)
            zf = expand(zero.float())
        else:
            half = 127 if fmt == "u8" else 7
            s = (amax / half).clamp_min(1e-6).to(scale_dtype)
            zf = float(DEFAULT_ZERO[fmt])
        qi = torch.round(w.float() / expand(s.float()) + zf).clamp(0, levels).to(torch.uint8)
        qv, zv = qi.double(), (expand(zero.double()) if zero is not None else float(DEFAULT_ZERO[fmt]))
        if fmt == "u8":
            data = qi.contiguous()
        else:
            # two codes a byte, element 2i in the low nibble; an odd row's pad nibble set (ignored)
            Kp = K + (K % 2)
            full = torch.full((E, N, Kp), 15, dtype=torch.uint8, device=w.device)
            full[:, :, :K] = qi
            data = (full[:, :, 0::2] | (full[:, :, 1::2] << 4)).contiguous()
    W64 = (qv - zv) * expand(s.double())
    blk = (bo, bi) if block else (1, K)
    return QW(fmt, data, s.contiguous(), zero.contiguous() if zero is not None else None, blk, K), W64


def dequant_t(q, dtype):
    """The weight the kernels multiply with: (q - z) * s in float32, rounded to T ([E, N, K])."""
    E, N, K = q.shape
    bo, bi = q.block
    if q.fmt == "fp8":
        qf = q.data.view(torch.float8_e4m3fn).float()
    elif q.fmt == "u8":
        qf = q.data.float()
    else:
        lo, hi = (q.data & 15).float(), (q.data >> 4).float()
        qf = torch.stack((lo, hi), dim=-1).view(E, N, -1)[:, :, :K]

    def expand(t):
        return t.repeat_interleave(bo, 1).repeat_interleave(bi, 2)[:, :N, :K]

    zf = expand(q.zero.float()) if q.zero is not None else float(DEFAULT_ZERO.get(q.fmt, 0))
    return ((qf - zf) * expand(q.scale.float())).to(dtype)


def random_weight(E, N, K, fmt):
    return torch.randn(E, N, K, device="cuda") / math.sqrt(K)


# block forms: per channel, the groups of AWQ/GPTQ/QMoE, 2-D blocks of DeepSeek-V3/Qwen3 fp8, a
# group that is whole 8-element chunks but not a power of two, and two that are not (the plain
# per-element path)
BLOCKS = (None, (1, 32), (1, 64), (1, 128), (128, 128), (1, 48), (1, 20), (3, 7))


def test_exact(K_, report_exact):
    """Dequantization bit for bit, through the GEMM: X = one-hot rows."""
    E, N = 3, 72
    i = 0
    for dtype in (torch.float16, torch.bfloat16):
        for fmt in FORMATS:
            for sdt in (dtype, torch.float32):
                for block in BLOCKS:
                    for zp in ((False, True) if fmt != "fp8" else (False,)):
                        K = (256, 201, 96)[i % 3]  # vector loads; element-wise loads (odd); K < one 2-D block
                        cfg = TILES[i % len(TILES)]
                        i += 1
                        q, _ = quantize(random_weight(E, N, K, fmt), fmt, block, sdt, zp)
                        # every code: random bytes (4-bit: both nibbles, the pad nibble too), fp8's
                        # two NaN codes left out (dequant.cuh reads them as +-480)
                        codes = torch.randint(0, 256, q.data.shape, device="cuda", dtype=torch.uint8)
                        if fmt == "fp8":
                            codes[(codes & 0x7F) == 0x7F] = 0x7E
                        q.data = codes
                        X = torch.eye(K, device="cuda", dtype=dtype).repeat(E, 1)  # token j*K + c: one-hot c
                        ri = torch.arange(E, device="cuda", dtype=torch.int32).repeat_interleave(K).view(-1, 1)
                        b = K_.alloc_routing(E * K, 1, E)
                        K_.routing(ri, E, b)
                        Y = torch.full((E * K, N), float("nan"), device="cuda", dtype=dtype)
                        K_.qgemm(X, q, None, Y, b["sidx"], b["offsets"], None, 1, E * K, 0, 0, cfg=cfg)
                        torch.cuda.synchronize()
                        want = dequant_t(q, dtype).transpose(1, 2).reshape(E * K, N)
                        same = torch.equal(Y, want)  # by value: the accumulator turns -0 into +0
                        report_exact(f"q exact {DT[dtype]} {fmt} scale {DT[sdt]} {block_name(block)}"
                                     f"{' zp' if zp else ''} K={K} {cfg}", same)


def test_pl(K_, report, linear_ref, make_routing, TOL):
    """The GEMM's modes on quantized W, every tile."""
    T, E, k = 300, 16, 2
    for dtype in (torch.float16, torch.bfloat16):
        for fmt in FORMATS:
            for (Kd, N, block) in ((256, 72, (1, 64)), (200, 136, (128, 128)), (101, 36, None)):
                ri = make_routing(T, E, k)
                b = K_.alloc_routing(T, k, E)
                K_.routing(ri, E, b)
                q, W64 = quantize(random_weight(E, N, Kd, fmt), fmt, block, dtype, fmt == "u4")
                bias = (0.1 * torch.randn(E, N, device="cuda")).to(dtype)
                rw = torch.rand(T, k, device="cuda").to(dtype)
                flat = ri.view(-1).long()
                for cfg in TILES:
                    x = torch.randn(T, Kd, device="cuda").to(dtype)
                    Y = torch.full((T * k, N), float("nan"), device="cuda", dtype=dtype)
                    K_.qgemm(x, q, bias, Y, b["sidx"], b["offsets"], rw.view(-1), k, T * k, 0, 0, cfg=cfg)
                    xr = x.double()[torch.arange(T * k, device="cuda") // k]
                    ref = linear_ref(xr, W64, bias, flat, "none", 0, "gate_up", 0, 0) * rw.double().view(-1, 1)
                    tag = f"{DT[dtype]} {fmt} {block_name(block)} {cfg} K={Kd} N={N}"
                    report(f"qPL in=0 out=0 scaled {tag}", relerr(Y, ref), TOL[dtype])
                    xg = torch.randn(T * k, Kd, device="cuda").to(dtype)
                    Y.fill_(float("nan"))
                    K_.qgemm(xg, q, None, Y, b["sidx"], b["offsets"], None, k, T * k, 1, 1, cfg=cfg)
                    sidx = b["sidx"].long()
                    ref = linear_ref(xg.double(), W64, None, flat[sidx], "none", 0, "gate_up", 0, 0)
                    report(f"qPL in=1 out=1 {tag}", relerr(Y, ref), TOL[dtype])


QFWD_CASES = [
    # name, T, E, k, d, f, routing mode
    ("one token", 1, 8, 2, 256, 128, "random"),
    ("16 tokens", 16, 8, 2, 256, 128, "random"),
    ("one expert", 300, 16, 1, 256, 128, "one"),
    ("most empty", 64, 64, 2, 256, 128, "sparse"),
    ("d=200 f=72", 77, 8, 2, 200, 72, "dup"),  # K not a multiple of the group; element-wise loads
    ("d=201 f=37", 33, 4, 2, 201, 37, "dup"),  # odd rows: 4-bit pad nibble, plain-path groups
    ("mid", 1000, 8, 2, 1024, 384, "random"),
]
QFWD_FORMS = (
    # w_in (format, block, zero point), w_out (None: in T)
    (("fp8", None, False), ("fp8", None, False)),
    (("fp8", (128, 128), False), ("fp8", (128, 128), False)),
    (("u8", (1, 64), True), ("u8", None, False)),
    (("u4", (1, 32), True), ("u4", (1, 32), True)),
    (("u4", (1, 128), False), ("u4", (1, 64), False)),
    (("u4", (1, 128), True), None),
    (None, ("fp8", (1, 128), False)),
)


def test_fwd(K_, report, forward_ref, make_routing, TOL):
    for dtype in (torch.float16, torch.bfloat16):
        for (name, T, E, k, d, f, mode) in QFWD_CASES:
            ri = make_routing(T, E, k, mode)
            rw = torch.softmax(torch.randn(T, k, device="cuda"), -1).to(dtype)
            x = torch.randn(T, d, device="cuda").to(dtype)
            for fi, (f1, f2) in enumerate(QFWD_FORMS):
                sdt = torch.float32 if fi % 2 else dtype
                b1 = (0.1 * torch.randn(E, 2 * f, device="cuda")).to(dtype)
                w1 = torch.randn(E, 2 * f, d, device="cuda") / math.sqrt(d)
                w2 = torch.randn(E, d, f, device="cuda") / math.sqrt(f)
                q1, W1 = quantize(w1, f1[0], f1[1], sdt, f1[2]) if f1 else (w1.to(dtype), w1.to(dtype))
                q2, W2 = quantize(w2, f2[0], f2[1], sdt, f2[2]) if f2 else (w2.to(dtype), w2.to(dtype))
                ref = forward_ref(x, rw, ri, W1, W2, b1, None, "silu", 1, "gate_up", 0, 0, None)
                form = f"{f1[0] + ' ' + block_name(f1[1]) if f1 else DT[dtype]} / {f2[0] + ' ' + block_name(f2[1]) if f2 else DT[dtype]}"
                for cfg in (None,) + (TILES if fi < 2 and T <= 64 else ()):
                    bufs = K_.alloc_forward(T, k, E, d, f, dtype)
                    for key in ("H", "O", "Y"):
                        bufs[key].fill_(float("nan"))
                    y = K_.forward(x, rw, ri, q1, q2, b1, None, bufs, "silu", 1, "gate_up", cfg1=cfg, cfg2=cfg)
                    torch.cuda.synchronize()
                    report(f"qfwd {name} T={T} E={E} k={k} d={d} f={f} {DT[dtype]} {form} scale {DT[sdt]} "
                           f"{cfg or 'auto'}", relerr(y, ref), TOL[dtype])


def sanitize(K_, make_routing, small=False):
    """Small launches of every quantized entry point: vector and element-wise loads, packed and
    plain conversions, zero points, both scale types (no references). small (racecheck): bfloat16,
    fp8 and 4-bit, one shape whose GEMM1 has more k-blocks than any tile has stages (the rings of
    stored W and A wrap, the converted tiles alternate)."""
    shapes = ((37, 8, 2, 256, 72, (1, 64), True), (10, 4, 2, 201, 5, (3, 7), False), (70, 3, 1, 96, 40, None, False))
    if small:
        shapes = ((37, 8, 2, 512, 72, (1, 64), True),)
    for dtype in ((torch.bfloat16,) if small else (torch.float16, torch.bfloat16)):
        for fmt in (("fp8", "u4") if small else FORMATS):
            for (T, E, k, d, f, block, zp) in shapes:
                ri = make_routing(T, E, k, "dup")
                x = torch.randn(T, d, device="cuda").to(dtype)
                rw = torch.rand(T, k, device="cuda").to(dtype)
                sdt = torch.float32 if zp else dtype
                q1, _ = quantize(torch.randn(E, 2 * f, d, device="cuda"), fmt, block, sdt, zp and fmt != "fp8")
                q2, _ = quantize(torch.randn(E, d, f, device="cuda"), fmt, block, sdt, zp and fmt != "fp8")
                for cfg in TILES:
                    bufs = K_.alloc_forward(T, k, E, d, f, dtype)
                    K_.forward(x, rw, ri, q1, q2, None, None, bufs, "silu", 1, "interleaved", cfg1=cfg, cfg2=cfg)
                    if small:
                        continue
                    bad = ri.clone()
                    bad.view(-1)[0] = 1000  # a bad index: must stay in bounds
                    K_.forward(x, rw, bad, q1, q2, None, None, bufs, "silu", 1, "gate_up", cfg1=cfg, cfg2=cfg)
    torch.cuda.synchronize()
    print("sanitize quant: all launches done", flush=True)


def relerr(a, b):
    a = a.double()
    b = b.double()
    den = b.abs().max().item()
    return (a - b).abs().max().item() / (den if den > 0 else 1.0)
