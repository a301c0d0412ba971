"""The quantized models of the benchmark at a toy size, on ORT's CPU EP (`gpu_bench.py --dry-run`; numpy,
onnx, ml_dtypes and onnxruntime only): ours fp8 / int4 / int8 (ScatterMoE through the plugin's CPU
kernels, bf16 IO binding, as the GPU run binds them) against numpy with the dequantized weights;
com.microsoft.QMoE as the benchmark builds it (raw weights there, float16: the CPU EP has no bfloat16
QMoE), and QMoE's semantics (quant.cpu_check)."""
import os

import numpy as np

from peers import onnx_models, quant


def _fp8(w):
    """w [E, N, K] float32 -> (codes uint8, scales float32 [E, N], dequantized)."""
    import ml_dtypes

    s = np.maximum(np.abs(w).max(axis=2) / 448.0, 1e-12).astype(np.float32)
    q = np.clip(w / s[..., None], -448, 448).astype(ml_dtypes.float8_e4m3fn)
    return np.ascontiguousarray(q.view(np.uint8)), s, q.astype(np.float32) * s[..., None]


def run(args, tmp, w_gu, w_down, xb, rwb, ri, lgb, x_f32, logits_f32, rw32, reference_np):
    """w_gu / w_down: bf16 bit arrays ([E, 2f, d], [E, d, f]); the rest as the dry run's bf16 checks.
    Returns whether every check passed (a missing plugin or onnxruntime skips, saying so)."""
    from onnx import TensorProto, checker

    from peers import ort_session

    E, n, d = w_gu.shape
    f, k, block = n // 2, ri.shape[1], 32
    w1, w2 = onnx_models.bf16_to_f32(w_gu), onnx_models.bf16_to_f32(w_down)
    wf = onnx_models.WeightFile(tmp, "qweights.bin")
    deq = {}
    for fmt in ("fp8", "int4", "int8"):
        parts = []
        for which, w in (("in", w1), ("out", w2)):
            if fmt == "fp8":
                codes, s, wd = _fp8(w)
                wf.add(f"q_{fmt}_{which}", codes, onnx_models.FP8)
                wf.add(f"q_{fmt}_{which}_s", s, TensorProto.FLOAT)
            else:
                codes, s, _ = quant._np_quant_int(w, 4 if fmt == "int4" else 8, block)
                sb = onnx_models.bf16_bits(s)  # scales in T, as the GPU run stores them
                zp = 8 if fmt == "int4" else 128
                q = codes if fmt == "int8" else np.stack((codes & 15, codes >> 4), -1).reshape(w.shape)
                wd = (q.astype(np.float32) - zp) * np.repeat(onnx_models.bf16_to_f32(sb), block, axis=2)
                wf.add(f"q_{fmt}_{which}", codes, onnx_models.UINT8)
                wf.add(f"q_{fmt}_{which}_s", sb)
                if fmt == "int4" and which == "in":
                    qmoe_in = (codes, s)
                if fmt == "int4" and which == "out":
                    qmoe_out = (codes, s)
            parts.append(wd)
        deq[fmt] = parts
    # QMoE (int4) as the benchmark builds it: raw layout, float16 (CPU EP), interleaved fc1
    il = lambda a: onnx_models.interleave_gate_up(a)  # noqa: E731
    wf.add("qmoe4_fc1", il(qmoe_in[0]), onnx_models.UINT8)
    wf.add("qmoe4_fc1_s", il(qmoe_in[1]).astype(np.float16), TensorProto.FLOAT16)
    wf.add("qmoe4_fc2", qmoe_out[0], onnx_models.UINT8)
    wf.add("qmoe4_fc2_s", qmoe_out[1].astype(np.float16), TensorProto.FLOAT16)
    wf.close()
    paths = {fmt: onnx_models.ours_quant_model(wf, os.path.join(tmp, f"ours_{fmt}.onnx"), k, fmt, d) for fmt in deq}
    paths["qmoe4"] = onnx_models.qmoe_model(wf, os.path.join(tmp, "qmoe4.onnx"), k, 4, d, E, block, elem=TensorProto.FLOAT16,
                                            prepacked=0)
    for name, p in paths.items():
        checker.check_model(p)
    print(f"ok   quantized models built and checked: {', '.join(paths)}")
    try:
        ort = ort_session.load_ort()
    except ImportError as e:
        print(f"--   onnxruntime not importable here ({e}): quantized models built and checked only")
        return True
    ok = True
    for what, err, exact in quant.cpu_check(ort):
        good = err < 1e-5 or not exact
        print(("ok   " if good else "FAIL ") + f"{what}: rel err {err:.1e}" + ("" if exact else " (int8 activations on the CPU EP)"))
        ok &= good

    def spec(a, etype):
        return a.ctypes.data, a.shape, etype

    BF, I64 = TensorProto.BFLOAT16, TensorProto.INT64
    if not os.path.exists(args.lib):
        print(f"--   no plugin at {args.lib}: quantized ScatterMoE models built and checked only")
    else:
        for fmt, (wd1, wd2) in deq.items():
            ref = reference_np(x_f32, rw32, ri, wd1, wd2)
            y = np.full(xb.shape, 0x7FC0, np.uint16)
            try:
                sess = ort_session.make_session(ort, paths[fmt], args.lib, device="cpu")
                io = ort_session.bind(sess, {"x": spec(xb, BF), "rw": spec(rwb, BF), "ri": spec(ri, I64)}, {"y": spec(y, BF)},
                                      device="cpu")
                sess.run_with_iobinding(io)
                err = float(np.abs(onnx_models.bf16_to_f32(y) - ref).max() / np.abs(ref).max())
                print(("ok   " if err < 3e-2 else "FAIL ") + f"ours {fmt} on ORT {ort.__version__} CPU EP, bf16 IO binding: rel err {err:.1e}"
                      " (against its own dequantized weights)")
                ok &= err < 3e-2
            except Exception as e:  # noqa: BLE001
                print(f"FAIL ours {fmt} on the CPU EP: {' '.join(str(e).split())[:300]}")
                ok = False
    # QMoE as built: float16 inputs, raw weights
    x16, lg16 = x_f32.astype(np.float16), logits_f32.astype(np.float16)
    y16 = np.zeros_like(x16)
    try:
        sess = ort_session.make_session(ort, paths["qmoe4"], device="cpu")
        io = ort_session.bind(sess, {"x": spec(x16, TensorProto.FLOAT16), "logits": spec(lg16, TensorProto.FLOAT16)},
                              {"y": spec(y16, TensorProto.FLOAT16)}, device="cpu")
        sess.run_with_iobinding(io)
        ref = reference_np(x16.astype(np.float32), rw32, ri, *deq["int4"])
        err = float(np.abs(y16.astype(np.float32) - ref).max() / np.abs(ref).max())
        print(("ok   " if err < 1e-2 else "FAIL ") + f"QMoE int4 as the benchmark builds it (raw, float16) on the CPU EP: rel err {err:.1e}")
        ok &= err < 1e-2
    except Exception as e:  # noqa: BLE001
        print(f"FAIL QMoE int4 on the CPU EP: {' '.join(str(e).split())[:300]}")
        ok = False
    return ok
