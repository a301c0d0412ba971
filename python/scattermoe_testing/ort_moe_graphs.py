"""com.microsoft.MoE graphs in every attribute combination, built with onnx.helper (no torch).

The combinations follow what ONNX Runtime's own MoE tests exercise: activation_type (relu, gelu,
silu, identity, swiglu), activation_alpha / activation_beta absent or given (defaults and other
values), swiglu_fusion, swiglu_limit, k, normalize_routing_weights, use_sparse_mixer, biases, fc3,
weights as initializers or as graph inputs, float32 / float16 / bfloat16. Not every combination is
one ONNX Runtime runs (its CPU kernel refuses fc3, for one); `enumerate_cases` lists them all and
the caller finds out which ones run.

Dimensions are small so that the whole enumeration runs in seconds.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

E, D, F = 6, 16, 24

DTYPES = {"f32": (TensorProto.FLOAT, np.float32), "f16": (TensorProto.FLOAT16, np.float16),
          "bf16": (TensorProto.BFLOAT16, None)}
# relative tolerance (max |a-b| / max |b|) per element type
TOLERANCE = {"f32": 1e-4, "f16": 1e-2, "bf16": 3e-2}


@dataclass(frozen=True)
class Case:
    activation: str = "relu"
    k: int = 2
    normalize: int | None = None        # None: attribute absent
    sparse_mixer: int | None = None
    biases: bool = False
    fc3: bool = False
    weights: str = "init"               # "init" or "input"
    dtype: str = "f32"
    alpha: float | None = None          # activation_alpha; None: absent
    beta: float | None = None           # activation_beta
    fusion: int | None = None           # swiglu_fusion
    limit: float | None = None          # swiglu_limit
    extra: tuple = field(default=())    # (name, value) attributes ONNX Runtime does not know

    @property
    def id(self) -> str:
        parts = [self.activation, f"k{self.k}", self.dtype, self.weights]
        for name, v in (("norm", self.normalize), ("mixer", self.sparse_mixer), ("alpha", self.alpha),
                        ("beta", self.beta), ("fusion", self.fusion), ("limit", self.limit)):
            if v is not None:
                parts.append(f"{name}{v:g}" if isinstance(v, float) else f"{name}{v}")
        if self.biases:
            parts.append("bias")
        if self.fc3:
            parts.append("fc3")
        for name, v in self.extra:
            parts.append(f"{name}{v}")
        return "-".join(parts)

    @property
    def gated(self) -> bool:
        return self.activation == "swiglu"


# (alpha, beta, fusion, limit) variants per activation
_SWIGLU_PARAMS = [
    (None, None, 1, None),          # silu(gate) * up, interleaved
    (1.0, 0.0, 1, None),            # the same, defaults written out
    (None, None, 2, None),          # chunked
    (1.702, 1.0, 1, 7.0),           # GPT-OSS (what onnxruntime-genai's builder writes)
    (1.702, 1.0, 2, 7.0),
    (1.702, 1.0, 1, None),          # no clamp
    (0.5, 0.0, 1, None),            # another alpha, no offset
    (1.0, 0.5, 1, 3.0),             # another beta with a clamp
    (1.3, -0.75, 1, 2.5),           # a negative beta
    (1.0, 0.0, 1, 4.0),             # a clamp without an offset
    (None, None, 0, None),          # fusion 0: fc1 and fc3 separate
    (None, None, None, None),       # fusion absent
]
_PLAIN_PARAMS = [
    (None, None, None, None),
    (1.0, 0.0, None, None),         # alpha/beta at their defaults
    (1.702, 1.0, None, None),       # alpha/beta at other values (not used by these activations)
    (None, None, None, 7.0),        # a limit (swiglu only)
]


def enumerate_cases() -> list[Case]:
    """Every combination: activation parameters x routing x layout x element type (pruned to pairs
    where the axes do not interact, so the list stays a few hundred long)."""
    cases: list[Case] = []
    routing = [(1, None, None), (2, 1, None), (3, 0, None), (2, None, 1), (2, 1, 1)]
    layouts = [(False, False, "init"), (True, False, "init"), (False, False, "input"), (True, False, "input"),
               (False, True, "init"), (True, True, "init")]
    for act in ("relu", "gelu", "silu", "identity", "swiglu"):
        params = _SWIGLU_PARAMS if act == "swiglu" else _PLAIN_PARAMS
        for (alpha, beta, fusion, limit), dtype in itertools.product(params, DTYPES):
            # every parameter set with every element type, the default routing and layout
            cases.append(Case(act, 2, 1, None, False, False, "init", dtype, alpha, beta, fusion, limit))
        for (k, norm, mixer), (biases, fc3, weights) in itertools.product(routing, layouts):
            # routing x layout for the first parameter set, float32 and float16
            alpha, beta, fusion, limit = params[0]
            for dtype in ("f32", "f16"):
                c = Case(act, k, norm, mixer, biases, fc3, weights, dtype, alpha, beta, fusion, limit)
                if c not in cases:
                    cases.append(c)
        # the parameter sets with biases and graph-input weights
        for (alpha, beta, fusion, limit) in params[1:]:
            for weights in ("init", "input"):
                c = Case(act, 2, 1, None, True, False, weights, "f32", alpha, beta, fusion, limit)
                if c not in cases:
                    cases.append(c)
    return cases


def _bf16_tensor(name: str, a: np.ndarray) -> TensorProto:
    bits = (a.astype(np.float32).view(np.uint32) + 0x7FFF + ((a.astype(np.float32).view(np.uint32) >> 16) & 1)) >> 16
    t = helper.make_tensor(name, TensorProto.BFLOAT16, a.shape, bits.astype(np.uint16).tobytes(), raw=True)
    return t


def bf16_round(a: np.ndarray) -> np.ndarray:
    """float32 values rounded to bfloat16 (round to nearest even), as float32."""
    u = a.astype(np.float32).view(np.uint32)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return u.astype(np.uint32).view(np.float32)


def weights(case: Case, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The node's weight tensors (float32 values, already rounded to the case's element type)."""
    n = 2 * F if case.gated and case.fusion != 0 else F
    w = {"fc1": rng.standard_normal((E, n, D)) * 0.3, "fc2": rng.standard_normal((E, D, F)) * 0.3}
    if case.biases:
        w["b1"] = rng.standard_normal((E, n)) * 0.3
        w["b2"] = rng.standard_normal((E, D)) * 0.3
    if case.fc3:
        w["fc3"] = rng.standard_normal((E, F, D)) * 0.3
        if case.biases:
            w["b3"] = rng.standard_normal((E, F)) * 0.3
    return {k: round_to(case.dtype, v) for k, v in w.items()}


def round_to(dtype: str, a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float32)
    if dtype == "f16":
        return a.astype(np.float16).astype(np.float32)
    if dtype == "bf16":
        return bf16_round(a)
    return a


def as_tensor(dtype: str, name: str, a: np.ndarray) -> TensorProto:
    if dtype == "bf16":
        return _bf16_tensor(name, a)
    return numpy_helper.from_array(a.astype(DTYPES[dtype][1]), name)


def as_feed(dtype: str, a: np.ndarray):
    """A feed for ONNX Runtime in the case's element type (bfloat16 needs an OrtValue)."""
    if dtype == "bf16":
        import onnxruntime as ort

        bits = (bf16_round(a).view(np.uint32) >> 16).astype(np.uint16)
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bits, TensorProto.BFLOAT16)
    return a.astype(DTYPES[dtype][1])


def build(case: Case, w: dict[str, np.ndarray], opset: int = 17) -> onnx.ModelProto:
    """x [T, D], router logits [T, E] -> y [T, D] through one com.microsoft.MoE node."""
    elem = DTYPES[case.dtype][0]
    names = ["x", "router", "fc1", "b1" if case.biases else "", "fc2", "b2" if case.biases else ""]
    if case.fc3:
        names += ["fc3", "b3" if case.biases else ""]
    while names and names[-1] == "":
        names.pop()
    attrs: dict = {"k": case.k, "activation_type": case.activation}
    for name, v in (("normalize_routing_weights", case.normalize), ("use_sparse_mixer", case.sparse_mixer),
                    ("activation_alpha", case.alpha), ("activation_beta", case.beta),
                    ("swiglu_fusion", case.fusion), ("swiglu_limit", case.limit)):
        if v is not None:
            attrs[name] = v
    attrs.update(dict(case.extra))
    node = helper.make_node("MoE", names, ["y"], domain="com.microsoft", name="moe", **attrs)
    inputs = [helper.make_tensor_value_info("x", elem, ["T", D]), helper.make_tensor_value_info("router", elem, ["T", E])]
    inits = []
    for name, a in w.items():
        if case.weights == "input":
            inputs.append(helper.make_tensor_value_info(name, elem, list(a.shape)))
        else:
            inits.append(as_tensor(case.dtype, name, a))
    g = helper.make_graph([node], "moe", inputs, [helper.make_tensor_value_info("y", elem, ["T", D])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 9
    return m


def feeds(case: Case, w: dict[str, np.ndarray], tokens: int, rng: np.random.Generator, one_expert: bool = False) -> dict:
    """Random token rows and router logits; with `one_expert` every token's first choice is expert 0.
    A token's logits are at least 0.3 apart, so that they stay distinct in float16 and bfloat16:
    ONNX Runtime's kernel breaks ties in no documented order, and ONNX's TopK by index."""
    x = round_to(case.dtype, rng.standard_normal((tokens, D)))
    r = np.stack([rng.permutation(E) for _ in range(tokens)]) * 0.7 + rng.uniform(-0.2, 0.2, (tokens, E)) - 1.5
    if one_expert:
        r[:, 0] = 8.0
    r = round_to(case.dtype, r)
    out = {"x": as_feed(case.dtype, x), "router": as_feed(case.dtype, r)}
    if case.weights == "input":
        out.update({k: as_feed(case.dtype, v) for k, v in w.items()})
    return out


def reference(case: Case, w: dict[str, np.ndarray], x: np.ndarray, router: np.ndarray) -> np.ndarray:
    """com.microsoft.MoE evaluated in float64, independently of ONNX Runtime, on the given values
    (16-bit inputs and weights as their float32 values): softmax over the router logits, top-k
    with ties to the higher expert number (ONNX Runtime's CPU kernel sorts (probability, expert)
    pairs in descending order), the k weights divided by their sum when normalize_routing_weights
    is 1, then fc1 [E, n, d] (+ bias), the activation, fc2 [E, d, f] (+ bias). swiglu is the
    interleaved form: g' = min(g, limit), u' = clamp(u, -limit, limit),
    h = g' sigmoid(alpha g') (u' + beta); absent alpha / beta / limit are 1 / 0 / none."""
    if case.fc3 or (case.gated and case.fusion != 1):
        raise ValueError(f"{case.id}: no reference for fc3 or a swiglu_fusion other than 1")
    x = np.asarray(x, np.float64).reshape(-1, D)
    r = np.asarray(router, np.float64).reshape(-1, E)
    p = np.exp(r - r.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    # descending probability, then descending expert number
    order = np.lexsort((-np.arange(E)[None, :].repeat(len(p), 0), -p), axis=-1)
    idx = order[:, : case.k]
    wt = np.take_along_axis(p, idx, -1)
    if case.normalize == 1:
        wt = wt / wt.sum(-1, keepdims=True)
    alpha = 1.0 if case.alpha is None else case.alpha
    beta = 0.0 if case.beta is None else case.beta
    limit = np.inf if case.limit is None else case.limit
    f64 = {k: np.asarray(v, np.float64) for k, v in w.items()}
    y = np.zeros_like(x)
    for t in range(len(x)):
        for j in range(case.k):
            e = idx[t, j]
            h = f64["fc1"][e] @ x[t] + (f64["b1"][e] if case.biases else 0.0)
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
                raise ValueError(f"activation {case.activation}")
            o = f64["fc2"][e] @ h + (f64["b2"][e] if case.biases else 0.0)
            y[t] += wt[t, j] * o
    return y
