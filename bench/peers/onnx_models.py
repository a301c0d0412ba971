"""The ONNX models the ORT columns run, built with numpy + onnx only (no torch), so that they can be
checked on a machine without a GPU (`gpu_bench.py --dry-run`).

Every model of one layer shape points into one external-data file (`WeightFile`): the weights are
written once per shape, in the layouts the models need:

  w_gu    [E, 2f, d]  gate rows [0, f), up rows [f, 2f)  (Hugging Face's gate_up_proj; ScatterMoE glu_layout=gate_up)
  w_il    [E, 2f, d]  row 2i gate i, row 2i+1 up i      (com.microsoft.MoE swiglu_fusion=1)
  w_down  [E, d, f]
  wr_t    [d, E]      the router weight, transposed for MatMul

bfloat16 tensors are passed around as uint16 arrays of their bit patterns (numpy has no bfloat16).
"""
import os

import numpy as np
from onnx import TensorProto, helper

BF16 = TensorProto.BFLOAT16
ALIGN = 4096


def bf16_bits(a):
    """float32 array -> uint16 bit patterns of bfloat16 (round to nearest even)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_to_f32(bits):
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


class WeightFile:
    """One external-data file; `tensor(key, name)` gives an initializer that points into it."""

    def __init__(self, directory, name="weights.bin"):
        self.dir, self.name = directory, name
        self._fh = open(os.path.join(directory, name), "wb")
        self._entries = {}

    def add(self, key, array, onnx_type=BF16):
        """array: numpy array whose bytes are the tensor (uint16 bit patterns for bfloat16)."""
        pad = (-self._fh.tell()) % ALIGN
        self._fh.write(b"\0" * pad)
        offset = self._fh.tell()
        a = np.ascontiguousarray(array)
        a.tofile(self._fh)
        self._entries[key] = (onnx_type, tuple(a.shape), offset, a.nbytes)

    def close(self):
        self._fh.close()

    def dims(self, key):
        return self._entries[key][1]

    def tensor(self, key, name=None):
        onnx_type, dims, offset, length = self._entries[key]
        t = TensorProto()
        t.name = name or key
        t.data_type = onnx_type
        t.dims.extend(dims)
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.name), ("offset", str(offset)), ("length", str(length))):
            e = t.external_data.add()
            e.key, e.value = k, v
        return t


def _vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def _save(graph, path, domains):
    import onnx

    opsets = [helper.make_opsetid("", 17)] + [helper.make_opsetid(dom, 1) for dom in domains]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 9
    onnx.save_model(model, path)  # initializers are external already: this writes only the graph
    return path


def _scattermoe_node(x, rw, ri, out="y"):
    return helper.make_node("ScatterMoE", [x, rw, ri, "w_in", "w_out"], [out], domain="ai.scattermoe",
                            activation="silu", gated=1, glu_layout="gate_up")


def ours_model(wf, path, k):
    """ScatterMoE alone; routing (weights, int64 indices) comes in as inputs."""
    E, _, d = wf.dims("w_gu")
    g = helper.make_graph(
        [_scattermoe_node("x", "rw", "ri")], "ours",
        [_vi("x", BF16, ["T", d]), _vi("rw", BF16, ["T", k]), _vi("ri", TensorProto.INT64, ["T", k])],
        [_vi("y", BF16, ["T", d])],
        [wf.tensor("w_gu", "w_in"), wf.tensor("w_down", "w_out")])
    return _save(g, path, ["ai.scattermoe"])


def router_nodes(k, x="x", rw="rw", ri="ri", f32_matmul=False):
    """The router as `scattermoe rewrite` keeps it (and as the HF export writes it): logits = x @ Wr^T in
    bfloat16, softmax in float32, top-k, renormalise, back to bfloat16. f32_matmul (dry run only: ORT's
    CPU EP has no bfloat16 MatMul) does the product in float32 instead; the logits are the same."""
    if f32_matmul:
        logits = [helper.make_node("Cast", [x], ["x_f"], to=TensorProto.FLOAT),
                  helper.make_node("Cast", ["wr_t"], ["wr_t_f"], to=TensorProto.FLOAT),
                  helper.make_node("MatMul", ["x_f", "wr_t_f"], ["logits_f"])]
    else:
        logits = [helper.make_node("MatMul", [x, "wr_t"], ["logits"]),
                  helper.make_node("Cast", ["logits"], ["logits_f"], to=TensorProto.FLOAT)]
    return logits + [
        helper.make_node("Softmax", ["logits_f"], ["probs"], axis=-1),
        helper.make_node("TopK", ["probs", "k"], ["top_p", ri], axis=-1, largest=1, sorted=1),
        helper.make_node("ReduceSum", ["top_p", "last_axis"], ["top_sum"], keepdims=1),
        helper.make_node("Div", ["top_p", "top_sum"], ["rw_f"]),
        helper.make_node("Cast", ["rw_f"], [rw], to=BF16),
    ]


def ours_router_model(wf, path, k, f32_matmul=False):
    """Router ops + ScatterMoE: the form the rewriter emits for an exported MoE block; input x only."""
    E, _, d = wf.dims("w_gu")
    consts = [helper.make_tensor("k", TensorProto.INT64, [1], [k]),
              helper.make_tensor("last_axis", TensorProto.INT64, [1], [-1])]
    g = helper.make_graph(
        router_nodes(k, f32_matmul=f32_matmul) + [_scattermoe_node("x", "rw", "ri")], "ours_router",
        [_vi("x", BF16, ["T", d])], [_vi("y", BF16, ["T", d])],
        [wf.tensor("w_gu", "w_in"), wf.tensor("w_down", "w_out"), wf.tensor("wr_t")] + consts)
    return _save(g, path, ["ai.scattermoe"])


def ort_moe_model(wf, path, k):
    """com.microsoft.MoE: softmax + top-k (renormalised) of the router logits it is given, SwiGLU with the
    interleaved fc1 (swiglu_fusion=1), fc2; no biases. Same attributes as the float16 run in bench/results."""
    E, _, d = wf.dims("w_il")
    node = helper.make_node("MoE", ["x", "logits", "fc1", "", "fc2"], ["y"], domain="com.microsoft",
                            activation_type="swiglu", swiglu_fusion=1, k=k, normalize_routing_weights=1)
    g = helper.make_graph(
        [node], "ort_moe",
        [_vi("x", BF16, ["T", d]), _vi("logits", BF16, ["T", E])], [_vi("y", BF16, ["T", d])],
        [wf.tensor("w_il", "fc1"), wf.tensor("w_down", "fc2")])
    return _save(g, path, ["com.microsoft"])


def interleave_gate_up(w_gu):
    """[E, 2f, d] gate_up -> interleaved rows (numpy; the GPU path does the same with torch)."""
    E, n, d = w_gu.shape
    return np.ascontiguousarray(w_gu.reshape(E, 2, n // 2, d).transpose(0, 2, 1, 3).reshape(E, n, d))


def write_weights(directory, w_gu, w_il, w_down, wr_t):
    """All four as uint16 bf16 bit arrays; returns the closed WeightFile."""
    wf = WeightFile(directory)
    for key, a in (("w_gu", w_gu), ("w_il", w_il), ("w_down", w_down), ("wr_t", wr_t)):
        wf.add(key, a)
    wf.close()
    return wf


# ------------------------------------------------------------------------------ quantized weights
# (bench/peers/quant.py makes the codes and scales; the keys below are the WeightFile's)
FP8 = TensorProto.FLOAT8E4M3FN
UINT8 = TensorProto.UINT8


def ours_quant_model(wf, path, k, fmt, d):
    """ScatterMoE with quantized w_in / w_out (docs/op-spec.md, "Quantized expert weights"): keys
    q_<fmt>_in, q_<fmt>_in_s, q_<fmt>_out, q_<fmt>_out_s of `wf`; fp8 with one scale per output channel,
    int4 / int8 group-wise along the input (block_size [1, group]) with the default zero point."""
    extra = {}
    if fmt != "fp8":
        group = d // wf.dims(f"q_{fmt}_in_s")[2]
        extra = dict(weight_bits=4 if fmt == "int4" else 8, block_size=[1, group])
    node = helper.make_node("ScatterMoE", ["x", "rw", "ri", "w_in", "w_out", "", "", "", "w_in_scale", "w_out_scale"], ["y"],
                            domain="ai.scattermoe", activation="silu", gated=1, glu_layout="gate_up", **extra)
    g = helper.make_graph(
        [node], f"ours_{fmt}",
        [_vi("x", BF16, ["T", d]), _vi("rw", BF16, ["T", k]), _vi("ri", TensorProto.INT64, ["T", k])],
        [_vi("y", BF16, ["T", d])],
        [wf.tensor(f"q_{fmt}_in", "w_in"), wf.tensor(f"q_{fmt}_out", "w_out"), wf.tensor(f"q_{fmt}_in_s", "w_in_scale"),
         wf.tensor(f"q_{fmt}_out_s", "w_out_scale")])
    return _save(g, path, ["ai.scattermoe"])


def qmoe_model(wf, path, k, bits, d, E, block, elem=BF16, prepacked=None):
    """com.microsoft.QMoE (int4 / int8, group `block` along the input, symmetric: no zero points): keys
    qmoe<bits>_fc1 (interleaved gate/up rows, swiglu_fusion = 1), qmoe<bits>_fc1_s, qmoe<bits>_fc2,
    qmoe<bits>_fc2_s; fed the router logits (softmax, top-k, renormalise inside); SwiGLU silu(gate) * up
    (activation_alpha 1, activation_beta 0, no limit). prepacked None: the attribute left out (the EP's
    prepacked layout, what the CUDA EP reads); 0: raw [E, N, K * bits / 8] weights (what the CPU EP reads)."""
    attrs = dict(k=k, activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=1, expert_weight_bits=bits,
                 block_size=block, quant_type="int", activation_alpha=1.0, activation_beta=0.0)
    if prepacked is not None:
        attrs["weights_prepacked"] = prepacked
    node = helper.make_node("QMoE", ["x", "logits", "fc1", "fc1_s", "", "fc2", "fc2_s"], ["y"], domain="com.microsoft", **attrs)
    p = f"qmoe{bits}"
    g = helper.make_graph(
        [node], f"qmoe_int{bits}", [_vi("x", elem, ["T", d]), _vi("logits", elem, ["T", E])], [_vi("y", elem, ["T", d])],
        [wf.tensor(f"{p}_fc1", "fc1"), wf.tensor(f"{p}_fc1_s", "fc1_s"), wf.tensor(f"{p}_fc2", "fc2"), wf.tensor(f"{p}_fc2_s", "fc2_s")])
    return _save(g, path, ["com.microsoft"])
