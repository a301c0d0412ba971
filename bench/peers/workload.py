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

Weights (make_weights): w_gu [E, 2f, d] in the layer's glu layout, w_down [E, d, f], N(0, 1/fan_in); for
layers with biases (GPT-OSS) b_gu [E, 2f] ~ N(0, BIAS_IN_STD^2) and b_down [E, d] ~ N(0, BIAS_OUT_STD^2):
with BIAS_IN_STD = 2 the gate and up values have a standard deviation of about 2.2, so GPT-OSS's clamp at
limit 7 acts on a few values in a thousand (the columns must clamp, not merely could).
"""
import torch
import torch.nn.functional as F

SETS = 4
LOGIT_SPAN = 8.0
BIAS_IN_STD, BIAS_OUT_STD = 2.0, 1.0
DEVICE = "cuda"  # a CPU check of this module may set "cpu"


def make_weights(layer, seed=0):
    """{"w_gu": [E, 2f, d] (the layer's glu layout), "w_down": [E, d, f], "wr": [E, d], "b_gu": [E, 2f] or
    None, "b_down": [E, d] or None}; bfloat16 on DEVICE. Generated expert by expert (no float32 copy of
    the whole tensor: DeepSeek-V3's experts are 22.5 GB in bfloat16)."""
    d, f, E, _ = layer.dims
    g = torch.Generator(device=DEVICE).manual_seed(seed)

    def normal(shape, std):
        out = torch.empty((E,) + shape, device=DEVICE, dtype=torch.bfloat16)
        for e in range(E):
            out[e] = torch.randn(shape, device=DEVICE, generator=g) * std
        return out

    w = dict(w_gu=normal((2 * f, d), d**-0.5), w_down=normal((d, f), f**-0.5), b_gu=None, b_down=None)
    if layer.bias:
        w["b_gu"] = (torch.randn(E, 2 * f, device=DEVICE, generator=g) * BIAS_IN_STD).to(torch.bfloat16)
        w["b_down"] = (torch.randn(E, d, device=DEVICE, generator=g) * BIAS_OUT_STD).to(torch.bfloat16)
    w["wr"] = torch.zeros(E, d, device=DEVICE, dtype=torch.bfloat16)
    w["wr"][:, :E] = torch.eye(E, device=DEVICE, dtype=torch.bfloat16)
    return w


def interleave(w_gu):
    """[E, 2f, ...] gate_up rows -> interleaved (row 2i gate i, 2i + 1 up i); works on biases [E, 2f] too."""
    E, n = w_gu.shape[:2]
    rest = w_gu.shape[2:]
    return w_gu.view(E, 2, n // 2, *rest).transpose(1, 2).reshape(E, n, *rest).contiguous()


def to_interleaved(t, layer):
    """w_gu or b_gu of `layer` in the interleaved layout com.microsoft.MoE reads (t itself when already so)."""
    if t is None or layer.glu == "interleaved":
        return t
    if layer.glu == "up_gate":
        t = torch.cat(t.chunk(2, dim=1)[::-1], dim=1)
    return interleave(t)


def split_glu(h, glu):
    """(gate, up) of h [..., 2f] in layout `glu`."""
    if glu == "interleaved":
        return h[..., 0::2], h[..., 1::2]
    a, b = h.chunk(2, dim=-1)
    return (a, b) if glu == "gate_up" else (b, a)


def glu_act(h, layer):
    """The layer's gated activation of h [..., 2f] (docs/op-spec.md, ScatterMoE semantics), in h's dtype."""
    g, u = split_glu(h, layer.glu)
    if layer.activation == "silu":
        return F.silu(g) * u
    g = g.clamp(max=layer.limit)
    return (u.clamp(-layer.limit, layer.limit) + 1) * (g * torch.sigmoid(layer.alpha * g))


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


def reference_f32(x, rw32, ri, w, layer):
    """float32 evaluation of the layer (weights, biases and x upcast from bf16), expert by expert;
    w: make_weights' dict. rw32 [T, k] may be any routing weights for the indices ri."""
    T, k = ri.shape
    xf = x.float()
    y = torch.zeros_like(xf)
    flat = ri.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w["w_gu"].shape[0]).tolist()
    tok, wts = order // k, rw32.reshape(-1)[order]
    start = 0
    for e, c in enumerate(counts):
        if c:
            rows = tok[start:start + c]
            h = xf[rows] @ w["w_gu"][e].float().t()
            if w["b_gu"] is not None:
                h += w["b_gu"][e].float()
            o = glu_act(h, layer) @ w["w_down"][e].float().t()
            if w["b_down"] is not None:
                o += w["b_down"][e].float()
            y.index_add_(0, rows, o * wts[start:start + c, None])
            start += c
    return y


def rel_err(y, ref):
    """max |y - ref| / max |ref| (as the repo's tests report it); inf if y holds a NaN or inf."""
    y = y.float()
    if not bool(torch.isfinite(y).all()):
        return float("inf")
    return float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def floor_ms(T, layer, n_hit, peak_flops, copy_bw):
    """max(FLOPs / matmul rate, bytes / copy bandwidth); FLOPs = 2 T k 3 d f (the biases' adds left out),
    bytes = weights and biases of the experts hit + X + Y."""
    d, f, _, k = layer.dims
    flops = 2 * T * k * 3 * d * f
    nbytes = layer.expert_bytes(n_hit) + 2 * T * d * 2
    return max(flops / peak_flops, nbytes / copy_bw) * 1e3
