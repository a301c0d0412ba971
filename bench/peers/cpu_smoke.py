"""The device run's own code (gpu_bench.Bench: prepare_shape, cell, every column, the breakdown, the
--repeat-close pass, the outputs) driven on the CPU at toy sizes, as part of `gpu_bench.py --dry-run` when
torch is importable: what a device call would otherwise be the first to run.

What stands in for the GPU, and only that:
  - torch.cuda's synchronize / memory queries / empty_cache: no-ops or fixed numbers; DEVICE is "cpu";
  - timing.ceilings: fixed numbers; timing.graph_ms: the same callables timed on the host (no CUDA graph);
  - ORT sessions on the CPU EP (IO binding on the CPU tensors) instead of the CUDA EP; bfloat16 MatMul and
    com.microsoft.MoE have no CPU kernel, so ours/ORT+router, ORT MoE and exported/ORT fail there and must
    say so in the row's notes (their models are checked by the dry run's float32 / f32-MatMul forms);
  - our kernels: tests/gpu/smoe_cuda.py's Kernels with its own forward() (stages, buffers, the arguments it
    passes to routing / gemm / combine) and its allocations on the CPU, where only routing(), gemm() and
    combine() are replaced by torch code of what the kernels compute. Every call is checked against the real
    signatures first.
Toy layers: SwiGLU without biases; the same with more experts than --shared-weights-gb (so ScatterMoE's
weights are bound as graph inputs, as DeepSeek-V3's); GPT-OSS's form. --close 1 makes every row close, so
the repeat pass runs on all of them.
"""
import contextlib
import inspect
import os
import sys
import tempfile
import types

import torch

from . import layers, report, timing, workload

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOY = {
    "toy_plain": layers.Layer(64, 32, 8, 2, "mixtral"),
    "toy_inputs": layers.Layer(128, 64, 16, 4, "deepseek_v3"),
    "toy_gpt_oss": layers.Layer(64, 32, 8, 2, "gpt_oss", activation="swiglu_oai", glu="interleaved", bias=True, router="topk_softmax"),
}
SHARED_GB = 0.0005  # between the toy layers' expert sizes: toy_inputs (0.77 MB) binds its weights as inputs


def _line(ok, what):
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    return ok


class _CpuTorch(types.ModuleType):
    """smoe_cuda's `torch`, with every allocation it makes on the CPU."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*a, device=None, **kw):
        return torch.empty(*a, device="cpu", **kw)


def fake_kernels():
    """smoe_cuda.Kernels whose routing / gemm / combine are torch on the CPU (their signatures checked)."""
    sys.path.insert(0, os.path.join(REPO, "tests", "gpu"))
    import smoe_cuda

    real = smoe_cuda.Kernels
    smoe_cuda.torch = _CpuTorch()

    def checked(name):
        sig = inspect.signature(getattr(real, name))

        def deco(fn):
            def wrapped(self, *a, **kw):
                sig.bind(self, *a, **kw)  # a TypeError here is a call the real kernel host would refuse
                return fn(self, *a, **kw)
            return wrapped
        return deco

    class CpuKernels(real):
        def __init__(self):  # no driver, no fatbins
            self.sms, self.calls = 4, []

        @checked("routing")
        def routing(self, idx, E, bufs, capacity=None, capacity_order=0, kept_out=None, small=None):
            flat = idx.reshape(-1).long()
            order = torch.argsort(flat, stable=True)
            counts = torch.bincount(flat, minlength=E)
            bufs["offsets"][0] = 0
            bufs["offsets"][1:] = counts.cumsum(0).to(torch.int32)
            bufs["sidx"][: flat.numel()] = order.to(torch.int32)
            bufs["pos"][order] = torch.arange(flat.numel(), dtype=torch.int32)
            self.calls.append("route")

        @checked("gemm")
        def gemm(self, X, W, bias, Y, sidx, offsets, row_scale, k, n_assign, grouped_in, grouped_out, act="none", gated=0,
                 glu_layout="gate_up", alpha=1.702, limit=7.0, cfg=None, grid=None):
            assert grouped_out == 1
            E = W.shape[0]
            rows = torch.arange(n_assign) if grouped_in else sidx[:n_assign].long() // k
            lay = layers.Layer(1, W.shape[1] // 2 if gated else W.shape[1], E, k, "mixtral", activation=act if gated else "silu",
                               glu=glu_layout, alpha=alpha, limit=limit) if gated else None
            for e in range(E):
                a, b = int(offsets[e]), int(offsets[e + 1])
                if a == b:
                    continue
                h = X[rows[a:b]].float() @ W[e].float().t() + (0 if bias is None else bias[e].float())
                Y[a:b] = (workload.glu_act(h, lay) if gated else h).to(Y.dtype)
            self.calls.append("g1" if not grouped_in else "g2")

        @checked("combine")
        def combine(self, O, pos, w, kept, Y, T, k, d):
            o = O[pos[: T * k].long()].float().view(T, k, d)
            Y[:T] = (o * w.float().view(T, k, 1)).sum(1).to(Y.dtype)
            self.calls.append("comb")

    return CpuKernels()


def _host_graph_ms(fns, budget_s=0.3, **_):
    import time

    for fn in fns:
        fn()
    t0 = time.perf_counter()
    for fn in fns:
        fn()
    return (time.perf_counter() - t0) * 1e3 / len(fns)


@contextlib.contextmanager
def _cpu_device(gpu_bench, ort_session):
    """Everything the CPU stands in for, restored afterwards."""
    cuda = torch.cuda
    saved = [(cuda, n, getattr(cuda, n)) for n in ("synchronize", "mem_get_info", "reset_peak_memory_stats",
                                                   "max_memory_allocated", "empty_cache", "get_device_name",
                                                   "get_device_properties")]
    saved += [(timing, "ceilings", timing.ceilings), (timing, "graph_ms", timing.graph_ms), (workload, "DEVICE", workload.DEVICE),
              (ort_session, "make_session", ort_session.make_session), (ort_session, "bind", ort_session.bind),
              (gpu_bench, "SHAPES", gpu_bench.SHAPES), (gpu_bench.Bench, "_load_kernels", gpu_bench.Bench._load_kernels)]
    make, bind = ort_session.make_session, ort_session.bind
    cuda.synchronize = cuda.empty_cache = cuda.reset_peak_memory_stats = lambda *a, **k: None
    cuda.mem_get_info = lambda *a: (70 << 30, 80 << 30)
    cuda.max_memory_allocated = lambda *a: 1 << 20
    cuda.get_device_name = lambda *a: "CPU (dry run)"
    cuda.get_device_properties = lambda *a: types.SimpleNamespace(total_memory=80 << 30)
    timing.ceilings = lambda: (1e12, 1e11)
    timing.graph_ms = _host_graph_ms
    workload.DEVICE = "cpu"
    ort_session.make_session = lambda ort, path, lib=None, device="cuda", profile_dir=None: make(ort, path, lib, "cpu", profile_dir)
    ort_session.bind = lambda sess, ins, outs, device="cuda": bind(sess, ins, outs, "cpu")
    gpu_bench.SHAPES = TOY
    gpu_bench.Bench._load_kernels = lambda self: fake_kernels()
    try:
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


def run(args):
    """Runs gpu_bench.Bench on the toy layers; returns whether every check passed."""
    import argparse
    import json

    import gpu_bench

    from . import ort_session

    ok = True
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as out, _cpu_device(gpu_bench, ort_session):
        a = argparse.Namespace(lib=args.lib, fatbin_dir="", triton_dir=args.triton_dir, out=out, name="smoke",
                               shapes=",".join(TOY), tokens="1,5", peers="ours,ours_router,exported,ortmoe,grouped_mm,triton,kernels",
                               budget=0.01, settle=0.0, time_limit=600, hard_extra=60, repeat_close=True, close=1.0,
                               shared_weights_gb=SHARED_GB, verbose=False, no_chart=True, router_ops=False)
        have_lib = os.path.exists(args.lib)
        b = gpu_bench.Bench(a)
        b.run()
        rows = json.load(open(os.path.join(out, "smoke.json")))["rows"]
        ok &= _line(len(rows) == 6 and all(os.path.exists(os.path.join(out, f"smoke.{e}")) for e in ("json", "md")),
                    f"Bench.run on the CPU: {len(rows)} rows over {', '.join(TOY)} at 1 and 5 tokens, smoke.json and smoke.md written")
        for r in rows:
            what = f"{r['shape']} T={r['tokens']}:"
            errs = {k: r.get(k + "_err") for k in ("ours/ORT", "grouped_mm", "kernels")}
            good = all(isinstance(v, float) and v < 3e-2 for k, v in errs.items() if k != "ours/ORT" or have_lib)
            parts = r.get("kernels_parts") or {}
            good &= set(parts) == {"routing", "G1", "G2", "comb"} and isinstance(r.get("kernels/graph"), float)
            good &= bool(r.get("close")) and set(r.get("repeat", {})) == {k for c in r["close"] for k in c[:2]}
            good &= "mem_gb" in r and all(k in r["notes"] for k in ("ORT MoE", "exported/ORT"))
            ok &= _line(good, f"{what} errors {', '.join(f'{k} {v:.1e}' for k, v in errs.items() if isinstance(v, float))}; "
                              f"parts {report.breakdown.cell(parts)} us; close {[c[:2] for c in r.get('close', [])]} repeated; "
                              f"ORT MoE / exported on the CPU EP noted as failing")
        shared = [r for r in rows if r["shape"] == "toy_inputs"]
        ok &= _line(have_lib and all("ours/ORT" in r for r in shared) or not have_lib,
                    "toy_inputs: ScatterMoE's weights bound as graph inputs (shared-weights threshold) and measured")
    return ok
