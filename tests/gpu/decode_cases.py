"""The decode kernel's own cases (kernels/moe_decode.cu: the whole ScatterMoE in one
cooperative launch), for test_kernels.py --only decode.

Each case runs the kernel forced (whatever the automatic choice would be) and checks:
  - its Y has the same bits as the four-kernel forward with the skinny kernel forced for both GEMMs
    (the decode kernel's units, tile and arithmetic are that kernel's, its combine combine.cu's);
  - its error against the float64 reference (test_kernels.forward_ref) is within the dtype's tolerance;
  - twice gives the same bits; and with a bad index, the same error words as the routing kernels.
Awkward inputs: one token, the largest T * k it takes (512) all on one expert, the largest E (1024),
experts with no token, K not a multiple of 8 (the element-wise path), d not a multiple of 8 (the
combine's element-wise path), int64 indices, every gated activation and GLU layout, biases.
"""
import math

import torch

import quant_cases
from smoe_cuda import DECODE_MAX_N

# (name, T, E, k, d, f, gated, bias, act, layout, routing mode)
CASES = [
    ("one token", 1, 8, 2, 256, 512, 1, 1, "silu", "gate_up", "random"),
    ("qwen3 1 token", 1, 128, 8, 2048, 768, 1, 0, "silu", "gate_up", "random"),
    ("fine 4 tokens", 4, 64, 8, 1024, 512, 1, 0, "silu", "up_gate", "random"),
    ("gpt-oss 2 tokens", 2, 32, 4, 2880, 2880, 1, 1, "swiglu_oai", "interleaved", "random"),
    ("max N on one expert", 64, 8, 8, 512, 256, 1, 1, "silu", "gate_up", "one"),
    ("largest E, most experts empty", 3, 1024, 8, 256, 128, 1, 0, "gelu", "gate_up", "sparse"),
    ("largest E, random", 40, 1024, 8, 128, 64, 1, 1, "silu", "interleaved", "random"),
    ("K and d not multiples of 8", 5, 32, 4, 200, 72, 1, 1, "gelu", "interleaved", "dup"),
    ("not gated, odd f", 7, 16, 3, 96, 41, 0, 1, "relu2", "gate_up", "dup"),
    ("swiglu_limit", 9, 16, 2, 384, 160, 1, 1, "swiglu_limit", "gate_up", "random"),
    ("k 1", 33, 6, 1, 160, 96, 0, 0, "gelu_tanh", "gate_up", "random"),
]
ACT_PARAMS = {"swiglu_oai": (1.702, 7.0), "swiglu_limit": (1.0, 0.5)}
# quantized W (both in one format; quant_cases.quantize): (name, T, E, k, d, f, format, w_in block,
# w_out block, zero points, scales in float32); None: one scale per output channel
QCASES = [
    ("fp8 per channel, one token", 1, 8, 2, 512, 256, "fp8", None, None, False, False),
    ("fp8 128x128 blocks", 4, 16, 4, 256, 384, "fp8", (128, 128), (128, 128), False, True),
    ("int8 groups of 64 with zero points", 3, 32, 4, 256, 128, "u8", (1, 64), (1, 64), True, False),
    ("int4 groups of 32 with zero points", 2, 64, 8, 512, 256, "u4", (1, 32), (1, 32), True, True),
    ("int4 groups of 128, max N on one expert", 64, 8, 8, 256, 128, "u4", (1, 128), (1, 128), False, False),
    ("int4, K not a multiple of the group (element-wise path)", 5, 16, 2, 200, 72, "u4", (1, 40), (1, 24), True, False),
]


def run(K, x, rw, ri, w1, w2, b1, b2, bufs, act, gated, layout, alpha, limit):
    for key in ("H", "O", "Y"):
        bufs[key].fill_(float("nan"))
    K.moe_decode(x, rw, ri, w1, w2, b1, b2, bufs, act, gated, layout, alpha, limit)
    torch.cuda.synchronize()
    return bufs["Y"][: ri.shape[0]].clone()


def four_kernels(K, x, rw, ri, w1, w2, b1, b2, act, gated, layout, alpha, limit, dtype):
    T, k = ri.shape
    E, _, d = w1.shape  # (a quant_cases QW has the same shape)
    bufs = K.alloc_forward(T, k, E, d, w2.shape[2], dtype)
    y = K.forward(x, rw, ri, w1, w2, b1, b2, bufs, act, gated, layout, alpha, limit, cfg1="skinny", cfg2="skinny")
    torch.cuda.synchronize()
    return y.clone(), bufs["error"].clone()


def test(K, report, check_exact, forward_ref, make_routing, make_weights, TOL):
    for dtype in (torch.float16, torch.bfloat16):
        for i, (name, T, E, k, d, f, gated, bias, act, layout, mode) in enumerate(CASES):
            assert T * k <= DECODE_MAX_N
            n = 2 * f if gated else f
            idt = torch.int64 if i % 2 else torch.int32
            ri = make_routing(T, E, k, mode, idt)
            rw = torch.softmax(torch.randn(T, k, device="cuda"), -1).to(dtype)
            x = torch.randn(T, d, device="cuda").to(dtype)
            w1, w2, b1, b2 = make_weights(E, n, d, f, dtype, bias)
            alpha, limit = ACT_PARAMS.get(act, (1.702, 7.0))
            ref = forward_ref(x, rw, ri, w1, w2, b1, b2, act, gated, layout, alpha, limit, None)
            bufs = K.alloc_forward(T, k, E, d, f, dtype)
            y = run(K, x, rw, ri, w1, w2, b1, b2, bufs, act, gated, layout, alpha, limit)
            y2 = run(K, x, rw, ri, w1, w2, b1, b2, bufs, act, gated, layout, alpha, limit)
            y4, _ = four_kernels(K, x, rw, ri, w1, w2, b1, b2, act, gated, layout, alpha, limit, dtype)
            tag = f"decode {name} T={T} E={E} k={k} d={d} f={f} {str(dtype)[6:]} {str(idt)[6:]}"
            report(f"{tag} vs float64", (y.double() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30),
                   TOL[dtype])
            check_exact(f"{tag}: same bits as the four kernels (skinny), and twice", torch.equal(y, y4) and torch.equal(y, y2))
            if i < 3:
                bad = ri.clone()
                bad.view(-1)[min(1, T * k - 1)] = E + 7
                run(K, x, rw, bad, w1, w2, b1, b2, bufs, act, gated, layout, alpha, limit)
                err = bufs["error"].clone()
                _, err4 = four_kernels(K, x, rw, bad, w1, w2, b1, b2, act, gated, layout, alpha, limit, dtype)
                check_exact(f"{tag}: bad index -> error words {err.tolist()} (routing kernels: {err4.tolist()})",
                            torch.equal(err, err4) and err[0].item() == 1)
    # quantized W: the same bits as the four kernels with the skinny kernel's quantized form forced
    for dtype in (torch.float16, torch.bfloat16):
        for i, (name, T, E, k, d, f, fmt, blk1, blk2, zp, sf32) in enumerate(QCASES):
            mode = "one" if "one expert" in name else "random"
            ri = make_routing(T, E, k, mode, torch.int64 if i % 2 else torch.int32)
            rw = torch.softmax(torch.randn(T, k, device="cuda"), -1).to(dtype)
            x = torch.randn(T, d, device="cuda").to(dtype)
            sdt = torch.float32 if sf32 else dtype
            q1, W1 = quant_cases.quantize(torch.randn(E, 2 * f, d, device="cuda") / math.sqrt(d), fmt, blk1, sdt, zp)
            q2, W2 = quant_cases.quantize(torch.randn(E, d, f, device="cuda") / math.sqrt(f), fmt, blk2, sdt, zp)
            b1 = (0.1 * torch.randn(E, 2 * f, device="cuda")).to(dtype)
            ref = forward_ref(x, rw, ri, W1, W2, b1, None, "silu", 1, "gate_up", 1.702, 7.0, None)
            bufs = K.alloc_forward(T, k, E, d, f, dtype)
            y = run(K, x, rw, ri, q1, q2, b1, None, bufs, "silu", 1, "gate_up", 1.702, 7.0)
            y4, _ = four_kernels(K, x, rw, ri, q1, q2, b1, None, "silu", 1, "gate_up", 1.702, 7.0, dtype)
            tag = f"decode quantized {name} T={T} E={E} k={k} d={d} f={f} {str(dtype)[6:]}"
            report(f"{tag} vs float64", (y.double() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30),
                   TOL[dtype])
            check_exact(f"{tag}: same bits as the four kernels (skinny)", torch.equal(y, y4))
    # in a CUDA graph, replayed over changed inputs (the op's use at decode)
    T, E, k, d, f = 4, 64, 8, 1024, 512
    dtype = torch.bfloat16
    w1, w2, b1, b2 = make_weights(E, 2 * f, d, f, dtype, 0)
    x = torch.randn(T, d, device="cuda").to(dtype)
    ri = make_routing(T, E, k, "random")
    rw = torch.softmax(torch.randn(T, k, device="cuda"), -1).to(dtype)
    bufs = K.alloc_forward(T, k, E, d, f, dtype)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        K.moe_decode(x, rw, ri, w1, w2, b1, b2, bufs)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=s):
            K.moe_decode(x, rw, ri, w1, w2, b1, b2, bufs)
    x.copy_(torch.randn(T, d, device="cuda").to(dtype))
    ri.copy_(make_routing(T, E, k, "random"))
    g.replay()
    torch.cuda.synchronize()
    yg = bufs["Y"][:T].clone()
    y4, _ = four_kernels(K, x, rw, ri, w1, w2, b1, b2, "silu", 1, "gate_up", 1.702, 7.0, dtype)
    check_exact("decode in a CUDA graph, replayed on new inputs: same bits as the four kernels", torch.equal(yg, y4))


def sanitize(K, make_routing, make_weights):
    """Small launches (no references), for compute-sanitizer: both index types, a bad index, both
    element-wise paths, max N on one expert, and each quantized format."""
    for dtype in (torch.float16, torch.bfloat16):
        for (T, E, k, d, f, gated, act, mode) in ((1, 8, 2, 256, 128, 1, "silu", "random"),
                                                  (5, 32, 4, 200, 72, 1, "gelu", "dup"),
                                                  (64, 8, 8, 128, 64, 0, "relu", "one"),
                                                  (3, 1024, 8, 64, 32, 1, "silu", "sparse")):
            for idt in (torch.int32, torch.int64):
                n = 2 * f if gated else f
                ri = make_routing(T, E, k, mode, idt)
                x = torch.randn(T, d, device="cuda").to(dtype)
                rw = torch.rand(T, k, device="cuda").to(dtype)
                w1, w2, b1, b2 = make_weights(E, n, d, f, dtype, 1)
                bufs = K.alloc_forward(T, k, E, d, f, dtype)
                K.moe_decode(x, rw, ri, w1, w2, b1, b2, bufs, act, gated)
                bad = ri.clone()
                bad.view(-1)[0] = -3
                K.moe_decode(x, rw, bad, w1, w2, b1, b2, bufs, act, gated)
        for (name, T, E, k, d, f, fmt, blk1, blk2, zp, sf32) in QCASES[2:]:
            ri = make_routing(T, E, k, "random")
            x = torch.randn(T, d, device="cuda").to(dtype)
            rw = torch.rand(T, k, device="cuda").to(dtype)
            sdt = torch.float32 if sf32 else dtype
            q1, _ = quant_cases.quantize(torch.randn(E, 2 * f, d, device="cuda") / math.sqrt(d), fmt, blk1, sdt, zp)
            q2, _ = quant_cases.quantize(torch.randn(E, d, f, device="cuda") / math.sqrt(f), fmt, blk2, sdt, zp)
            bufs = K.alloc_forward(T, k, E, d, f, dtype)
            K.moe_decode(x, rw, ri, q1, q2, None, None, bufs)
    torch.cuda.synchronize()
    print("sanitize decode: all launches done", flush=True)
