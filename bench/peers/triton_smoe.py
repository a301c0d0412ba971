"""ScatterMoE's own Triton kernels (github.com/shawntan/scattermoe, unpacked into the git-ignored
.carry/scattermoe; never committed), called the way its mlp.GLUMLP.forward calls them:

    sorted_expert_idxs, sorted_scattered_idxs, expert_offsets = flatten_sort_count(idx, E)
    h = parallel_linear(x, W1, k, ..., grouped_out=True)          # scatter2scatter kernel
    h = act(gate) * up
    y = parallel_linear(h, W2, 1, ..., grouped_in=True, gates=p)  # scatter2scatter + bmm over k

with W = weight.permute(0, 2, 1) of [E, out, in] weights, as its ParallelExperts passes them. Two
differences from GLUMLP, neither touching its kernels: GLUMLP's first projection puts `up` before
`gate` (`h, gates = ....chunk(2)`), ours is gate_up, so the chunk order is swapped; and
flatten_sort_count is its eager body (torch.sort of the flat indices + counts + cumsum), with the
counts made by scatter_add_ instead of bincount: its @torch.compile wrapper would compile per shape
(time this benchmark does not have) and bincount synchronises with the host, which a CUDA graph
cannot capture. The offsets are only kept for the backward pass; the forward kernels use the sorted
indices alone.

Layers with biases and GPT-OSS's clamped SwiGLU: as the package's own GptOssExperts replacement
(scattermoe/utils/replace_moe.py) runs them: each projection's bias goes to scatter2scatter as
`expert_biases` (added in the kernel's epilogue), gate and up are read interleaved from the first
product, and the clamped activation is torch elementwise (workload.glu_act) between the two kernels.
"""
import importlib
import os
import sys
import types

import torch
import torch.nn.functional as F


def load(directory):
    """parallel_linear from directory/scattermoe, imported without the package's __init__ (which also
    imports transformers and patches its GPT-OSS and GraniteMoeHybrid classes): only its kernels and
    parallel_experts module are loaded."""
    pkg_dir = os.path.join(os.path.abspath(directory), "scattermoe")
    if not os.path.isfile(os.path.join(pkg_dir, "parallel_experts.py")):
        raise FileNotFoundError(f"no scattermoe package under {directory}")
    pkg = types.ModuleType("scattermoe")
    pkg.__path__ = [pkg_dir]
    sys.modules["scattermoe"] = pkg
    return importlib.import_module("scattermoe.parallel_experts").parallel_linear


def weights(w_gu, w_down):
    return w_gu.permute(0, 2, 1), w_down.permute(0, 2, 1)


def sort_count(ri, E):
    flat = ri.flatten()
    sorted_expert_idxs, sorted_scattered_idxs = torch.sort(flat)
    counts = torch.zeros(E, dtype=torch.int64, device=ri.device).scatter_add_(0, flat, torch.ones_like(flat))
    return sorted_expert_idxs, sorted_scattered_idxs, counts.cumsum(-1)


def forward(parallel_linear, x, rw, ri, w1, w2, b1=None, b2=None, layer=None):
    """layer None: SwiGLU (silu), gate_up rows, no biases (the biases are passed only when given, so that a
    ScatterMoE without bias support still runs the bias-free layers)."""
    k = ri.shape[1]
    se, ss, offsets = sort_count(ri, w1.shape[0])
    bias1 = {} if b1 is None else {"expert_biases": b1}
    bias2 = {} if b2 is None else {"expert_biases": b2}
    h = parallel_linear(x, w1, k, se, ss, offsets, grouped_out=True, **bias1)
    if layer is None:
        gate, up = h.chunk(2, dim=-1)
        a = F.silu(gate) * up
    else:
        from peers import workload

        a = workload.glu_act(h, layer)
    return parallel_linear(a, w2, 1, se, ss, offsets, grouped_in=True, gates=rw, **bias2)
