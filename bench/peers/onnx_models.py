"""The ONNX models the ORT columns run, built with numpy + onnx only (no torch), so that they can be
checked on a machine without a GPU (`gpu_bench.py --dry-run`).

Every model of one layer (layers.Layer) points into one external-data file (`WeightFile`): the weights
are written once per layer, in the layouts the models need:

  w_gu    [E, 2f, d]  gate and up rows in the layer's glu layout (ScatterMoE's glu_layout)
  w_il    [E, 2f, d]  row 2i gate i, row 2i+1 up i (com.microsoft.MoE swiglu_fusion=1); absent when w_gu
                      is interleaved already (GPT-OSS): the MoE model then reads w_gu
  w_down  [E, d, f]
  b_gu, b_il [E, 2f], b_down [E, d]   the biases, for layers that have them
  wr_t    [d, E]      the router weight, transposed for MatMul; wr_b [E] its bias (GPT-OSS's router has one)

Weights as inputs (`weights_as_inputs=True`): the ScatterMoE models take w_in / w_out (and b_in / b_out)
as graph inputs instead of initializers, and the GPU run binds them to torch's own weight tensors. Our
op's CUDA kernel reads every input through its device pointer on every run (src/ort_ops/cuda.rs has no
constant-initializer path), so the work is the same; what changes is that ORT holds no second copy of
the experts (DeepSeek-V3's are 22.5 GB: three copies would not fit an 80 GB card).

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
        a = np.ascontiguousarray(array)
        self.add_chunks(key, a.shape, [a], onnx_type)

    def add_chunks(self, key, shape, chunks, onnx_type=BF16):
        """A tensor of `shape` written from `chunks` (numpy arrays whose bytes, in order, are the tensor):
        a tensor larger than host memory wants is written a piece at a time."""
        pad = (-self._fh.tell()) % ALIGN
        self._fh.write(b"\0" * pad)
        offset = self._fh.tell()
        for c in chunks:
            np.ascontiguousarray(c).tofile(self._fh)
        length = self._fh.tell() - offset
        self._entries[key] = (onnx_type, tuple(shape), offset, length)

    def close(self):
        self._fh.close()

    def has(self, key):
        return key in self._entries

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


# ScatterMoE's weight inputs and the WeightFile keys they come from
EXPERT_INPUTS = (("w_in", "w_gu"), ("w_out", "w_down"), ("b_in", "b_gu"), ("b_out", "b_down"))


def _experts(wf, layer, weights_as_inputs, elem=BF16):
    """(node input names, graph inputs, initializers) of the expert weights (and biases) of `layer`."""
    d, f, E, _ = layer.dims
    shapes = {"w_in": [E, 2 * f, d], "w_out": [E, d, f], "b_in": [E, 2 * f], "b_out": [E, d]}
    names = [n for n, _ in EXPERT_INPUTS[:4 if layer.bias else 2]]
    if weights_as_inputs:
        return names, [_vi(n, elem, shapes[n]) for n in names], []
    return names, [], [wf.tensor(key, n) for n, key in EXPERT_INPUTS if n in names]


def _scattermoe_node(layer, names, x="x", rw="rw", ri="ri", out="y"):
    return helper.make_node("ScatterMoE", [x, rw, ri] + names, [out], domain="ai.scattermoe", **layer.scattermoe_attrs())


def ours_model(wf, path, layer, weights_as_inputs=False):
    """ScatterMoE alone; routing (weights, int64 indices) comes in as inputs."""
    d, _, _, k = layer.dims
    names, w_inputs, inits = _experts(wf, layer, weights_as_inputs)
    g = helper.make_graph(
        [_scattermoe_node(layer, names)], "ours",
        [_vi("x", BF16, ["T", d]), _vi("rw", BF16, ["T", k]), _vi("ri", TensorProto.INT64, ["T", k])] + w_inputs,
        [_vi("y", BF16, ["T", d])], inits)
    return _save(g, path, ["ai.scattermoe"])


def fused_router_nodes(layer, x="x", rw="rw", ri="ri", f32_matmul=False, logits_16bit=False):
    """The router as `scattermoe rewrite` writes it now (router fusion): logits = x @ Wr^T (+ bias) in
    bfloat16, their Cast to float32 as the exported router has it, then one ai.scattermoe TopKRouter node
    (softmax, top-k, renormalised; GPT-OSS: top-k of the logits, softmax over the k) and a Cast of its
    weights to bfloat16. logits_16bit: the TopKRouter reads the bfloat16 logits and writes bfloat16 weights
    (no Casts), as the rewrite writes com.microsoft.MoE's router, and as it wrote every router at 476bd51."""
    nodes = router_nodes(layer, x, rw, ri, f32_matmul)
    logits_end = next(i for i, n in enumerate(nodes) if n.op_type in ("TopK", "Softmax"))
    logits = nodes[:logits_end]
    src = logits[-1].output[0]
    bf16_in = logits_16bit and logits[-1].op_type == "Cast" and not f32_matmul
    if bf16_in:  # the bfloat16 logits themselves
        src = logits[-1].input[0]
        logits = logits[:-1]
    scoring = "topk_softmax" if layer.router == "topk_softmax" else "softmax"
    normalize = 0 if layer.router == "topk_softmax" else 1
    out = rw if bf16_in else "rw_f"
    node = helper.make_node("TopKRouter", [src], [out, ri], domain="ai.scattermoe", k=layer.dims[3], scoring=scoring,
                            normalize=normalize)
    tail = [] if bf16_in else [helper.make_node("Cast", ["rw_f"], [rw], to=BF16)]
    return logits + [node] + tail


def router_nodes(layer, x="x", rw="rw", ri="ri", f32_matmul=False):
    """The router as `scattermoe rewrite` keeps it (and as the HF export writes it): logits = x @ Wr^T in
    bfloat16, then in float32 either softmax, top-k, renormalise (layer.router softmax_topk: Mixtral, Qwen3,
    and the benchmark's routing for DeepSeek-V3), or GPT-OSS's order (topk_softmax: + the router bias, top-k
    of the logits, softmax over the k; the same weights), back to bfloat16. f32_matmul (dry run only: ORT's
    CPU EP has no bfloat16 MatMul) does the product in float32 instead; the logits are the same."""
    if f32_matmul:
        logits = [helper.make_node("Cast", [x], ["x_f"], to=TensorProto.FLOAT),
                  helper.make_node("Cast", ["wr_t"], ["wr_t_f"], to=TensorProto.FLOAT),
                  helper.make_node("MatMul", ["x_f", "wr_t_f"], ["logits_f"])]
        if layer.router == "topk_softmax":
            logits[-1].output[0] = "logits_nb"
            logits += [helper.make_node("Cast", ["wr_b"], ["wr_b_f"], to=TensorProto.FLOAT),
                       helper.make_node("Add", ["logits_nb", "wr_b_f"], ["logits_f"])]
    else:
        logits = [helper.make_node("MatMul", [x, "wr_t"], ["logits"])]
        if layer.router == "topk_softmax":
            logits[-1].output[0] = "logits_nb"
            logits.append(helper.make_node("Add", ["logits_nb", "wr_b"], ["logits"]))
        logits.append(helper.make_node("Cast", ["logits"], ["logits_f"], to=TensorProto.FLOAT))
    if layer.router == "topk_softmax":
        return logits + [
            helper.make_node("TopK", ["logits_f", "k"], ["top_l", ri], axis=-1, largest=1, sorted=1),
            helper.make_node("Softmax", ["top_l"], ["rw_f"], axis=-1),
            helper.make_node("Cast", ["rw_f"], [rw], to=BF16),
        ]
    return logits + [
        helper.make_node("Softmax", ["logits_f"], ["probs"], axis=-1),
        helper.make_node("TopK", ["probs", "k"], ["top_p", ri], axis=-1, largest=1, sorted=1),
        helper.make_node("ReduceSum", ["top_p", "last_axis"], ["top_sum"], keepdims=1),
        helper.make_node("Div", ["top_p", "top_sum"], ["rw_f"]),
        helper.make_node("Cast", ["rw_f"], [rw], to=BF16),
    ]


def ours_router_model(wf, path, layer, f32_matmul=False, weights_as_inputs=False, router_ops=False):
    """The router + ScatterMoE: the form the rewriter emits for an exported MoE block (the router's
    MatMul, then TopKRouter; router_ops: the router as ONNX ops, as `scattermoe rewrite --keep-router`
    leaves it); input x (and, with weights_as_inputs, the expert weights) only."""
    d, _, _, k = layer.dims
    names, w_inputs, inits = _experts(wf, layer, weights_as_inputs)
    consts = [helper.make_tensor("k", TensorProto.INT64, [1], [k]),
              helper.make_tensor("last_axis", TensorProto.INT64, [1], [-1])]
    router = [wf.tensor("wr_t")] + ([wf.tensor("wr_b")] if layer.router == "topk_softmax" else [])
    g = helper.make_graph(
        (router_nodes if router_ops else fused_router_nodes)(layer, f32_matmul=f32_matmul) + [_scattermoe_node(layer, names)], "ours_router",
        [_vi("x", BF16, ["T", d])] + w_inputs, [_vi("y", BF16, ["T", d])], inits + router + consts)
    return _save(g, path, ["ai.scattermoe"])


def ort_moe_attrs(layer):
    """com.microsoft.MoE's attributes for `layer`: softmax over the E logits, top-k, renormalised; SwiGLU
    over interleaved fc1 rows (swiglu_fusion=1). GPT-OSS's form adds activation_alpha 1.702, activation_beta
    1 (the + 1 on the clamped up value) and swiglu_limit 7, as ORT's schema writes its SwiGLU:
    G = min(g, limit), L = clamp(u, -limit, limit), G * sigmoid(alpha G) * (L + beta)."""
    a = dict(activation_type="swiglu", swiglu_fusion=1, k=layer.k, normalize_routing_weights=1)
    if layer.activation == "swiglu_oai":
        a.update(activation_alpha=layer.alpha, activation_beta=1.0, swiglu_limit=layer.limit)
    return a


def ort_moe_model(wf, path, layer, elem=BF16):
    """com.microsoft.MoE fed the router logits, with the layer's biases. elem: the model's float type (the
    dry run checks the GPT-OSS form in float32 on the CPU EP, which has no bfloat16 MoE)."""
    d, _, E, _ = layer.dims
    w1 = "w_il" if wf.has("w_il") else "w_gu"
    b1 = "b_il" if wf.has("b_il") else "b_gu"
    inputs = ["x", "logits", "fc1", "fc1_b" if layer.bias else "", "fc2"] + (["fc2_b"] if layer.bias else [])
    inits = [wf.tensor(w1, "fc1"), wf.tensor("w_down", "fc2")]
    if layer.bias:
        inits += [wf.tensor(b1, "fc1_b"), wf.tensor("b_down", "fc2_b")]
    node = helper.make_node("MoE", inputs, ["y"], domain="com.microsoft", **ort_moe_attrs(layer))
    g = helper.make_graph([node], "ort_moe", [_vi("x", elem, ["T", d]), _vi("logits", elem, ["T", E])],
                          [_vi("y", elem, ["T", d])], inits)
    return _save(g, path, ["com.microsoft"])


def interleave_gate_up(w_gu):
    """[E, 2f, ...] gate_up -> interleaved rows (numpy; the GPU path does the same with torch)."""
    E, n = w_gu.shape[:2]
    rest = w_gu.shape[2:]
    return np.ascontiguousarray(np.swapaxes(w_gu.reshape(E, 2, n // 2, *rest), 1, 2).reshape(E, n, *rest))


def write_weights(directory, tensors, name="weights.bin"):
    """tensors: {key: numpy array, or (shape, iterable of numpy chunks[, onnx type])}; bf16 as uint16 bits
    unless a type is given. Returns the closed WeightFile."""
    wf = WeightFile(directory, name)
    for key, t in tensors.items():
        if isinstance(t, np.ndarray):
            wf.add(key, t, BF16 if t.dtype == np.uint16 else TensorProto.FLOAT)
        else:
            shape, chunks, *etype = t
            wf.add_chunks(key, shape, chunks, etype[0] if etype else BF16)
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
