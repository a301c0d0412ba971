"""Quantized expert weights for the benchmark's quantized columns: ours (the contract of docs/op-spec.md,
"Quantized expert weights") and ORT's com.microsoft.QMoE, from the same bf16 weights, same routing.

  fp8    our float8e4m3fn weights, one float32 scale per output channel (amax / 448)
  int4   4-bit codes, group 128 along the input, symmetric: scale = amax / 8 of each group (in T),
         code = clamp(round(w / scale), -8, 7) + 8, default zero point 8 (no zero-point input)
  int8   the same with 8-bit codes: amax / 128, clamp(-128, 127) + 128, default zero point 128

The integer codes are ONNX Runtime's symmetric MatMulNBits / QMoE encoding (onnxruntime 1.31
quantization/cuda_quantizer.py: `_matmulnbits_blockwise_quantize_impl`, symmetric, full range), so our
int4 / int8 columns and QMoE's multiply the same codes and scales; ours reads them as stored ([E, N, K/2]
bytes, element 2i in the low nibble), QMoE on CUDA reads them prepacked by ORT's own packer into the
CUTLASS mixed-GEMM layout ([E, K, N/pack], `_pack_weights_for_cuda_mixed_gemm`, SM80 layout), with its
default weights_prepacked (the CUDA EP's prepacked layout). QMoE is fed the router logits (it applies
softmax, top-k and, with normalize_routing_weights = 1, renormalises, as com.microsoft.MoE does), the
fused SwiGLU weights interleaved (swiglu_fusion = 1, activation_alpha 1, activation_beta 0, no limit:
silu(gate) * up). `cpu_check` confirms those semantics on ORT's CPU EP (float32, raw weights) against a
numpy evaluation; the CUDA layout is ORT's packer's business.

The quantized floors count the bytes the kernels must read: codes, scales (and zero points) of the
experts hit, X and Y.
"""
import numpy as np

BLOCK = 128  # the group of the int4 / int8 columns (QMoE on CUDA takes 64 or 128)
FORMATS = ("fp8", "int4", "int8")


def weight_bytes_per_element(fmt, t_bytes=2, block=BLOCK):
    """Stored bytes per weight element, scales included (fp8: one float32 per row of d or f, counted
    as 4 / K with K = 1024 as a bound below 0.4 %, so taken as 0)."""
    if fmt == "bf16":
        return 2.0
    if fmt == "fp8":
        return 1.0
    bits = 4 if fmt == "int4" else 8
    return bits / 8 + t_bytes / block


def floor_ms(T, d, f, k, n_hit, peak_flops, copy_bw, fmt):
    """max(FLOPs / matmul rate, bytes / copy bandwidth) with the weights of the experts hit stored in
    `fmt` (workload.floor_ms for bf16)."""
    flops = 2 * T * k * 3 * d * f
    nbytes = n_hit * 3 * f * d * weight_bytes_per_element(fmt) + 2 * T * d * 2
    return max(flops / peak_flops, nbytes / copy_bw) * 1e3


# ------------------------------------------------------------------------------ quantization (torch)
def quantize_fp8(w):
    """w [E, N, K] (torch, any float) -> (codes uint8 [E, N, K] (e4m3fn bits), scales float32 [E, N])."""
    import torch

    wf = w.float()
    s = (wf.abs().amax(dim=2) / 448.0).clamp_min(1e-12)
    q = (wf / s[:, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q.view(torch.uint8).contiguous(), s.contiguous()


def quantize_int(w, bits, block=BLOCK):
    """w [E, N, K] (torch) -> (codes uint8 [E, N, K * bits / 8], scales float32 [E, N, K / block]):
    symmetric, full range, zero point 2^(bits - 1) implied (ORT's MatMulNBits / QMoE encoding)."""
    import torch

    E, N, K = w.shape
    assert K % block == 0, "K must be a multiple of the group"
    qmin, qmax, div, zp = (-8, 7, 8, 8) if bits == 4 else (-128, 127, 128, 128)
    wb = w.float().view(E, N, K // block, block)
    s = (wb.abs().amax(dim=3) / div).clamp_min(float(np.finfo(np.float32).eps))
    q = (torch.clamp(torch.round(wb / s[..., None]), qmin, qmax) + zp).to(torch.uint8).view(E, N, K)
    if bits == 4:
        q = (q[:, :, 0::2] & 0xF) | ((q[:, :, 1::2] & 0xF) << 4)
    return q.contiguous(), s.contiguous()


def prepack_qmoe(codes, K, bits):
    """Raw codes [E, N, K * bits / 8] -> QMoE's CUDA layout [E, K, N * bits / 8], by ORT's packer."""
    import torch

    try:
        from onnxruntime.quantization.cuda_quantizer import _pack_weights_for_cuda_mixed_gemm as pack
    except ImportError:
        from onnxruntime.capi.onnxruntime_cuda_quant_preprocess import pack_weights_for_cuda_mixed_gemm as pack
    E, N, _ = codes.shape
    out = []
    for e in range(E):
        p = np.asarray(pack(codes[e].cpu().numpy(), N, K, bits, 80)).view(np.uint8).reshape(K, N * bits // 8)
        out.append(torch.from_numpy(np.ascontiguousarray(p)))
    return torch.stack(out)


# ------------------------------------------------------------------------------ QMoE semantics on CPU
def _np_ref(x, logits, k, w1, w2):
    """x [T, d]; logits [T, E]; w1 [E, 2f, d] interleaved (row 2i gate i, 2i+1 up i); w2 [E, d, f]."""
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    ri = np.argsort(-p, axis=1, kind="stable")[:, :k]
    pk = np.take_along_axis(p, ri, 1)
    rw = pk / pk.sum(1, keepdims=True)
    y = np.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(k):
            e = ri[t, j]
            h = w1[e] @ x[t]
            g, u = h[0::2], h[1::2]
            y[t] += rw[t, j] * (w2[e] @ (g / (1 + np.exp(-g)) * u))
    return y


def _np_quant_int(w, bits, block):
    """numpy twin of quantize_int (for the torch-free check): codes [E, N, K*bits/8], scales [E, N, K/block],
    and the dequantized weight."""
    E, N, K = w.shape
    qmin, qmax, div, zp = (-8, 7, 8, 8) if bits == 4 else (-128, 127, 128, 128)
    wb = w.reshape(E, N, K // block, block)
    s = np.maximum(np.abs(wb).max(axis=3) / div, np.finfo(np.float32).eps).astype(np.float32)
    q = (np.clip(np.rint(wb / s[..., None]), qmin, qmax) + zp).astype(np.uint8)
    deq = ((q.astype(np.float32) - zp) * s[..., None]).reshape(E, N, K)
    q = q.reshape(E, N, K)
    if bits == 4:
        q = (q[:, :, 0::2] & 0xF) | ((q[:, :, 1::2] & 0xF) << 4)
    return np.ascontiguousarray(q), s, deq


def qmoe_model_bytes(d, E, k, bits, block, w1c, s1, w2c, s2, elem, prepacked=None):
    """com.microsoft.QMoE as the benchmark builds it (initializers inline: for the small CPU check).
    block None: one scale per output channel (scales [E, N])."""
    from onnx import TensorProto, helper

    attrs = dict(k=k, activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=1, expert_weight_bits=bits,
                 quant_type="int", activation_alpha=1.0, activation_beta=0.0)
    if block is not None:
        attrs["block_size"] = block
    if prepacked is not None:
        attrs["weights_prepacked"] = prepacked
    node = helper.make_node("QMoE", ["x", "logits", "fc1", "fc1_s", "", "fc2", "fc2_s"], ["y"], domain="com.microsoft",
                            **attrs)
    npt = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}[elem]
    inits = [helper.make_tensor("fc1", TensorProto.UINT8, w1c.shape, w1c.tobytes(), raw=True),
             helper.make_tensor("fc2", TensorProto.UINT8, w2c.shape, w2c.tobytes(), raw=True),
             helper.make_tensor("fc1_s", elem, s1.shape, s1.astype(npt).tobytes(), raw=True),
             helper.make_tensor("fc2_s", elem, s2.shape, s2.astype(npt).tobytes(), raw=True)]
    g = helper.make_graph([node], "qmoe", [helper.make_tensor_value_info("x", elem, ["T", d]),
                                           helper.make_tensor_value_info("logits", elem, ["T", E])],
                          [helper.make_tensor_value_info("y", elem, ["T", d])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 9
    return m.SerializeToString()


def cpu_check(ort=None):
    """QMoE's semantics on ORT's CPU EP (float32, raw weights, weights_prepacked = 0) against numpy:
    softmax + top-k + renormalise of the logits it is given, interleaved SwiGLU = silu(gate) * up,
    scales [E, N] or [E, N, K / block], zero point 2^(bits - 1), element 2i in the low nibble. Returns
    [(what, relative error, whether it must be exact)]. Block-wise 8-bit experts are not exact on the
    CPU EP: it has no float32 kernel for them and quantizes the activations to int8 (QMoE's
    accuracy_level documentation), which the check shows; the CUDA EP keeps activations in T."""
    if ort is None:
        import onnxruntime as ort
    from onnx import TensorProto

    rng = np.random.default_rng(0)
    d, f, E, k, T = 64, 32, 8, 2, 5
    x = rng.standard_normal((T, d)).astype(np.float32)
    logits = rng.standard_normal((T, E)).astype(np.float32) * 2
    w1 = (rng.standard_normal((E, 2 * f, d)) * d**-0.5).astype(np.float32)  # interleaved rows
    w2 = (rng.standard_normal((E, d, f)) * f**-0.5).astype(np.float32)
    out = []
    for bits, block, exact in ((4, 32, True), (8, None, True), (4, None, True), (8, 32, False)):
        w1c, s1, w1d = _np_quant_int(w1, bits, block or d)
        w2c, s2, w2d = _np_quant_int(w2, bits, block or f)
        if block is None:
            s1, s2 = s1[..., 0], s2[..., 0]
        ref = _np_ref(x, logits, k, w1d, w2d)
        m = qmoe_model_bytes(d, E, k, bits, block, w1c, s1, w2c, s2, TensorProto.FLOAT, prepacked=0)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(m, so, providers=["CPUExecutionProvider"])
        y = sess.run(None, {"x": x, "logits": logits})[0]
        what = f"QMoE int{bits} {'block ' + str(block) if block else 'per channel'} on ORT {ort.__version__} CPU EP"
        out.append((what, float(np.abs(y - ref).max() / np.abs(ref).max()), exact))
    return out


if __name__ == "__main__":
    for what, err, exact in cpu_check():
        print(f"{'ok  ' if err < 1e-5 or not exact else 'FAIL'} {what}: rel err {err:.2e}{'' if exact else ' (int8 activations)'}")
