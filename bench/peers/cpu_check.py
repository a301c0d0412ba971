"""The torch side of the benchmark on the CPU at a toy size (part of `gpu_bench.py --dry-run` when torch is
importable), for one toy layer per Hugging Face family (layers.Layer: SwiGLU without biases, DeepSeek-V3's
routed experts, GPT-OSS's biases and clamped SwiGLU on interleaved rows): input sets and their routing, the
float32 reference against a per-token loop written from docs/op-spec.md's formulas (not from the reference's
own code), torch._grouped_mm, the Hugging Face export (in float32: ORT's CPU EP has no bfloat16 MatMul) run in
ORT against the reference with the block's own routing weights, the re-export on a new experts-hit count,
and loading ScatterMoE's parallel_linear (its Triton kernels need a GPU).
Prints one line per check; returns True when every check passed."""
import math
import os
import tempfile

import torch

from . import hf_export, torch_gmm, triton_smoe, workload
from .layers import Layer

TOY = {  # name: a toy layer of the family, and the token counts of the export check
    "mixtral": Layer(64, 48, 8, 2, "mixtral"),
    "qwen3": Layer(64, 32, 16, 4, "qwen3_moe"),
    "deepseek_v3": Layer(64, 32, 16, 4, "deepseek_v3"),
    "gpt_oss": Layer(64, 32, 16, 4, "gpt_oss", activation="swiglu_oai", glu="interleaved", bias=True, router="topk_softmax"),
}


def _line(ok, what):
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    return ok


def toy_weights(layer):
    w = workload.make_weights(layer, seed=1)
    if layer.bias:  # three times the benchmark's bias spread, so that the clamp surely acts at this size
        w["b_gu"] = (w["b_gu"].float() * 3).to(torch.bfloat16)
    return w


def check_sets(layer, T, wr):
    d, _, E, k = layer.dims
    sets = workload.make_sets(T, d, E, k, seed=T)
    hits = [workload.experts_hit(s["ri"]) for s in sets]
    ok = len(set(hits)) == 1
    for s in sets:  # the routing each set carries is the routing of its router logits x @ Wr^T (bf16)
        rw32, _, ri = workload.route(s["x"] @ wr.t(), k)
        ok &= torch.equal(ri, s["ri"]) and torch.equal(rw32, s["rw32"])
    return _line(ok, f"{len(sets)} input sets at {T} tokens: experts hit {hits}, routing of x @ Wr^T matches"), sets


def _spec_act(a, layer):
    """h[i] for one assignment's first-projection values a [2f] (floats), as docs/op-spec.md writes it;
    returns (h, number of values the clamp changed)."""
    f = a.shape[0] // 2
    gate_row = {"gate_up": lambda i: i, "up_gate": lambda i: f + i, "interleaved": lambda i: 2 * i}[layer.glu]
    up_row = {"gate_up": lambda i: f + i, "up_gate": lambda i: i, "interleaved": lambda i: 2 * i + 1}[layer.glu]
    h, clamped = torch.empty(f, dtype=torch.float64), 0
    for i in range(f):
        g, u = float(a[gate_row(i)]), float(a[up_row(i)])
        if layer.activation == "silu":
            h[i] = g / (1 + math.exp(-g)) * u
        else:
            g2, u2 = min(g, layer.limit), min(max(u, -layer.limit), layer.limit)
            clamped += (g2 != g) + (u2 != u)
            h[i] = (u2 + 1) * g2 / (1 + math.exp(-layer.alpha * g2))
    return h, clamped


def check_reference(layer, sets, w):
    s, k = sets[0], layer.k
    ref = workload.reference_f32(s["x"], s["rw32"], s["ri"], w, layer)
    naive, clamped = torch.zeros(ref.shape, dtype=torch.float64), 0
    for t in range(s["x"].shape[0]):
        for j in range(k):
            e = int(s["ri"][t, j])
            a = w["w_gu"][e].double() @ s["x"][t].double()
            if layer.bias:
                a += w["b_gu"][e].double()
            h, c = _spec_act(a, layer)
            clamped += c
            o = w["w_down"][e].double() @ h
            if layer.bias:
                o += w["b_down"][e].double()
            naive[t] += float(s["rw32"][t, j]) * o
    err = workload.rel_err(ref, naive.float())
    what = f"float32 reference vs a per-token float64 loop of the spec: rel err {err:.1e}"
    ok = err < 1e-5
    if layer.activation == "swiglu_oai":
        ok &= clamped > 0
        what += f" ({clamped} values clamped at limit {layer.limit:g})"
    return _line(ok, what), ref


def check_grouped_mm(layer, sets, ref, w):
    s = sets[0]
    try:
        y = torch_gmm.forward(s["x"], s["rw"], s["ri"], *torch_gmm.weights(w["w_gu"], w["w_down"]), b1=w["b_gu"],
                              b2=w["b_down"], layer=layer)
        err = workload.rel_err(y, ref)
        return _line(err < 3e-2, f"torch._grouped_mm path on CPU: rel err {err:.1e}")
    except RuntimeError as e:  # CPU support of _grouped_mm varies between torch versions
        print(f"--   torch._grouped_mm on CPU: {' '.join(str(e).split())[:160]}")
        return True


def check_export(name, layer, w, tmp):
    import onnxruntime as ort

    d, _, E, k = layer.dims
    wf32 = {key: (v.float() if v is not None else None) for key, v in w.items()}
    block, version = hf_export.build_block(layer.family, layer, wf32)
    ok, traced, last = True, {}, None
    for T in (16, 1, 17):
        sets = workload.make_sets(T, d, E, k, seed=100 + T)
        n_hit = workload.experts_hit(sets[0]["ri"])
        if n_hit not in traced:
            if last is not None:  # an export traced with another hit count must refuse these inputs
                try:
                    last.run(None, {"hidden_states": sets[0]["x"].float().unsqueeze(0).numpy()})
                    print(f"--   an export traced at another hit count ran {n_hit} experts hit")
                except Exception as e:  # noqa: BLE001
                    _line(True, f"an export traced at another hit count refuses {n_hit} experts hit: "
                          f"{' '.join(str(e).split())[:100]}")
            path = os.path.join(tmp, f"{name}_{T}.onnx")
            nodes = hf_export.export(block, sets[0]["x"].float(), path)
            last = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            traced[n_hit] = (last, T, nodes)
        sess, t_tr, nodes = traced[n_hit]
        for i, st in enumerate(sets):
            rw = hf_export.routing_weights(layer.family, st["logits"], st["ri"])
            ref = workload.reference_f32(st["x"], st["rw32"] if rw is None else rw, st["ri"], w, layer)
            (y,) = sess.run(None, {"hidden_states": st["x"].float().unsqueeze(0).numpy()})
            err = workload.rel_err(torch.from_numpy(y)[0], ref)
            ok &= _line(err < 1e-4, f"{name}: HF block (transformers {version}) exported at {t_tr} tokens "
                        f"({n_hit} experts hit, {nodes} nodes), float32 in ORT CPU, set {i} at {T} tokens: "
                        f"rel err {err:.1e}" + (" (the block's own routing weights)" if rw is not None else ""))
    return ok


def check_unloadable(name, layer, w, tmp):
    """The bfloat16 export of a block hf_export.UNLOADABLE names must still fail to load, for the reason given."""
    import onnxruntime as ort

    d, _, E, k = layer.dims
    block, _ = hf_export.build_block(layer.family, layer, w)
    path = os.path.join(tmp, f"{name}_bf16.onnx")
    hf_export.export(block, workload.make_sets(4, d, E, k, seed=4)[0]["x"], path)
    try:
        ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        return _line(False, f"{name}: the bfloat16 export now loads: hf_export.UNLOADABLE's reason no longer holds")
    except Exception as e:  # noqa: BLE001
        msg = " ".join(str(e).split())
        return _line("INVALID_GRAPH" in msg and "TopK" in msg, f"{name}: the bfloat16 export is refused at load, as "
                     f"hf_export.UNLOADABLE says: {msg[msg.find('Type Error'):][:140]}")


def check_triton_import(directory):
    try:
        pl = triton_smoe.load(directory)
        return _line(callable(pl), f"ScatterMoE parallel_linear imported from {directory}")
    except Exception as e:  # noqa: BLE001
        print(f"--   ScatterMoE not importable here: {type(e).__name__}: {' '.join(str(e).split())[:160]}")
        return True


def run(triton_dir, names=None):
    workload.DEVICE = "cpu"
    torch.manual_seed(0)
    torch.set_num_threads(1)
    ok = True
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        for name in names or TOY:
            layer = TOY[name]
            print(f"--   {name} (toy): {layer.describe()}")
            w = toy_weights(layer)
            good, sets = check_sets(layer, 16, w["wr"])
            ok &= good
            good, ref = check_reference(layer, sets, w)
            ok &= good
            ok &= check_grouped_mm(layer, sets, ref, w)
            try:
                ok &= check_export(name, layer, w, tmp)
                if layer.family in hf_export.UNLOADABLE:
                    ok &= check_unloadable(name, layer, w, tmp)
            except ImportError as e:
                print(f"--   HF export not checked: {e}")
        ok &= check_triton_import(triton_dir)
    return ok
