//! The routing indices' source: the TopK (or top-1 ArgMax, or com.microsoft.MoE's reversed TopK)
//! that chooses the experts, its k and its tie rule. See the parent module for the whole router.

use onnx_protobuf::NodeProto;

use super::{last_width, skip_identity, std_op};
use crate::onnx::graph::{attr_i, GraphIndex};
use crate::rewrite::matcher::{is_last_axis, rank_of};
use crate::spec::TieBreak;

/// k of a TopK that takes the largest of its input's last axis (sorted or not).
pub(super) fn topk_k(g: &GraphIndex, n: &NodeProto) -> Result<usize, String> {
    if attr_i(n, "largest").unwrap_or(1) != 1 {
        return Err("TopK takes the smallest".into());
    }
    if !is_last_axis(attr_i(n, "axis").unwrap_or(-1), rank_of(g, &n.input[0])) {
        return Err("TopK is not over the last axis".into());
    }
    let k = match n.input.get(1).filter(|s| !s.is_empty()) {
        Some(k) => g.const_i64(k).filter(|k| k.len() == 1).map(|k| k[0]),
        None => attr_i(n, "k"),
    };
    k.filter(|&k| k >= 1).map(|k| k as usize).ok_or_else(|| "TopK's k is not a constant".into())
}

/// The TopK (or top-1 ArgMax) whose indices `idx` are, its tie rule, and the scores it ranks
/// (before any reversal).
pub(super) fn indices_source<'g>(g: &GraphIndex<'g>, idx: &'g str, nodes: &mut Vec<usize>) -> Result<(usize, TieBreak, &'g str), String> {
    let idx = skip_identity(g, idx, nodes);
    let (i, n) = g.prod(idx).ok_or("the routing indices are not computed in the graph")?;
    if let Some((_, t)) = std_op(g, idx, "TopK").filter(|(_, t)| t.output.get(1).map(String::as_str) == Some(idx)) {
        return Ok((i, TieBreak::LowerIndex, t.input[0].as_str()));
    }
    // top-1 as ArgMax over the last axis, keeping it (the [T, 1] indices TopK with k = 1 gives);
    // select_last_index picks the tie rule: the first maximum (lower_index) or the last
    if let Some((_, a)) = std_op(g, idx, "ArgMax") {
        let s = a.input[0].as_str();
        if !is_last_axis(attr_i(a, "axis").unwrap_or(0), rank_of(g, s)) || attr_i(a, "keepdims").unwrap_or(1) != 1 {
            return Err("the routing indices come from an ArgMax that is not over the experts' axis, kept".into());
        }
        let tie = if attr_i(a, "select_last_index").unwrap_or(0) == 0 { TieBreak::LowerIndex } else { TieBreak::HigherIndex };
        return Ok((i, tie, s));
    }
    let Some((_, sub)) = std_op(g, idx, "Sub") else {
        return Err(format!("the routing indices come from {}, not TopK", n.op_type));
    };
    nodes.push(i);
    // com.microsoft.MoE's form: E - 1 - TopK(S reversed).indices
    let last = g.const_i64(&sub.input[0]).filter(|c| c.len() == 1).map(|c| c[0]).ok_or("the routing indices are a Sub of no constant")?;
    let rev_idx = skip_identity(g, &sub.input[1], nodes);
    let (ti, t) =
        std_op(g, rev_idx, "TopK").filter(|(_, t)| t.output.get(1).map(String::as_str) == Some(rev_idx)).ok_or("the routing indices are a Sub of no TopK")?;
    let (si, slice) = std_op(g, &t.input[0], "Slice").ok_or("the routing indices are E - 1 minus TopK of no reversal")?;
    nodes.push(si);
    let s = slice.input[0].as_str();
    let e = last_width(g, s).ok_or("cannot tell the number of experts the reversed router ranks")?;
    let one = |j: usize| slice.input.get(j).filter(|v| !v.is_empty()).and_then(|v| g.const_i64(v)).filter(|c| c.len() == 1).map(|c| c[0]);
    let reversed = matches!((one(1), one(2), one(3), one(4)), (Some(start), Some(end), Some(axis), Some(-1))
        if (start == -1 || start > e - 2) && end < -e && is_last_axis(axis, rank_of(g, s)));
    if !reversed || last != e - 1 {
        return Err("the routing indices are E - 1 minus TopK of a Slice that is not the experts reversed".into());
    }
    Ok((ti, TieBreak::HigherIndex, s))
}
