"""torch._grouped_mm peer: sort assignments by expert, gather rows, grouped GEMM, SwiGLU, grouped GEMM,
scale by the routing weight, index_add_ back. No host synchronisation (counts by scatter_add_, not
bincount), so it can be captured in a CUDA graph. tests/gpu/bench_forward.py times the same function."""
import torch
import torch.nn.functional as F


def weights(w_gu, w_down):
    """torch._grouped_mm wants [E, K, N]: transposed views of the [E, N, K] weights (no copy)."""
    return w_gu.transpose(1, 2), w_down.transpose(1, 2)


def forward(x, rw, ri, w1t, w2t):
    T, k = ri.shape
    E = w1t.shape[0]
    flat = ri.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(E, dtype=torch.int64, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
    offs = counts.cumsum(0).to(torch.int32)
    tok = order // k
    h = torch._grouped_mm(x[tok], w1t, offs=offs)
    gate, up = h.chunk(2, dim=-1)
    o = torch._grouped_mm(F.silu(gate) * up, w2t, offs=offs)
    o = o * rw.reshape(-1)[order].unsqueeze(1)
    return torch.zeros_like(x).index_add_(0, tok, o)
