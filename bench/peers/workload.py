"""The layer every column computes: weights, input sets with their routing, the float32 reference.

Routing that every implementation reproduces bit-for-bit. The router weight is Wr = [I_E | 0] (E x d),
so router logits = x @ Wr^T are exactly x[:, :E] in any bfloat16 matmul (one non-zero product per
logit). Per token, x[:, :E] holds a random permutation of E distinct bf16-exact values spread over
[-4, 4): softmax -> top-k -> renormalise then picks a uniformly random set of k experts, with no
ties (neighbouring logits differ by 8/E), in torch, in ORT's TopK, in com.microsoft.MoE and in the
Hugging Face block alike. The other d - E features are N(0, 1).

Input sets: SETS of them per token count, all with the same number of distinct experts hit (set s
relabels set 0's experts with a random permutation, and draws fresh other features), so that the
timed loops do not re-read one routing's weights from L2 and the traced export (valid only for the
hit count it was traced with) runs on every set.
"""
import torch
import torch.nn.functional as F

SETS = 4
LOGIT_SPAN = 8.0
DEVICE = "cuda"  # a CPU check of this module may set "cpu"


def make_weights(d, f, E, seed=0):
    """w_gu [E, 2f, d] (gate rows first), w_down [E, d, f], wr [E, d]; bfloat16 on the GPU."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    w_gu = (torch.randn(E, 2 * f, d, device=DEVICE, generator=g) * d**-0.5).to(torch.bfloat16)
    w_down = (torch.randn(E, d, f, device=DEVICE, generator=g) * f**-0.5).to(torch.bfloat16)
    wr = torch.zeros(E, d, device=DEVICE, dtype=torch.bfloat16)
    wr[:, :E] = torch.eye(E, device=DEVICE, dtype=torch.bfloat16)
    return w_gu, w_down, wr


def interleave(w_gu):
    E, n, d = w_gu.shape
    return w_gu.view(E, 2, n // 2, d).transpose(1, 2).reshape(E, n, d).contiguous()


def logit_grid(E):
    grid = ((torch.arange(E, dtype=torch.float32) - E / 2) * (LOGIT_SPAN / E)).to(torch.bfloat16)
    assert torch.unique(grid).numel() == E, "router logits must be distinct in bfloat16"
    return grid.to(DEVICE)


def route(logits, k):
    """softmax (float32) -> top-k -> renormalise; returns (float32 weights, bf16 weights, int64 indices)."""
    p, ri = torch.topk(torch.softmax(logits.float(), dim=-1), k, dim=-1)
    rw32 = p / p.sum(-1, keepdim=True)
    return rw32, rw32.to(torch.bfloat16), ri.contiguous()


def make_sets(T, d, E, k, seed):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    grid = logit_grid(E)
    order = torch.rand(T, E, device=DEVICE, generator=g).argsort(dim=1)  # token t gives grid[j] to expert order[t, j]
    logits0 = torch.empty(T, E, device=DEVICE, dtype=torch.bfloat16).scatter_(1, order, grid.expand(T, E))
    sets = []
    for s in range(SETS):
        relabel = torch.arange(E, device=DEVICE) if s == 0 else torch.randperm(E, device=DEVICE, generator=g)
        x = torch.randn(T, d, device=DEVICE, generator=g).to(torch.bfloat16)
        x[:, relabel] = logits0  # expert relabel[e] of set s gets expert e's logit of set 0
        logits = x[:, :E].contiguous()
        rw32, rw, ri = route(logits, k)
        sets.append(dict(x=x, logits=logits, rw32=rw32, rw=rw, ri=ri, y=torch.empty_like(x)))
    return sets


def experts_hit(ri):
    return int(torch.unique(ri).numel())


def reference_f32(x, rw32, ri, w_gu, w_down):
    """float32 evaluation of the layer (weights and x upcast from bf16), expert by expert."""
    T, k = ri.shape
    f = w_down.shape[2]
    xf = x.float()
    y = torch.zeros_like(xf)
    flat = ri.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w_gu.shape[0]).tolist()
    tok, wts = order // k, rw32.reshape(-1)[order]
    start = 0
    for e, c in enumerate(counts):
        if c:
            rows = tok[start:start + c]
            h = xf[rows] @ w_gu[e].float().t()
            o = (F.silu(h[:, :f]) * h[:, f:]) @ w_down[e].float().t()
            y.index_add_(0, rows, o * wts[start:start + c, None])
            start += c
    return y


def rel_err(y, ref):
    """max |y - ref| / max |ref| (as the repo's tests report it); inf if y holds a NaN or inf."""
    y = y.float()
    if not bool(torch.isfinite(y).all()):
        return float("inf")
    return float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def floor_ms(T, d, f, k, n_hit, peak_flops, copy_bw):
    """max(FLOPs / matmul rate, bytes / copy bandwidth); bytes = weights of the experts hit + X + Y."""
    flops = 2 * T * k * 3 * d * f
    nbytes = n_hit * 3 * f * d * 2 + 2 * T * d * 2
    return max(flops / peak_flops, nbytes / copy_bw) * 1e3
