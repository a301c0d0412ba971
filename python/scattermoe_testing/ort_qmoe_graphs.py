"""com.microsoft.QMoE graphs in every attribute combination, built with onnx.helper (no torch), and
a float64 evaluation of the node written from its semantics (not from ONNX Runtime's code).

The semantics, as ONNX Runtime 1.31's CPU kernel computes them (its source read, and every claim
checked against the kernel by python/tests/test_ort_qmoe_matrix.py):
- `router_probs` [T, E] are logits; the k largest are chosen, ties to the higher expert number;
  the routing weights are the softmax over those k logits (normalised whatever
  `normalize_routing_weights` says). With `router_weights` (input 14), the weights are
  `router_weights` at the chosen experts, divided by their sum when `normalize_routing_weights`
  is 1 (0 where the sum is 0). An assignment whose weight is not above 1e-8 is not computed.
- fc1 codes [E, n, d·bits/8], fc2 [E, d, f·bits/8] uint8, `expert_weight_bits` 8, 4 or 2: 8/bits
  codes a byte along the input, the first in the lowest bits. Scales [E, rows] (per output
  channel) or [E, rows, in/block_size] with `block_size`, of the node's type. Zero points: 8-bit
  ones of the scales' shape; 4- and 2-bit ones packed like the codes along the scales' last axis
  (along the rows for per-channel scales); absent, 2^(bits-1). W = (q - z) * s.
- activations relu, gelu (tanh), silu, identity; swiglu interleaved (swiglu_fusion = 1) with
  activation_alpha / activation_beta / swiglu_limit as for com.microsoft.MoE; biases [E, n], [E, d].
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import ort_moe_graphs as M

E, D, F = 4, 64, 64
DTYPES = M.DTYPES
TOLERANCE = M.TOLERANCE


@dataclass(frozen=True)
class Case:
    activation: str = "relu"
    k: int = 2
    bits: int = 8
    block: int = 0                      # block_size; 0: absent (per-channel scales)
    zero: bool = False                  # zero points given
    normalize: int | None = None
    router_weights: bool = False
    biases: bool = False
    dtype: str = "f32"
    alpha: float | None = None
    beta: float | None = None
    fusion: int | None = None
    limit: float | None = None
    accuracy_level: int | None = None
    prepacked: int | None = None        # weights_prepacked
    sparse_mixer: int | None = None
    quant_type: str | None = None
    bits_fc: tuple | None = None        # (fc1_expert_weight_bits, fc2_expert_weight_bits)
    input_3d: bool = False
    defaults: bool = False              # k, activation_type, expert_weight_bits absent (1, relu, 4)

    @property
    def id(self) -> str:
        parts = [self.activation, f"k{self.k}", f"b{self.bits}", f"blk{self.block}", self.dtype]
        for name, v in (("norm", self.normalize), ("alpha", self.alpha), ("beta", self.beta), ("fusion", self.fusion),
                        ("limit", self.limit), ("acc", self.accuracy_level), ("prepacked", self.prepacked),
                        ("mixer", self.sparse_mixer), ("qt", self.quant_type), ("bitsfc", self.bits_fc)):
            if v is not None:
                parts.append(f"{name}{v:g}" if isinstance(v, float) else f"{name}{v}")
        for flag, name in ((self.zero, "zp"), (self.router_weights, "rw"), (self.biases, "bias"), (self.input_3d, "3d"),
                           (self.defaults, "defaults")):
            if flag:
                parts.append(name)
        return "-".join(parts).replace(" ", "").replace(",", "_")

    @property
    def gated(self) -> bool:
        return self.activation == "swiglu"


def enumerate_cases() -> list[Case]:
    """Bits x block x zero points x element type for every activation, then routing, biases,
    router weights and the attributes ONNX Runtime reads or refuses, on a default layout."""
    cases: list[Case] = []
    acts = [("relu", None, None, None, None), ("gelu", None, None, None, None), ("silu", None, None, None, None),
            ("identity", None, None, None, None), ("swiglu", None, None, 1, None), ("swiglu", 1.702, 1.0, 1, 7.0)]
    for (act, alpha, beta, fusion, limit), bits, block, zero, dtype in itertools.product(
            acts, (8, 4, 2), (0, 16, 64), (False, True), ("f32", "f16")):
        if act not in ("relu", "swiglu") and (block == 64 or dtype == "f16" or (zero and bits != 4)):
            continue
        cases.append(Case(act, 2, bits, block, zero, dtype=dtype, alpha=alpha, beta=beta, fusion=fusion, limit=limit))
    base = dict(bits=4, block=16, zero=True)
    for k, norm, rw, biases, dtype in itertools.product((1, 2, 4), (None, 0, 1), (False, True), (False, True), ("f32", "f16")):
        if biases and (k != 2 or dtype == "f16"):
            continue
        cases.append(Case("relu", k, normalize=norm, router_weights=rw, biases=biases, dtype=dtype, **base))
    extra = [
        Case("swiglu", 2, fusion=1, biases=True, **base),
        Case("swiglu", 2, fusion=1, alpha=1.702, beta=1.0, limit=7.0, biases=True, router_weights=True, normalize=1, **base),
        Case("swiglu", 2, fusion=1, alpha=0.5, beta=0.0, **base),          # an alpha that needs rescaled gate rows
        Case("swiglu", 2, fusion=1, alpha=1.0, beta=0.5, limit=3.0, **base),
        Case("swiglu", 2, fusion=2, **base),                               # chunked: the CPU kernel refuses it
        Case("swiglu", 2, fusion=0, **base),
        Case("relu", 2, accuracy_level=4, **base),                         # int8 activations on the CPU
        Case("relu", 2, accuracy_level=4, bits=4, block=0),
        Case("relu", 2, accuracy_level=1, **base),
        Case("relu", 2, prepacked=0, **base), Case("relu", 2, prepacked=1, **base), Case("relu", 2, prepacked=-1, **base),
        Case("relu", 2, prepacked=1, bits=8),
        Case("relu", 2, sparse_mixer=1, **base),
        Case("relu", 2, quant_type="fp8", bits=8, block=16),
        Case("relu", 2, bits_fc=(8, 4), bits=4),
        Case("relu", 2, bits_fc=(4, 4), **base),
        Case("relu", 2, input_3d=True, **base),
        Case("relu", 1, bits=4, defaults=True), Case("relu", 1, bits=4, block=16, zero=True, defaults=True),
        Case("relu", 2, bits=4, block=16, dtype="bf16"),
        Case("relu", 2, bits=8, block=0, dtype="bf16"),
    ]
    for c in extra:
        if c not in cases:
            cases.append(c)
    return cases


def _pack(vals: np.ndarray, bits: int) -> np.ndarray:
    """Values [..., n] of `bits` bits packed 8/bits a byte along the last axis, first lowest (the
    padding of a partial last byte random)."""
    if bits == 8:
        return vals.astype(np.uint8)
    per = 8 // bits
    n = vals.shape[-1]
    m = -(-n // per)
    rng = np.random.default_rng(n)
    v = rng.integers(0, 2**bits, vals.shape[:-1] + (m * per,)).astype(np.uint8)
    v[..., :n] = vals
    v = v.reshape(vals.shape[:-1] + (m, per))
    out = np.zeros(vals.shape[:-1] + (m,), np.uint8)
    for j in range(per):
        out |= (v[..., j] << (bits * j)).astype(np.uint8)
    return out


def _unpack(b: np.ndarray, bits: int, n: int) -> np.ndarray:
    if bits == 8:
        return b.astype(np.int64)
    per = 8 // bits
    v = np.stack([(b >> (bits * j)) & (2**bits - 1) for j in range(per)], -1)
    return v.reshape(b.shape[:-1] + (-1,))[..., :n].astype(np.int64)


def weights(case: Case, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The node's tensors: codes (packed), scales (rounded to the case's type), zero points
    (packed), biases; also '_q1', '_z1', ... unpacked, for the reference."""
    n = 2 * F if case.gated and case.fusion != 0 else F
    w: dict[str, np.ndarray] = {}
    for name, rows, inp in (("1", n, D), ("2", D, F)):
        bits = bits_of(case, name)
        q = rng.integers(0, 2**bits, (E, rows, inp))
        nb = inp // case.block if case.block else None
        sshape = (E, rows, nb) if nb else (E, rows)
        s = M.round_to(case.dtype, rng.uniform(0.5, 1.5, sshape) / (2**bits) / np.sqrt(inp) * 4)
        w[f"fc{name}"] = _pack(q, bits)
        w[f"s{name}"] = s
        w[f"_q{name}"] = q
        if case.zero:
            z = rng.integers(0, 2**bits, sshape)
            w[f"z{name}"] = _pack(z, bits)
            w[f"_z{name}"] = z
    if case.biases:
        w["b1"] = M.round_to(case.dtype, rng.standard_normal((E, n)) * 0.1)
        w["b2"] = M.round_to(case.dtype, rng.standard_normal((E, D)) * 0.1)
    return w


def bits_of(case: Case, j: str) -> int:
    """fc<j>'s code width: fc<j>_expert_weight_bits where given, else expert_weight_bits."""
    return case.bits if case.bits_fc is None else case.bits_fc[int(j) - 1]


def dequantized(case: Case, w: dict, j: str) -> np.ndarray:
    """fc<j>'s weight [E, rows, in] in float64: (q - z) * s per block."""
    q = w[f"_q{j}"].astype(np.float64)
    s = np.asarray(w[f"s{j}"], np.float64)
    z = w.get(f"_z{j}")
    z = np.full(s.shape, 2 ** (bits_of(case, j) - 1), np.float64) if z is None else z.astype(np.float64)
    if s.ndim == 3:
        s = np.repeat(s, case.block, -1)
        z = np.repeat(z, case.block, -1)
    else:
        s, z = s[..., None], z[..., None]
    return (q - z) * s


def build(case: Case, w: dict[str, np.ndarray], opset: int = 17) -> onnx.ModelProto:
    """x [T, D] (or [1, T, D]), router logits [T, E] [, router weights [T, E]] -> y through one QMoE node."""
    elem = DTYPES[case.dtype][0]
    names = ["x", "router", "fc1", "s1", "b1" if case.biases else "", "fc2", "s2", "b2" if case.biases else "",
             "", "", "", "z1" if case.zero else "", "z2" if case.zero else "", "", "rw" if case.router_weights else ""]
    while names and names[-1] == "":
        names.pop()
    attrs: dict = {} if case.defaults else {"k": case.k, "activation_type": case.activation, "expert_weight_bits": case.bits}
    for name, v in (("block_size", case.block or None), ("normalize_routing_weights", case.normalize),
                    ("activation_alpha", case.alpha), ("activation_beta", case.beta), ("swiglu_fusion", case.fusion),
                    ("swiglu_limit", case.limit), ("accuracy_level", case.accuracy_level), ("weights_prepacked", case.prepacked),
                    ("use_sparse_mixer", case.sparse_mixer), ("quant_type", case.quant_type)):
        if v is not None:
            attrs[name] = v
    if case.bits_fc is not None:
        attrs["fc1_expert_weight_bits"], attrs["fc2_expert_weight_bits"] = case.bits_fc
    node = helper.make_node("QMoE", names, ["y"], domain="com.microsoft", name="qmoe", **attrs)
    xshape = [1, "T", D] if case.input_3d else ["T", D]
    inputs = [helper.make_tensor_value_info("x", elem, xshape), helper.make_tensor_value_info("router", elem, ["T", E])]
    if case.router_weights:
        inputs.append(helper.make_tensor_value_info("rw", elem, ["T", E]))
    inits = []
    for name, a in w.items():
        if name.startswith("_"):
            continue
        if name.startswith(("fc", "z")):
            inits.append(numpy_helper.from_array(np.asarray(a, np.uint8), name))
        else:
            inits.append(M.as_tensor(case.dtype, name, a))
    g = helper.make_graph([node], "qmoe", inputs, [helper.make_tensor_value_info("y", elem, xshape)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 9
    return m


def feeds(case: Case, tokens: int, rng: np.random.Generator, one_expert: bool = False, ties: bool = False) -> dict:
    """Token rows, router logits 0.3 apart (or with exact ties), router weights of either sign."""
    x = M.round_to(case.dtype, rng.standard_normal((tokens, D)))
    if ties:
        r = rng.integers(0, 3, (tokens, E)).astype(np.float32) * 0.5
    else:
        r = np.stack([rng.permutation(E) for _ in range(tokens)]) * 0.7 + rng.uniform(-0.2, 0.2, (tokens, E)) - 1.5
    if one_expert:
        r[:, 0] = 8.0
    r = M.round_to(case.dtype, r)
    out = {"x": M.as_feed(case.dtype, x.reshape(1, tokens, D) if case.input_3d else x), "router": M.as_feed(case.dtype, r)}
    if case.router_weights:
        out["rw"] = M.as_feed(case.dtype, M.round_to(case.dtype, rng.uniform(-0.3, 1.0, (tokens, E))))
    return out


def reference(case: Case, w: dict, x, router, rw=None) -> np.ndarray:
    """The node evaluated in float64 on the given values (see the module's docstring)."""
    if case.gated and case.fusion != 1:
        raise ValueError(f"{case.id}: no reference for swiglu_fusion {case.fusion}")
    x = np.asarray(x, np.float64).reshape(-1, D)
    r = np.asarray(router, np.float64).reshape(-1, E)
    w1, w2 = dequantized(case, w, "1"), dequantized(case, w, "2")
    alpha = 1.0 if case.alpha is None else case.alpha
    beta = 0.0 if case.beta is None else case.beta
    limit = np.inf if case.limit is None else case.limit
    y = np.zeros_like(x)
    for t in range(len(x)):
        order = sorted(range(E), key=lambda e: (r[t, e], e), reverse=True)[: case.k]
        if rw is None:
            v = np.array([r[t, e] for e in order])
            wt = np.exp(v - v.max())
            wt /= wt.sum()
        else:
            wt = np.array([float(np.asarray(rw, np.float64).reshape(-1, E)[t, e]) for e in order])
            if case.normalize == 1:
                s = wt.sum()
                wt = wt / s if s != 0 else np.zeros_like(wt)
        for j, e in enumerate(order):
            if not wt[j] > 1e-8:
                continue
            h = w1[e] @ x[t] + (np.asarray(w["b1"][e], np.float64) if case.biases else 0.0)
            if case.activation == "relu":
                h = np.maximum(h, 0.0)
            elif case.activation == "gelu":
                h = 0.5 * h * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (h + 0.044715 * h**3)))
            elif case.activation == "silu":
                h = h / (1.0 + np.exp(-h))
            elif case.activation == "swiglu":
                g, u = np.minimum(h[0::2], limit), np.clip(h[1::2], -limit, limit)
                h = g / (1.0 + np.exp(-alpha * g)) * (u + beta)
            elif case.activation != "identity":
                raise ValueError(case.activation)
            y[t] += wt[j] * (w2[e] @ h + (np.asarray(w["b2"][e], np.float64) if case.biases else 0.0))
    return y
