"""Quantized expert weights (docs/op-spec.md, "Quantized expert weights") for the op tests: random
quantized weights, their float64 values from the spec's formula, and one-node models that take them.

A weight is a ``QWeight``: codes as stored (uint8 bytes; fp8 codes are e4m3fn bit patterns, 4-bit
codes packed two a byte along ``in``), one scale per block (rounded to the scale's element type),
optional zero points. ``dequantize`` evaluates ``(q - z) * s`` in float64; fp8 codes are decoded
by ml_dtypes (independent of the Rust decoder).
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
from onnx import TensorProto, helper

from . import graphs
from .reference import round_to

FP8 = TensorProto.FLOAT8E4M3FN
UINT8 = TensorProto.UINT8

# format -> (ONNX element type, weight_bits, default zero point, code range for scaling)
FORMATS = {"fp8": (FP8, 8, 0, 100.0), "int8": (UINT8, 8, 128, 128.0), "int4": (UINT8, 4, 8, 8.0)}


@dataclass
class QWeight:
    fmt: str  # fp8 / int8 / int4
    block: tuple | None  # None: per output channel (rank-2 scale); (block_out, block_in)
    codes: np.ndarray  # uint8 [E, out, in] or [E, out, ceil(in / 2)]
    scale: np.ndarray  # float32 values, rounded to scale_dtype
    scale_dtype: str  # "f32" or T
    zero_point: np.ndarray | None  # uint8, the scale's shape
    shape: tuple  # logical [E, out, in]

    @property
    def elem(self) -> int:
        return FORMATS[self.fmt][0]

    @property
    def bits(self) -> int:
        return FORMATS[self.fmt][1]


def scale_shape(block, E, out, inn):
    return (E, out) if block is None else (E, -(-out // block[0]), -(-inn // block[1]))


def random_weight(rng, fmt, block, E, out, inn, mag, scale_dtype="f32", zero_point=False) -> QWeight:
    """Random codes (every finite fp8 code; both nibbles of a 4-bit byte, the padding one too) and
    scales of about ``mag / range`` so values are about ``mag``."""
    stored = -(-inn // 2) if fmt == "int4" else inn
    codes = rng.integers(0, 256, size=(E, out, stored), dtype=np.uint8)
    if fmt == "fp8":
        codes[(codes & 0x7F) == 0x7F] ^= 0x08  # NaN codes -> +-256
    sshape = scale_shape(block, E, out, inn)
    scale = round_to(rng.uniform(0.5, 1.5, size=sshape) * mag / FORMATS[fmt][3], scale_dtype)
    zp = None
    if zero_point:
        zp = rng.integers(0, 16, size=sshape, dtype=np.uint8) if fmt == "int4" else rng.integers(96, 160, size=sshape, dtype=np.uint8)
    return QWeight(fmt, block, codes, scale, scale_dtype, zp, (E, out, inn))


def codes_of(w: QWeight) -> np.ndarray:
    """The unpacked codes q [E, out, in] as float64 (fp8: their values)."""
    E, out, inn = w.shape
    if w.fmt == "fp8":
        return w.codes.view(ml_dtypes.float8_e4m3fn).astype(np.float64)
    if w.fmt == "int8":
        return w.codes.astype(np.float64)
    q = np.empty((E, out, 2 * w.codes.shape[2]), np.float64)
    q[..., 0::2] = w.codes & 0x0F
    q[..., 1::2] = w.codes >> 4
    return q[..., :inn]


def dequantize(w: QWeight) -> np.ndarray:
    """W[e, o, i] = (q - z) * s in float64, s and z those of the block holding (o, i)."""
    E, out, inn = w.shape
    s = w.scale.astype(np.float64)
    z = np.full(s.shape, FORMATS[w.fmt][2], np.float64) if w.zero_point is None else w.zero_point.astype(np.float64)
    if w.fmt == "fp8":
        z = np.zeros(s.shape)
    if w.block is None:
        s_full, z_full = s[:, :, None], z[:, :, None]
    else:
        bo, bi = w.block
        rows, cols = np.arange(out) // bo, np.arange(inn) // bi
        s_full, z_full = s[:, rows][:, :, cols], z[:, rows][:, :, cols]
    return (codes_of(w) - z_full) * s_full


def _raw_tensor(name: str, elem: int, arr: np.ndarray):
    return helper.make_tensor(name, elem, list(arr.shape), vals=np.ascontiguousarray(arr).tobytes(), raw=True)


def float_tensor(name: str, values: np.ndarray, dtype: str):
    """An initializer of element type `dtype` (f32 / f16 / bf16) holding `values`."""
    np_t = {"f32": np.float32, "f16": np.float16, "bf16": ml_dtypes.bfloat16}[dtype]
    return _raw_tensor(name, graphs.ELEM[dtype], np.asarray(values, np.float32).astype(np_t))


def weight_tensors(prefix: str, w: QWeight):
    """Initializers for a quantized weight: codes, scale and (when given) zero point."""
    out = [_raw_tensor(prefix, w.elem, w.codes), float_tensor(prefix + "_scale", w.scale, w.scale_dtype)]
    if w.zero_point is not None:
        out.append(_raw_tensor(prefix + "_zero_point", UINT8, w.zero_point))
    return out


def one_node_model(op: str, float_inputs: list, weights: dict, dtype: str, attrs: dict, port_names: list, extra_inits=()):
    """One `op` node of type `dtype`: `float_inputs` (name, shape) are float32 graph inputs cast to
    T; `weights` maps a weight port to a QWeight (initializers), a float32 array (a T initializer)
    or "input:<elem>" (a graph input of that ONNX element type; its scale and zero point too);
    ``routing_indices`` is an int64 graph input. `port_names` lists the node's inputs by position
    ("" for absent); a weight port `w`'s scale is `w + "_scale"`, its zero point
    `w + "_zero_point"`."""
    nodes, gin, inits = [], [], list(extra_inits)
    t = graphs.ELEM[dtype]
    present = set()
    for name, shape in float_inputs:
        # a rank left unknown would leave ONNX Runtime's type inference to pick T (the ops set the
        # output type from their inputs only where X's rank is known)
        shape = shape if shape is not None else [f"{name}_rows", f"{name}_cols"]
        gin.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
        if dtype != "f32":
            nodes.append(helper.make_node("Cast", [name], [name + "_t"], to=t))
        present.add(name)
    gin.append(helper.make_tensor_value_info("routing_indices", TensorProto.INT64, ["T", "K"]))
    present.add("routing_indices")
    for port, w in weights.items():
        present.add(port)
        if isinstance(w, QWeight):
            inits.extend(weight_tensors(port, w))
            present.add(port + "_scale")
            if w.zero_point is not None:
                present.add(port + "_zero_point")
        elif isinstance(w, tuple):  # ("input", QWeight): codes, scale, zero point as graph inputs
            qw = w[1]
            gin.append(helper.make_tensor_value_info(port, qw.elem, list(qw.codes.shape)))
            gin.append(helper.make_tensor_value_info(port + "_scale", graphs.ELEM[qw.scale_dtype], list(qw.scale.shape)))
            present.add(port + "_scale")
            if qw.zero_point is not None:
                gin.append(helper.make_tensor_value_info(port + "_zero_point", UINT8, list(qw.zero_point.shape)))
                present.add(port + "_zero_point")
        else:
            inits.append(float_tensor(port, w, dtype))
    names = []
    for p in port_names:
        if p not in present:
            names.append("")
        elif dtype != "f32" and any(p == n for n, _ in float_inputs):
            names.append(p + "_t")
        else:
            names.append(p)
    while names and names[-1] == "":
        names.pop()
    y = "Y" if dtype == "f32" else "Y_t"
    nodes.append(helper.make_node(op, names, [y], name=op.lower(), domain=graphs.DOMAIN, **attrs))
    if dtype != "f32":
        nodes.append(helper.make_node("Cast", ["Y_t"], ["Y"], to=TensorProto.FLOAT))
    return graphs._finish(nodes, gin, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits, op, graphs.DEFAULT_OPSET)


MOE_PORTS = ["X", "routing_weights", "routing_indices", "w_in", "w_out", "b_in", "b_out", "capacity",
             "w_in_scale", "w_out_scale", "w_in_zero_point", "w_out_zero_point"]
LINEAR_PORTS = ["X", "routing_indices", "W", "b", "gates", "W_scale", "W_zero_point"]


def quant_attrs(*weights) -> dict:
    """weight_bits and block_size as the node's quantized weights need them (all alike)."""
    attrs = {}
    for w in weights:
        w = w[1] if isinstance(w, tuple) else w
        if isinstance(w, QWeight):
            if w.fmt == "int4":
                attrs["weight_bits"] = 4
            if w.block is not None:
                attrs["block_size"] = list(w.block)
    return attrs
