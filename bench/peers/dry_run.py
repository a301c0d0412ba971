"""`gpu_bench.py --dry-run`: the benchmark checked without a GPU, at toy sizes.

For each toy layer (the forms the GPU run builds: SwiGLU without biases with initializer weights; the same
with the weights as graph inputs, as DeepSeek-V3 runs; GPT-OSS's biases and clamped SwiGLU on interleaved
rows with its top-k-then-softmax router), every ONNX model is built and checked, and run on ORT's CPU EP
through the same bf16 IO-binding path the GPU run uses (the ScatterMoE models need the plugin: --lib),
against a float64 numpy evaluation of docs/op-spec.md's formulas. com.microsoft.MoE, which the CPU EP runs
in float32 only, is run in float32 with the attributes the GPU run gives it: this is what shows that its
GPT-OSS form (activation_alpha, activation_beta, swiglu_limit) computes the layer. Then the quantized models
(quant_dry.py), the torch side (cpu_check.py) and the device run's own code driven on the CPU
(cpu_smoke.py) when torch is importable, and the report rendered from made-up rows (every table, the
breakdown and repeats included).
"""
import importlib.util
import os
import shutil
import tempfile

import numpy as np

from . import onnx_models, report
from .layers import Layer

TOY = {  # name: (layer, ScatterMoE weights as graph inputs)
    "plain": (Layer(64, 32, 8, 2, "mixtral"), False),
    "weights as inputs": (Layer(64, 32, 8, 2, "deepseek_v3"), True),
    "gpt_oss": (Layer(64, 32, 8, 2, "gpt_oss", activation="swiglu_oai", glu="interleaved", bias=True, router="topk_softmax"), False),
}
BIAS_IN_STD = 6.0  # three times workload.BIAS_IN_STD: at this size the clamp must act


def short(e):
    return " ".join(f"{type(e).__name__}: {e}".split())[:300]


def to_interleaved(a, layer):
    if layer.glu == "interleaved":
        return a
    if layer.glu == "up_gate":
        a = np.concatenate(np.split(a, 2, axis=1)[::-1], axis=1)
    return onnx_models.interleave_gate_up(a)


def reference_np(layer, x, rw, ri, w_gu, w_down, b_gu=None, b_down=None):
    """float64, per token and slot, from docs/op-spec.md; returns (y, number of values the clamp changed)."""
    f = w_down.shape[2]
    y, clamped = np.zeros(x.shape, np.float64), 0
    for t in range(x.shape[0]):
        for j in range(ri.shape[1]):
            e = ri[t, j]
            a = w_gu[e].astype(np.float64) @ x[t] + (0 if b_gu is None else b_gu[e])
            if layer.glu == "interleaved":
                g, u = a[0::2], a[1::2]
            else:
                g, u = (a[:f], a[f:]) if layer.glu == "gate_up" else (a[f:], a[:f])
            if layer.activation == "silu":
                h = g / (1 + np.exp(-g)) * u
            else:
                g2, u2 = np.minimum(g, layer.limit), np.clip(u, -layer.limit, layer.limit)
                clamped += int((g2 != g).sum() + (u2 != u).sum())
                h = (u2 + 1) * g2 / (1 + np.exp(-layer.alpha * g2))
            o = w_down[e].astype(np.float64) @ h + (0 if b_down is None else b_down[e])
            y[t] += rw[t, j] * o
    return y, clamped


def _toy(layer, rng, T=5):
    d, f, E, k = layer.dims
    w = dict(w_gu=onnx_models.bf16_bits(rng.standard_normal((E, 2 * f, d)) * d**-0.5),
             w_down=onnx_models.bf16_bits(rng.standard_normal((E, d, f)) * f**-0.5))
    if layer.bias:
        w["b_gu"] = onnx_models.bf16_bits(rng.standard_normal((E, 2 * f)) * BIAS_IN_STD)
        w["b_down"] = onnx_models.bf16_bits(rng.standard_normal((E, d)))
    wr = np.zeros((E, d), np.float32)
    wr[:, :E] = np.eye(E)
    # inputs as workload.py makes them: x[:, :E] a permutation of distinct logits per token
    grid = ((np.arange(E) - E / 2) * (8.0 / E)).astype(np.float32)
    x = rng.standard_normal((T, d)).astype(np.float32)
    for t in range(T):
        x[t, :E] = grid[rng.permutation(E)]
    xb = onnx_models.bf16_bits(x)
    logits = onnx_models.bf16_to_f32(xb)[:, :E]
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    ri = np.argsort(-p, axis=1)[:, :k].astype(np.int64)
    pk = np.take_along_axis(p, ri, 1)
    return w, onnx_models.bf16_bits(wr.T), xb, logits, ri, pk / pk.sum(1, keepdims=True)


def _weight_files(tmp, layer, w, wr_t):
    E = layer.E
    bf = {"w_gu": w["w_gu"], "w_down": w["w_down"], "wr_t": wr_t, "wr_b": np.zeros(E, np.uint16)}
    f32 = {"w_down": onnx_models.bf16_to_f32(w["w_down"])}
    if layer.glu != "interleaved":
        bf["w_il"] = to_interleaved(w["w_gu"], layer)
    f32["w_il"] = to_interleaved(onnx_models.bf16_to_f32(w["w_gu"]), layer)
    if layer.bias:
        bf.update(b_gu=w["b_gu"], b_down=w["b_down"])
        if layer.glu != "interleaved":
            bf["b_il"] = to_interleaved(w["b_gu"], layer)
        f32.update(b_il=to_interleaved(onnx_models.bf16_to_f32(w["b_gu"]), layer), b_down=onnx_models.bf16_to_f32(w["b_down"]))
    return onnx_models.write_weights(tmp, bf), onnx_models.write_weights(tmp, f32, "weights_f32.bin")


def check_layer(args, name, layer, as_inputs, rng, tmp, ort):
    """Builds, checks and (with onnxruntime) runs this toy layer's models; returns (ok, arrays for quant_dry)."""
    import onnx
    from onnx import TensorProto

    from . import ort_session

    d, f, E, k = layer.dims
    print(f"--   {name}: {layer.describe()}" + (", ScatterMoE weights as graph inputs" if as_inputs else ""))
    w, wr_t, xb, logits, ri, rw32 = _toy(layer, rng)
    sub = os.path.join(tmp, name.replace(" ", "_"))
    os.makedirs(sub)
    wf, wf32 = _weight_files(sub, layer, w, wr_t)
    paths = {"ours": onnx_models.ours_model(wf, os.path.join(sub, "ours.onnx"), layer, as_inputs),
             "ours_router": onnx_models.ours_router_model(wf, os.path.join(sub, "ours_router.onnx"), layer,
                                                          weights_as_inputs=as_inputs),
             "ortmoe": onnx_models.ort_moe_model(wf, os.path.join(sub, "ortmoe.onnx"), layer),
             "ortmoe f32": onnx_models.ort_moe_model(wf32, os.path.join(sub, "ortmoe_f32.onnx"), layer, elem=TensorProto.FLOAT)}
    onnx.checker.check_model(paths["ours_router"])  # the bf16-MatMul form the GPU runs; CPU runs this one:
    paths["ours_router"] = onnx_models.ours_router_model(wf, os.path.join(sub, "ours_router_f32mm.onnx"), layer, f32_matmul=True,
                                                         weights_as_inputs=as_inputs)
    # the router as ONNX ops (--router-ops), on the CPU alike
    paths["ours_router ops"] = onnx_models.ours_router_model(wf, os.path.join(sub, "ours_router_ops_f32mm.onnx"), layer,
                                                             f32_matmul=True, weights_as_inputs=as_inputs, router_ops=True)
    for model, p in paths.items():
        onnx.checker.check_model(p)
        print(f"ok   {model}: {len(onnx.load(p, load_external_data=False).graph.node)} nodes, checker passed")
    xf = onnx_models.bf16_to_f32(xb)
    b = {key: onnx_models.bf16_to_f32(w[key]) for key in ("b_gu", "b_down") if key in w}
    ref, clamped = reference_np(layer, xf, rw32, ri, onnx_models.bf16_to_f32(w["w_gu"]), onnx_models.bf16_to_f32(w["w_down"]), **b)
    ok = True
    if layer.activation == "swiglu_oai":
        ok = clamped > 0
        print(("ok   " if ok else "FAIL ") + f"the float64 reference clamps {clamped} values at limit {layer.limit:g}")
    if ort is None:
        return ok, (w, xb, ri, rw32, logits, xf)

    def spec(a, etype):
        return a.ctypes.data, a.shape, etype

    BF, I64, F32 = TensorProto.BFLOAT16, TensorProto.INT64, TensorProto.FLOAT
    weights = {n: spec(w[key], BF) for n, key in onnx_models.EXPERT_INPUTS if key in w} if as_inputs else {}
    rwb, lgb = onnx_models.bf16_bits(rw32), onnx_models.bf16_bits(logits)
    xf32 = np.ascontiguousarray(xf)
    feeds = {"ours": {"x": spec(xb, BF), "rw": spec(rwb, BF), "ri": spec(ri, I64), **weights},
             "ours_router": {"x": spec(xb, BF), **weights}, "ours_router ops": {"x": spec(xb, BF), **weights}, "ortmoe": {"x": spec(xb, BF), "logits": spec(lgb, BF)},
             "ortmoe f32": {"x": spec(xf32, F32), "logits": spec(np.ascontiguousarray(logits), F32)}}
    have_lib = os.path.exists(args.lib)
    if not have_lib:
        print(f"--   no plugin at {args.lib}: ScatterMoE models built and checked only")
    for model, path in paths.items():
        ours = model.startswith("ours")
        if ours and not have_lib:
            continue
        f32 = model == "ortmoe f32"
        y = np.full(xb.shape, np.nan, np.float32) if f32 else np.full(xb.shape, 0x7FC0, np.uint16)  # NaN: all must be written
        try:
            sess = ort_session.make_session(ort, path, args.lib if ours else None, device="cpu", profile_dir=sub)
            io = ort_session.bind(sess, feeds[model], {"y": spec(y, F32 if f32 else BF)}, device="cpu")
            placement = ort_session.first_run(sess, io)
            yf = y if f32 else onnx_models.bf16_to_f32(y)
            err = float(np.abs(yf - ref).max() / np.abs(ref).max())
            good = err < (1e-4 if f32 else 3e-2)
            print(("ok   " if good else "FAIL ") + f"{model} on ORT {ort.__version__} CPU EP, {'float32' if f32 else 'bf16'} IO "
                  f"binding: rel err {err:.1e}, placement {placement}")
            ok &= good or model == "ortmoe"  # bf16 com.microsoft.MoE on CPU is informative only
        except Exception as e:  # noqa: BLE001
            print(("--   " if model == "ortmoe" else "FAIL ") + f"{model} on the CPU EP: {short(e)}")
            ok &= model == "ortmoe"
    return ok, (w, xb, ri, rw32, logits, xf)


def fake_rows(shapes):
    rng = np.random.default_rng(1)
    rows = []
    for shape in shapes:
        for T in (1, 16, 128, 1024, 4096, 16384):
            r = dict(shape=shape, tokens=T, experts_hit=8, notes={"Triton": "made-up row"}, floor=0.01 * T**0.5)
            for key, _, how in report.COLUMNS[1:]:
                if key != "Triton" and key != "Triton/graph":
                    r[key] = r["floor"] * (1.2 + rng.random()) * (1 if how == "graph" else 1.5)
                    r[key.split("/graph")[0] + "_err"] = 3e-3 * rng.random()
            r["kernels_parts"] = {"routing": 9.5, "G1": 600 * rng.random(), "G2": 300 * rng.random(), "comb": 12.0}
            r["ORT MoE"] = r["ours/ORT"] * (1 + 0.08 * (rng.random() - 0.5))  # some rows close
            r["close"] = report.close_pairs(r)
            if r["close"]:
                r["repeat"] = {k: r[k] * (1 + 0.02 * rng.random()) for c in r["close"] for k in c[:2]}
            rows.append(r)
    return rows


def run(args, write_outputs, shapes):
    """The whole dry run; returns the exit status."""
    ok = True
    rng = np.random.default_rng(0)
    tmp = tempfile.mkdtemp(prefix="smoe-dry-")
    try:
        from . import ort_session

        try:
            ort = ort_session.load_ort()
        except ImportError as e:
            ort = None
            print(f"--   onnxruntime not importable here ({e}): models built and checked only")
        arrays = {}
        for name, (layer, as_inputs) in TOY.items():
            good, arrays[name] = check_layer(args, name, layer, as_inputs, rng, tmp, ort)
            ok &= good
        if ort is not None:
            from . import quant_dry

            w, xb, ri, rw32, logits, xf = arrays["plain"]
            layer = TOY["plain"][0]
            ok &= quant_dry.run(args, tmp, w["w_gu"], w["w_down"], xb, onnx_models.bf16_bits(rw32), ri,
                                onnx_models.bf16_bits(logits), xf, logits, rw32,
                                lambda x, rw, ri_, w1, w2: reference_np(layer, x, rw, ri_, w1, w2)[0])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if importlib.util.find_spec("torch") is None:
        print("--   torch not importable here: torch side not checked")
    else:
        from . import cpu_check, cpu_smoke

        ok &= cpu_check.run(args.triton_dir)
        ok &= cpu_smoke.run(args)
    write_outputs(args.out, args.name, {"dry_run": True}, fake_rows(shapes), list(shapes))
    for ext in ("json", "md", "png"):
        print(("ok   " if os.path.exists(os.path.join(args.out, f"{args.name}.{ext}")) else "--   ") + f"wrote {args.name}.{ext}")
    return 0 if ok else 1
