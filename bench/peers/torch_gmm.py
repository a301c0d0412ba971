"""torch._grouped_mm peer: sort assignments by expert, gather rows, grouped GEMM, the gated activation,
grouped GEMM, scale by the routing weight, index_add_ back. No host synchronisation (counts by
scatter_add_, not bincount), so it can be captured in a CUDA graph. tests/gpu/bench_forward.py times the
same function (SwiGLU, gate_up, no biases: the defaults).

Layers with biases (GPT-OSS): torch._grouped_mm takes none, so each projection's output gets its expert's
bias row gathered per assignment (b[sorted experts], [T k, n]) and added: the plain torch spelling, and
extra traffic the fused columns do not pay. The activation is workload.glu_act on the layout as stored
(GPT-OSS: gate and up interleaved, strided slices of the first product)."""
import torch
import torch.nn.functional as F


def weights(w_gu, w_down):
    """torch._grouped_mm wants [E, K, N]: transposed views of the [E, N, K] weights (no copy)."""
    return w_gu.transpose(1, 2), w_down.transpose(1, 2)


def forward(x, rw, ri, w1t, w2t, b1=None, b2=None, layer=None):
    """layer None: SwiGLU (silu) with gate_up rows, no biases."""
    T, k = ri.shape
    E = w1t.shape[0]
    flat = ri.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(E, dtype=torch.int64, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
    offs = counts.cumsum(0).to(torch.int32)
    tok = order // k
    h = torch._grouped_mm(x[tok], w1t, offs=offs)
    sorted_e = flat[order] if b1 is not None or b2 is not None else None
    if b1 is not None:
        h = h + b1[sorted_e]
    if layer is None:
        gate, up = h.chunk(2, dim=-1)
        a = F.silu(gate) * up
    else:
        from peers import workload

        a = workload.glu_act(h, layer)
    o = torch._grouped_mm(a.contiguous(), w2t, offs=offs)
    if b2 is not None:
        o = o + b2[sorted_e]
    o = o * rw.reshape(-1)[order].unsqueeze(1)
    return torch.zeros_like(x).index_add_(0, tok, o)
