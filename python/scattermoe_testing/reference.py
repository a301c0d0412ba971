"""A float64 numpy reference of ScatterMoE and ParallelLinear, written straight from docs/op-spec.md.

Inputs are taken as given (round them to the op's element type first with ``round_to`` when
comparing against a float16 / bfloat16 run). Errors raise ``ValueError`` with the spec's wording.
"""

from __future__ import annotations

import math

import numpy as np

try:  # bfloat16 rounding; ml-dtypes comes with the project venvs
    import ml_dtypes

    _BF16 = ml_dtypes.bfloat16
except ImportError:  # pragma: no cover
    _BF16 = None

NP_DTYPES = {"f32": np.float32, "f16": np.float16, "bf16": _BF16}


def round_to(a, dtype: str) -> np.ndarray:
    """float32 array holding the values of `a` rounded (nearest-even) to `dtype`."""
    a = np.asarray(a, dtype=np.float32)
    if dtype == "f32":
        return a.copy()
    return a.astype(NP_DTYPES[dtype]).astype(np.float32)


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free logistic


_erf = np.vectorize(math.erf, otypes=[np.float64])


def activation(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if name == "silu":
        return x * _sigmoid(x)
    if name == "gelu":
        return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))
    if name == "gelu_tanh":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    if name == "relu":
        return np.maximum(x, 0.0)
    if name == "relu2":
        return np.maximum(x, 0.0) ** 2
    raise ValueError(f"ScatterMoE: attribute 'activation' has unsupported value '{name}'")


# the activations defined only over a gate and an up projection (clamped SwiGLU forms)
GATED_ONLY = ("swiglu_oai", "swiglu_limit")


def glu_rows(glu_layout: str, f: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of w_in (elements of b_in) holding gate unit i and up unit i, i in [0, f)."""
    i = np.arange(f)
    if glu_layout == "gate_up":
        return i, f + i
    if glu_layout == "up_gate":
        return f + i, i
    if glu_layout == "interleaved":
        return 2 * i, 2 * i + 1
    raise ValueError(f"ScatterMoE: attribute 'glu_layout' has unsupported value '{glu_layout}'")


def hidden(a: np.ndarray, *, gated: int, activation_name: str, glu_layout: str = "gate_up",
           alpha: float = 1.702, limit: float = 7.0) -> np.ndarray:
    """h from a ([..., n]) per the spec."""
    a = np.asarray(a, np.float64)
    if not gated:
        if activation_name in GATED_ONLY:
            raise ValueError(f"ScatterMoE: attribute 'activation' = '{activation_name}' needs 'gated' = 1")
        return activation(a, activation_name)
    f = a.shape[-1] // 2
    gr, ur = glu_rows(glu_layout, f)
    g, u = a[..., gr], a[..., ur]
    if activation_name in GATED_ONLY:
        g2 = np.minimum(g, limit)
        offset = 1.0 if activation_name == "swiglu_oai" else 0.0
        return (np.clip(u, -limit, limit) + offset) * g2 * _sigmoid(alpha * g2)
    return activation(g, activation_name) * u


def check_indices(op: str, ri2: np.ndarray, E: int) -> None:
    bad = np.argwhere((ri2 < 0) | (ri2 >= E))
    if len(bad):
        t, j = bad[0]
        raise ValueError(
            f"{op}: input 'routing_indices' holds {int(ri2[t, j])} at [{t}, {j}], outside [0, {E}) (the number of experts)"
        )


def kept_mask(ri2: np.ndarray, E: int, capacity: int | None, order: str = "slot_major") -> np.ndarray:
    """[T, k] float64: 1 where the assignment is computed, 0 where capacity drops it.

    Assignments are ranked by (j, t) for slot_major, (t, j) for token_major; one is kept iff fewer
    than C assignments ranked before it chose the same expert.
    """
    T, k = ri2.shape
    if capacity is None:
        return np.ones((T, k))
    C = int(capacity)
    if C < 0:
        raise ValueError(f"ScatterMoE: input 'capacity' must be >= 0, got {C}")
    if order == "slot_major":
        ranked = [(t, j) for j in range(k) for t in range(T)]
    elif order == "token_major":
        ranked = [(t, j) for t in range(T) for j in range(k)]
    else:
        raise ValueError(f"ScatterMoE: attribute 'capacity_order' has unsupported value '{order}'")
    seen = np.zeros(E, dtype=np.int64)
    kept = np.zeros((T, k))
    for t, j in ranked:
        e = ri2[t, j]
        if seen[e] < C:
            kept[t, j] = 1.0
        seen[e] += 1
    return kept


def scatter_moe(X, routing_weights, routing_indices, w_in, w_out, b_in=None, b_out=None, capacity=None, *,
                activation="silu", gated=1, glu_layout="gate_up", alpha=1.702, limit=7.0,
                capacity_order="slot_major"):
    """Returns (Y, kept) in float64, Y shaped like X, kept like routing_indices."""
    X = np.asarray(X, np.float64)
    d = X.shape[-1]
    ri = np.asarray(routing_indices)
    k = ri.shape[-1]
    x2 = X.reshape(-1, d)
    T = x2.shape[0]
    ri2 = ri.reshape(-1, k).astype(np.int64)
    rw2 = np.asarray(routing_weights, np.float64).reshape(-1, k)
    if ri2.shape[0] != T:
        raise ValueError("ScatterMoE: token counts of 'X' and 'routing_indices' differ")
    w_in = np.asarray(w_in, np.float64)
    w_out = np.asarray(w_out, np.float64)
    E = w_in.shape[0]
    check_indices("ScatterMoE", ri2, E)
    if capacity is not None:
        capacity = int(np.asarray(capacity).reshape(-1)[0])
    kept = kept_mask(ri2, E, capacity, capacity_order)
    y = np.zeros((T, d))
    for e in range(E):
        t_idx, j_idx = np.nonzero((ri2 == e) & (kept > 0))
        if len(t_idx) == 0:
            continue
        a = x2[t_idx] @ w_in[e].T
        if b_in is not None:
            a = a + np.asarray(b_in, np.float64)[e]
        h = hidden(a, gated=gated, activation_name=activation, glu_layout=glu_layout, alpha=alpha, limit=limit)
        o = h @ w_out[e].T
        if b_out is not None:
            o = o + np.asarray(b_out, np.float64)[e]
        np.add.at(y, t_idx, o * rw2[t_idx, j_idx][:, None])
    return y.reshape(X.shape), kept.reshape(ri.shape)


def grouped_order(routing_indices) -> np.ndarray:
    """perm: the flat assignment indices t*k+j sorted by expert, stable. pos = inverse(perm)."""
    flat = np.asarray(routing_indices).reshape(-1).astype(np.int64)
    return np.argsort(flat, kind="stable")


def grouped_positions(routing_indices) -> np.ndarray:
    """pos[t*k+j]: the rank of assignment (t, j) in grouped order."""
    perm = grouped_order(routing_indices)
    pos = np.empty_like(perm)
    pos[perm] = np.arange(len(perm))
    return pos


def parallel_linear(X, routing_indices, W, b=None, gates=None, *, grouped_in=0, grouped_out=0):
    """ParallelLinear in float64; the output shape follows the spec's table."""
    ri = np.asarray(routing_indices)
    k = ri.shape[-1]
    ri2 = ri.reshape(-1, k).astype(np.int64)
    T = ri2.shape[0]
    W = np.asarray(W, np.float64)
    E, d_out, d_in = W.shape
    check_indices("ParallelLinear", ri2, E)
    X = np.asarray(X, np.float64)
    pos = grouped_positions(ri2)  # [T*k]
    if grouped_in:
        if X.shape != (T * k, d_in):
            raise ValueError(f"ParallelLinear: input 'X' {list(X.shape)} is grouped (grouped_in = 1) and must have T*k = {T * k} rows")
        xa = X[pos]  # x(t, j) for flat assignment t*k+j
    else:
        x2 = X.reshape(-1, d_in)
        xa = np.repeat(x2, k, axis=0)
    ea = ri2.reshape(-1)
    z = np.einsum("aoi,ai->ao", W[ea], xa)
    if b is not None:
        z = z + np.asarray(b, np.float64)[ea]
    if gates is not None:
        if grouped_out:
            raise ValueError("ParallelLinear: input 'gates' combines over k into token order, so it needs 'grouped_out' = 0")
        g = np.asarray(gates, np.float64).reshape(-1)
        y = (z * g[:, None]).reshape(T, k, d_out).sum(axis=1)
        return y.reshape(tuple(ri.shape[:-1]) + (d_out,))
    if grouped_out:
        y = np.empty_like(z)
        y[pos] = z
        return y
    return z.reshape(tuple(ri.shape) + (d_out,))


def rel_err(got, want) -> float:
    """max|a-b| / max|b| (0 for two empty arrays; max|a-b| when b is all zero)."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    if got.shape != want.shape:
        raise AssertionError(f"shape {got.shape} != expected {want.shape}")
    if want.size == 0:
        return 0.0
    diff = float(np.max(np.abs(got - want)))
    if not np.all(np.isfinite(got)):
        return math.inf
    scale = float(np.max(np.abs(want)))
    return diff / scale if scale > 0 else diff


TOLERANCE = {"f32": 1e-4, "f16": 1e-2, "bf16": 3e-2}


def assert_close(got, want, dtype: str, what: str = "", tol: float | None = None) -> float:
    """Relative error max|a-b|/max|b| within the per-dtype tolerance; a detailed message otherwise."""
    tol = TOLERANCE[dtype] if tol is None else tol
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    err = rel_err(got, want)
    if not err <= tol:
        diff = np.abs(got - want)
        diff = np.where(np.isnan(diff), np.inf, diff)
        at = np.unravel_index(int(np.argmax(diff)), diff.shape)
        raise AssertionError(
            f"{what}: relative error {err:.3e} > {tol:g} ({dtype}); max|expected| = {np.max(np.abs(want)):.4g}; "
            f"worst at {tuple(int(i) for i in at)}: got {got[at]!r}, expected {want[at]!r}"
        )
    return err


def topk_router(logits, k: int, scoring: str = "softmax", normalize: int = 0, tie_break: str = "lower_index"):
    """TopKRouter (docs/op-spec.md): (weights float64 [*, k], indices int64 [*, k]), best first.

    The choice ranks float32 scores as the contract says (equal scores by the tie rule, NaN last);
    the weights are computed in float64 from the chosen experts.
    """
    x = np.asarray(logits, np.float32)
    E = x.shape[-1]
    if not 1 <= k <= E:
        raise ValueError(f"TopKRouter: attribute 'k' = {k} is more than the {E} experts")
    rows = x.reshape(-1, E)
    x64 = rows.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        if scoring == "softmax":
            m = rows.max(axis=1, keepdims=True)
            e = np.exp(rows - m)
            rank = e / e.sum(axis=1, keepdims=True)
            e64 = np.exp(x64 - x64.max(axis=1, keepdims=True))
            score64 = e64 / e64.sum(axis=1, keepdims=True)
        elif scoring == "sigmoid":
            rank = (np.float32(1) / (np.float32(1) + np.exp(-rows))).astype(np.float32)
            score64 = _sigmoid(x64)
        elif scoring in ("topk_softmax", "identity"):
            rank, score64 = rows, x64
        else:
            raise ValueError(f"TopKRouter: attribute 'scoring' has unsupported value '{scoring}'")
    nan = np.isnan(rank)
    rank = np.where(nan, 0, rank)
    idx = np.arange(E)
    # sort keys: numbers before NaN, score descending, then the index by the tie rule
    tie_key = idx if tie_break == "lower_index" else -idx
    order = np.array([np.lexsort((tie_key, -r, n))[:k] for r, n in zip(rank, nan)], np.int64).reshape(-1, k)
    chosen = np.take_along_axis(score64, order, axis=1)
    if scoring == "topk_softmax":
        e = np.exp(chosen - chosen[:, :1])
        chosen = e / e.sum(axis=1, keepdims=True)
    if normalize:
        chosen = chosen / chosen.sum(axis=1, keepdims=True)
    lead = x.shape[:-1]
    return chosen.reshape(*lead, k), order.reshape(*lead, k)
