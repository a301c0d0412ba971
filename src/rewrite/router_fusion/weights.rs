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

/// `Mul(w, c)` or `Mul(c, w)` with `c` a scalar constant: (w, c).
pub(super) fn scaled<'g>(g: &GraphIndex<'g>, v: &'g str, nodes: &mut Vec<usize>) -> Option<(&'g str, f32)> {
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
