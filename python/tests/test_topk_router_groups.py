"""TopKRouter's selection bias and group-limited choice (docs/op-spec.md, "TopKRouter": `bias`,
`n_group`, `topk_group`, `group_score`, `group_fill`, `weights_from`, `normalize_eps`, `scale`) on
ONNX Runtime's CPU execution provider:

- against a numpy reference of the contract's formula, step by step (the choice ranks float32
  values by the contract's order, the weights are computed in float64): every dtype, E in
  {8, 16, 64, 160, 256}, n_group in {1, 2, 4, 8}, every topk_group, k up to E (more than the
  competing experts too), bias absent / float32 / T, [E] / [1, E], both fills, both weights_from,
  normalize with and without eps, scale, both tie rules; rows with exact ties (experts and groups),
  NaN and -inf logits; T = 0, 1, many;
- against ONNX Runtime running the graphs torch's TorchScript exporter writes for DeepSeek-V3,
  DeepSeek-V2's group_limited_greedy, Mistral 4 and MiniMax-M2 (their TopK unsorted: compared per
  row as sets of (expert, weight));
- the new error messages.

Logits lie on a 1/64 grid (exact in every dtype); a row whose choice a relative change of 1e-5 in
its scores could change (two different values nearly equal where it matters) is drawn again, so
that every implementation of the float32 scores (numpy's, the kernel's, ONNX Runtime's) must
choose alike. Exact ties are made by copying (logit, bias) pairs, and whole groups."""

import itertools
import zlib

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from scattermoe_testing import graphs, ort_utils
from scattermoe_testing import reference as R

from test_errors import any_error, assert_mentions

NEG_INF = float("-inf")
ES = (8, 16, 64, 160, 256)
N_GROUPS = (1, 2, 4, 8)


# --------------------------------------------------------------------------------------------
# the reference
# --------------------------------------------------------------------------------------------


def _order_keys(v, tie_break: str) -> np.ndarray:
    """int64 keys along the last axis, smaller = better, by the contract's order: the larger
    float32 value first, NaN below every number (-inf included), equal values (-0 = +0) by the tie
    rule."""
    v = np.asarray(v, np.float32) + np.float32(0)  # -0 -> +0
    bits = v.view(np.uint32).astype(np.int64)
    ordered = np.where(bits >= 2**31, ~bits & 0xFFFFFFFF, bits | 2**31)  # monotone in the value
    ordered = np.where(np.isnan(v), 0, ordered)  # -inf is 0x007FFFFF: NaN below it
    n = v.shape[-1]
    tie = np.arange(n) if tie_break == "lower_index" else n - 1 - np.arange(n)
    return ((2**32 - 1 - ordered) << 12) | tie


def best(v, n: int, tie_break: str) -> np.ndarray:
    """Positions of the n best of `v` along the last axis, best first."""
    return np.argsort(_order_keys(v, tie_break), axis=-1, kind="stable")[..., :n]


def router_reference(logits, k: int, bias=None, scoring: str = "softmax", normalize: int = 0,
                     tie_break: str = "lower_index", n_group: int = 1, topk_group: int = 0,
                     group_score: str = "top2_sum", group_fill: float = NEG_INF,
                     weights_from: str = "scores", normalize_eps: float = 0.0, scale: float = 1.0,
                     normalize_min: float = 0.0, perturb=None):
    """TopKRouter as docs/op-spec.md writes it: (weights float64 [*, k], indices int64 [*, k], and
    whether each chosen expert's choice score is group_fill), best first. The choice ranks float32
    values (scores, s + bias, group sums); the weights are float64. `perturb`: a function applied
    to the float32 scores before the choice (the robustness check's)."""
    x = np.asarray(logits, np.float32)
    E = x.shape[-1]
    lead = x.shape[:-1]
    rows = x.reshape(-1, E)
    x64 = rows.astype(np.float64)
    with np.errstate(all="ignore"):
        if scoring == "softmax":
            e = np.exp(rows - rows.max(axis=1, keepdims=True))
            s32 = e / e.sum(axis=1, keepdims=True)
            e64 = np.exp(x64 - x64.max(axis=1, keepdims=True))
            s64 = e64 / e64.sum(axis=1, keepdims=True)
        elif scoring == "sigmoid":
            s32 = (np.float32(1) / (np.float32(1) + np.exp(-rows))).astype(np.float32)
            s64 = R._sigmoid(x64)
        else:  # topk_softmax
            s32, s64 = rows.copy(), x64
        if perturb is not None:
            s32 = perturb(s32, rows)
        # choice: c = s + bias, in float32 (c = s without a bias)
        if bias is None:
            c32, c64 = s32.copy(), s64.copy()
        else:
            b = np.asarray(bias, np.float32).reshape(-1)
            c32 = (s32 + b).astype(np.float32)
            c64 = s64 + b.astype(np.float64)
        filled = np.zeros(rows.shape, bool)
        g_eff = n_group if topk_group == 0 else topk_group
        if g_eff < n_group:
            size = E // n_group
            cg = c32.reshape(-1, n_group, size)
            n_top = 2 if group_score == "top2_sum" else 1
            top = np.take_along_axis(cg, best(cg, n_top, tie_break), axis=-1)
            G = (top[..., 0] + top[..., 1]).astype(np.float32) if n_top == 2 else top[..., 0]
            keep = np.zeros(G.shape, bool)
            np.put_along_axis(keep, best(G, g_eff, tie_break), True, axis=-1)
            filled = ~np.repeat(keep, size, axis=-1)
            c32 = np.where(filled, np.float32(group_fill), c32)
            c64 = np.where(filled, group_fill, c64)
        idx = best(c32, k, tie_break)
        w = np.take_along_axis(s64 if weights_from == "scores" else c64, idx, axis=1)
        if scoring == "topk_softmax":
            w = np.exp(w - w[:, :1])
            w = w / w.sum(axis=1, keepdims=True)
        if normalize:
            d = w.sum(axis=1, keepdims=True) + normalize_eps
            if normalize_min > 0:  # 0: no floor; a NaN sum stays NaN
                d = np.where(d < normalize_min, normalize_min, d)
            w = w / d
        w = w * scale
    fill_chosen = np.take_along_axis(filled, idx, axis=1)
    return w.reshape(*lead, k), idx.reshape(*lead, k), fill_chosen.reshape(*lead, k)


def _perturbation(mult: int, rel: float = 1e-5):
    """Scores times (1 + rel * f), f in [-1, 1) a hash of the logit's bits: the scores of equal
    logits stay equal (the rows' intended ties), two scores that are equal only by rounding (of
    different logits) part, so a row whose choice rests on such a tie is found fragile. Each is
    used with rel and -rel: one direction alone misses a pair whose gap only the other closes (a
    larger score moved up past a smaller one's plus a bias)."""
    def p(s32, x):
        bits = (np.asarray(x, np.float32) + np.float32(0)).view(np.uint32).astype(np.uint64)
        h = ((bits * np.uint64(mult) + np.uint64(0x9E3779B9)) >> np.uint64(7)) % np.uint64(2**24)
        f = h.astype(np.float64) / 2**23 - 1
        return (s32.astype(np.float64) * (1 + rel * f)).astype(np.float32)
    return p


PERTURBATIONS = [_perturbation(m, rel) for m in (2654435761, 40503, 2246822519) for rel in (1e-5, -1e-5)]


def _row_rel_change(w0, w1) -> np.ndarray:
    """Per row: inf where the non-finite weights differ, else max|w1 - w0| / max|w0|."""
    fin0, fin1 = np.isfinite(w0), np.isfinite(w1)
    same = (fin0 & fin1) | (np.isnan(w0) & np.isnan(w1)) | (~fin0 & ~fin1 & (w0 == w1))
    same_nonfinite = same.all(axis=1)
    with np.errstate(all="ignore"):
        d = np.abs(np.where(fin0 & fin1, w1 - w0, 0)).max(axis=1)
        m = np.abs(np.where(fin0, w0, 0)).max(axis=1)
        rel = np.where(m > 0, d / m, d)
    return np.where(same_nonfinite, rel, np.inf)


def fragile_rows(logits2d, k, bias, attrs) -> np.ndarray:
    """Rows whose choice (experts, their order, which were filled) a relative change of 1e-5 in the
    scores changes (two different values too close for every implementation of the float32 scores
    to order them alike), or whose weights it changes by more than 1e-3; and, normalizing weights
    of both signs (weights_from = choice with a bias), rows whose sum cancels (sum |w| > 10 |sum w|:
    the float32 sum's rounding error is then beyond the float64 reference's tolerance)."""
    w0, i0, f0 = router_reference(logits2d, k, bias, **attrs)
    bad = np.zeros(logits2d.shape[0], bool)
    if attrs.get("normalize") and attrs.get("weights_from") == "choice" and bias is not None:
        raw, _, _ = router_reference(logits2d, k, bias, **dict(attrs, normalize=0, scale=1.0))
        bad |= np.isfinite(raw).all(axis=1) & (np.abs(raw).sum(axis=1) > 10 * np.abs(raw.sum(axis=1)))
    for p in PERTURBATIONS:
        w1, i1, f1 = router_reference(logits2d, k, bias, perturb=p, **attrs)
        bad |= (i0 != i1).any(axis=1) | (f0 != f1).any(axis=1) | (_row_rel_change(w0, w1) > 1e-3)
    return bad


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def make_bias(rng, E: int, n_group: int, scoring: str, bias_dtype: str | None, dtype: str, tied_groups: int = 2):
    """A selection bias (float32 holding values exact in its dtype: float32 or T) with equal pairs
    inside each group, and groups 1 .. tied_groups - 1 equal to group 0 permuted. Returns (bias or
    None, twins, copies): twins, the sets of experts of equal bias (from which the rows' exact ties
    are made); copies, (group, permutation of group 0) for each such group."""
    size = E // n_group
    copies = [(g, rng.permutation(size)) for g in range(1, min(tied_groups, n_group))]
    if bias_dtype is None:
        return None, [np.arange(E)], copies
    spread = 0.25 if scoring == "sigmoid" else 2.0 / E
    b = (rng.uniform(-1, 1, E) * spread).astype(np.float32)
    if size >= 2:
        for g in range(n_group):
            for _ in range(max(1, size // 4)):
                i, j = g * size + rng.choice(size, 2, replace=False)
                b[j] = b[i]
    for g, perm in copies:
        b[g * size:(g + 1) * size] = b[:size][perm]
    b = R.round_to(b, dtype if bias_dtype == "T" else "f32")
    _, inverse, counts = np.unique(b, return_inverse=True, return_counts=True)
    twins = [np.flatnonzero(inverse == u) for u in np.flatnonzero(counts >= 2)]
    return b, twins, copies


ROW_KINDS = ("plain", "ties", "group_ties", "ties", "nan", "neginf", "plain", "group_ties")


def make_rows(rng, n: int, E: int, n_group: int, twins, copies, kinds=ROW_KINDS):
    """n rows of grid logits, row r of kind kinds[r % len(kinds)]: plain; ties (experts of equal
    bias given equal logits); group_ties (ties, then the bias's copies of group 0 made in the
    logits too: equal group scores); nan (a few NaN); neginf (a few -inf); all_neginf; saturated
    (a few logits >= 18, whose float32 sigmoids are all 1)."""
    x = rng.integers(-256, 257, size=(n, E)).astype(np.float32) / 64
    size = E // n_group
    for r in range(n):
        kind = kinds[r % len(kinds)]
        row = x[r]
        if kind in ("ties", "group_ties") and twins:
            for _ in range(max(2, E // 4)):
                t = twins[rng.integers(len(twins))]
                i, j = rng.choice(t, 2, replace=False)
                row[j] = row[i]
        if kind == "group_ties":
            for g, perm in copies:
                row[g * size:(g + 1) * size] = row[:size][perm]
        if kind == "nan":
            row[rng.choice(E, max(1, E // 16), replace=False)] = np.nan
        if kind == "neginf":
            row[rng.choice(E, max(1, E // 8), replace=False)] = -np.inf
        if kind == "all_neginf":
            row[:] = -np.inf
        if kind == "saturated":
            m = max(2, E // 8)
            row[rng.choice(E, m, replace=False)] = rng.integers(18, 40, m)
    return x


def robust_rows(rng, n, E, n_group, k, bias, twins, copies, attrs, kinds=ROW_KINDS):
    """make_rows, with the fragile rows drawn again (each kind keeps its place, unless 20 draws of
    it fail: all -inf rows, say, where the bias alone decides and cancels; then a plain row)."""
    x = make_rows(rng, n, E, n_group, twins, copies, kinds)
    tries = np.zeros(n, int)
    for _ in range(60):
        bad = np.flatnonzero(fragile_rows(x, k, bias, attrs))
        if bad.size == 0:
            return x
        for r in bad:
            tries[r] += 1
            kind = kinds[r % len(kinds)] if tries[r] < 20 else "plain"
            x[r] = make_rows(rng, 1, E, n_group, twins, copies, [kind])[0]
    # rows still fragile after 60 draws (softmax weights from the choice, where a bias decides and
    # cancels) are left out, as long as half the rows remain
    keep = ~fragile_rows(x, k, bias, attrs)
    if keep.sum() < n // 2:
        raise FragileBias(f"could not draw robust rows for E={E} n_group={n_group} k={k} {attrs}")
    return x[keep]


class FragileBias(Exception):
    """Most rows' normalised weights cancel whatever the logits: with weights from the choice, k
    near E and a bias of both signs, the divisor is mostly the sum of the chosen biases. The caller
    draws another bias."""


# --------------------------------------------------------------------------------------------
# models and comparisons
# --------------------------------------------------------------------------------------------


def router_model(*, E: int, k: int, dtype: str = "f32", rank: int = 2, bias_dtype: str | None = None,
                 bias_shape: str = "E", **attrs):
    """One TopKRouter node: `logits` float32 [.., E] Cast to `dtype`; with `bias_dtype` ("f32" or
    "T"), graph input `bias` float32 ([E] or [1, E]) Cast to T for "T"; outputs as
    graphs.topk_router_model's (weights Cast back to float32)."""
    et = graphs.elem_type(dtype)
    nodes, ins = [], [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [f"d{i}" for i in range(rank - 1)] + [E])]
    x = "logits"
    if et != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", ["logits"], ["logits_t"], to=et))
        x = "logits_t"
    inputs = [x]
    if bias_dtype is not None:
        ins.append(helper.make_tensor_value_info("bias", TensorProto.FLOAT, [E] if bias_shape == "E" else [1, E]))
        b = "bias"
        if bias_dtype == "T" and et != TensorProto.FLOAT:
            nodes.append(helper.make_node("Cast", ["bias"], ["bias_t"], to=et))
            b = "bias_t"
        inputs.append(b)
    w = "routing_weights" if et == TensorProto.FLOAT else "routing_weights_t"
    nodes.append(helper.make_node("TopKRouter", inputs, [w, "routing_indices"], domain=graphs.DOMAIN, k=k, **attrs))
    if w != "routing_weights":
        nodes.append(helper.make_node("Cast", [w], ["routing_weights"], to=TensorProto.FLOAT))
    outs = [helper.make_tensor_value_info("routing_weights", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("routing_indices", TensorProto.INT64, None)]
    return graphs._finish(nodes, ins, outs, [], "topk_router_groups", graphs.DEFAULT_OPSET)


def run_router(lib, logits, k, dtype="f32", bias=None, bias_dtype=None, bias_shape="E", **attrs):
    E = logits.shape[-1]
    model = router_model(E=E, k=k, dtype=dtype, rank=logits.ndim, bias_dtype=bias_dtype if bias is not None else None,
                         bias_shape=bias_shape, **attrs)
    feeds = {"logits": logits}
    if bias is not None:
        feeds["bias"] = bias.reshape(E if bias_shape == "E" else (1, E))
    return ort_utils.run(ort_utils.session(model, lib), feeds)


def assert_weights(got, want, dtype, what):
    """The non-finite weights exactly where the reference has them (NaN for NaN, the same
    infinity); the finite ones within the dtype's tolerance (R.TOLERANCE, relative to the largest)."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    fin = np.isfinite(want)
    np.testing.assert_array_equal(got[~fin], want[~fin], err_msg=f"{what}: the non-finite weights")
    assert np.isfinite(got[fin]).all(), f"{what}: non-finite weights where the reference's are finite"
    if fin.any():
        R.assert_close(got[fin], want[fin], dtype, what)


def check_against_reference(lib, logits, k, dtype, bias, bias_dtype, bias_shape, attrs, what):
    w, i = run_router(lib, logits, k, dtype, bias, bias_dtype, bias_shape, **attrs)
    want_w, want_i, _ = router_reference(R.round_to(logits, dtype), k, bias, **attrs)
    assert w.shape == logits.shape[:-1] + (k,) and i.shape == w.shape and i.dtype == np.int64
    np.testing.assert_array_equal(i, want_i, err_msg=f"indices: {what}")
    assert_weights(w, want_w, dtype, f"weights: {what}")


# the attributes besides n_group, topk_group and k, cycled through deterministically
OPTIONS = dict(
    bias_dtype=(None, "f32", "T"),
    bias_shape=("E", "1E"),
    group_fill=(NEG_INF, 0.0),
    weights_from=("scores", "choice"),
    norm=((0, 0.0), (1, 0.0), (1, 1e-20)),
    scale=(1.0, 2.5),
    tie_break=("lower_index", "higher_index"),
    group_score=("top2_sum", "max"),
)
COMBOS = [dict(zip(OPTIONS, c)) for c in itertools.product(*OPTIONS.values())]


def k_choices(E, competing):
    """1, a few, exactly the competing experts, one more than them (experts at group_fill chosen), E."""
    ks = {1, min(E, 6), competing, min(E, competing + 1), min(E, competing + 5), E}
    return sorted(ks)


def configs(E, offset):
    """(n_group, topk_group, k, combo, tied_groups) for every n_group and topk_group (0 too, for
    n_group 1 and 8), k and the other attributes cycled; tied_groups: 2 or every group (the groups
    a group_ties row makes equal)."""
    j = 0
    for n_group in N_GROUPS:
        for topk_group in ([0] if n_group in (1, 8) else []) + list(range(1, n_group + 1)):
            combo = dict(COMBOS[(j * 97 + offset) % len(COMBOS)])
            limited = 0 < topk_group < n_group
            if limited and E // n_group < 2:
                combo["group_score"] = "max"  # top2_sum over groups of one is an error (tested below)
            competing = E if not limited else topk_group * (E // n_group)
            ks = k_choices(E, competing)
            # where the groups limit the choice, half the time more than the competing experts
            k = ks[(j * 5 + offset) % len(ks)]
            if limited and competing < E and j % 2 == 0:
                k = min(E, competing + 1 + (j + offset) % 3)
            yield n_group, topk_group, k, combo, (n_group if j % 2 else 2)
            j += 1


@pytest.mark.parametrize("E", ES)
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_against_the_reference(lib, rng, dtype, scoring, E):
    offset = zlib.crc32(f"{dtype}{scoring}{E}".encode()) % len(COMBOS)
    T = 24
    for n_group, topk_group, k, c, tied_groups in configs(E, offset):
        normalize, eps = c["norm"]
        attrs = dict(scoring=scoring, normalize=normalize, normalize_eps=eps, tie_break=c["tie_break"],
                     n_group=n_group, topk_group=topk_group, group_score=c["group_score"],
                     group_fill=c["group_fill"], weights_from=c["weights_from"], scale=c["scale"])
        kinds = ("plain", "ties", "group_ties", "ties", "nan", "neginf", "plain", "group_ties", "all_neginf",
                 "saturated" if scoring == "sigmoid" else "ties")
        for attempt in range(8):
            bias, twins, copies = make_bias(rng, E, n_group, scoring, c["bias_dtype"], dtype, tied_groups)
            try:
                logits = robust_rows(rng, T, E, n_group, k, bias, twins, copies, attrs, kinds)
                break
            except FragileBias:
                if attempt == 7:
                    raise
        what = f"E={E} k={k} bias={c['bias_dtype']}{c['bias_shape']} {attrs}"
        check_against_reference(lib, logits, k, dtype, bias, c["bias_dtype"], c["bias_shape"], attrs, what)


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_no_token_one_token_and_leading_dimensions(lib, rng, dtype):
    E, k = 64, 10
    attrs = dict(scoring="sigmoid", normalize=1, normalize_eps=1e-20, n_group=8, topk_group=2,
                 group_score="top2_sum", weights_from="scores", scale=2.5)
    bias, twins, copies = make_bias(rng, E, 8, "sigmoid", "f32", dtype)
    w, i = run_router(lib, np.zeros((0, E), np.float32), k, dtype, bias, "f32", "1E", **attrs)
    assert w.shape == (0, k) and i.shape == (0, k)
    for shape in [(1, E), (2, 3, E)]:
        logits = robust_rows(rng, int(np.prod(shape[:-1])), E, 8, k, bias, twins, copies, attrs).reshape(shape)
        check_against_reference(lib, logits, k, dtype, bias, "f32", "1E", attrs, f"shape {shape}")


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("n_group,topk_group", [(1, 0), (4, 0), (4, 4)])
def test_topk_softmax_with_eps_and_scale(lib, rng, dtype, n_group, topk_group):
    """topk_softmax takes n_group where every group competes, normalize_eps and scale."""
    E, k = 16, 5
    for normalize, eps, scale in [(0, 0.0, 2.5), (1, 1e-20, 1.0), (1, 0.0, 2.5)]:
        attrs = dict(scoring="topk_softmax", normalize=normalize, normalize_eps=eps, scale=scale,
                     n_group=n_group, topk_group=topk_group)
        logits = robust_rows(rng, 16, E, n_group, k, None, [np.arange(E)], [], attrs)
        check_against_reference(lib, logits, k, dtype, None, None, "E", attrs, f"{attrs}")


def test_hand_worked_groups(lib):
    """A row worked by hand: E = 8 in 4 groups of 2, sigmoid(0) = 0.5 everywhere, the bias picking
    the groups; equal values (experts and groups) by the tie rule."""
    bias = np.array([0.0, 0.25, 0.25, 0.0, 0.5, -0.5, 0.0, 0.0], np.float32)
    logits = np.zeros((1, 8), np.float32)
    # c = 0.5, 0.75, 0.75, 0.5, 1.0, 0.0, 0.5, 0.5; top2_sum G = 1.25, 1.25, 1.0, 1.0
    base = dict(scoring="sigmoid", n_group=4)

    def run(k, **attrs):
        return run_router(lib, logits, k, "f32", bias, "f32", **base, **attrs)

    w, i = run(3, topk_group=2)
    np.testing.assert_array_equal(i, [[1, 2, 0]])  # groups 0 and 1; expert 0's 0.5 before 3's
    np.testing.assert_allclose(w, [[0.5, 0.5, 0.5]])
    _, i = run(3, topk_group=2, tie_break="higher_index")
    np.testing.assert_array_equal(i, [[2, 1, 3]])
    _, i = run(6, topk_group=3)  # groups 0, 1 and 2 (2 before 3 at G = 1.0)
    np.testing.assert_array_equal(i, [[4, 1, 2, 0, 3, 5]])
    _, i = run(6, topk_group=3, tie_break="higher_index")  # groups 1, 0 and 3
    np.testing.assert_array_equal(i, [[2, 1, 7, 6, 3, 0]])
    # max: G = 0.75, 0.75, 1.0, 0.5: groups 2 and 0; fill 0: the filled 2 and 3 rank with 5's 0.0, by index
    w, i = run(5, topk_group=2, group_score="max", weights_from="choice", group_fill=0.0)
    np.testing.assert_array_equal(i, [[4, 1, 0, 2, 3]])
    np.testing.assert_array_equal(w, [[1.0, 0.75, 0.5, 0.0, 0.0]])
    # fill -inf: 5 (0.0) before the filled 2 (-inf), whose weight from the choice is -inf
    w, i = run(5, topk_group=2, group_score="max", weights_from="choice")
    np.testing.assert_array_equal(i, [[4, 1, 0, 5, 2]])
    np.testing.assert_array_equal(w, [[1.0, 0.75, 0.5, 0.0, NEG_INF]])
    w, _ = run(5, topk_group=2, group_score="max", weights_from="choice", normalize=1)  # / -inf
    np.testing.assert_array_equal(w, [[0.0, 0.0, 0.0, 0.0, np.nan]])
    w, i = run(5, topk_group=2, group_score="max", normalize=1, scale=2.5)  # weights from the scores
    np.testing.assert_array_equal(i, [[4, 1, 0, 5, 2]])
    np.testing.assert_allclose(w, [[0.5, 0.5, 0.5, 0.5, 0.5]])


def test_normalize_eps_keeps_zero_weights_finite(lib):
    """All chosen weights 0 (sigmoid of -inf): eps 1e-20 gives 0, eps 0 gives 0/0 = NaN."""
    logits = np.full((2, 8), -np.inf, np.float32)
    w, i = run_router(lib, logits, 2, scoring="sigmoid", normalize=1, normalize_eps=1e-20, scale=2.5)
    np.testing.assert_array_equal(w, 0.0)
    np.testing.assert_array_equal(i, [[0, 1], [0, 1]])
    w, _ = run_router(lib, logits, 2, scoring="sigmoid", normalize=1)
    assert np.isnan(w).all()


# --------------------------------------------------------------------------------------------
# against the ONNX graphs the exporters write
# --------------------------------------------------------------------------------------------


class _G:
    """A float32 router graph: logits [T, E] Cast to T and back; the weights Cast to T and back."""

    def __init__(self, dtype):
        self.nodes, self.inits, self.n = [], [], 0
        self.et = graphs.elem_type(dtype)
        self.node("Cast", ["logits"], ["lt"], to=self.et)
        self.node("Cast", ["lt"], ["l32"], to=TensorProto.FLOAT)

    def const(self, value, dtype=np.int64):
        self.n += 1
        name = f"c{self.n}"
        self.inits.append(numpy_helper.from_array(np.array(value, dtype), name))
        return name

    def node(self, op, ins, outs=None, **attrs):
        self.n += 1
        outs = outs or [f"t{self.n}"]
        self.nodes.append(helper.make_node(op, ins, outs, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def finish(self, weights, indices, E):
        wt = self.node("Cast", [weights], to=self.et)
        self.node("Cast", [wt], ["routing_weights"], to=TensorProto.FLOAT)
        self.node("Identity", [indices], ["routing_indices"])
        ins = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["T", E])]
        outs = [helper.make_tensor_value_info("routing_weights", TensorProto.FLOAT, None),
                helper.make_tensor_value_info("routing_indices", TensorProto.INT64, None)]
        return graphs._finish(self.nodes, ins, outs, self.inits, "exported_router", graphs.DEFAULT_OPSET, custom=False)


def _group_mask_fill(g: _G, c, E, n_group, topk_group, group_score, fill):
    """torch: group_scores = c.view(-1, G, E/G).topk(2)[0].sum(-1) (or .max(-1).values);
    group_idx = topk(group_scores, topk_group, sorted=False)[1]; group_mask = zeros.scatter_(1,
    group_idx, 1); score_mask = group_mask.unsqueeze(-1).expand(-1, G, E/G).reshape(-1, E);
    c.masked_fill(~score_mask.bool(), fill)."""
    size = E // n_group
    cg = g.node("Reshape", [c, g.const([-1, n_group, size])])
    if group_score == "top2_sum":
        top2, _ = g.node("TopK", [cg, g.const([2])], [f"top2_{g.n}", f"top2i_{g.n}"], axis=-1, largest=1, sorted=1)
        gs = g.node("ReduceSum", [top2, g.const([-1])], keepdims=0)
    else:
        gs = g.node("ReduceMax", [cg], axes=[-1], keepdims=0)
    _, gidx = g.node("TopK", [gs, g.const([topk_group])], [f"gv_{g.n}", f"gi_{g.n}"], axis=-1, largest=1, sorted=0)
    zeros = g.node("ConstantOfShape", [g.node("Shape", [gs])], value=numpy_helper.from_array(np.zeros(1, np.float32)))
    ones = g.node("ConstantOfShape", [g.node("Shape", [gidx])], value=numpy_helper.from_array(np.ones(1, np.float32)))
    gmask = g.node("ScatterElements", [zeros, gidx, ones], axis=1)
    un = g.node("Unsqueeze", [gmask, g.const([-1])])
    shape = g.node("Concat", [g.node("Shape", [gmask]), g.const([size])], axis=0)
    ex = g.node("Expand", [un, shape])
    smask = g.node("Reshape", [ex, g.const([-1, E])])
    notm = g.node("Not", [g.node("Cast", [smask], to=TensorProto.BOOL)])
    return g.node("Where", [notm, g.const(np.float32(fill), np.float32), c])


def exported_router(family, *, E, k, dtype, bias=None, n_group=1, topk_group=1, scale=1.0):
    """The graph torch's TorchScript exporter writes for `family`'s router (float32 router math)."""
    g = _G(dtype)
    axis1 = g.const([-1])
    if family in ("deepseek_v3", "minimax_m2"):
        s = g.node("Sigmoid", ["l32"])
        c = g.node("Add", [s, g.const(bias.reshape(E), np.float32)])
    else:  # deepseek_v2, mistral4
        s = g.node("Softmax", ["l32"], axis=-1)
        c = s
    if family == "deepseek_v3":
        c = _group_mask_fill(g, c, E, n_group, topk_group, "top2_sum", NEG_INF)
    elif family == "deepseek_v2":
        c = _group_mask_fill(g, c, E, n_group, topk_group, "max", 0.0)
    elif family == "mistral4":
        c = _group_mask_fill(g, c, E, n_group, topk_group, "top2_sum", 0.0)
    v, idx = g.node("TopK", [c, g.const([k])], ["topk_v", "topk_i"], axis=-1, largest=1, sorted=0)
    if family == "deepseek_v2":
        w = v  # topk_weight from the masked scores; no normalisation
    else:
        w = g.node("GatherElements", [s, idx], axis=1)
        den = g.node("ReduceSum", [w, axis1], keepdims=1)
        if family != "minimax_m2":
            den = g.node("Add", [den, g.const(np.float32(1e-20), np.float32)])
        w = g.node("Div", [w, den])
    if family != "minimax_m2":
        w = g.node("Mul", [w, g.const(np.float32(scale), np.float32)])
    return g.finish(w, idx, E)


FAMILIES = {
    # E, k, n_group, topk_group, scale; the TopKRouter attributes that stand for the graph
    "deepseek_v3": (256, 8, 8, 4, 2.5, dict(scoring="sigmoid", group_score="top2_sum", group_fill=NEG_INF,
                                          weights_from="scores", normalize=1, normalize_eps=1e-20)),
    "deepseek_v2": (160, 6, 8, 3, 16.0, dict(scoring="softmax", group_score="max", group_fill=0.0,
                                           weights_from="choice")),
    "mistral4": (128, 4, 4, 2, 1.5, dict(scoring="softmax", group_score="top2_sum", group_fill=0.0,
                                       weights_from="scores", normalize=1, normalize_eps=1e-20)),
    "minimax_m2": (256, 8, 1, 1, 1.0, dict(scoring="sigmoid", normalize=1)),
}


def as_sets(w, i):
    """Each row's (index, weight) pairs in index order."""
    o = np.argsort(i, axis=-1, kind="stable")
    return np.take_along_axis(w, o, -1), np.take_along_axis(i, o, -1)


def compare_with_graph(lib, family, dtype, rng, E, k, n_group, topk_group, scale, node_attrs, bias_dtype, kinds, T=64,
                       tied_groups=2):
    scoring = node_attrs["scoring"]
    attrs = dict(node_attrs, n_group=n_group, topk_group=topk_group, scale=scale)
    if family == "minimax_m2":
        attrs.pop("n_group"), attrs.pop("topk_group")
    if family in ("deepseek_v3", "minimax_m2"):
        bias, twins, copies = make_bias(rng, E, n_group, scoring, bias_dtype, dtype, tied_groups)
    else:
        bias, twins, copies = make_bias(rng, E, n_group, scoring, None, dtype, tied_groups)
        bias_dtype = None
    logits = robust_rows(rng, T, E, n_group, k, bias, twins, copies, attrs, kinds)
    w, i = run_router(lib, logits, k, dtype, bias, bias_dtype, "E", **attrs)
    model = exported_router(family, E=E, k=k, dtype=dtype, bias=bias, n_group=n_group, topk_group=topk_group, scale=scale)
    gw, gi = ort_utils.run(ort_utils.session(model), {"logits": logits})
    (w, i), (gw, gi) = as_sets(w, i), as_sets(gw, gi)
    rows = np.flatnonzero((i != gi).any(axis=1))
    assert rows.size == 0, (
        f"{family} {dtype}: {rows.size} of {T} rows choose other experts than the ONNX graph, e.g. row {rows[0]} "
        f"(kind {kinds[rows[0] % len(kinds)]}): node {i[rows[0]].tolist()}, graph {gi[rows[0]].tolist()}")
    assert_weights(w, gw, dtype, f"{family} {dtype}: weights against the ONNX graph's")


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_same_as_the_exported_router(lib, rng, family, dtype):
    """Plain rows and rows with -inf logits (-inf scores for softmax, 0 for sigmoid)."""
    E, k, n_group, topk_group, scale, attrs = FAMILIES[family]
    compare_with_graph(lib, family, dtype, rng, E, k, n_group, topk_group, scale, attrs, "f32", ("plain", "neginf"))


@pytest.mark.parametrize("family,bias_dtype", [(f, b) for f in FAMILIES for b in ("f32", "T")
                                               if b == "f32" or f in ("deepseek_v3", "minimax_m2")])
def test_same_as_the_exported_router_on_ties(lib, rng, family, bias_dtype):
    """Exact ties inside groups and between every group (group_ties rows: all groups equal, so the
    tie rule alone picks them); ONNX Runtime's TopK, sorted or not, chooses the lower index among
    equal values, as lower_index does. For the sigmoid routers all -inf rows too (every score 0:
    the bias decides). Softmax's all -inf rows are NaN, which ONNX Runtime's TopK ranks by no rule
    (test_all_minus_infinity_softmax_rows_with_groups)."""
    E, k, n_group, topk_group, scale, attrs = FAMILIES[family]
    kinds = ("ties", "group_ties", "all_neginf" if attrs["scoring"] == "sigmoid" else "ties", "group_ties")
    for dtype in ("f32", "bf16"):
        compare_with_graph(lib, family, dtype, rng, E, k, n_group, topk_group, scale, attrs, bias_dtype, kinds,
                           tied_groups=n_group)
        # k more than the competing experts: the filled experts (all tied) by index
        if n_group > 1:
            big_k = topk_group * (E // n_group) + 3
            compare_with_graph(lib, family, dtype, rng, E, big_k, n_group, topk_group, scale, attrs, bias_dtype, kinds,
                               T=16, tied_groups=n_group)


def test_all_minus_infinity_softmax_rows_with_groups(lib):
    """Softmax of an all -inf row is NaN everywhere: every group scores NaN (a tie, so the lowest
    topk_group groups compete), and the other experts' group_fill ranks above NaN: the k chosen
    are the lowest experts outside the competing groups, at the fill. With DeepSeek-V2's form
    (fill 0, weights_from choice) the weights are then 0, not NaN; with Mistral 4's (weights from
    the scores) NaN. ONNX Runtime's TopK ranks NaN by no rule (its graph gives experts 0 .. k-1)."""
    E, k, n_group, topk_group, scale, attrs = FAMILIES["deepseek_v2"]
    logits = np.full((2, E), -np.inf, np.float32)
    w, i = run_router(lib, logits, k, n_group=n_group, topk_group=topk_group, scale=scale, **attrs)
    first = topk_group * (E // n_group)
    np.testing.assert_array_equal(i, [list(range(first, first + k))] * 2)
    np.testing.assert_array_equal(w, 0.0)
    E, k, n_group, topk_group, scale, attrs = FAMILIES["mistral4"]
    w, i = run_router(lib, np.full((1, E), -np.inf, np.float32), k, n_group=n_group, topk_group=topk_group,
                      scale=scale, **attrs)
    first = topk_group * (E // n_group)
    np.testing.assert_array_equal(i, [list(range(first, first + k))])
    assert np.isnan(w).all()


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


def _error(lib, E=8, k=2, logits_type="f32", bias=None, **attrs):
    """The message of the model's failure (session creation or run); `bias` = (dtype, shape). The
    weights go through a Cast, as in a model: a graph output declared float16 would meet ONNX
    Runtime's own type check first when the node's type inference fails (its fallback type is
    float32), with ORT's message instead of the op's."""
    ins = [helper.make_tensor_value_info("logits", graphs.elem_type(logits_type), [2, E])]
    feed = {"logits": np.zeros([2, E], np.float32)}
    names = ["logits"]
    if bias is not None:
        ins.append(helper.make_tensor_value_info("bias", graphs.elem_type(bias[0]), bias[1]))
        feed["bias"] = np.zeros(bias[1], np.float32)
        names.append("bias")
    nodes = [helper.make_node("TopKRouter", names, ["w", "routing_indices"], domain=graphs.DOMAIN, k=k, **attrs),
             helper.make_node("Cast", ["w"], ["routing_weights"], to=TensorProto.FLOAT)]
    outs = [helper.make_tensor_value_info("routing_weights", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("routing_indices", TensorProto.INT64, None)]
    return any_error(graphs._finish(nodes, ins, outs, [], "topk_router_error", graphs.DEFAULT_OPSET), lib, feed)


BAD_ATTRIBUTES = [
    (dict(n_group=0), "TopKRouter: attribute 'n_group' must be at least 1, got 0"),
    (dict(n_group=-4), "TopKRouter: attribute 'n_group' must be at least 1, got -4"),
    (dict(n_group=4, topk_group=5), "TopKRouter: attribute 'topk_group' must be in [1, n_group = 4] (or 0: every group), got 5"),
    (dict(n_group=4, topk_group=-1), "TopKRouter: attribute 'topk_group' must be in [1, n_group = 4] (or 0: every group), got -1"),
    (dict(topk_group=2), "TopKRouter: attribute 'topk_group' must be in [1, n_group = 1] (or 0: every group), got 2"),
    (dict(n_group=3, topk_group=1), "TopKRouter: the 8 experts of input 'logits' do not split into n_group = 3 groups"),
    (dict(n_group=8, topk_group=4), "TopKRouter: group_score 'top2_sum' needs two experts a group; n_group = 8 leaves 1"),
    (dict(n_group=2, topk_group=1, group_fill=float("nan")), "TopKRouter: attribute 'group_fill' is NaN"),
    (dict(group_fill=float("nan")), "TopKRouter: attribute 'group_fill' is NaN"),
    (dict(group_score="sum"), "TopKRouter: attribute 'group_score' has unsupported value 'sum' (supported: top2_sum, max)"),
    (dict(weights_from="bias"), "TopKRouter: attribute 'weights_from' has unsupported value 'bias' (supported: scores, choice)"),
    (dict(normalize=1, normalize_eps=-1e-20), "TopKRouter: attribute 'normalize_eps' must be finite and >= 0, got -0.00000000000000000001"),
    (dict(normalize_eps=float("inf")), "TopKRouter: attribute 'normalize_eps' must be finite and >= 0, got inf"),
    (dict(normalize_eps=float("nan")), "TopKRouter: attribute 'normalize_eps' must be finite and >= 0, got NaN"),
    (dict(scale=float("inf")), "TopKRouter: attribute 'scale' must be finite, got inf"),
    (dict(scale=float("-inf")), "TopKRouter: attribute 'scale' must be finite, got -inf"),
    (dict(scale=float("nan")), "TopKRouter: attribute 'scale' must be finite, got NaN"),
    (dict(scoring="topk_softmax", n_group=4, topk_group=2), "TopKRouter: scoring 'topk_softmax' takes no group-limited choice and no 'weights_from'"),
    (dict(scoring="topk_softmax", weights_from="choice"), "TopKRouter: scoring 'topk_softmax' takes no group-limited choice and no 'weights_from'"),
]


@pytest.mark.parametrize("attrs,message", BAD_ATTRIBUTES, ids=[m.split(": ", 1)[1][:48] + f"-{i}" for i, (_, m) in enumerate(BAD_ATTRIBUTES)])
def test_bad_group_attributes_are_named(lib, attrs, message):
    assert_mentions(_error(lib, **attrs), message)


BAD_BIAS = [
    (dict(bias=("f32", [9])), "TopKRouter: input 'bias' has [9] values but input 'logits' has [2, 8] experts"),
    (dict(bias=("f32", [1, 9])), "TopKRouter: input 'bias' has [1, 9] values but input 'logits' has [2, 8] experts"),
    (dict(bias=("f32", [2, 8])), "TopKRouter: input 'bias' must have shape [E] or [1, E], got [2, 8]"),
    (dict(bias=("f32", [1, 1, 8])), "TopKRouter: input 'bias' must have shape [E] or [1, E], got [1, 1, 8]"),
    (dict(bias=("int64", [8])), "TopKRouter: input 'bias' has element type int64; it must be float32 or T (float32, the type of 'logits')"),
    (dict(bias=("f16", [8])), "TopKRouter: input 'bias' has element type float16; it must be float32 or T (float32, the type of 'logits')"),
    (dict(bias=("bf16", [8]), logits_type="f16"), "TopKRouter: input 'bias' has element type bfloat16; it must be float32 or T (float16, the type of 'logits')"),
    (dict(bias=("f32", [8]), scoring="topk_softmax"), "TopKRouter: scoring 'topk_softmax' takes no 'bias'"),
]


@pytest.mark.parametrize("case,message", BAD_BIAS, ids=[f"bias-{i}" for i in range(len(BAD_BIAS))])
def test_bad_bias_is_named(lib, case, message):
    assert_mentions(_error(lib, **case), message)


def test_float32_bias_with_16_bit_logits_and_groups_over_every_group_are_accepted(lib, rng):
    """float32 bias with float16 logits (the models keep e_score_correction_bias in float32); and
    n_group without topk_group (every group competes) does not limit anything, so top2_sum over
    groups of one is no error."""
    E = 8
    logits = rng.integers(-256, 257, size=(4, E)).astype(np.float32) / 64
    bias = rng.uniform(-0.2, 0.2, E).astype(np.float32)
    for dtype in ("f16", "bf16"):
        attrs = dict(scoring="sigmoid", n_group=8)
        w, i = run_router(lib, logits, 3, dtype, bias, "f32", **attrs)
        want_w, want_i, _ = router_reference(R.round_to(logits, dtype), 3, bias, **attrs)
        np.testing.assert_array_equal(i, want_i)
        R.assert_close(w, want_w, dtype, "weights")


# --- normalize_min: the divisor's floor (Ernie-4.5's sum.clamp(min=norm_min)) ---

@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_normalize_min_floors_the_divisor(lib, rng, dtype):
    """Against the reference: a floor that never holds (1e-12), one that holds for some rows
    (sigmoid sums of 2 between 0 and 2: floor 1), and one that always holds (softmax: floor 1.5,
    the weights then sum to less than 1)."""
    for scoring, floor in (("softmax", 1e-12), ("sigmoid", 1.0), ("softmax", 1.5)):
        logits = R.round_to(rng.standard_normal((64, 16)).astype(np.float32) * 3, dtype)
        attrs = dict(scoring=scoring, normalize=1, normalize_min=floor)
        w, i = run_router(lib, logits, 2, dtype, **attrs)
        want_w, want_i, _ = router_reference(logits, 2, **attrs)
        np.testing.assert_array_equal(i, want_i)
        assert_weights(w, want_w, dtype, f"{scoring} floor {floor}")
    # a negative sum of choice scores is not floored at 0 (0 means no floor)
    bias = np.full(8, -2.0, np.float32)
    logits = rng.standard_normal((16, 8)).astype(np.float32)
    attrs = dict(scoring="sigmoid", normalize=1, weights_from="choice")
    w, _ = run_router(lib, logits, 2, "f32", bias=bias, bias_dtype="f32", **attrs)
    want_w, _, _ = router_reference(logits, 2, bias=bias, **attrs)
    assert_weights(w, want_w, "f32", "negative sums, no floor")


def test_ernie_router_graph_equals_the_node(lib, rng):
    """Ernie-4.5's router as the TorchScript exporter writes it (softmax, moe_statics added for the
    choice, TopK, the softmax gathered, divided by its sum clamped from below) against one
    TopKRouter node, in ONNX Runtime; tiny sums included (rows one expert dominates)."""
    E, k, norm_min = 8, 2, 1e-12
    bias = (rng.standard_normal(E) * 0.1).astype(np.float32)
    X = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", E])
    inits = [numpy_helper.from_array(bias, "b"), numpy_helper.from_array(np.array([k], np.int64), "k"),
             numpy_helper.from_array(np.array([-1], np.int64), "ax"), numpy_helper.from_array(np.array(norm_min, np.float32), "lo")]
    nodes = [helper.make_node("Softmax", ["x"], ["s"], axis=1), helper.make_node("Add", ["s", "b"], ["c"]),
             helper.make_node("TopK", ["c", "k"], ["v", "i"], axis=-1),
             helper.make_node("GatherElements", ["s", "i"], ["g"], axis=1),
             helper.make_node("ReduceSum", ["g", "ax"], ["sum"], keepdims=1),
             helper.make_node("Clip", ["sum", "lo"], ["den"]), helper.make_node("Div", ["g", "den"], ["w"]),
             helper.make_node("TopKRouter", ["x", "b"], ["w2", "i2"], domain=graphs.DOMAIN, k=k, normalize=1,
                              normalize_min=norm_min)]
    outs = [helper.make_tensor_value_info(n, t, None) for n, t in
            (("w", TensorProto.FLOAT), ("i", TensorProto.INT64), ("w2", TensorProto.FLOAT), ("i2", TensorProto.INT64))]
    model = graphs._finish(nodes, [X], outs, inits, "ernie_router", graphs.DEFAULT_OPSET)
    x = rng.standard_normal((64, E)).astype(np.float32) * 4
    x[::4, 0] += 120.0  # expert 0 takes all: the others' softmax underflows to 0
    w, i, w2, i2 = ort_utils.run(ort_utils.session(model, lib), {"x": x})
    np.testing.assert_array_equal(i, i2)
    np.testing.assert_allclose(w2, w, rtol=1e-6, atol=1e-7)
