"""GPU benchmark of one SwiGLU MoE layer forward, float16, on the device machine.

Columns, per layer shape and token count, all measured in the same run:
  ours/ORT      ScatterMoE through ONNX Runtime's CUDA execution provider (IO binding, device
                tensors, host-timed session.run_with_iobinding: launch + kernels + ORT's end-of-run sync)
  ORT MoE       com.microsoft.MoE on the same EP (swiglu, interleaved fc1), same inputs (router logits)
  grouped_mm    torch: argsort by expert + torch._grouped_mm x2 + silu*up + index_add_, host-timed the same way
  floor         max(FLOPs / measured f16 matmul rate, bytes / measured copy bandwidth); bytes = the
                weights of the experts this routing uses + X + Y
Times are medians over repetitions (after warm-up), in milliseconds. Also writes a PNG chart.

Run (device, onnxruntime-gpu unpacked at /tmp/ortgpu, see tests/gpu/run_ort_cuda.sh):
  PYTHONPATH=/tmp/ortgpu python3 bench/gpu_bench.py --lib .carry/ort/libscattermoe_ort.so --out $OUT
Not measured here (yet): the exported per-expert loop on the CUDA EP and ScatterMoE's Triton kernels.
"""
import argparse
import json
import os
import tempfile
import time

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

SHAPES = {  # name: (d, f, E, k)
    "mixtral": (4096, 14336, 8, 2),
    "qwen3": (2048, 768, 128, 8),
    "fine": (1024, 512, 64, 8),
}


def timed(fn, budget_s=0.5, min_reps=5, max_reps=200):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    start = time.perf_counter()
    while len(ts) < min_reps or (time.perf_counter() - start < budget_s and len(ts) < max_reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)) * 1e3


def ceilings():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    ms = timed(lambda: a @ b, budget_s=1.0)
    flops = 2 * 8192**3 / (ms / 1e3)
    x = torch.empty(1 << 30, device="cuda", dtype=torch.float16)
    y = torch.empty_like(x)
    ms = timed(lambda: y.copy_(x), budget_s=1.0)
    bw = 2 * x.numel() * 2 / (ms / 1e3)
    del a, b, x, y
    return flops, bw


def save(model, path):
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=os.path.basename(path) + ".data", size_threshold=1024)


def ours_model(d, f, E, k, w_in, w_out, path):
    node = helper.make_node("ScatterMoE", ["x", "rw", "ri", "w_in", "w_out"], ["y"], domain="ai.scattermoe",
                            activation="silu", gated=1, glu_layout="interleaved")
    g = helper.make_graph([node], "ours",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["T", d]),
                           helper.make_tensor_value_info("rw", TensorProto.FLOAT16, ["T", k]),
                           helper.make_tensor_value_info("ri", TensorProto.INT64, ["T", k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["T", d])],
                          [numpy_helper.from_array(w_in, "w_in"), numpy_helper.from_array(w_out, "w_out")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.scattermoe", 1)])
    m.ir_version = 9
    save(m, path)


def ort_moe_model(d, f, E, k, w_in, w_out, path):
    node = helper.make_node("MoE", ["x", "logits", "fc1", "", "fc2"], ["y"], domain="com.microsoft",
                            activation_type="swiglu", swiglu_fusion=1, k=k, normalize_routing_weights=1)
    g = helper.make_graph([node], "ortmoe",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["T", d]),
                           helper.make_tensor_value_info("logits", TensorProto.FLOAT16, ["T", E])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["T", d])],
                          [numpy_helper.from_array(w_in, "fc1"), numpy_helper.from_array(w_out, "fc2")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 9
    save(m, path)


def session(ort, path, lib):
    so = ort.SessionOptions()
    so.register_custom_ops_library(lib)
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    return ort.InferenceSession(path, so, providers=[("CUDAExecutionProvider", {"device_id": 0})])


def bind_run(sess, inputs, out):
    io = sess.io_binding()
    for name, t in inputs.items():
        dt = {torch.float16: np.float16, torch.int64: np.int64}[t.dtype]
        io.bind_input(name, "cuda", 0, dt, tuple(t.shape), t.data_ptr())
    io.bind_output("y", "cuda", 0, np.float16, tuple(out.shape), out.data_ptr())
    return lambda: sess.run_with_iobinding(io)


def torch_grouped(x, rw, ri, w1, w2, E):
    # w1: [E, d, 2f] (gate, up interleaved columns), w2: [E, f, d], as torch._grouped_mm wants.
    T, k = ri.shape
    flat = ri.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    xs = x[order // k]
    h = torch._grouped_mm(xs, w1, offs=offs)
    h = torch.nn.functional.silu(h[:, 0::2]) * h[:, 1::2]
    o = torch._grouped_mm(h, w2, offs=offs) * rw.reshape(-1)[order, None]
    y = torch.zeros_like(x)
    y.index_add_(0, order // k, o)
    return y


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", required=True)
    ap.add_argument("--out", default=".")
    ap.add_argument("--shapes", default="qwen3,fine,mixtral")
    ap.add_argument("--tokens", default="1,16,128,1024,4096,16384")
    args = ap.parse_args()
    import onnxruntime as ort
    ort.preload_dlls()
    torch.manual_seed(0)
    peak, bw = ceilings()
    print(f"measured ceilings: f16 matmul {peak / 1e12:.0f} TFLOP/s, copy {bw / 1e12:.2f} TB/s; onnxruntime {ort.__version__}, "
          f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
    rows = []
    tmp = tempfile.mkdtemp()
    for shape in args.shapes.split(","):
        d, f, E, k = SHAPES[shape]
        w_in = (torch.randn(E, 2 * f, d, device="cuda", dtype=torch.float16) * d**-0.5)
        w_out = (torch.randn(E, d, f, device="cuda", dtype=torch.float16) * f**-0.5)
        ours_path, moe_path = f"{tmp}/{shape}_ours.onnx", f"{tmp}/{shape}_moe.onnx"
        w_in_np, w_out_np = w_in.cpu().numpy(), w_out.cpu().numpy()
        ours_model(d, f, E, k, w_in_np, w_out_np, ours_path)
        sess_ours = session(ort, ours_path, args.lib)
        try:
            ort_moe_model(d, f, E, k, w_in_np, w_out_np, moe_path)
            sess_moe = session(ort, moe_path, args.lib)
        except Exception as e:  # noqa: BLE001 - a peer that does not load is reported, not fatal
            print(f"{shape}: com.microsoft.MoE unavailable: {str(e)[:200]}", flush=True)
            sess_moe = None
        del w_in_np, w_out_np
        w1 = w_in.transpose(1, 2).contiguous()  # [E, d, 2f]
        w2 = w_out.transpose(1, 2).contiguous()  # [E, f, d]
        for T in map(int, args.tokens.split(",")):
            x = torch.randn(T, d, device="cuda", dtype=torch.float16)
            logits = torch.randn(T, E, device="cuda", dtype=torch.float16)
            p, ri = torch.topk(torch.softmax(logits.float(), -1), k, dim=-1)
            rw = (p / p.sum(-1, keepdim=True)).half()
            ri = ri.contiguous()
            y = torch.empty_like(x)
            row = {"shape": shape, "tokens": T}
            used = int(torch.unique(ri).numel())
            flops = 2 * T * k * d * 3 * f
            bytes_ = used * 3 * f * d * 2 + 2 * T * d * 2
            row["floor"] = max(flops / peak, bytes_ / bw) * 1e3
            ref = torch_grouped(x, rw, ri, w1, w2, E)
            row["grouped_mm"] = timed(lambda: torch_grouped(x, rw, ri, w1, w2, E))
            run = bind_run(sess_ours, {"x": x, "rw": rw, "ri": ri}, y)
            run()
            torch.cuda.synchronize()
            row["ours_err"] = float((y.float() - ref.float()).abs().max() / ref.float().abs().max())
            row["ours/ORT"] = timed(run)
            if sess_moe is not None:
                y2 = torch.empty_like(x)
                try:
                    run2 = bind_run(sess_moe, {"x": x, "logits": logits}, y2)
                    run2()
                    torch.cuda.synchronize()
                    row["ORT MoE"] = timed(run2)
                    row["ortmoe_err"] = float((y2.float() - ref.float()).abs().max() / ref.float().abs().max())
                except Exception as e:  # noqa: BLE001
                    print(f"{shape} T={T}: com.microsoft.MoE failed: {str(e)[:200]}", flush=True)
            rows.append(row)
            print(json.dumps(row), flush=True)
        del sess_ours, sess_moe, w_in, w_out, w1, w2
        torch.cuda.empty_cache()
    cols = ["floor", "ours/ORT", "ORT MoE", "grouped_mm"]
    print("\n| shape | tokens | " + " | ".join(cols) + " | ours rel. err vs torch |")
    print("|---|---:|" + "---:|" * len(cols) + "---:|")
    for r in rows:
        cells = [f"{r[c]:.3f}" if c in r else "-" for c in cols]
        print(f"| {r['shape']} | {r['tokens']} | " + " | ".join(cells) + f" | {r['ours_err']:.1e} |")
    with open(os.path.join(args.out, "gpu_bench.json"), "w") as fh:
        json.dump({"peak_flops": peak, "copy_bw": bw, "rows": rows}, fh, indent=1)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        shapes = list(dict.fromkeys(r["shape"] for r in rows))
        fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5))
        for ax, s in zip(np.atleast_1d(axes), shapes):
            rs = [r for r in rows if r["shape"] == s]
            for c in cols:
                pts = [(r["tokens"], r[c]) for r in rs if c in r]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=c, linestyle="--" if c == "floor" else "-")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("tokens")
            ax.set_ylabel("ms (median)")
            ax.set_title(f"{s} (d, f, E, k) = {SHAPES[s]}, float16")
            ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "gpu_bench.png"), dpi=110)
    except Exception as e:  # noqa: BLE001
        print(f"chart not written: {e}")


if __name__ == "__main__":
    main()
