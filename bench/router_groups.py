"""DeepSeek-V3-style routers at their real sizes: the exported ONNX router against one TopKRouter node.

transformers' own router module (DeepseekV3TopkRouter: sigmoid scores, e_score_correction_bias, the
group-limited choice, the scores gathered, `+ 1e-20`, the routed scaling factor) exported by torch's
TorchScript exporter, bfloat16 hidden states in, as a model's router runs; the same router with its
nodes after the logits replaced by one ai.scattermoe TopKRouter node with the attributes
`scattermoe rewrite` writes for that spelling (tests/rewrite_families.rs proves the rewriter writes
them for the same export at 8 experts; `router_fusion.rs` reads the attributes from the graph the same
way for any size). Both run in ONNX Runtime's CUDA execution provider on the same inputs.

  export DIR     (CPU, torch + transformers) write DIR/<router>.onnx and DIR/<router>.fused.onnx
  check DIR LIB  (CPU) both models on random inputs in ONNX Runtime's CPU provider: the same experts, as
                 sets per token, weights within 1e-5 (the rewriter's proof, at these sizes)
  bench DIR LIB  (GPU, torch for the device buffers) host-timed `run_with_iobinding` + synchronize, median
                 of --reps calls after --warmup, at each token count, both models; the same check on the
                 GPU's outputs; a markdown table on stdout and --json

Routers: deepseek_v3 (d 7168, E 256, k 8, 8 groups of which 4 compete, scale 2.5) and kimi_k2 (d 7168,
E 384, k 8, one group, scale 2.827).
"""
import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

from peers.onnx_models import bf16_bits  # (bench/ is this script's directory)

ROUTERS = {
    "deepseek_v3": dict(hidden_size=7168, n_routed_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4,
                        routed_scaling_factor=2.5),
    "kimi_k2": dict(hidden_size=7168, n_routed_experts=384, num_experts_per_tok=8, n_group=1, topk_group=1,
                    routed_scaling_factor=2.827),
}


class _Router:
    """The exported module: hidden_states [T, d] in bfloat16 -> (weights float32, indices int64)."""

    @staticmethod
    def build(name, seed=0):
        import torch
        import transformers as tr

        cfg = tr.DeepseekV3Config(norm_topk_prob=True, **ROUTERS[name])
        r = tr.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3TopkRouter(cfg)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            r.weight.copy_(torch.randn(r.weight.shape, generator=g) / cfg.hidden_size ** 0.5)
            r.e_score_correction_bias.copy_(torch.randn(r.e_score_correction_bias.shape, generator=g) * 0.05)
        r.weight.data = r.weight.data.to(torch.bfloat16)  # as a bfloat16 checkpoint stores it; the bias stays float32

        class Wrap(torch.nn.Module):
            def __init__(self, r):
                super().__init__()
                self.r = r

            def forward(self, h):
                _, w, i = self.r(h)
                return w, i

        return Wrap(r).eval(), cfg


def export(out):
    import torch

    os.makedirs(out, exist_ok=True)
    for name in ROUTERS:
        m, cfg = _Router.build(name)
        path = os.path.join(out, f"{name}.onnx")
        x = torch.randn(16, cfg.hidden_size).to(torch.bfloat16)
        with torch.no_grad():
            torch.onnx.export(m, (x,), path, dynamo=False, opset_version=17, input_names=["hidden_states"],
                              output_names=["weights", "indices"], dynamic_axes={"hidden_states": {0: "T"},
                              "weights": {0: "T"}, "indices": {0: "T"}}, do_constant_folding=True)
        fused(path, os.path.join(out, f"{name}.fused.onnx"), cfg)
        print(f"{name}: {path} and its fused twin", flush=True)


def fused(src, dst, cfg):
    """The exported router with every node after its logits replaced by one TopKRouter node."""
    import onnx
    from onnx import helper

    m = onnx.load(src)
    g = m.graph
    prod = {o: n for n in g.node for o in n.output}
    sig = next(n for n in g.node if n.op_type == "Sigmoid")
    add = next(n for n in g.node if n.op_type == "Add" and sig.output[0] in n.input)
    bias = next(v for v in add.input if v != sig.output[0])
    logits = sig.input[0]
    keep, stack = set(), [logits]
    while stack:  # the nodes the logits need
        n = prod.get(stack.pop())
        if n is not None and id(n) not in keep:
            keep.add(id(n))
            stack.extend(n.input)
    nodes = [n for n in g.node if id(n) in keep]
    attrs = dict(k=cfg.num_experts_per_tok, scoring="sigmoid", normalize=1, tie_break="lower_index",
                 normalize_eps=1e-20, scale=float(cfg.routed_scaling_factor))
    if cfg.topk_group < cfg.n_group:
        attrs.update(n_group=cfg.n_group, topk_group=cfg.topk_group, group_score="top2_sum", group_fill=float("-inf"))
    nodes.append(helper.make_node("TopKRouter", [logits, bias], ["weights", "indices"], domain="ai.scattermoe", **attrs))
    used = {v for n in nodes for v in n.input}
    inits = [t for t in g.initializer if t.name in used]
    gg = helper.make_graph(nodes, "fused", list(g.input), list(g.output), inits)
    mm = helper.make_model(gg, opset_imports=list(m.opset_import) + [helper.make_opsetid("ai.scattermoe", 1)])
    mm.ir_version = m.ir_version
    onnx.save(mm, dst)


def as_sets(w, i):
    o = np.argsort(i, axis=-1)
    return np.take_along_axis(w.astype(np.float64), o, -1), np.take_along_axis(i, o, -1)


def compare(a, b):
    """(indices equal as sets per token, max |weight difference|)"""
    wa, ia = as_sets(*a)
    wb, ib = as_sets(*b)
    return bool((ia == ib).all()), float(np.abs(wa - wb).max()) if wa.size else 0.0


def check(d, lib):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.register_custom_ops_library(lib)
    ok = True
    for name, c in ROUTERS.items():
        a = ort.InferenceSession(os.path.join(d, f"{name}.onnx"), so, providers=["CPUExecutionProvider"])
        b = ort.InferenceSession(os.path.join(d, f"{name}.fused.onnx"), so, providers=["CPUExecutionProvider"])
        for T in (1, 7, 64, 513):
            x = np.random.default_rng(T).standard_normal((T, c["hidden_size"])).astype(np.float32)
            # bfloat16 input through ONNX Runtime's OrtValue: the bits as uint16, typed bfloat16
            v = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bf16_bits(x), 16)
            same, dw = compare(a.run(None, {"hidden_states": v}), b.run(None, {"hidden_states": v}))
            print(f"{name} T={T}: same experts {same}, max weight difference {dw:.2e}")
            ok &= same and dw <= 1e-5
    return 0 if ok else 1


def bench(d, lib, tokens, reps, warmup, json_out):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers"))
    import torch
    from ort_session import bind, load_ort, make_session, placement

    ort = load_ort()
    rows = []
    for name, c in ROUTERS.items():
        E, k = c["n_routed_experts"], c["num_experts_per_tok"]
        sessions = {}
        for form in ("onnx", "fused"):
            path = os.path.join(d, f"{name}.onnx" if form == "onnx" else f"{name}.fused.onnx")
            prof = f"/tmp/rg-prof-{name}-{form}"
            os.makedirs(prof, exist_ok=True)
            sessions[form] = (make_session(ort, path, lib, profile_dir=prof), path)
        nodes = {}  # {form: {provider: node count}}, from each session's first run
        for T in tokens:
            x = torch.randn(T, c["hidden_size"], device="cuda").to(torch.bfloat16)
            outs, times = {}, {}
            for form, (s, _) in sessions.items():
                w = torch.empty(T, k, device="cuda", dtype=torch.float32)
                i = torch.empty(T, k, device="cuda", dtype=torch.int64)
                io = bind(s, {"hidden_states": (x.data_ptr(), (T, c["hidden_size"]), 16)},
                          {"weights": (w.data_ptr(), (T, k), 1), "indices": (i.data_ptr(), (T, k), 7)})
                s.run_with_iobinding(io)
                if form not in nodes:
                    p = s.end_profiling()
                    nodes[form] = placement(p) if p else None
                for _ in range(warmup):
                    s.run_with_iobinding(io)
                torch.cuda.synchronize()
                t = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    s.run_with_iobinding(io)
                    torch.cuda.synchronize()
                    t.append((time.perf_counter() - t0) * 1e3)
                times[form] = statistics.median(t)
                outs[form] = (w.cpu().numpy(), i.cpu().numpy())
            same, dw = compare(outs["onnx"], outs["fused"])
            rows.append(dict(router=name, tokens=T, onnx_ms=times["onnx"], fused_ms=times["fused"], same_experts=same,
                             max_weight_diff=dw, placement=nodes or None))
            print(json.dumps(rows[-1]), flush=True)
    gpu = torch.cuda.get_device_name(0)
    print(f"\n{gpu}, ONNX Runtime {ort.__version__}; median of {reps} host-timed calls (run_with_iobinding + "
          f"synchronize) after {warmup}; ms per router call\n")
    print("| router | tokens | exported ONNX router | TopKRouter | speed-up | same experts | max weight diff |")
    print("|---|---:|---:|---:|---:|---|---:|")
    for r in rows:
        print(f"| {r['router']} | {r['tokens']} | {r['onnx_ms']:.3f} | {r['fused_ms']:.3f} | "
              f"{r['onnx_ms'] / r['fused_ms']:.2f}x | {r['same_experts']} | {r['max_weight_diff']:.1e} |")
    if json_out:
        with open(json_out, "w") as fh:
            json.dump(dict(gpu=gpu, ort=ort.__version__, reps=reps, warmup=warmup, rows=rows), fh, indent=1)
    return 0 if all(r["same_experts"] and r["max_weight_diff"] <= 1e-5 for r in rows) else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["export", "check", "bench"])
    ap.add_argument("dir")
    ap.add_argument("lib", nargs="?")
    ap.add_argument("--tokens", default="1,16,128,1024")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    if a.mode == "export":
        return export(a.dir)
    if a.mode == "check":
        return check(a.dir, a.lib)
    return bench(a.dir, a.lib, [int(t) for t in a.tokens.split(",")], a.reps, a.warmup, a.json)


if __name__ == "__main__":
    sys.exit(main())
