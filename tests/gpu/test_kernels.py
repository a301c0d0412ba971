"""Correctness of kernels/ against float64 torch references (on the GPU).

usage: python3 tests/gpu/test_kernels.py --fatbin-dir DIR [--mode correct|sanitize]
correct : routing exactness, capacity, validation, ParallelLinear GEMM modes, full forward over
          dtypes / shapes / activations / layouts, quantized weights (quant_cases.py); prints one
          line per case and a summary. --only selects: routing, pl, fwd, quant, skinny, decode.
          skinny: the skinny kernel's own cases (skinny_cases.py: long K, partial k-steps, the
          element-wise path, skew past 8 rows, every quantized block form, bit-exact dequantization).
          decode: the decode kernel's cases (decode_cases.py: the whole op in one launch, bit for
          bit against the four kernels, and against float64).
          --cfgs limits the forced configurations of every group to a list (e.g. --cfgs skinny).
sanitize: a few small launches of every entry point, no references (run under compute-sanitizer);
          --only quant: the quantized ones only; --only skinny: the skinny kernel's only (both
          paths, every format); --only decode: the decode kernel's; --small: fewer of them (racecheck).
"""
import argparse
import math
import sys
import time

import torch

sys.path.insert(0, __import__("os").path.dirname(__file__))
from smoe_cuda import ROUTING_CHUNK, Kernels  # noqa: E402
import quant_cases  # noqa: E402
import decode_cases  # noqa: E402
import skinny_cases  # noqa: E402
from kernel_table import SM90A_ONLY, TC_CFGS  # noqa: E402

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
DT = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
FAILS = []
NCASES = [0]


def report(name, err, tol):
    NCASES[0] += 1
    ok = (err == err) and err <= tol  # NaN fails
    if not ok:
        FAILS.append(name)
    print(f"{'PASS' if ok else 'FAIL'}  {name:<78s} err={err:.3e} tol={tol:.0e}", flush=True)


def check_exact(name, ok):
    NCASES[0] += 1
    if not ok:
        FAILS.append(name)
    print(f"{'PASS' if ok else 'FAIL'}  {name}", flush=True)


def relerr(a, b):
    a = a.double()
    b = b.double()
    den = b.abs().max().item()
    return (a - b).abs().max().item() / (den if den > 0 else 1.0)


# ---------------------------------------------------------------------------- references
def act_ref(x, act):
    if act == "silu":
        return x * torch.sigmoid(x)
    if act == "gelu":
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
    if act == "gelu_tanh":
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    if act == "relu":
        return x.clamp_min(0)
    if act == "relu2":
        return x.clamp_min(0) ** 2
    return x


def glu_ref(a, act, layout, alpha, limit):
    f = a.shape[1] // 2
    if layout == "gate_up":
        g, u = a[:, :f], a[:, f:]
    elif layout == "up_gate":
        u, g = a[:, :f], a[:, f:]
    else:
        g, u = a[:, 0::2], a[:, 1::2]
    if act in ("swiglu_oai", "swiglu_limit"):
        g = g.clamp(max=limit)
        u = u.clamp(-limit, limit)
        return (u + (1 if act == "swiglu_oai" else 0)) * g * torch.sigmoid(alpha * g)
    return act_ref(g, act) * u


def routing_ref(ri, E):
    flat = ri.reshape(-1).long()
    N = flat.numel()
    counts = torch.bincount(flat, minlength=E)
    offsets = torch.zeros(E + 1, dtype=torch.long, device=ri.device)
    offsets[1:] = counts.cumsum(0)
    sidx = torch.argsort(flat, stable=True)
    pos = torch.empty_like(sidx)
    pos[sidx] = torch.arange(N, device=ri.device)
    return offsets, sidx, pos


def kept_ref(ri, E, C, order):
    T, k = ri.shape
    flat = ri.reshape(-1).long()
    N = T * k
    fi = torch.arange(N, device=ri.device)
    key = fi if order == 1 else (fi % k) * T + fi // k
    o = torch.argsort(flat * N + key, stable=True)
    counts = torch.bincount(flat, minlength=E)
    start = torch.zeros(E, dtype=torch.long, device=ri.device)
    start[1:] = counts.cumsum(0)[:-1]
    rank = torch.empty(N, dtype=torch.long, device=ri.device)
    rank[o] = torch.arange(N, device=ri.device) - start[flat[o]]
    return (rank < C).to(torch.uint8)


def linear_ref(x64, w, b, e_of_row, act, gated, layout, alpha, limit):
    """x64 [R, K] float64, rows grouped by e_of_row; returns [R, Nout] float64."""
    E, N, K = w.shape
    out = torch.zeros(x64.shape[0], N // 2 if gated else N, dtype=torch.float64, device=x64.device)
    for e in torch.unique(e_of_row).tolist():
        sel = (e_of_row == e).nonzero().squeeze(1)
        a = x64[sel] @ w[e].double().t()
        if b is not None:
            a = a + b[e].double()
        out[sel] = glu_ref(a, act, layout, alpha, limit) if gated else act_ref(a, act)
    return out


def forward_ref(x, rw, ri, w1, w2, b1, b2, act, gated, layout, alpha, limit, kept):
    T, k = ri.shape
    flat = ri.reshape(-1).long()
    tok = torch.arange(T * k, device=x.device) // k
    h = linear_ref(x.double()[tok], w1, b1, flat, act, gated, layout, alpha, limit)
    o = linear_ref(h, w2, b2, flat, "none", 0, layout, alpha, limit)
    wk = rw.double().reshape(-1) * (kept.double() if kept is not None else 1.0)
    return (o * wk[:, None]).view(T, k, -1).sum(1)


# ---------------------------------------------------------------------------- inputs
def make_routing(T, E, k, mode="random", idx_dtype=torch.int32, gen=None):
    dev = "cuda"
    if mode == "random":  # distinct experts per token when possible
        if k <= E:
            ri = torch.rand(T, E, device=dev).topk(k, dim=1).indices
        else:
            ri = torch.randint(0, E, (T, k), device=dev)
    elif mode == "one":  # one expert takes everything
        ri = torch.full((T, k), min(5, E - 1), device=dev, dtype=torch.long)
    elif mode == "sparse":  # most experts empty
        choices = torch.tensor(sorted({0, 3 % E, E - 1}), device=dev)
        ri = choices[torch.randint(0, len(choices), (T, k), device=dev)]
    elif mode == "dup":  # repeats allowed
        ri = torch.randint(0, E, (T, k), device=dev)
    return ri.to(idx_dtype).contiguous()


def make_weights(E, n, d, f, dtype, bias):
    dev = "cuda"
    w1 = (torch.randn(E, n, d, device=dev) / math.sqrt(d)).to(dtype)
    w2 = (torch.randn(E, d, f, device=dev) / math.sqrt(f)).to(dtype)
    b1 = (0.1 * torch.randn(E, n, device=dev)).to(dtype) if bias else None
    b2 = (0.1 * torch.randn(E, d, device=dev)).to(dtype) if bias else None
    return w1, w2, b1, b2


# ---------------------------------------------------------------------------- tests
def test_routing(K):
    shapes = [(1, 8, 2), (3, 64, 8), (64, 1, 1), (1000, 256, 8), (65536, 256, 8), (65536, 8, 2),
              (300000, 64, 8), (5000, 1000, 4), (4097, 3, 1)]
    for T, E, k in shapes:
        for idt in (torch.int32, torch.int64):
            for mode in ("random", "sparse", "dup"):
                if mode != "random" and T > 70000:
                    continue
                ri = make_routing(T, E, k, mode, idt)
                # one block of assignments: both the one-block kernel and count + scan + scatter
                for small in ((True, False) if T * k <= ROUTING_CHUNK else (False,)):
                    b = K.alloc_routing(T, k, E)
                    for key in ("sidx", "pos", "offsets", "error", "kept"):
                        b[key].fill_(-7 if key != "kept" else 7)
                    K.routing(ri, E, b, small=small)
                    torch.cuda.synchronize()
                    off, sidx, pos = routing_ref(ri, E)
                    ok = (torch.equal(b["offsets"].long(), off) and torch.equal(b["sidx"][: T * k].long(), sidx)
                          and torch.equal(b["pos"][: T * k].long(), pos) and b["error"].tolist() == [0, -1]
                          and bool((b["kept"][: T * k] == 1).all()))
                    check_exact(f"routing T={T} E={E} k={k} {str(idt)[6:]} {mode}{' small' if small else ''}", ok)
    # capacity
    for T, E, k in [(1000, 8, 2), (3, 4, 8), (65536, 64, 8)]:
        ri = make_routing(T, E, k, "dup")
        for order in (0, 1):
            for C in (0, 1, (T * k) // E // 2, (T * k) // E, 10 ** 12):
                b = K.alloc_routing(T, k, E)
                cap = torch.tensor([C], dtype=torch.int64, device="cuda")
                kout = torch.full((T * k,), -1.0, device="cuda", dtype=torch.bfloat16)
                K.routing(ri, E, b, cap, order, kept_out=kout)
                torch.cuda.synchronize()
                kr = kept_ref(ri, E, C, order)
                off, sidx, pos = routing_ref(ri, E)
                ok = (torch.equal(b["kept"][: T * k], kr) and torch.equal(kout, kr.to(torch.bfloat16))
                      and torch.equal(b["sidx"][: T * k].long(), sidx) and b["error"].tolist() == [0, -1])
                check_exact(f"capacity T={T} E={E} k={k} C={C} {'slot' if order == 0 else 'token'}_major", ok)
    # validation (5000 tokens: several blocks; 1000 tokens: the one-block kernel)
    E, k = 16, 4
    for T, idt, bads in ((5000, torch.int32, [(77, 16), (3000, -1)]), (5000, torch.int64, [(9, 2 ** 40), (19999, -(2 ** 40))]),
                         (1000, torch.int32, [(3999, 16), (2500, -5)]), (1000, torch.int64, [(0, 2 ** 40), (7, -1)])):
        ri = make_routing(T, E, k, "random", idt)
        flat = ri.view(-1)
        for p, v in bads:
            flat[p] = v
        b = K.alloc_routing(T, k, E)
        K.routing(ri, E, b)
        torch.cuda.synchronize()
        mn = min(p for p, _ in bads)
        check_exact(f"validation T={T} {str(idt)[6:]} bad at {[p for p, _ in bads]} -> error {b['error'].tolist()}",
                    b["error"].tolist() == [1, mn] and int(b["offsets"][E]) == T * k)
    b = K.alloc_routing(10, 2, 4)
    K.routing(make_routing(10, 4, 2), 4, b, torch.tensor([-3], dtype=torch.int64, device="cuda"), 1)
    torch.cuda.synchronize()
    check_exact(f"validation negative capacity -> error {b['error'].tolist()}", b["error"].tolist() == [2, -1])
    # T = 0
    b = K.alloc_routing(0, 2, 8)
    K.routing(torch.empty(0, 2, dtype=torch.int32, device="cuda"), 8, b)
    torch.cuda.synchronize()
    check_exact("routing T=0", b["offsets"].tolist() == [0] * 9 and b["error"].tolist() == [0, -1])


# the configurations every group forces (--cfgs narrows them; None: all)
ONLY_CFGS = None


def cfgs_for(dtype):
    """Every 16-bit configuration of the catalogue that runs here (the sm_90a-only ones on Hopper;
    wgmma_mc_ga takes grouped input only, else it runs as wgmma_mc)."""
    if dtype == torch.float32:
        return [None]
    hopper = torch.cuda.get_device_capability()[0] == 9
    c = [x for x in TC_CFGS if x not in SM90A_ONLY or hopper]
    return [x for x in c if ONLY_CFGS is None or x in ONLY_CFGS]


def test_parallel_linear(K):
    T, E, k = 1000, 64, 2
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for Kd, N in ((200, 72), (72, 200), (100, 36)):
            ri = make_routing(T, E, k)
            b = K.alloc_routing(T, k, E)
            K.routing(ri, E, b)
            w = (torch.randn(E, N, Kd, device="cuda") / math.sqrt(Kd)).to(dtype)
            bias = (0.1 * torch.randn(E, N, device="cuda")).to(dtype)
            rw = torch.rand(T, k, device="cuda").to(dtype)
            flat = ri.view(-1).long()
            for cfg in cfgs_for(dtype):
                # scatter in, scatter out with routing-weight scale
                x = torch.randn(T, Kd, device="cuda").to(dtype)
                Y = torch.full((T * k, N), float("nan"), device="cuda", dtype=dtype)
                K.gemm(x, w, bias, Y, b["sidx"], b["offsets"], rw.view(-1), k, T * k, 0, 0, cfg=cfg)
                xr = x.double()[torch.arange(T * k, device="cuda") // k]
                ref = linear_ref(xr, w, bias, flat, "none", 0, "gate_up", 0, 0) * rw.double().view(-1, 1)
                report(f"PL in=0 out=0 scaled {DT[dtype]} {cfg} K={Kd} N={N}", relerr(Y, ref), TOL[dtype])
                # grouped in, scattered out, no bias
                xg = torch.randn(T * k, Kd, device="cuda").to(dtype)
                Y.fill_(float("nan"))
                K.gemm(xg, w, None, Y, b["sidx"], b["offsets"], None, k, T * k, 1, 0, cfg=cfg)
                sidx = b["sidx"].long()
                ref = torch.empty(T * k, N, dtype=torch.float64, device="cuda")
                ref[sidx] = linear_ref(xg.double(), w, None, flat[sidx], "none", 0, "gate_up", 0, 0)
                report(f"PL in=1 out=0 {DT[dtype]} {cfg} K={Kd} N={N}", relerr(Y, ref), TOL[dtype])


FWD_CASES = [
    # name, T, E, k, d, f, gated, bias, act, layout, routing mode, capacity (C, order)
    ("decode", 1, 8, 2, 200, 72, 1, 1, "silu", "gate_up", "random", None),
    ("tiny", 3, 64, 8, 200, 72, 1, 0, "gelu", "up_gate", "random", None),
    ("E1 plain relu", 64, 1, 1, 256, 128, 0, 1, "relu", "gate_up", "random", None),
    ("swiglu_oai interleaved", 1000, 8, 2, 200, 72, 1, 1, "swiglu_oai", "interleaved", "random", None),
    ("E256 gelu_tanh", 1000, 256, 8, 128, 64, 1, 0, "gelu_tanh", "gate_up", "random", None),
    ("one expert", 1000, 64, 1, 200, 72, 1, 1, "silu", "gate_up", "one", None),
    ("most empty", 64, 256, 2, 200, 72, 1, 1, "silu", "interleaved", "sparse", None),
    ("unaligned d=100 f=36", 77, 8, 2, 100, 36, 1, 1, "silu", "up_gate", "random", None),
    ("odd d=30 f=5", 10, 4, 2, 30, 5, 1, 1, "gelu", "gate_up", "dup", None),
    ("plain gelu nobias", 1000, 8, 2, 512, 256, 0, 0, "gelu", "gate_up", "random", None),
    ("k8 E8 all experts", 64, 8, 8, 200, 72, 1, 1, "silu", "gate_up", "random", None),
    ("capacity slot", 1000, 8, 2, 200, 72, 1, 1, "silu", "gate_up", "dup", (200, 0)),
    ("capacity token", 1000, 8, 2, 200, 72, 1, 1, "silu", "gate_up", "dup", (150, 1)),
    ("capacity 0", 100, 8, 2, 200, 72, 1, 1, "silu", "gate_up", "dup", (0, 0)),
    ("T65536 E256 k8", 65536, 256, 8, 200, 72, 1, 1, "silu", "gate_up", "random", None),
    ("T65536 E8 k2 plain", 65536, 8, 2, 512, 256, 0, 1, "gelu", "gate_up", "random", None),
    ("mid 4096 E64 k8", 4096, 64, 8, 1024, 512, 1, 0, "silu", "gate_up", "random", None),
    ("plain relu2", 1000, 8, 2, 200, 72, 0, 1, "relu2", "gate_up", "random", None),
    ("gated relu2 odd d=30 f=5", 10, 4, 2, 30, 5, 1, 1, "relu2", "interleaved", "dup", None),
    ("swiglu_limit up_gate", 1000, 8, 2, 200, 72, 1, 1, "swiglu_limit", "up_gate", "random", None),
    ("swiglu_limit interleaved unaligned", 77, 8, 2, 100, 36, 1, 0, "swiglu_limit", "interleaved", "dup", None),
    ("mid relu2 plain", 4096, 8, 2, 1024, 512, 0, 1, "relu2", "gate_up", "random", None),
    ("mid swiglu_limit", 4096, 64, 8, 1024, 512, 1, 0, "swiglu_limit", "gate_up", "random", None),
]
# alpha and limit of the clamped forms per activation (others ignore them): swiglu_limit as GLM-5-Next
# writes it (alpha 1) with a limit the values cross
ACT_PARAMS = {"swiglu_limit": (1.0, 0.5)}


def test_forward(K):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for (name, T, E, k, d, f, gated, bias, act, layout, mode, cap) in FWD_CASES:
            n = 2 * f if gated else f
            idt = torch.int64 if (T % 2) else torch.int32
            ri = make_routing(T, E, k, mode, idt)
            rw = torch.softmax(torch.randn(T, k, device="cuda"), -1).to(dtype)
            x = torch.randn(T, d, device="cuda").to(dtype)
            w1, w2, b1, b2 = make_weights(E, n, d, f, dtype, bias)
            capt = torch.tensor([cap[0]], dtype=torch.int64, device="cuda") if cap else None
            kept = kept_ref(ri, E, cap[0], cap[1]) if cap else None
            alpha, limit = ACT_PARAMS.get(act, (1.702, 7.0))
            ref = forward_ref(x, rw, ri, w1, w2, b1, b2, act, gated, layout, alpha, limit, kept)
            for cfg in cfgs_for(dtype):
                if T * k > 100000 and cfg in ("32x64s6", "32x32"):
                    continue
                bufs = K.alloc_forward(T, k, E, d, f, dtype)
                for key in ("H", "O", "Y"):
                    bufs[key].fill_(float("nan"))
                y = K.forward(x, rw, ri, w1, w2, b1, b2, bufs, act, gated, layout, alpha, limit, capt,
                              cap[1] if cap else 0, cfg1=cfg, cfg2=cfg)
                torch.cuda.synchronize()
                report(f"fwd {name} T={T} E={E} k={k} d={d} f={f} {DT[dtype]} {cfg}", relerr(y, ref), TOL[dtype])
            # the automatic choice, once
            bufs = K.alloc_forward(T, k, E, d, f, dtype)
            y = K.forward(x, rw, ri, w1, w2, b1, b2, bufs, act, gated, layout, alpha, limit, capt,
                          cap[1] if cap else 0).clone()
            y2 = K.forward(x, rw, ri, w1, w2, b1, b2, bufs, act, gated, layout, alpha, limit, capt,
                           cap[1] if cap else 0).clone()
            torch.cuda.synchronize()
            check_exact(f"fwd {name} {DT[dtype]} auto cfg deterministic (bitwise equal twice)",
                        torch.equal(y, y2) and relerr(y, ref) <= TOL[dtype])


def sanitize(K):
    """Small launches of every entry point (no references)."""
    for idt in (torch.int32, torch.int64):
        ri = make_routing(100, 8, 2, "dup", idt)
        b = K.alloc_routing(100, 2, 8)
        K.routing(ri, 8, b)
        for order in (0, 1):
            K.routing(ri, 8, b, torch.tensor([30], dtype=torch.int64, device="cuda"), order,
                      kept_out=torch.empty(200, device="cuda"))
        bad = ri.clone()
        bad.view(-1)[5] = 99
        bad.view(-1)[7] = -4
        K.routing(bad, 8, b)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for (T, E, k, d, f, gated, act) in ((37, 8, 2, 200, 72, 1, "silu"), (10, 4, 2, 30, 5, 1, "gelu"),
                                            (50, 3, 1, 64, 40, 0, "relu"), (600, 2, 2, 512, 64, 1, "silu"),
                                            (50, 3, 1, 64, 40, 0, "relu2"), (37, 8, 2, 200, 72, 1, "swiglu_limit")):
            n = 2 * f if gated else f
            ri = make_routing(T, E, k, "dup")
            x = torch.randn(T, d, device="cuda").to(dtype)
            rw = torch.rand(T, k, device="cuda").to(dtype)
            w1, w2, b1, b2 = make_weights(E, n, d, f, dtype, 1)
            for cfg in cfgs_for(dtype):
                bufs = K.alloc_forward(T, k, E, d, f, dtype)
                K.forward(x, rw, ri, w1, w2, b1, b2, bufs, act, gated, "gate_up", cfg1=cfg, cfg2=cfg)
                K.forward(x, rw, ri, w1, w2, b1, b2, bufs, act, gated, "interleaved", capacity=torch.tensor(
                    [3], dtype=torch.int64, device="cuda"), capacity_order=0, cfg1=cfg, cfg2=cfg)
                Y = torch.empty(T * k, n, device="cuda", dtype=dtype)
                K.gemm(x, w1, b1, Y, bufs["sidx"], bufs["offsets"], rw.view(-1), k, T * k, 0, 0, cfg=cfg)
                # bad index: must stay in bounds
                bad = ri.clone()
                bad.view(-1)[0] = 1000
                K.forward(x, rw, bad, w1, w2, b1, b2, bufs, act, gated, "gate_up", cfg1=cfg, cfg2=cfg)
    torch.cuda.synchronize()
    print("sanitize: all launches done", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fatbin-dir", default="target/scattermoe-kernels")
    ap.add_argument("--mode", default="correct")
    ap.add_argument("--only", default="routing,pl,fwd,quant,skinny,decode")
    ap.add_argument("--small", action="store_true", help="sanitize: the reduced quantized set (racecheck)")
    ap.add_argument("--cfgs", default=None, help="only these forced configurations (comma-separated suffixes)")
    a = ap.parse_args()
    global ONLY_CFGS
    if a.cfgs:
        ONLY_CFGS = a.cfgs.split(",")
        quant_cases.TILES = tuple(t for t in quant_cases.TILES if t in ONLY_CFGS)
    torch.manual_seed(0)
    K = Kernels(a.fatbin_dir)
    t0 = time.time()
    if a.mode == "sanitize":
        if a.only == "skinny":
            skinny_cases.sanitize(K, make_routing, make_weights, small=a.small)
            return
        if a.only == "decode":
            decode_cases.sanitize(K, make_routing, make_weights)
            return
        if a.only != "quant":
            sanitize(K)
        quant_cases.sanitize(K, make_routing, small=a.small)
        return
    only = a.only.split(",")
    if "routing" in only:
        test_routing(K)
    if "pl" in only:
        test_parallel_linear(K)
    if "fwd" in only:
        test_forward(K)
    if "quant" in only:
        quant_cases.test_exact(K, check_exact)
        quant_cases.test_pl(K, report, linear_ref, make_routing, TOL)
        quant_cases.test_fwd(K, report, forward_ref, make_routing, TOL)
    if "skinny" in only:
        skinny_cases.test_exact(K, check_exact)
        skinny_cases.test_pl(K, report, linear_ref, make_routing, TOL)
        skinny_cases.test_fwd(K, report, forward_ref, make_routing, make_weights, TOL)
        skinny_cases.test_quant_fwd(K, report, forward_ref, make_routing, TOL)
    if "decode" in only:
        decode_cases.test(K, report, check_exact, forward_ref, make_routing, make_weights, TOL)
    print(f"\n{NCASES[0] - len(FAILS)}/{NCASES[0]} passed in {time.time() - t0:.1f}s; failures: {FAILS}")
    sys.exit(1 if FAILS else 0)


if __name__ == "__main__":
    main()
