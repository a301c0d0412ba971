//! The routing weights' own formula after the choice: a scale by a constant, and a normalisation
//! by their sum (an epsilon on it, a floor under it). See the parent module for the whole router.

use onnx_protobuf::NodeProto;

use super::{skip_identity, std_op};
use crate::onnx::graph::{attr_i, GraphIndex};
use crate::rewrite::matcher::{axes_of, is_last_axis, rank_of};

/// A scalar constant, as float32 (its exact value where it is float32 or narrower).
pub(super) fn scalar(g: &GraphIndex, v: &str) -> Option<f32> {
    g.const_f32(v).filter(|c| c.len() == 1).map(|c| c[0])
}

/// A two-input node with one scalar-constant operand, either side: (the other operand, the constant).
fn with_scalar<'g>(g: &GraphIndex, n: &'g NodeProto) -> Option<(&'g str, f32)> {
    match (scalar(g, n.input.first()?), scalar(g, n.input.get(1)?)) {
        (None, Some(c)) => Some((n.input[0].as_str(), c)),
        (Some(c), None) => Some((n.input[1].as_str(), c)),
        _ => None,
    }
}

/// `Mul(w, c)` or `Mul(c, w)` with `c` a scalar constant: (w, c); or `Div(w, c)`: (w, 1 / c) (the
/// OpenAI privacy filter divides its top-k softmax by k). `w * (1 / c)` is `w / c` where 1 / c is
/// exact in float32 (c a power of two), else within a rounding of it; the router's proof holds the
/// weights to the type's tolerance either way.
pub(super) fn scaled<'g>(g: &GraphIndex<'g>, v: &'g str, nodes: &mut Vec<usize>) -> Option<(&'g str, f32)> {
    if let Some((i, d)) = std_op(g, v, "Div") {
        let c = scalar(g, d.input.get(1)?)?;
        let inv = 1.0 / c;
        if !(c.is_finite() && c != 0.0 && inv.is_finite()) || scalar(g, &d.input[0]).is_some() {
            return None;
        }
        nodes.push(i);
        return Some((d.input[0].as_str(), inv));
    }
    let (i, m) = std_op(g, v, "Mul")?;
    let (w, c) = with_scalar(g, m).filter(|(_, c)| c.is_finite())?;
    nodes.push(i);
    Some((w, c))
}

/// The divisor of a normalisation: its sum's epsilon and floor.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct Divisor {
    pub(super) eps: f32,
    pub(super) min: f32,
}

/// `Div(w, ReduceSum(w, last axis, keepdims = 1) [+ eps])`, the divisor maybe clamped from below
/// (`Clip(·, min)`, `Max(·, min)`: Ernie-4.5's `clamp(min=norm_min)`): (w, divisor), or None.
pub(super) fn normalized<'g>(g: &GraphIndex<'g>, v: &'g str, nodes: &mut Vec<usize>) -> Option<(&'g str, Divisor)> {
    let (di, div) = std_op(g, v, "Div")?;
    let mut mine = vec![di];
    let mut den = div.input[1].as_str();
    let mut min = 0.0f32;
    let mut floored = false;
    // a floor: Clip with a constant min and no max, or Max with a constant
    if let Some((ci, c)) = std_op(g, den, "Clip") {
        let lo = c.input.get(1).filter(|v| !v.is_empty()).and_then(|v| scalar(g, v))?;
        if c.input.get(2).is_some_and(|v| !v.is_empty()) {
            return None;
        }
        mine.push(ci);
        den = c.input[0].as_str();
        min = lo;
        floored = true;
    } else if let Some((mi, m)) = std_op(g, den, "Max").filter(|(_, m)| m.input.len() == 2) {
        let (x, lo) = with_scalar(g, m)?;
        mine.push(mi);
        den = x;
        min = lo;
        floored = true;
    }
    // the op's floor 0 means none: a clamp at 0 (which would floor a negative sum) is not it
    if !(min.is_finite() && (min > 0.0 || !floored)) {
        return None;
    }
    let mut eps = 0.0f32;
    // an epsilon added to the sum (DeepSeek-V3: `sum + 1e-20`)
    if let Some((ai, add)) = std_op(g, den, "Add") {
        let (x, e) = with_scalar(g, add)?;
        if !(e.is_finite() && e >= 0.0) {
            return None;
        }
        mine.push(ai);
        den = x;
        eps = e;
    }
    // the weights are never negative (probabilities, sigmoids): their L1 norm is their sum (DBRX)
    let (ri, rs) = std_op(g, den, "ReduceSum").or_else(|| std_op(g, den, "ReduceL1"))?;
    mine.push(ri);
    let a = skip_identity(g, &div.input[0], &mut mine);
    let b = skip_identity(g, &rs.input[0], &mut mine);
    let axes = axes_of(g, rs)?;
    let last = axes.len() == 1 && is_last_axis(axes[0], rank_of(g, a));
    (a == b && last && attr_i(rs, "keepdims").unwrap_or(1) == 1).then(|| {
        nodes.extend(mine);
        (a, Divisor { eps, min })
    })
}

/// A per-expert scale of the chosen weights: `Mul(w, table[indices])` (either side), the table a
/// constant of one value an expert (rank 1), read by `Gather(table, indices, axis 0)`
/// or `GatherND(table, Unsqueeze(indices, last axis))` (torch's `per_expert_scale[top_k_index]`
/// through TorchScript and dynamo), maybe through exact widening Casts. `indices`: the router's
/// chosen experts. Returns (w, the table's value name, its element type).
pub(super) fn expert_scaled<'g>(g: &GraphIndex<'g>, v: &'g str, indices: &str, nodes: &mut Vec<usize>) -> Option<(&'g str, &'g str, i32)> {
    let (mi, m) = std_op(g, v, "Mul").filter(|(_, m)| m.input.len() == 2)?;
    (0..2).find_map(|side| {
        let mut mine = vec![mi];
        let table = gathered_table(g, &m.input[side], indices, &mut mine)?;
        nodes.extend(mine);
        Some((m.input[1 - side].as_str(), table.0, table.1))
    })
}

/// The table `v` reads at `indices` (see [`expert_scaled`]): its name and element type.
fn gathered_table<'g>(g: &GraphIndex<'g>, v: &'g str, indices: &str, nodes: &mut Vec<usize>) -> Option<(&'g str, i32)> {
    let mut cur = skip_identity(g, v, nodes);
    // widening Casts: float16 / bfloat16 to float32, exact
    while let Some((ci, c)) = std_op(g, cur, "Cast") {
        let from = g.infer_type(&c.input[0])?;
        if !(attr_i(c, "to") == Some(1) && matches!(from, 1 | 10 | 16)) {
            return None;
        }
        nodes.push(ci);
        cur = skip_identity(g, &c.input[0], nodes);
    }
    let (gi, gn) = std_op(g, cur, "Gather").or_else(|| std_op(g, cur, "GatherND"))?;
    let table = gn.input.first()?.as_str();
    let t = g.const_tensor(table)?;
    // one value an expert: gathering from a rank-2 table would take rows, not values
    if t.dims.len() != 1 || !matches!(t.data_type, 1 | 10 | 16) {
        return None;
    }
    let mut mine = vec![gi];
    let idx = if gn.op_type == "Gather" {
        if attr_i(gn, "axis").unwrap_or(0) != 0 {
            return None;
        }
        skip_identity(g, &gn.input[1], &mut mine)
    } else {
        // GatherND of a rank-1 table at indices with a trailing axis of 1
        if attr_i(gn, "batch_dims").unwrap_or(0) != 0 {
            return None;
        }
        let (ui, u) = std_op(g, &gn.input[1], "Unsqueeze")?;
        let r = rank_of(g, &u.input[0])?;
        let axes = axes_of(g, u)?;
        if !(axes.len() == 1 && (axes[0] == -1 || axes[0] == r as i64)) {
            return None;
        }
        mine.push(ui);
        skip_identity(g, &u.input[0], &mut mine)
    };
    (idx == indices).then(|| {
        nodes.extend(mine);
        (table, t.data_type)
    })
}
