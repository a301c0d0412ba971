"""Quantized variants of the rewriter's fixtures: each expert weight initializer W becomes
`DequantizeLinear(codes, scale[, zero_point])` with the same output name, so that the graph's
products read the dequantized weight where they read W.

    python -m scattermoe_testing.qdq IN.onnx OUT.onnx --code int4 --layout block_in --block 16 [--zero]

A scheme is the code type (int8, uint8, int4, uint4, fp8), the scale's layout and whether zero
points are given:
- `tensor`: one scale for the whole initializer;
- `channel`: per axis along the weight's output channel (a stack's scale is then shared by its
  experts: DequantizeLinear's per-axis scale is 1-D);
- `expert`: per axis along a stack's expert axis (one scale per expert);
- `row`: blocked along the input axis with one block of the whole row (one scale per expert and
  output channel);
- `block_in` / `block_out`: blocked (opset 21) along the input / output axis, `block` codes a block;
- `in_channel`: per axis along the input channel (a layout the rewriter leaves).

Which initializers are expert weights, and which of their axes is the output, the input and the
expert axis, is read from the graph: an initializer of rank 2 or 3 is followed to the products that
read it (through Gather/GatherND of an expert, Transpose, Cast, Identity, Squeeze, Unsqueeze), a
MatMul (as either operand), a Gemm (transB) or an Einsum (the label shared with the other operand
and summed is the input, the one kept is the output, the one both keep the expert). A weight whose
product feeds a TopK or ArgMax within a few steps is the router and is left in float. The codes are
quantized from the weight's values here (round to nearest, symmetric scales from the block's
largest magnitude, zero points drawn at random when asked), in float64 (fp8: ml_dtypes' rounding).

`quantize_matmul_nbits_qdq` runs onnxruntime.quantization's MatMulNBitsQuantizer in QDQ format
(4-bit, blocked along the input of rank-2 MatMul weights): the form ONNX Runtime's own tool writes.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CODES = {"int8": (TensorProto.INT8, -128, 127), "uint8": (TensorProto.UINT8, 0, 255), "int4": (TensorProto.INT4, -8, 7),
         "uint4": (TensorProto.UINT4, 0, 15), "fp8": (TensorProto.FLOAT8E4M3FN, -448.0, 448.0)}
LAYOUTS = ("tensor", "channel", "expert", "row", "block_in", "block_out", "in_channel")


@dataclass(frozen=True)
class Scheme:
    code: str = "int8"
    layout: str = "channel"
    block: int = 16
    zero: bool = False

    @property
    def id(self) -> str:
        b = f"{self.block}" if self.layout in ("block_in", "block_out") else ""
        return f"{self.code}-{self.layout}{b}{'-zp' if self.zero else ''}"


@dataclass
class Weight:
    name: str
    out_axis: int
    in_axis: int
    expert_axis: int | None


def _consumers(g):
    cons = {}
    for n in g.node:
        for i in n.input:
            cons.setdefault(i, []).append(n)
    return cons


def _attr(n, name, default=None):
    for a in n.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _const_ints(g, name):
    for t in g.initializer:
        if t.name == name:
            return [int(v) for v in numpy_helper.to_array(t).reshape(-1)]
    for n in g.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return [int(v) for v in numpy_helper.to_array(_attr(n, "value")).reshape(-1)]
    return None


def _feeds_router(cons, v, depth=0):
    if depth > 4:
        return False
    for n in cons.get(v, []):
        if n.op_type in ("TopK", "ArgMax"):
            return True
        if n.op_type in ("Softmax", "Sigmoid", "Cast", "Add", "Identity", "Reshape", "Div", "Mul") and _feeds_router(cons, n.output[0], depth + 1):
            return True
    return False


def _roles(g, cons, v, amap, depth=0):
    """(out, in, expert) axes of the initializer, read at the first product `v` reaches; `amap`
    maps v's axes to the initializer's (None: an axis the initializer does not have)."""
    if depth > 8:
        return None
    for n in cons.get(v, []):
        op = n.op_type
        if op in ("Cast", "Identity"):
            r = _roles(g, cons, n.output[0], amap, depth + 1)
        elif op == "Transpose":
            perm = _attr(n, "perm") or list(range(len(amap)))[::-1]
            r = _roles(g, cons, n.output[0], [amap[p] for p in perm], depth + 1)
        elif op == "Gather" and n.input[0] == v and (_attr(n, "axis", 0) == 0):
            rank = _rank(g, n.output[0])
            rank_idx = 0 if _is_scalar(g, n.input[1]) else 1 if rank is None else rank - (len(amap) - 1)
            r = _with_expert(_roles(g, cons, n.output[0], [None] * rank_idx + amap[1:], depth + 1), amap[0])
        elif op == "GatherND" and n.input[0] == v:
            r = _with_expert(_roles(g, cons, n.output[0], [None] + amap[1:], depth + 1), amap[0])
        elif op == "Squeeze":
            axes = _const_ints(g, n.input[1]) if len(n.input) > 1 else _attr(n, "axes")
            axes = [a % len(amap) for a in axes]
            r = _roles(g, cons, n.output[0], [a for j, a in enumerate(amap) if j not in axes], depth + 1)
        elif op == "Unsqueeze":
            axes = _const_ints(g, n.input[1]) if len(n.input) > 1 else _attr(n, "axes")
            m = list(amap)
            for a in sorted(x % (len(amap) + len(axes)) for x in axes):
                m.insert(a, None)
            r = _roles(g, cons, n.output[0], m, depth + 1)
        elif op == "MatMul":
            if _feeds_router(cons, n.output[0]):
                return "router"
            q = len(amap)
            if n.input[1] == v:
                r = (amap[q - 1], amap[q - 2], amap[0] if q == 3 else None)
            else:
                r = (amap[q - 2], amap[q - 1], amap[0] if q == 3 else None)
        elif op == "Gemm" and n.input[1] == v:
            if _feeds_router(cons, n.output[0]):
                return "router"
            r = (amap[0], amap[1], None) if _attr(n, "transB", 0) else (amap[1], amap[0], None)
        elif op == "Einsum":
            eq = _attr(n, "equation").decode().replace(" ", "")
            lhs, out = eq.split("->")
            terms = lhs.split(",")
            j = list(n.input).index(v)
            mine, other = terms[j], terms[1 - j]
            o = [c for c in mine if c in out and c not in other]
            i = [c for c in mine if c in other and c not in out]
            e = [c for c in mine if c in other and c in out]
            if len(o) == 2 and not e and len(mine) == 3 and mine[0] in o:
                # a stack applied to shared rows: its first axis is the experts'
                e, o = [mine[0]], [c for c in o if c != mine[0]]
            if len(o) != 1 or len(i) != 1:
                return None
            r = (amap[mine.index(o[0])], amap[mine.index(i[0])], amap[mine.index(e[0])] if e else None)
        else:
            continue
        if r is not None:
            return r
    return None


def _rank(g, name):
    for vi in list(g.value_info) + list(g.output) + list(g.input):
        if vi.name == name and vi.type.tensor_type.HasField("shape"):
            return len(vi.type.tensor_type.shape.dim)
    return None


def _is_scalar(g, name):
    for t in g.initializer:
        if t.name == name:
            return len(t.dims) == 0
    for n in g.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return len(_attr(n, "value").dims) == 0
    return False


def _with_expert(r, axis):
    if r is None or r == "router":
        return r
    o, i, e = r
    return (o, i, e if e is not None else axis)


def expert_weights(m: onnx.ModelProto) -> list[Weight]:
    """The expert weight initializers of `m` with their axes (the router's weight excluded)."""
    try:
        g = onnx.shape_inference.infer_shapes(m).graph
    except Exception:  # noqa: BLE001 - ranks are a help, not a need
        g = m.graph
    cons = _consumers(g)
    out = []
    for t in g.initializer:
        if t.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16) or len(t.dims) not in (2, 3):
            continue
        r = _roles(g, cons, t.name, list(range(len(t.dims))))
        if r is None or r == "router" or r[0] is None or r[1] is None:
            continue
        o, i, e = r
        if len(t.dims) == 3 and e is None:
            e = ({0, 1, 2} - {o, i}).pop()
        out.append(Weight(t.name, o, i, e if len(t.dims) == 3 else None))
    return out


def _blocks(a: np.ndarray, axis: int, block: int, fn):
    """fn over blocks of `block` along `axis`, broadcast back to a's shape; and the per-block values."""
    n = a.shape[axis]
    nb = -(-n // block)
    pad = nb * block - n
    ap = np.moveaxis(a, axis, -1)
    if pad:
        ap = np.concatenate([ap, np.repeat(ap[..., -1:], pad, -1)], -1)
    per = fn(ap.reshape(ap.shape[:-1] + (nb, block)), -1)  # [..., nb]
    full = np.repeat(per, block, -1)[..., :n]
    return np.moveaxis(full, -1, axis), np.moveaxis(per, -1, axis)


def quantize_weight(w: np.ndarray, wt: Weight, s: Scheme, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, dict]:
    """(codes, scale, zero point, DequantizeLinear attributes) of `w` under scheme `s`."""
    _, lo, hi = CODES[s.code]
    w = w.astype(np.float64)
    amax = lambda x, ax: np.maximum(np.abs(x).max(axis=ax), 1e-8)  # noqa: E731
    attrs: dict = {}
    if s.layout == "tensor":
        full = per = np.array(amax(w, None))
    elif s.layout in ("channel", "expert", "in_channel"):
        ax = {"channel": wt.out_axis, "expert": wt.expert_axis, "in_channel": wt.in_axis}[s.layout]
        if ax is None:
            raise ValueError(f"{wt.name}: no {s.layout} axis")
        others = tuple(j for j in range(w.ndim) if j != ax)
        per = amax(w, others)
        full = np.expand_dims(per, others)
        attrs["axis"] = ax
    else:
        ax = wt.out_axis if s.layout == "block_out" else wt.in_axis
        block = w.shape[ax] if s.layout == "row" else s.block
        full, per = _blocks(w, ax, block, lambda x, a: amax(x, a))
        attrs.update(axis=ax, block_size=block)
    qmax = 448.0 if s.code == "fp8" else float(hi if lo < 0 else (hi - lo) // 2)
    scale_per = per / qmax
    scale_full = full / qmax
    zero_per = zero_full = None
    if s.zero and s.code != "fp8":
        center = 0 if lo < 0 else (hi + 1) // 2
        spread = max(1, (hi - lo) // 16)
        zero_per = center + rng.integers(-spread, spread + 1, np.shape(per))
        zero_full = _expand_like(zero_per, scale_per, scale_full, attrs, w)
    if s.code == "fp8":
        import ml_dtypes

        codes = (w / scale_full).astype(ml_dtypes.float8_e4m3fn)
        return codes, scale_per, None, attrs
    z = 0 if zero_full is None else zero_full
    if lo >= 0 and zero_full is None:
        # unsigned codes without a zero point hold values >= 0 only: the fixture's weights become
        # their magnitudes (a valid quantized model all the same; its reference is itself)
        q = np.clip(np.round(np.abs(w) / scale_full), lo, hi)
    else:
        q = np.clip(np.round(w / scale_full) + z, lo, hi)
    import ml_dtypes

    dt = {"int8": np.int8, "uint8": np.uint8, "int4": ml_dtypes.int4, "uint4": ml_dtypes.uint4}[s.code]
    zp = None if zero_per is None else np.asarray(zero_per).astype(dt)
    return q.astype(np.int64).astype(dt), scale_per, zp, attrs


def _expand_like(per, scale_per, scale_full, attrs, w):
    """Zero points per block broadcast to the weight's shape, as the scale is."""
    if "block_size" in attrs:
        ax, b = attrs["axis"], attrs["block_size"]
        return np.moveaxis(np.repeat(np.moveaxis(per, ax, -1), b, -1)[..., : w.shape[ax]], -1, ax)
    if "axis" in attrs:
        ax = attrs["axis"]
        others = tuple(j for j in range(w.ndim) if j != ax)
        return np.expand_dims(per, others)
    return per


def quantize_model(m: onnx.ModelProto, s: Scheme, seed: int = 0, only: list[str] | None = None) -> onnx.ModelProto:
    """A copy of `m` with its expert weights dequantized from codes under scheme `s` (opset raised
    to what DequantizeLinear needs: 21 for int4/uint4 and blocks, 19 for fp8, else 13)."""
    m = onnx.ModelProto.FromString(m.SerializeToString())
    rng = np.random.default_rng(seed)
    weights = [w for w in expert_weights(m) if only is None or w.name in only]
    if not weights:
        raise ValueError("no expert weights found")
    half = any(t.data_type != TensorProto.FLOAT for t in m.graph.initializer if t.name in {w.name for w in weights})
    need = 21 if (s.code in ("int4", "uint4") or s.layout in ("block_in", "block_out", "row")) else 19 if (s.code == "fp8" or half) else 13
    m = raise_opset(m, need)
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    nodes = []
    for wt in weights:
        t = inits[wt.name]
        w = numpy_helper.to_array(t)
        ftype = t.data_type
        # a weight without an expert axis (one matrix per expert) takes one scale where a stack
        # takes one per expert
        ws = Scheme(s.code, "tensor", s.block, s.zero) if s.layout == "expert" and wt.expert_axis is None else s
        codes, scale, zp, attrs = quantize_weight(np.asarray(w, np.float64), wt, ws, rng)
        sdt = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}.get(ftype, np.float32)
        names = [f"{wt.name}_codes", f"{wt.name}_scale"] + ([f"{wt.name}_zero_point"] if zp is not None else [])
        new = [numpy_helper.from_array(codes, names[0]), numpy_helper.from_array(np.asarray(scale, sdt), names[1])]
        if zp is not None:
            new.append(numpy_helper.from_array(zp, names[2]))
        g.initializer.remove(t)
        g.initializer.extend(new)
        nodes.append(helper.make_node("DequantizeLinear", names, [wt.name], name=f"{wt.name}_DequantizeLinear", **attrs))
    for n in reversed(nodes):
        g.node.insert(0, n)
    return m


def raise_opset(m: onnx.ModelProto, version: int) -> onnx.ModelProto:
    """`m` at default-domain opset `version` at least (ONNX's version converter, which rewrites the
    attributes that became inputs, e.g. ReduceMax's axes at 18)."""
    cur = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), version)
    if cur >= version:
        return m
    from onnx import version_converter

    out = version_converter.convert_version(m, version)
    out.ir_version = max(out.ir_version, 10 if version >= 21 else 9)
    # the converter's shape inference adds declarations the exporter did not write (with the
    # traced length where the graph computes another): keep the exporter's own
    del out.graph.value_info[:]
    out.graph.value_info.extend(m.graph.value_info)
    return out


def quantize_matmul_nbits_qdq(m: onnx.ModelProto, block: int = 16, symmetric: bool = True) -> onnx.ModelProto:
    """ONNX Runtime's MatMulNBitsQuantizer in QDQ format: every rank-2 MatMul weight (the router's
    too) becomes DequantizeLinear of int4 (symmetric) or uint4 codes blocked along its input."""
    import logging

    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.ERROR)
    cfg = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=symmetric, quant_format=QuantFormat.QDQ, bits=4, op_types_to_quantize=("MatMul",))
    # the quantizer sets opset 21 without converting the graph: convert it first
    q = MatMulNBitsQuantizer(raise_opset(onnx.ModelProto.FromString(m.SerializeToString()), 21), algo_config=cfg)
    q.process()
    return q.model.model


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--code", choices=CODES, default="int8")
    ap.add_argument("--layout", choices=LAYOUTS, default="channel")
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--zero", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nbits-qdq", action="store_true", help="onnxruntime.quantization's MatMulNBits QDQ instead")
    a = ap.parse_args()
    m = onnx.load(a.src)
    q = quantize_matmul_nbits_qdq(m, a.block) if a.nbits_qdq else quantize_model(m, Scheme(a.code, a.layout, a.block, a.zero), a.seed)
    onnx.save(q, a.dst)


if __name__ == "__main__":
    main()


def op_weight(codes: np.ndarray, code_type: int, scale: np.ndarray, zero: np.ndarray | None, weight_bits: int,
              block_size: list[int] | None, inp: int) -> np.ndarray:
    """A quantized ScatterMoE/ParallelLinear weight [E, out, in] as docs/op-spec.md defines it,
    `(q - z) * s` in float32 with the block's scale and zero point (written from the spec alone)."""
    if code_type == TensorProto.FLOAT8E4M3FN:
        import ml_dtypes

        q = codes.view(np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
        z = np.float32(0)
    else:
        c = codes.astype(np.uint8)
        if weight_bits == 4:
            q = np.stack([c & 15, c >> 4], -1).reshape(c.shape[0], c.shape[1], -1)[..., :inp].astype(np.float32)
        else:
            q = c.astype(np.float32)
        z = np.float32(8 if weight_bits == 4 else 128) if zero is None else None
    e, out = q.shape[0], q.shape[1]
    if scale.ndim == 2:
        s = scale.astype(np.float32)[:, :, None]
        zz = z if zero is None else zero.astype(np.float32)[:, :, None]
    else:
        bo, bi = block_size
        rows = np.arange(out) // bo
        cols = np.arange(inp) // bi
        s = scale.astype(np.float32)[:, rows][:, :, cols]
        zz = z if zero is None else zero.astype(np.float32)[:, rows][:, :, cols]
    return ((q - zz) * s).astype(np.float32)


def float_twin(m: onnx.ModelProto, elem: int | None = None) -> onnx.ModelProto:
    """`m` with every ScatterMoE node's quantized weights dequantized by `op_weight` into
    initializers of the node's type `elem` (default: float32) (its quantized inputs and
    attributes dropped): a model the float kernels run, to check a rewrite's layout of codes,
    scales and zero points."""
    m = onnx.ModelProto.FromString(m.SerializeToString())
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    for n in g.node:
        if n.op_type != "ScatterMoE" or len(n.input) <= 8:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        bits = attrs.get("weight_bits", 8)
        block = list(attrs["block_size"]) if "block_size" in attrs else None
        ins = list(n.input) + [""] * (12 - len(n.input))
        d = int(inits[ins[4]].dims[1])
        f = int(inits[ins[3]].dims[1]) // (2 if attrs.get("gated", 1) else 1)
        for w, s, z, inp in ((3, 8, 10, d), (4, 9, 11, f)):
            if not ins[s]:
                continue
            ct = inits[ins[w]]
            codes = numpy_helper.to_array(ct)
            scale = numpy_helper.to_array(inits[ins[s]]).astype(np.float32)
            zero = numpy_helper.to_array(inits[ins[z]]) if ins[z] else None
            W = op_weight(codes, ct.data_type, scale, zero, bits if ct.data_type == TensorProto.UINT8 else 8, block, inp)
            name = ins[w] + "_dequantized"
            g.initializer.append(numpy_helper.from_array(W.astype(np.float16 if elem == TensorProto.FLOAT16 else np.float32), name))
            ins[w] = name
        ins = ins[:8]
        while ins and ins[-1] == "":
            ins.pop()
        del n.input[:]
        n.input.extend(ins)
        keep = [a for a in n.attribute if a.name not in ("weight_bits", "block_size")]
        del n.attribute[:]
        n.attribute.extend(keep)
    for n in g.node:
        if n.op_type != "ParallelLinear" or len(n.input) <= 5:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        bits = attrs.get("weight_bits", 8)
        block = list(attrs["block_size"]) if "block_size" in attrs else None
        ins = list(n.input) + [""] * (7 - len(n.input))
        ct = inits[ins[2]]
        codes = numpy_helper.to_array(ct)
        four = bits == 4 and ct.data_type == TensorProto.UINT8
        scale = numpy_helper.to_array(inits[ins[5]]).astype(np.float32)
        zero = numpy_helper.to_array(inits[ins[6]]) if ins[6] else None
        # the logical width of a 4-bit weight: twice its bytes (the fixtures' widths are even)
        W = op_weight(codes, ct.data_type, scale, zero, bits if ct.data_type == TensorProto.UINT8 else 8, block, codes.shape[2] * (2 if four else 1))
        name = ins[2] + "_dequantized"
        g.initializer.append(numpy_helper.from_array(W.astype(np.float16 if elem == TensorProto.FLOAT16 else np.float32), name))
        ins[2] = name
        ins = ins[:5]
        while ins and ins[-1] == "":
            ins.pop()
        del n.input[:]
        n.input.extend(ins)
        keep = [a for a in n.attribute if a.name not in ("weight_bits", "block_size")]
        del n.attribute[:]
        n.attribute.extend(keep)
    return m
