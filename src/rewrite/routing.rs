//! Routing bookkeeping read by meaning: the index values MoE layers build from routing indices
//! (one-hot masks, row gathers and scatters, floor divisions, sorts by expert) recognised in every
//! spelling the exporters write, so that a rule asks what a value is rather than which nodes
//! spell it. Each helper answers only for forms whose meaning it can prove; anything else is
//! `None` and the caller's rule names what it could not explain.

use onnx_protobuf::NodeProto;

use super::matcher::{axes_of, prod, rank_of, shape_entries, strip_noop_expand};
use super::prove::shape::shape_of;

pub(super) mod dims;
mod width;
pub use width::{chosen_width, router_experts};
use crate::onnx::graph::{attr_i, attr_s, strip, GraphIndex};
use crate::onnx::tensor::tensor_f32;
pub use dims::{shape_vector, sym};

/// `v` with Casts between numeric types removed (what an index or a 0/1 mask is does not change).
pub fn uncast<'g>(g: &GraphIndex<'g>, v: &'g str) -> &'g str {
    strip(g, v, &["Cast", "Identity"])
}

/// Whether `v` is an integer tensor provably without negative entries: TopK/ArgMax indices,
/// shapes, and the ops that move or combine such values without making them negative.
pub fn nonneg(g: &GraphIndex, v: &str) -> bool {
    nonneg_depth(g, v, 0)
}

fn nonneg_depth(g: &GraphIndex, v: &str, depth: usize) -> bool {
    if depth > 32 {
        return false;
    }
    if let Some(c) = g.const_i64(v) {
        return c.iter().all(|&x| x >= 0);
    }
    let Some((_, n)) = g.prod(v) else {
        return false;
    };
    if !n.domain.is_empty() {
        return false;
    }
    let inp = |i: usize| n.input.get(i).is_some_and(|x| nonneg_depth(g, x, depth + 1));
    match n.op_type.as_str() {
        "TopK" => n.output.get(1).is_some_and(|o| o == v) || inp(0),
        "ArgMax" | "ArgMin" | "Shape" | "Size" | "NonZero" => true,
        "Cast" => matches!(attr_i(n, "to"), Some(6 | 7 | 1 | 10 | 11 | 16)) && inp(0),
        // the data input moves; indices, shapes and axes do not make entries negative
        "Identity" | "Reshape" | "Flatten" | "Unsqueeze" | "Squeeze" | "Expand" | "Transpose" | "Gather" | "GatherND" | "GatherElements" | "Slice"
        | "ReduceMax" | "ReduceMin" | "ReduceSum" | "CumSum" | "Floor" | "Ceil" => inp(0),
        "Concat" => (0..n.input.len()).all(inp),
        "Add" | "Mul" => inp(0) && inp(1),
        "Div" => inp(0) && g.const_scalar(&n.input[1]).is_some_and(|k| k > 0.0),
        "Clip" => n.input.get(1).and_then(|x| g.const_scalar(x)).is_some_and(|lo| lo >= 0.0),
        "Range" => {
            let (s, d) = (g.const_scalar(&n.input[0]), g.const_scalar(&n.input[2]));
            s.is_some_and(|s| s >= 0.0) && d.is_some_and(|d| d > 0.0)
        }
        _ => false,
    }
}

/// The arange constant `[0, 1, .., L-1]` (an initializer or `Range(0, L, 1)` of constants): L.
pub fn arange_len(g: &GraphIndex, v: &str) -> Option<i64> {
    let v = uncast(g, v);
    if let Some(c) = g.const_i64(v).or_else(|| g.const_f32(v).map(|f| f.iter().map(|&x| if x.fract() == 0.0 { x as i64 } else { -1 }).collect())) {
        let dims = g.const_dims(v)?;
        return (dims.len() == 1 && !c.is_empty() && c.iter().enumerate().all(|(i, &x)| x == i as i64)).then_some(c.len() as i64);
    }
    let r = prod(g, v, "Range")?;
    let (s, l, d) = (g.const_scalar(&r.input[0])?, g.const_scalar(&r.input[1])?, g.const_scalar(&r.input[2])?);
    (s == 0.0 && d == 1.0 && l >= 1.0 && l.fract() == 0.0).then_some(l as i64)
}

/// `v` is the one-hot of `idx` over the last axis, `v[.., e] = [idx == e]` for e in [0, depth):
/// `OneHot(idx, depth, [0, 1])` or `Equal(Unsqueeze(idx, -1), arange(depth))`, through Casts.
/// OneHot counts a negative index from the back, so it means `[idx == e]` only for indices that
/// are never negative. (idx, depth)
pub fn one_hot(g: &GraphIndex, v: &str) -> Option<(String, i64)> {
    let v = uncast(g, v);
    let (_, n) = g.prod(v)?;
    match n.op_type.as_str() {
        "OneHot" => {
            let idx = n.input[0].as_str();
            let last = super::matcher::is_last_axis(attr_i(n, "axis").unwrap_or(-1), rank_of(g, idx).map(|r| r + 1));
            let vals = g.const_f32(&n.input[2]).or_else(|| g.const_i64(&n.input[2]).map(|x| x.iter().map(|&y| y as f32).collect()));
            let depth = g.const_scalar(&n.input[1])?;
            (last && vals.as_deref() == Some(&[0.0, 1.0]) && depth >= 1.0 && depth.fract() == 0.0 && nonneg(g, idx)).then(|| (idx.to_string(), depth as i64))
        }
        "Equal" => {
            for (a, b) in [(0, 1), (1, 0)] {
                let Some(depth) = arange_len(g, &n.input[b]) else {
                    continue;
                };
                let Some(u) = prod(g, &n.input[a], "Unsqueeze") else {
                    continue;
                };
                let r = rank_of(g, &u.input[0]);
                let ax = axes_of(g, u)?;
                if ax.len() == 1 && super::matcher::is_last_axis(ax[0], r.map(|r| r + 1)) {
                    return Some((u.input[0].clone(), depth));
                }
            }
            None
        }
        // torch.zeros(.., E).scatter(-1, idx.unsqueeze(-1), 1): a 1 at each index (a negative
        // index counts from the back, so again only for indices never negative)
        "ScatterElements" if attr_s(n, "reduction").is_none_or(|r| r == "none") => {
            let u = prod(g, &n.input[1], "Unsqueeze")?;
            let idx = u.input[0].as_str();
            let r = rank_of(g, idx)?;
            let (ua, axis) = (axes_of(g, u)?, attr_i(n, "axis").unwrap_or(0));
            let last = |a: i64| super::matcher::is_last_axis(a, Some(r + 1));
            let depth = zeros_shape(g, &n.input[0]).and_then(|s| shape_entries(g, s)).filter(|e| e.len() == r + 1).and_then(|e| *e.last()?)?;
            (ua.len() == 1 && last(ua[0]) && last(axis) && is_ones(g, &n.input[2]) && nonneg(g, idx) && depth >= 1).then(|| (idx.to_string(), depth))
        }
        _ => None,
    }
}

/// The shape vector of zeros: `ConstantOfShape(shape)` with value 0 (or none), or `Expand(0, shape)`.
pub fn zeros_shape<'g>(g: &GraphIndex<'g>, v: &'g str) -> Option<&'g str> {
    let (_, z) = g.prod(v)?;
    match z.op_type.as_str() {
        "ConstantOfShape" => {
            let zero = z
                .attribute
                .iter()
                .find(|a| a.name == "value")
                .and_then(|a| a.t.as_ref())
                .is_none_or(|t| tensor_f32(t, None).is_ok_and(|v| v.iter().all(|&x| x == 0.0)));
            zero.then_some(z.input[0].as_str())
        }
        "Expand" => (g.const_scalar(&z.input[0]) == Some(0.0)).then_some(z.input[1].as_str()),
        _ => None,
    }
}

/// Whether `v` is zeros (see [`zeros_shape`]).
pub fn is_zeros(g: &GraphIndex, v: &str) -> bool {
    zeros_shape(g, v).is_some()
}

/// Whether a Shape node reads the whole shape (no start other than 0, no end).
pub fn whole_shape(s: &NodeProto) -> bool {
    attr_i(s, "start").unwrap_or(0) == 0 && attr_i(s, "end").is_none()
}

/// `Concat(Shape(a), Slice(Shape(b), [1], [end]))` (axes [0] and steps 1 where given, both Shapes
/// whole): `[len(a)] + b.shape[1:]`, the updates' shape a row scatter at a's entries into b needs
/// (TorchScript reshapes `x[idx] = rows` and `index_put_` rows to it). (a, b)
pub fn rows_with_tail_of<'g>(g: &GraphIndex<'g>, v: &'g str) -> Option<(&'g str, &'g str)> {
    let c = prod(g, v, "Concat")?;
    if c.input.len() != 2 {
        return None;
    }
    let rows = prod(g, &c.input[0], "Shape").filter(|s| whole_shape(s))?;
    let tail = prod(g, &c.input[1], "Slice")?;
    let sh = prod(g, &tail.input[0], "Shape").filter(|s| whole_shape(s))?;
    let (st, en) = (g.const_i64(tail.input.get(1)?)?, g.const_i64(tail.input.get(2)?)?);
    let ax_ok = tail.input.get(3).is_none_or(|a| g.const_i64(a).is_some_and(|a| a == [0]));
    let step_ok = tail.input.get(4).is_none_or(|s| g.const_i64(s).is_some_and(|s| s == [1]));
    (st == [1] && en.len() == 1 && en[0] >= i64::MAX / 2 && ax_ok && step_ok).then(|| (rows.input[0].as_str(), sh.input[0].as_str()))
}

/// Ones: `ConstantOfShape` with value 1, `Expand` of a constant 1, a constant of ones, or a Slice,
/// Reshape or Cast of ones.
pub fn is_ones(g: &GraphIndex, v: &str) -> bool {
    if let Some(c) = g.const_f32(v).or_else(|| g.const_i64(v).map(|x| x.iter().map(|&y| y as f32).collect())) {
        return !c.is_empty() && c.iter().all(|&x| x == 1.0);
    }
    let Some((_, z)) = g.prod(v) else { return false };
    match z.op_type.as_str() {
        "ConstantOfShape" => z
            .attribute
            .iter()
            .find(|a| a.name == "value")
            .and_then(|a| a.t.as_ref())
            .is_some_and(|t| tensor_f32(t, None).is_ok_and(|v| v.iter().all(|&x| x == 1.0))),
        "Expand" => g.const_scalar(&z.input[0]) == Some(1.0),
        "Slice" | "Reshape" | "Cast" | "Identity" => is_ones(g, &z.input[0]),
        _ => false,
    }
}

/// `v = data[idx]` along axis 0: `Gather(data, idx, axis 0)` or `GatherND(data, Unsqueeze(idx,
/// -1), batch_dims 0)` (the same rows). (data, idx)
pub fn row_gather<'g>(g: &GraphIndex<'g>, v: &'g str) -> Option<(&'g str, &'g str)> {
    let (_, n) = g.prod(v)?;
    match n.op_type.as_str() {
        "Gather" if attr_i(n, "axis").unwrap_or(0) == 0 => Some((n.input[0].as_str(), n.input[1].as_str())),
        "GatherND" if attr_i(n, "batch_dims").unwrap_or(0) == 0 => {
            let u = prod(g, &n.input[1], "Unsqueeze")?;
            let ax = axes_of(g, u)?;
            (ax.len() == 1 && super::matcher::is_last_axis(ax[0], rank_of(g, &u.input[0]).map(|r| r + 1))).then(|| (n.input[0].as_str(), u.input[0].as_str()))
        }
        _ => None,
    }
}

/// `v` is `base` with row `idx[i]` replaced by row i of `upd` (torch's `index_copy` along axis 0,
/// or `scatter` of rows): `ScatterND(base, Unsqueeze(idx, -1), upd)` or `ScatterElements(base,
/// Expand(Unsqueeze(idx, 1), S), upd, axis 0)`, no reduction. ScatterElements requires the index
/// to have the updates' shape, so the Expand repeats `idx[i]` along row i whatever S is, as long
/// as idx has a row per update row (the callers check that idx and upd have the same length).
/// (base, idx, upd)
pub fn row_scatter<'g>(g: &GraphIndex<'g>, v: &'g str) -> Option<(&'g str, &'g str, &'g str)> {
    row_scatter_with(g, v, false)
}

/// [`row_scatter`], also reading `index_add` (a scatter with reduction add) when `add_ok`: the
/// same as a copy into zeros at distinct indices, which the caller must know the indices are.
pub fn row_scatter_with<'g>(g: &GraphIndex<'g>, v: &'g str, add_ok: bool) -> Option<(&'g str, &'g str, &'g str)> {
    let (_, n) = g.prod(v)?;
    match attr_s(n, "reduction").as_deref() {
        None | Some("none") => {}
        Some("add") if add_ok && is_zeros(g, &n.input[0]) => {}
        _ => return None,
    }
    match n.op_type.as_str() {
        "ScatterND" => {
            let u = prod(g, &n.input[1], "Unsqueeze")?;
            let ax = axes_of(g, u)?;
            let last = ax.len() == 1 && super::matcher::is_last_axis(ax[0], rank_of(g, &u.input[0]).map(|r| r + 1));
            (last && rank_of(g, &u.input[0]) == Some(1)).then(|| (n.input[0].as_str(), u.input[0].as_str(), n.input[2].as_str()))
        }
        "ScatterElements" if attr_i(n, "axis").unwrap_or(0) == 0 => {
            let mut i = n.input[1].as_str();
            if let Some(ex) = prod(g, i, "Expand") {
                i = ex.input[0].as_str();
            }
            let u = prod(g, i, "Unsqueeze")?;
            (axes_of(g, u)? == [1] && rank_of(g, &u.input[0]) == Some(1)).then(|| (n.input[0].as_str(), u.input[0].as_str(), n.input[2].as_str()))
        }
        _ => None,
    }
}

/// `v = num div k` for a non-negative integer `num` and a constant k >= 1, in the spellings torch
/// writes `torch.div(num, k, rounding_mode="floor")` and `num // k`: integer Div; the
/// TorchScript floor correction `Where(cond, Div - 1, Div)` whose condition is false for num >= 0
/// and k > 0; and the dynamo exporter's `Cast(Floor(Cast(num, float) / k))` (exact while num is
/// below 2^24, as every float32 index is). (num, k)
pub fn floor_div<'g>(g: &GraphIndex<'g>, v: &'g str) -> Option<(&'g str, i64)> {
    let mut v = strip(g, v, &["Cast", "Identity"]);
    // a 1-D value reshaped to [-1] is itself
    while let Some(r) = prod(g, v, "Reshape").filter(|r| g.const_i64(&r.input[1]).is_some_and(|t| t == [-1]) && rank_of(g, &r.input[0]) == Some(1)) {
        v = strip(g, &r.input[0], &["Cast", "Identity"]);
    }
    let (_, n) = g.prod(v)?;
    let (num, k) = match n.op_type.as_str() {
        // the dynamo exporter's `q - (num < 0 and num mod k != 0)`: the correction is 0 for num >= 0
        "Sub" => {
            let q = n.input[0].as_str();
            let (num, k) = match prod(g, q, "Div") {
                Some(d) if matches!(g.infer_type(&d.input[0]), Some(6 | 7)) => (d.input[0].as_str(), g.const_scalar(&d.input[1])?),
                Some(_) => return None,
                None => (q, 1.0),
            };
            let and = prod(g, uncast(g, &n.input[1]), "And")?;
            let negative = |x: &str| {
                let less = |y: &str| prod(g, y, "Less").is_some_and(|l| uncast(g, &l.input[0]) == uncast(g, num) && g.const_scalar(&l.input[1]) == Some(0.0));
                less(x)
                    || prod(g, x, "Equal")
                        .is_some_and(|e| [(0, 1), (1, 0)].into_iter().any(|(a, b)| less(&e.input[a]) && g.const_i64(&e.input[b]).is_some_and(|t| t == [1])))
            };
            if !(negative(&and.input[0]) || negative(&and.input[1])) {
                return None;
            }
            (num, k)
        }
        "Where" => {
            let d = prod(g, &n.input[2], "Div")?;
            let s = prod(g, &n.input[1], "Sub")?;
            if s.input[0] != n.input[2] || g.const_scalar(&s.input[1]) != Some(1.0) || !floor_fix_is_false(g, &n.input[0], &d.input[0], &d.input[1]) {
                return None;
            }
            (d.input[0].as_str(), g.const_scalar(&d.input[1])?)
        }
        // k = 1: Floor(Cast(num, float)) (the exporter folds the division by 1)
        "Floor" if prod(g, &n.input[0], "Cast").is_some_and(|c| matches!(g.infer_type(&c.input[0]), Some(6 | 7))) => {
            (prod(g, &n.input[0], "Cast").unwrap().input[0].as_str(), 1.0)
        }
        "Floor" => {
            let d = prod(g, &n.input[0], "Div")?;
            let num = d.input[0].as_str();
            // the numerator is an integer cast to float
            let inner = prod(g, num, "Cast")?;
            if !matches!(g.infer_type(&inner.input[0]), Some(6 | 7)) || !matches!(attr_i(inner, "to"), Some(1 | 11)) {
                return None;
            }
            (inner.input[0].as_str(), g.const_scalar(&d.input[1])?)
        }
        "Div" => {
            if !matches!(g.infer_type(&n.input[0]), Some(6 | 7)) {
                return None;
            }
            // k a constant, or a fixed dimension read from a shape (`topk_ids.shape[1]`)
            let k = g.const_scalar(&n.input[1]).or_else(|| dims::sym(g, &n.input[1]).filter(|d| d.t == 0).map(|d| d.c as f64))?;
            (n.input[0].as_str(), k)
        }
        _ => return None,
    };
    (k >= 1.0 && k.fract() == 0.0 && nonneg(g, num)).then_some((uncast(g, num), k as i64))
}

/// torch's floor-division correction `And(Xor(Less(num, 0), Less(k, 0)), Not(Equal(Mod(num, k), 0)))`
/// (the Xor's second operand folded to a constant), with num >= 0 and k > 0 a constant: false
/// everywhere. Any other condition could select `Div - 1`.
fn floor_fix_is_false(g: &GraphIndex, cond: &str, num: &str, k: &str) -> bool {
    let Some(kv) = g.const_scalar(k) else {
        return false;
    };
    if kv <= 0.0 || !nonneg(g, num) {
        return false;
    }
    if g.const_i64(cond).is_some_and(|c| c.iter().all(|&x| x == 0)) {
        return true;
    }
    let Some(and) = prod(g, cond, "And") else {
        return false;
    };
    [(0, 1), (1, 0)].into_iter().any(|(a, b)| {
        let sign_false = prod(g, &and.input[a], "Xor").is_some_and(|x| {
            [(0, 1), (1, 0)].into_iter().any(|(p, q)| {
                let num_neg = prod(g, &x.input[p], "Less").is_some_and(|l| l.input[0] == num && g.const_scalar(&l.input[1]) == Some(0.0));
                let k_neg_false = g.const_i64(&x.input[q]).is_some_and(|c| c.iter().all(|&v| v == 0))
                    || prod(g, &x.input[q], "Less").is_some_and(|l| l.input[0] == k && g.const_scalar(&l.input[1]) == Some(0.0));
                num_neg && k_neg_false
            })
        });
        let rem = prod(g, &and.input[b], "Not").and_then(|n| prod(g, &n.input[0], "Equal")).is_some_and(|e| {
            [(0, 1), (1, 0)].into_iter().any(|(p, q)| {
                g.const_scalar(&e.input[q]) == Some(0.0)
                    && prod(g, &e.input[p], "Mod").is_some_and(|m| m.input[0] == num && g.const_scalar(&m.input[1]) == Some(kv))
            })
        });
        sign_false && rem
    })
}

/// A sort of the flattened routing indices by expert: `(values, order) = TopK(flat, len(flat),
/// largest = 0)` over the one axis of `flat = Reshape(IDX, [-1])`. TopK over the whole length
/// returns every position once (order is a permutation); with `sorted = 1` the values ascend and
/// equal values keep their original order (ONNX breaks ties by the lower index).
#[derive(Debug, Clone)]
pub struct Sort {
    /// the routing indices [T, k]
    pub idx: String,
    pub flat: String,
    pub values: String,
    pub order: String,
    pub sorted: bool,
}

/// The sort whose `order` output is `v`.
pub fn sort_by_order(g: &GraphIndex, v: &str) -> Option<Sort> {
    let (_, tk) = g.prod(v).filter(|(_, n)| n.op_type == "TopK" && n.output.get(1).is_some_and(|o| o == v))?;
    sort_of(g, tk)
}

/// The sort whose `values` output is `v`.
pub fn sort_by_values(g: &GraphIndex, v: &str) -> Option<Sort> {
    let (_, tk) = g.prod(v).filter(|(_, n)| n.op_type == "TopK" && n.output[0] == v)?;
    sort_of(g, tk)
}

fn sort_of(g: &GraphIndex, tk: &NodeProto) -> Option<Sort> {
    let axis = attr_i(tk, "axis").unwrap_or(-1);
    if attr_i(tk, "largest").unwrap_or(1) != 0 || !(axis == -1 || axis == 0) || tk.output.len() < 2 {
        return None;
    }
    let flat = tk.input[0].as_str();
    let rs = prod(g, flat, "Reshape")?;
    if g.const_i64(&rs.input[1])? != [-1] {
        return None;
    }
    whole_length(g, &tk.input[1], flat).then(|| Sort {
        idx: rs.input[0].clone(),
        flat: flat.to_string(),
        values: tk.output[0].clone(),
        order: tk.output[1].clone(),
        sorted: attr_i(tk, "sorted").unwrap_or(1) != 0,
    })
}

/// Whether the scalar (or [1]) `k` is the length of the 1-D value `v`: `Shape(v)[0]` or
/// `Shape(v)[-1]` through Reshape/Unsqueeze/Squeeze/Cast, or `Shape(v)` itself.
pub fn whole_length(g: &GraphIndex, k: &str, v: &str) -> bool {
    let kv = strip(g, k, &["Unsqueeze", "Squeeze", "Reshape", "Cast", "Identity"]);
    let Some((_, n)) = g.prod(kv) else {
        return false;
    };
    let sh = match n.op_type.as_str() {
        "Gather" if g.const_i64(&n.input[1]).is_some_and(|i| i == [0] || i == [-1]) => prod(g, &n.input[0], "Shape"),
        "Shape" => Some(n),
        _ => None,
    };
    let direct = sh.is_some_and(|s| {
        s.input[0] == v && attr_i(s, "start").unwrap_or(0) == 0 && attr_i(s, "end").is_none_or(|e| e == 1 || e == -1 && rank_of(g, v) == Some(1))
    });
    // or the same dimension computed otherwise (torch.topk(flat, T * k) from the rows' shape)
    let same = || sym(g, k).is_some_and(|n| shape_of(g, v).is_some_and(|s| s.len() == 1 && s[0] == n));
    (direct || same()) && rank_of(g, v).is_none_or(|r| r == 1)
}

/// `v = Concat(Unsqueeze(a, -1), Unsqueeze(b, -1), axis -1)`: coordinate pairs (a[i], b[i]) of a
/// ScatterND/GatherND over the first two axes; Expands that keep a's and b's common shape are
/// looked through. (a, b)
pub fn coord_pair<'g>(g: &GraphIndex<'g>, v: &'g str) -> Option<(&'g str, &'g str)> {
    let cat = prod(g, v, "Concat")?;
    if cat.input.len() != 2 {
        return None;
    }
    let r = rank_of(g, v);
    if !super::matcher::is_last_axis(attr_i(cat, "axis")?, r) {
        return None;
    }
    let un = |x: &'g str| -> Option<&'g str> {
        let u = prod(g, x, "Unsqueeze")?;
        let ax = axes_of(g, u)?;
        (ax.len() == 1 && super::matcher::is_last_axis(ax[0], r)).then_some(u.input[0].as_str())
    };
    let (a0, b0) = (un(&cat.input[0])?, un(&cat.input[1])?);
    // index_put broadcasts its index tensors to one shape: Expands of a and b to the shape of
    // their sum keep each (they have the same shape)
    let peers_of = |x: &str| -> Vec<String> {
        let mut p = vec![x.to_string()];
        if let Some(ex) = prod(g, x, "Expand") {
            p.push(ex.input[0].clone());
        }
        p
    };
    let mut peers: Vec<String> = peers_of(a0);
    peers.extend(peers_of(b0));
    let pr: Vec<&str> = peers.iter().map(String::as_str).collect();
    Some((strip_noop_expand(g, a0, &pr), strip_noop_expand(g, b0, &pr)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::graph::{attr_int, make_node};
    use crate::onnx::tensor::make_i64;
    use onnx_protobuf::GraphProto;

    fn graph(nodes: Vec<NodeProto>, inits: Vec<onnx_protobuf::TensorProto>) -> GraphProto {
        let mut g = GraphProto::new();
        g.node = nodes;
        g.initializer = inits;
        g
    }

    #[test]
    fn one_hot_spellings() {
        let mut oh = make_node("OneHot", "", "oh", &["i", "depth", "vals"], &["m"]);
        oh.attribute.push(attr_int("axis", -1));
        let mut tk = make_node("TopK", "", "tk", &["p", "k"], &["w", "i"]);
        tk.attribute.push(attr_int("axis", -1));
        let nodes = vec![
            tk,
            oh,
            make_node("Unsqueeze", "", "u", &["i", "m1"], &["iu"]),
            make_node("Equal", "", "eq", &["iu", "ar"], &["m2"]),
            make_node("Cast", "", "c", &["m2"], &["m3"]),
            // a OneHot of a possibly negative value wraps it: not [v == e]
            make_node("Neg", "", "neg", &["i"], &["ni"]),
            make_node("OneHot", "", "oh2", &["ni", "depth", "vals"], &["m4"]),
        ];
        let inits = vec![
            make_i64("k", &[1], &[2]),
            make_i64("depth", &[], &[4]),
            make_i64("vals", &[2], &[0, 1]),
            make_i64("m1", &[1], &[-1]),
            make_i64("ar", &[4], &[0, 1, 2, 3]),
        ];
        let gp = graph(nodes, inits);
        let g = GraphIndex::new(&gp, None).unwrap();
        assert_eq!(one_hot(&g, "m"), Some(("i".into(), 4)));
        assert_eq!(one_hot(&g, "m3"), Some(("i".into(), 4)));
        assert_eq!(one_hot(&g, "m4"), None);
    }

    #[test]
    fn a_scatter_of_ones_is_a_one_hot() {
        let mut tk = make_node("TopK", "", "tk", &["p", "k"], &["w", "i"]);
        tk.attribute.push(attr_int("axis", -1));
        let mut sc = make_node("ScatterElements", "", "sc", &["z", "iu", "ones"], &["m"]);
        sc.attribute.push(attr_int("axis", 1));
        let mut sc2 = sc.clone();
        sc2.output[0] = "m2".into();
        sc2.input[2] = "twos".into();
        let nodes = vec![
            tk,
            make_node("Unsqueeze", "", "u", &["i", "ax"], &["iu"]),
            make_node("ConstantOfShape", "", "zs", &["zshape"], &["z"]),
            make_node("Expand", "", "ex", &["one", "ishape"], &["ones"]),
            make_node("Expand", "", "ex2", &["two", "ishape"], &["twos"]),
            sc,
            sc2,
        ];
        let inits = vec![
            make_i64("k", &[1], &[1]),
            make_i64("ax", &[1], &[1]),
            make_i64("zshape", &[2], &[5, 6]),
            make_i64("ishape", &[2], &[5, 1]),
            make_i64("one", &[], &[1]),
            make_i64("two", &[], &[2]),
        ];
        let mut gp = graph(nodes, inits);
        // i is [T, 1] from a TopK of k = 1 over [T, E]: rank 2, so the one-hot axis is 2 here;
        // declare p so that ranks are known
        let mut vi = onnx_protobuf::ValueInfoProto::new();
        vi.name = "p".into();
        let mut tt = onnx_protobuf::type_proto::Tensor::new();
        tt.elem_type = 1;
        let mut sh = onnx_protobuf::TensorShapeProto::new();
        for d in [5, 6] {
            let mut x = onnx_protobuf::tensor_shape_proto::Dimension::new();
            x.set_dim_value(d);
            sh.dim.push(x);
        }
        tt.shape = Some(sh).into();
        let mut t = onnx_protobuf::TypeProto::new();
        t.value = Some(onnx_protobuf::type_proto::Value::TensorType(tt));
        vi.type_ = Some(t).into();
        gp.input.push(vi);
        // a rank-2 index unsqueezed at 1 is not the last axis: not a one-hot of it
        let g = GraphIndex::new(&gp, None).unwrap();
        assert_eq!(one_hot(&g, "m"), None);
        // over a rank-1 index (the squeezed choice) it is
        let mut gp2 = gp.clone();
        gp2.node.insert(1, make_node("Squeeze", "", "sq", &["i", "ax"], &["i1"]));
        gp2.node[2].input[0] = "i1".into();
        let g2 = GraphIndex::new(&gp2, None).unwrap();
        assert_eq!(one_hot(&g2, "m"), Some(("i1".into(), 6)));
        // a scatter of twos is not
        assert_eq!(one_hot(&g2, "m2"), None);
    }

    #[test]
    fn floor_division_of_a_float_cast() {
        let mut tk = make_node("TopK", "", "tk", &["f", "n"], &["s", "o"]);
        tk.attribute.push(attr_int("largest", 0));
        let mut c1 = make_node("Cast", "", "c1", &["o"], &["of"]);
        c1.attribute.push(attr_int("to", 1));
        let mut c2 = make_node("Cast", "", "c2", &["fl"], &["tok"]);
        c2.attribute.push(attr_int("to", 7));
        let mut kf = make_i64("k", &[], &[0]);
        kf.data_type = 1;
        kf.int64_data.clear();
        kf.raw_data = 2f32.to_le_bytes().to_vec();
        let nodes = vec![
            tk,
            c1,
            make_node("Div", "", "d", &["of", "k"], &["q"]),
            make_node("Floor", "", "fl", &["q"], &["fl"]),
            c2,
            make_node("Div", "", "d2", &["s", "k"], &["bad"]),
        ];
        let gp = graph(nodes, vec![kf, make_i64("n", &[1], &[4])]);
        let g = GraphIndex::new(&gp, None).unwrap();
        assert_eq!(floor_div(&g, "tok"), Some(("o", 2)));
        // a float division is not an integer one
        assert_eq!(floor_div(&g, "bad"), None);
    }
}
