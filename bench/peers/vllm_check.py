"""CPU check of the vLLM column (peers/vllm_moe.py) before device time is spent on it: `align` against a
plain per-expert listing, and the whole forward, vLLM's Triton kernel run by Triton's interpreter, against
a float64 loop over the assignments, on tiny layers: SwiGLU over gate_up rows and GPT-OSS's clamped
SwiGLU over interleaved rows with biases; one token, a token count that leaves experts empty, every
token on one expert, many experts (the low-latency path without alignment), block sizes that do not
divide the token count.

usage: TRITON_INTERPRET=1 TORCH_PYTHON bench/peers/vllm_check.py [--vllm-dir .carry/vllm]
Needs torch with triton, and numpy below 2.4 (Triton 3.6's interpreter converts 1-element arrays with int(),
which numpy 2.4 refuses). Exit status 1 when a check fails.
"""
import argparse
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from peers import vllm_moe, workload  # noqa: E402
from peers.layers import Layer  # noqa: E402

FAILED = []


def line(ok, what):
    print(("PASS " if ok else "FAIL ") + what, flush=True)
    if not ok:
        FAILED.append(what)


def check_align(ri, block_m, E):
    sorted_ids, expert_ids, n_post = vllm_moe.align(ri, block_m, E)
    flat = ri.reshape(-1).tolist()
    n = len(flat)
    want, blocks = [], []
    for e in range(E):
        ids = [i for i, x in enumerate(flat) if x == e]  # stable: ascending assignment ids
        pad = -len(ids) % block_m
        want += ids + [n] * pad
        blocks += [e] * ((len(ids) + pad) // block_m)
    npost = int(n_post.item())
    ok = (npost == len(want) and sorted_ids[:npost].tolist() == want and expert_ids[: npost // block_m].tolist() == blocks
          and bool((sorted_ids[npost:] == n).all()) and sorted_ids.numel() >= npost)
    line(ok, f"align T={ri.shape[0]} k={ri.shape[1]} E={E} block_m={block_m}: {npost} padded rows")


def reference(x, rw, ri, w1, w2, b1, b2, layer):
    """float64 loop over the assignments; the gated activation is the bench's own (workload.glu_act)."""
    T, d = x.shape
    y = torch.zeros(T, d, dtype=torch.float64)
    for t in range(T):
        for j in range(ri.shape[1]):
            e = int(ri[t, j])
            h = w1[e].double() @ x[t].double() + (b1[e].double() if b1 is not None else 0)
            a = workload.glu_act(h, layer)
            y[t] += float(rw[t, j]) * (w2[e].double() @ a + (b2[e].double() if b2 is not None else 0))
    return y


def check_forward(vm, T, d, f, E, k, config, oss=False, ri=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g)
    w1 = torch.randn(E, 2 * f, d, generator=g) / d**0.5
    w2 = torch.randn(E, d, f, generator=g) / f**0.5
    b1 = torch.randn(E, 2 * f, generator=g) if oss else None
    b2 = torch.randn(E, d, generator=g) * 0.1 if oss else None
    if ri is None:
        ri = torch.rand(T, E, generator=g).argsort(dim=1)[:, :k]
    rw = torch.rand(T, k, generator=g)
    rw = rw / rw.sum(-1, keepdim=True)
    layer = (Layer(d, f, E, k, "gpt_oss", activation="swiglu_oai", glu="interleaved", bias=True) if oss
             else Layer(d, f, E, k, "mixtral"))
    y = vllm_moe.forward(vm, x, rw, ri, w1, w2, b1, b2, layer, config=config, device_name="cpu")
    ref = reference(x, rw, ri, w1, w2, b1, b2, layer)
    err = float((y.double() - ref).abs().max() / ref.abs().max())
    path = "one block per assignment" if T * k * 4 <= E else "aligned"
    line(err < 1e-4, f"forward T={T} d={d} f={f} E={E} k={k} {'gpt-oss' if oss else 'swiglu'} {path} "
                     f"BLOCK {config['BLOCK_SIZE_M']}x{config['BLOCK_SIZE_N']}x{config['BLOCK_SIZE_K']}: rel err {err:.1e}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vllm-dir", default=os.path.join(os.path.dirname(__file__), "..", "..", ".carry", "vllm"))
    a = ap.parse_args()
    vm = vllm_moe.load(a.vllm_dir)
    print(f"vLLM {vm.version}: fused_moe_kernel and get_default_config loaded", flush=True)
    g = torch.Generator().manual_seed(1)
    check_align(torch.tensor([[3, 1]]), 16, 8)                                 # one token
    check_align(torch.rand(5, 8, generator=g).argsort(1)[:, :2], 16, 8)         # experts left empty
    check_align(torch.zeros(37, 1, dtype=torch.long), 16, 4)                   # every token on expert 0
    check_align(torch.rand(100, 128, generator=g).argsort(1)[:, :8], 64, 128)  # Qwen3's E and k
    check_align(torch.rand(33, 8, generator=g).argsort(1)[:, :2], 128, 8)      # block larger than any expert's rows
    small = dict(BLOCK_SIZE_M=16, BLOCK_SIZE_N=32, BLOCK_SIZE_K=32, GROUP_SIZE_M=1)
    check_forward(vm, 1, 32, 16, 8, 2, small)
    check_forward(vm, 7, 48, 24, 4, 2, small)                                  # K, N not multiples of the block
    check_forward(vm, 19, 32, 16, 4, 1, dict(small, GROUP_SIZE_M=4), ri=torch.zeros(19, 1, dtype=torch.long))
    check_forward(vm, 2, 32, 16, 64, 2, small)                                 # T k 4 <= E: no alignment
    check_forward(vm, 6, 32, 16, 8, 2, small, oss=True)
    # the default heuristic's tiles (vLLM's get_default_config) at a small M
    cfg = vm.default_config(6, 8, 16, 32, 2, None, None)
    check_forward(vm, 6, 32, 16, 8, 2, cfg, seed=3)
    print(f"{len(FAILED)} failed", flush=True)
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
