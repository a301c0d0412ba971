"""ONNX model builders (onnx.helper only).

Two families, sharing graph input and output names so one feed dict runs both:

* ``scatter_moe_model`` / ``parallel_linear_model`` / ``capacity_mask_model``: one ``ai.scattermoe``
  node (``scatter_moe_model(kept=True)`` adds a CapacityMask beside the ScatterMoE). Graph inputs are
  float32 (indices int32/int64, capacity int64); every float input is Cast to the op's element type
  ``T`` (f32 / f16 / bf16) and every float output Cast back to float32, so Python never handles
  bfloat16 arrays. Weights and biases may be graph inputs or float32 initializers.
  ``op_model`` builds a bare node with graph inputs of any element type and no casts (error tests).

* ``moe_loop_model``: the same MoE layer written in standard ONNX ops as a per-expert loop, as
  PyTorch exporters write it (Equal -> NonZero -> Gather rows -> MatMul / activation / MatMul ->
  times the gathered routing weight -> ScatterND or ScatterElements with reduction='add'). It
  rounds its float inputs to ``T`` first (Cast f32 -> T -> f32) and then computes in float32: an
  independent, ORT-computed reference.

* ``composed_moe_model``: ScatterMoE next to its ParallelLinear composition, for comparing the two.

Graph input names: X, routing_weights, routing_indices, w_in, w_out, b_in, b_out, capacity
(ScatterMoE); X, routing_indices, W, b, gates (ParallelLinear); routing_indices, capacity
(CapacityMask). Outputs: Y (and kept).
Models use opset 17 (or 18) of the default domain and IR version 8, which ONNX Runtime 1.20 reads.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DOMAIN = "ai.scattermoe"
OP_VERSION = 1
DEFAULT_OPSET = 17
IR_VERSION = 8

ELEM = {
    "f32": TensorProto.FLOAT,
    "f16": TensorProto.FLOAT16,
    "bf16": TensorProto.BFLOAT16,
    "f64": TensorProto.DOUBLE,
}
INDEX_ELEM = {"int32": TensorProto.INT32, "int64": TensorProto.INT64}

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "relu2", "swiglu_oai", "swiglu_limit")
GLU_LAYOUTS = ("gate_up", "up_gate", "interleaved")

def elem_type(dtype) -> int:
    """'f32' / 'f16' / 'bf16' / 'f64', 'int32' / 'int64', or a TensorProto code."""
    if isinstance(dtype, int):
        return dtype
    if dtype in ELEM:
        return ELEM[dtype]
    if dtype in INDEX_ELEM:
        return INDEX_ELEM[dtype]
    raise ValueError(f"unknown dtype {dtype!r}")


def _vi(name: str, et: int, shape: Sequence | None):
    return helper.make_tensor_value_info(name, et, None if shape is None else list(shape))


def _finish(nodes, inputs, outputs, initializers, name, opset, custom=True, value_info=()):
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=list(initializers), value_info=list(value_info))
    imports = [helper.make_opsetid("", opset)]
    if custom:
        imports.append(helper.make_opsetid(DOMAIN, OP_VERSION))
    model = helper.make_model(graph, opset_imports=imports, producer_name="scattermoe_testing")
    model.ir_version = IR_VERSION
    return model


class _Builder:
    """Tiny helper: unique names, constants, node emission."""

    def __init__(self, prefix: str = ""):
        self.nodes: list = []
        self.inits: list = []
        self.n = 0
        self.prefix = prefix

    def name(self, hint: str) -> str:
        self.n += 1
        return f"{self.prefix}{hint}_{self.n}"

    def const(self, value, dtype=np.float32, hint="c") -> str:
        arr = np.asarray(value, dtype=dtype)
        nm = self.name(hint)
        self.inits.append(numpy_helper.from_array(arr, nm))
        return nm

    def op(self, op_type: str, inputs: Iterable[str], hint: str | None = None, n_out: int = 1, domain: str = "", **attrs):
        outs = [self.name(hint or op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self.name("n_" + op_type), domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs

    def round_to(self, x: str, dtype: str) -> str:
        """Cast f32 -> T -> f32 (no-op for f32)."""
        if dtype == "f32":
            return x
        t = self.op("Cast", [x], "to_t", to=ELEM[dtype])
        return self.op("Cast", [t], "to_f32", to=TensorProto.FLOAT)


def _add_float_source(b: _Builder, graph_inputs: list, name: str, shape, initializers: Mapping | None):
    """A float32 tensor named `name`: an initializer if one is given, else a graph input."""
    if initializers is not None and name in initializers:
        b.inits.append(numpy_helper.from_array(np.asarray(initializers[name], dtype=np.float32), name))
    else:
        graph_inputs.append(_vi(name, TensorProto.FLOAT, shape))


def _attr_dict(**kw):
    return {k: v for k, v in kw.items() if v is not None}


# ---------------------------------------------------------------------------------------------
# One-node models
# ---------------------------------------------------------------------------------------------


def op_model(
    op_type: str,
    inputs: Sequence[tuple[str, object, Sequence | None] | None],
    outputs: Sequence[tuple[str, object, Sequence | None]],
    attrs: Mapping | None = None,
    opset: int = DEFAULT_OPSET,
    initializers: Mapping[str, np.ndarray] | None = None,
) -> onnx.ModelProto:
    """A bare model: one custom node wired straight to graph inputs of the given element types.

    `inputs`: (name, dtype, shape) per op input position, None for an absent optional input
    (written as an empty name). `initializers`: name -> array (its own dtype) replacing graph inputs.
    """
    graph_inputs, inits, names = [], [], []
    for spec in inputs:
        if spec is None:
            names.append("")
            continue
        nm, dt, shape = spec
        names.append(nm)
        if initializers is not None and nm in initializers:
            inits.append(numpy_helper.from_array(np.asarray(initializers[nm]), nm))
        else:
            graph_inputs.append(_vi(nm, elem_type(dt), shape))
    while names and names[-1] == "":
        names.pop()
    outs = [_vi(nm, elem_type(dt), shape) for nm, dt, shape in outputs]
    node = helper.make_node(op_type, names, [o[0] for o in outputs], name=op_type.lower(), domain=DOMAIN, **(attrs or {}))
    return _finish([node], graph_inputs, outs, inits, f"{op_type}_bare", opset)


def scatter_moe_model(
    *,
    d: int,
    f: int,
    E: int,
    k: int,
    dtype: str = "f32",
    index_dtype: str = "int64",
    x_shape: Sequence | None = None,
    routing_shape: Sequence | None = None,
    w_in_shape: Sequence | None = None,
    w_out_shape: Sequence | None = None,
    gated: int | None = 1,
    activation: str | None = None,
    glu_layout: str | None = None,
    alpha: float | None = None,
    limit: float | None = None,
    capacity_order: str | None = None,
    b_in: bool = False,
    b_out: bool = False,
    capacity: bool = False,
    capacity_shape: Sequence = (),
    kept: bool = False,
    initializers: Mapping[str, np.ndarray] | None = None,
    extra_attrs: Mapping | None = None,
    output_shapes: bool = False,
    opset: int = DEFAULT_OPSET,
) -> onnx.ModelProto:
    """A model with one ScatterMoE node computing in `dtype` (float32 graph inputs / outputs).

    `kept=True` (needs `capacity`) adds a CapacityMask node on the same routing_indices, capacity
    and capacity_order, with num_experts = E; its bool output is Cast to a float32 output "kept".

    Attributes left None are omitted (the op's default applies); `gated` defaults to writing 1.
    Shapes may contain strings (symbolic dims). `initializers` maps some of w_in / w_out / b_in /
    b_out (float32 arrays) or capacity (int64) to initializers instead of graph inputs.
    """
    gated_v = 1 if gated is None else gated
    n = 2 * f if gated_v == 1 else f
    x_shape = list(x_shape) if x_shape is not None else ["T", d]
    routing_shape = list(routing_shape) if routing_shape is not None else ["T", k]
    w_in_shape = list(w_in_shape) if w_in_shape is not None else [E, n, d]
    w_out_shape = list(w_out_shape) if w_out_shape is not None else [E, d, f]
    b = _Builder()
    gin: list = []
    t = ELEM[dtype]

    def float_in(name, shape):
        _add_float_source(b, gin, name, shape, initializers)
        return name if dtype == "f32" else b.op("Cast", [name], name + "_t", to=t)

    op_inputs = [
        float_in("X", x_shape),
        float_in("routing_weights", routing_shape),
    ]
    gin.append(_vi("routing_indices", INDEX_ELEM[index_dtype], routing_shape))
    op_inputs.append("routing_indices")
    op_inputs.append(float_in("w_in", w_in_shape))
    op_inputs.append(float_in("w_out", w_out_shape))
    op_inputs.append(float_in("b_in", [w_in_shape[0], w_in_shape[1]]) if b_in else "")
    op_inputs.append(float_in("b_out", [w_out_shape[0], w_out_shape[1]]) if b_out else "")
    if capacity:
        if initializers is not None and "capacity" in initializers:
            b.inits.append(numpy_helper.from_array(np.asarray(initializers["capacity"], dtype=np.int64), "capacity"))
        else:
            gin.append(_vi("capacity", TensorProto.INT64, list(capacity_shape)))
        op_inputs.append("capacity")
    while op_inputs[-1] == "":
        op_inputs.pop()

    attrs = _attr_dict(
        activation=activation, gated=gated, glu_layout=glu_layout, alpha=alpha, limit=limit, capacity_order=capacity_order
    )
    attrs.update(extra_attrs or {})
    y_raw = "Y" if dtype == "f32" else "Y_t"
    b.nodes.append(helper.make_node("ScatterMoE", op_inputs, [y_raw], name="scatter_moe", domain=DOMAIN, **attrs))
    if dtype != "f32":
        b.nodes.append(helper.make_node("Cast", ["Y_t"], ["Y"], name="cast_Y", to=TensorProto.FLOAT))
    if kept:
        if not capacity:
            raise ValueError("kept needs capacity (CapacityMask takes the capacity input)")
        mask_attrs = _attr_dict(num_experts=E, capacity_order=capacity_order)
        b.nodes.append(helper.make_node("CapacityMask", ["routing_indices", "capacity"], ["kept_b"], name="capacity_mask",
                                        domain=DOMAIN, **mask_attrs))
        b.nodes.append(helper.make_node("Cast", ["kept_b"], ["kept"], name="cast_kept", to=TensorProto.FLOAT))
    outs = [_vi("Y", TensorProto.FLOAT, x_shape if output_shapes else None)]
    if kept:
        outs.append(_vi("kept", TensorProto.FLOAT, routing_shape if output_shapes else None))
    return _finish(b.nodes, gin, outs, b.inits, "scatter_moe", opset)


def capacity_mask_model(
    *,
    E: int | None,
    k: int,
    index_dtype: str = "int64",
    routing_shape: Sequence | None = None,
    capacity_shape: Sequence = (),
    capacity_order: str | None = None,
    opset: int = DEFAULT_OPSET,
) -> onnx.ModelProto:
    """A model with one CapacityMask node (num_experts = E; None leaves it out); output kept (bool)."""
    routing_shape = list(routing_shape) if routing_shape is not None else ["T", k]
    attrs = _attr_dict(num_experts=E, capacity_order=capacity_order)
    node = helper.make_node("CapacityMask", ["routing_indices", "capacity"], ["kept"], name="capacity_mask",
                            domain=DOMAIN, **attrs)
    gin = [_vi("routing_indices", INDEX_ELEM[index_dtype], routing_shape),
           _vi("capacity", TensorProto.INT64, list(capacity_shape))]
    return _finish([node], gin, [_vi("kept", TensorProto.BOOL, None)], [], "capacity_mask", opset)


def parallel_linear_model(
    *,
    d_in: int,
    d_out: int,
    E: int,
    k: int,
    dtype: str = "f32",
    index_dtype: str = "int64",
    grouped_in: int | None = None,
    grouped_out: int | None = None,
    bias: bool = False,
    gates: bool = False,
    x_shape: Sequence | None = None,
    routing_shape: Sequence | None = None,
    initializers: Mapping[str, np.ndarray] | None = None,
    opset: int = DEFAULT_OPSET,
) -> onnx.ModelProto:
    """A model with one ParallelLinear node computing in `dtype` (float32 graph inputs / outputs)."""
    routing_shape = list(routing_shape) if routing_shape is not None else ["T", k]
    if x_shape is None:
        x_shape = ["TK", d_in] if grouped_in == 1 else ["T", d_in]
    b = _Builder()
    gin: list = []
    t = ELEM[dtype]

    def float_in(name, shape):
        _add_float_source(b, gin, name, shape, initializers)
        return name if dtype == "f32" else b.op("Cast", [name], name + "_t", to=t)

    op_inputs = [float_in("X", x_shape)]
    gin.append(_vi("routing_indices", INDEX_ELEM[index_dtype], routing_shape))
    op_inputs.append("routing_indices")
    op_inputs.append(float_in("W", [E, d_out, d_in]))
    op_inputs.append(float_in("b", [E, d_out]) if bias else "")
    op_inputs.append(float_in("gates", routing_shape) if gates else "")
    while op_inputs[-1] == "":
        op_inputs.pop()
    attrs = _attr_dict(grouped_in=grouped_in, grouped_out=grouped_out)
    y_raw = "Y" if dtype == "f32" else "Y_t"
    b.nodes.append(helper.make_node("ParallelLinear", op_inputs, [y_raw], name="parallel_linear", domain=DOMAIN, **attrs))
    if dtype != "f32":
        b.nodes.append(helper.make_node("Cast", ["Y_t"], ["Y"], name="cast_Y", to=TensorProto.FLOAT))
    return _finish(b.nodes, gin, [_vi("Y", TensorProto.FLOAT, None)], b.inits, "parallel_linear", opset)


# ---------------------------------------------------------------------------------------------
# Activations in standard ONNX ops (float32)
# ---------------------------------------------------------------------------------------------


def _act(b: _Builder, x: str, activation: str) -> str:
    if activation == "silu":
        return b.op("Mul", [x, b.op("Sigmoid", [x])], "silu")
    if activation == "relu":
        return b.op("Relu", [x])
    if activation == "relu2":  # square(relu(x)), as transformers writes it
        r = b.op("Relu", [x])
        return b.op("Mul", [r, r], "relu2")
    if activation == "gelu":  # x * 0.5 * (1 + erf(x / sqrt(2))); the Gelu op is opset 20
        e = b.op("Erf", [b.op("Mul", [x, b.const(1.0 / math.sqrt(2.0))])])
        return b.op("Mul", [b.op("Mul", [x, b.const(0.5)]), b.op("Add", [e, b.const(1.0)])], "gelu")
    if activation == "gelu_tanh":  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        x3 = b.op("Mul", [b.op("Mul", [x, x]), x])
        inner = b.op("Add", [x, b.op("Mul", [x3, b.const(0.044715)])])
        th = b.op("Tanh", [b.op("Mul", [inner, b.const(math.sqrt(2.0 / math.pi))])])
        return b.op("Mul", [b.op("Mul", [x, b.const(0.5)]), b.op("Add", [th, b.const(1.0)])], "gelu_tanh")
    raise ValueError(f"activation {activation!r} has no plain form here")


def _split_glu(b: _Builder, a: str, f: int, glu_layout: str) -> tuple[str, str]:
    """(gate, up) columns of a [N, 2f] tensor."""
    ax = b.const([1], np.int64)

    def sl(start, end, step):
        return b.op("Slice", [a, b.const([start], np.int64), b.const([end], np.int64), ax, b.const([step], np.int64)])

    if glu_layout == "gate_up":
        return sl(0, f, 1), sl(f, 2 * f, 1)
    if glu_layout == "up_gate":
        return sl(f, 2 * f, 1), sl(0, f, 1)
    if glu_layout == "interleaved":
        return sl(0, 2 * f, 2), sl(1, 2 * f, 2)
    raise ValueError(f"glu_layout {glu_layout!r}")


def hidden(b: _Builder, a: str, *, f: int, gated: int, activation: str, glu_layout: str, alpha: float, limit: float) -> str:
    """h from a = x W_in^T + b_in, per op-spec (float32)."""
    if not gated:
        return _act(b, a, activation)
    gate, up = _split_glu(b, a, f, glu_layout)
    if activation == "swiglu_oai":
        g = b.op("Min", [gate, b.const(limit)])
        u = b.op("Clip", [up, b.const(-limit), b.const(limit)])
        sg = b.op("Sigmoid", [b.op("Mul", [g, b.const(alpha)])])
        return b.op("Mul", [b.op("Mul", [b.op("Add", [u, b.const(1.0)]), g]), sg], "swiglu")
    if activation == "swiglu_limit":  # GLM-5-Next: silu(min(gate, l)) * clamp(up, -l, l), alpha general
        g = b.op("Min", [gate, b.const(limit)])
        u = b.op("Clip", [up, b.const(-limit), b.const(limit)])
        sg = b.op("Sigmoid", [b.op("Mul", [g, b.const(alpha)])])
        return b.op("Mul", [b.op("Mul", [g, sg]), u], "swiglu_limit")
    return b.op("Mul", [_act(b, gate, activation), up], "glu")


# ---------------------------------------------------------------------------------------------
# The per-expert loop (the exported form)
# ---------------------------------------------------------------------------------------------


def moe_loop_model(
    *,
    d: int,
    f: int,
    E: int,
    k: int,
    dtype: str = "f32",
    index_dtype: str = "int64",
    x_shape: Sequence | None = None,
    routing_shape: Sequence | None = None,
    gated: int = 1,
    activation: str = "silu",
    glu_layout: str = "gate_up",
    alpha: float = 1.702,
    limit: float = 7.0,
    b_in: bool = False,
    b_out: bool = False,
    initializers: Mapping[str, np.ndarray] | None = None,
    scatter: str = "nd",
    pretransposed: bool = True,
    opset: int = DEFAULT_OPSET,
) -> onnx.ModelProto:
    """The MoE layer in standard ONNX ops, one block per expert, as exporters write it.

    Per expert e: mask = Equal(indices, e); (tok, slot) = NonZero(mask); rows = Gather(X, tok);
    a = rows @ W_in[e]^T (+ b_in[e]); h = act(...); o = h @ W_out[e]^T (+ b_out[e]);
    Y = Scatter{ND,Elements}(Y, tok, o * routing_weights[tok, slot], reduction='add').
    Float inputs are rounded to `dtype` first (Cast f32 -> T -> f32); compute is float32.
    `scatter`: 'nd' (index_add_ exported as ScatterND) or 'elements' (ScatterElements).
    `pretransposed`: with weight initializers, store each expert's [in, out] matrix as its own
    initializer as torch.onnx does for nn.Linear (otherwise Gather + Transpose per expert).
    """
    n = 2 * f if gated else f
    x_shape = list(x_shape) if x_shape is not None else ["T", d]
    routing_shape = list(routing_shape) if routing_shape is not None else ["T", k]
    b = _Builder()
    gin: list = []
    inits = dict(initializers or {})

    def float_in(name, shape):
        _add_float_source(b, gin, name, shape, inits)
        return b.round_to(name, dtype)

    x = float_in("X", x_shape)
    rw = float_in("routing_weights", routing_shape)
    gin.append(_vi("routing_indices", INDEX_ELEM[index_dtype], routing_shape))
    ri = "routing_indices" if index_dtype == "int64" else b.op("Cast", ["routing_indices"], "ri64", to=TensorProto.INT64)

    # per-expert weights: pre-transposed, per-expert initializers (f32 initializer case), or sliced
    # out of [E, ...] tensors at run time.
    needed = ["w_in", "w_out"] + (["b_in"] if b_in else []) + (["b_out"] if b_out else [])
    split_weights = pretransposed and dtype == "f32" and all(nm in inits for nm in needed)
    if split_weights:
        w_in_a = np.asarray(inits["w_in"], np.float32)
        w_out_a = np.asarray(inits["w_out"], np.float32)
        b_in_a = np.asarray(inits["b_in"], np.float32) if b_in else None
        b_out_a = np.asarray(inits["b_out"], np.float32) if b_out else None
    else:
        w_in = float_in("w_in", [E, n, d])
        w_out = float_in("w_out", [E, d, f])
        bi = float_in("b_in", [E, n]) if b_in else None
        bo = float_in("b_out", [E, d]) if b_out else None

    x2 = b.op("Reshape", [x, b.const([-1, d], np.int64)], "x2")
    ri2 = b.op("Reshape", [ri, b.const([-1, k], np.int64)], "ri2")
    rw2 = b.op("Reshape", [rw, b.const([-1, k], np.int64)], "rw2")
    y = b.op("ConstantOfShape", [b.op("Shape", [x2])], "y0", value=helper.make_tensor("z", TensorProto.FLOAT, [1], [0.0]))
    zero_i = b.const(0, np.int64)
    ax1 = b.const([1], np.int64)
    for e in range(E):
        mask = b.op("Equal", [ri2, b.const(e, np.int64)], f"mask{e}")
        nz = b.op("NonZero", [mask], f"nz{e}")  # [2, N]
        tok = b.op("Gather", [nz, zero_i], f"tok{e}", axis=0)  # [N]
        rows = b.op("Gather", [x2, tok], f"rows{e}", axis=0)  # [N, d]
        wsel = b.op("GatherND", [rw2, b.op("Transpose", [nz], perm=[1, 0])], f"w{e}")  # [N]
        if split_weights:
            a = b.op("MatMul", [rows, b.const(w_in_a[e].T.copy(), hint=f"w_in_T{e}")], f"a{e}")
            if b_in:
                a = b.op("Add", [a, b.const(b_in_a[e], hint=f"b_in{e}")])
        else:
            ei = b.const(e, np.int64)
            wi = b.op("Transpose", [b.op("Gather", [w_in, ei], axis=0)], perm=[1, 0])
            a = b.op("MatMul", [rows, wi], f"a{e}")
            if b_in:
                a = b.op("Add", [a, b.op("Gather", [bi, ei], axis=0)])
        h = hidden(b, a, f=f, gated=gated, activation=activation, glu_layout=glu_layout, alpha=alpha, limit=limit)
        if split_weights:
            o = b.op("MatMul", [h, b.const(w_out_a[e].T.copy(), hint=f"w_out_T{e}")], f"o{e}")
            if b_out:
                o = b.op("Add", [o, b.const(b_out_a[e], hint=f"b_out{e}")])
        else:
            wo = b.op("Transpose", [b.op("Gather", [w_out, ei], axis=0)], perm=[1, 0])
            o = b.op("MatMul", [h, wo], f"o{e}")
            if b_out:
                o = b.op("Add", [o, b.op("Gather", [bo, ei], axis=0)])
        contrib = b.op("Mul", [o, b.op("Unsqueeze", [wsel, ax1])], f"c{e}")
        tok_col = b.op("Unsqueeze", [tok, ax1])  # [N, 1]
        if scatter == "nd":
            y = b.op("ScatterND", [y, tok_col, contrib], f"y{e + 1}", reduction="add")
        elif scatter == "elements":
            idx = b.op("Expand", [tok_col, b.op("Shape", [contrib])])
            y = b.op("ScatterElements", [y, idx, contrib], f"y{e + 1}", axis=0, reduction="add")
        else:
            raise ValueError(f"scatter {scatter!r}")
    b.nodes.append(helper.make_node("Reshape", [y, b.op("Shape", [x])], ["Y"], name="reshape_Y"))
    return _finish(b.nodes, gin, [_vi("Y", TensorProto.FLOAT, None)], b.inits, "moe_loop", opset, custom=False)


# ---------------------------------------------------------------------------------------------
# Composition: ScatterMoE = PL(grouped_out=1) -> act -> PL(grouped_in=1, gates)
# ---------------------------------------------------------------------------------------------


def composed_moe_model(
    *,
    d: int,
    f: int,
    E: int,
    k: int,
    dtype: str = "f32",
    index_dtype: str = "int64",
    gated: int = 1,
    activation: str = "silu",
    glu_layout: str = "gate_up",
    alpha: float = 1.702,
    limit: float = 7.0,
    b_in: bool = False,
    b_out: bool = False,
    opset: int = DEFAULT_OPSET,
) -> onnx.ModelProto:
    """One model, two outputs: Y_moe from a ScatterMoE node, Y_pl from the ParallelLinear chain
    PL(w_in, b_in, grouped_out=1) -> activation (float32, standard ops) -> PL(w_out, b_out,
    grouped_in=1, gates=routing_weights). Both compute in `dtype`."""
    n = 2 * f if gated else f
    b = _Builder()
    t = ELEM[dtype]
    gin = [
        _vi("X", TensorProto.FLOAT, ["T", d]),
        _vi("routing_weights", TensorProto.FLOAT, ["T", k]),
        _vi("routing_indices", INDEX_ELEM[index_dtype], ["T", k]),
        _vi("w_in", TensorProto.FLOAT, [E, n, d]),
        _vi("w_out", TensorProto.FLOAT, [E, d, f]),
    ]
    if b_in:
        gin.append(_vi("b_in", TensorProto.FLOAT, [E, n]))
    if b_out:
        gin.append(_vi("b_out", TensorProto.FLOAT, [E, d]))

    def cast_t(nm):
        return nm if dtype == "f32" else b.op("Cast", [nm], nm + "_t", to=t)

    X, rw, wi, wo = cast_t("X"), cast_t("routing_weights"), cast_t("w_in"), cast_t("w_out")
    bi = cast_t("b_in") if b_in else ""
    bo = cast_t("b_out") if b_out else ""
    attrs = dict(activation=activation, gated=gated, glu_layout=glu_layout, alpha=alpha, limit=limit)
    moe_in = [X, rw, "routing_indices", wi, wo, bi, bo]
    while moe_in[-1] == "":
        moe_in.pop()
    y_moe = b.op("ScatterMoE", moe_in, "y_moe_t", domain=DOMAIN, **attrs)
    a = b.op("ParallelLinear", [X, "routing_indices", wi] + ([bi] if b_in else []), "a_grouped", domain=DOMAIN, grouped_out=1)
    a32 = a if dtype == "f32" else b.op("Cast", [a], to=TensorProto.FLOAT)
    h32 = hidden(b, a32, f=f, gated=gated, activation=activation, glu_layout=glu_layout, alpha=alpha, limit=limit)
    h = h32 if dtype == "f32" else b.op("Cast", [h32], to=t)
    y_pl = b.op("ParallelLinear", [h, "routing_indices", wo, bo, rw], "y_pl_t", domain=DOMAIN, grouped_in=1)
    b.nodes.append(helper.make_node("Cast", [y_moe], ["Y_moe"], to=TensorProto.FLOAT))
    b.nodes.append(helper.make_node("Cast", [y_pl], ["Y_pl"], to=TensorProto.FLOAT))
    outs = [_vi("Y_moe", TensorProto.FLOAT, None), _vi("Y_pl", TensorProto.FLOAT, None)]
    return _finish(b.nodes, gin, outs, b.inits, "composed_moe", opset)


def stacked_moe_model(
    *,
    d: int,
    f: int,
    E: int,
    k: int,
    layers: int = 2,
    dtype: str = "f32",
    x_shape: Sequence | None = None,
    routing_shape: Sequence | None = None,
    opset: int = DEFAULT_OPSET,
) -> onnx.ModelProto:
    """`layers` ScatterMoE nodes stacked with residual adds, as in a transformer:
    H_0 = X, H_{i+1} = H_i + ScatterMoE(H_i, routing_weights, routing_indices, w_in[i], w_out[i]).
    Every layer shares the routing (the test feeds one); weights are graph inputs w_in_i / w_out_i.
    A node's X is another node's output, so its shape is known only through shape inference."""
    x_shape = list(x_shape) if x_shape is not None else ["T", d]
    routing_shape = list(routing_shape) if routing_shape is not None else ["T", k]
    b = _Builder()
    t = ELEM[dtype]

    def cast_t(nm):
        return nm if dtype == "f32" else b.op("Cast", [nm], nm + "_t", to=t)

    gin = [_vi("X", TensorProto.FLOAT, x_shape), _vi("routing_weights", TensorProto.FLOAT, routing_shape),
           _vi("routing_indices", TensorProto.INT64, routing_shape)]
    h, rw = cast_t("X"), cast_t("routing_weights")
    for i in range(layers):
        gin += [_vi(f"w_in_{i}", TensorProto.FLOAT, [E, 2 * f, d]), _vi(f"w_out_{i}", TensorProto.FLOAT, [E, d, f])]
        y = b.op("ScatterMoE", [h, rw, "routing_indices", cast_t(f"w_in_{i}"), cast_t(f"w_out_{i}")], f"moe{i}",
                 domain=DOMAIN)
        h = b.op("Add", [h, y], f"h{i + 1}")
    b.nodes.append(helper.make_node("Cast", [h], ["Y"], to=TensorProto.FLOAT))
    return _finish(b.nodes, gin, [_vi("Y", TensorProto.FLOAT, None)], b.inits, "stacked_moe", opset)


def topk_router_model(*, E: int, k: int, dtype: str = "f32", rank: int = 2, opset: int = DEFAULT_OPSET, **attrs):
    """One TopKRouter node: graph input `logits` float32 [.., E] Cast to `dtype`; outputs
    `routing_weights` (Cast back to float32) and `routing_indices` (int64)."""
    b = _Builder()
    et = elem_type(dtype)
    shape = [f"d{i}" for i in range(rank - 1)] + [E]
    gin = [_vi("logits", TensorProto.FLOAT, shape)]
    x = "logits"
    if et != TensorProto.FLOAT:
        x = "logits_t"
        b.nodes.append(helper.make_node("Cast", ["logits"], [x], to=et))
    w = "routing_weights" if et == TensorProto.FLOAT else "routing_weights_t"
    b.nodes.append(helper.make_node("TopKRouter", [x], [w, "routing_indices"], domain=DOMAIN, k=k, **_attr_dict(**attrs)))
    if w != "routing_weights":
        b.nodes.append(helper.make_node("Cast", [w], ["routing_weights"], to=TensorProto.FLOAT))
    outs = [_vi("routing_weights", TensorProto.FLOAT, None), _vi("routing_indices", TensorProto.INT64, None)]
    return _finish(b.nodes, gin, outs, b.inits, "topk_router", opset)


def router_graph_model(*, E: int, k: int, dtype: str = "f32", scoring: str = "softmax", normalize: int = 0,
                       tie_break: str = "lower_index", opset: int = DEFAULT_OPSET):
    """The router TopKRouter stands for, in standard ONNX ops, as exporters and the rewriter write
    it: logits float32 [T, E] Cast to `dtype` and to float32, Softmax / Sigmoid, TopK (over the
    experts reversed for tie_break = higher_index), [ReduceSum, Div,] Cast to `dtype`; outputs as
    ``topk_router_model``'s. An independent, ORT-computed reference."""
    b = _Builder()
    et = elem_type(dtype)
    gin = [_vi("logits", TensorProto.FLOAT, ["T", E])]
    nodes = b.nodes
    nodes.append(helper.make_node("Cast", ["logits"], ["lt"], to=et))
    nodes.append(helper.make_node("Cast", ["lt"], ["l32"], to=TensorProto.FLOAT))
    score = {"softmax": "Softmax", "sigmoid": "Sigmoid", "topk_softmax": "Identity", "identity": "Identity"}[scoring]
    nodes.append(helper.make_node(score, ["l32"], ["s"], **({"axis": -1} if score == "Softmax" else {})))
    init = lambda n, v: b.inits.append(numpy_helper.from_array(np.array(v, np.int64), n))  # noqa: E731
    init("k", [k])
    src = "s"
    if tie_break == "higher_index":
        for n, v in [("st", [-1]), ("en", [-(2**63)]), ("ax", [1]), ("sp", [-1])]:
            init(n, v)
        nodes.append(helper.make_node("Slice", ["s", "st", "en", "ax", "sp"], ["s_rev"]))
        src = "s_rev"
    nodes.append(helper.make_node("TopK", [src, "k"], ["v", "i_raw"], axis=-1, largest=1, sorted=1))
    if tie_break == "higher_index":
        init("last", [E - 1])
        nodes.append(helper.make_node("Sub", ["last", "i_raw"], ["routing_indices"]))
    else:
        nodes.append(helper.make_node("Identity", ["i_raw"], ["routing_indices"]))
    w = "v"
    if scoring == "topk_softmax":
        nodes.append(helper.make_node("Softmax", ["v"], ["v_sm"], axis=-1))
        w = "v_sm"
    if normalize:
        init("axes", [-1])
        nodes.append(helper.make_node("ReduceSum", [w, "axes"], ["sum"], keepdims=1))
        nodes.append(helper.make_node("Div", [w, "sum"], ["w_n"]))
        w = "w_n"
    nodes.append(helper.make_node("Cast", [w], ["w_t"], to=et))
    nodes.append(helper.make_node("Cast", ["w_t"], ["routing_weights"], to=TensorProto.FLOAT))
    outs = [_vi("routing_weights", TensorProto.FLOAT, None), _vi("routing_indices", TensorProto.INT64, None)]
    return _finish(nodes, gin, outs, b.inits, "router_graph", opset, custom=False)
