//! What a router's TopK ranks, between its scores and the TopK: the scores, a selection bias added
//! to them, and the group-limited choice that fills the experts of the losing groups
//! (DeepSeek-V2/V3). See the parent module for the whole router and the proof.

use onnx_protobuf::NodeProto;

use super::{is_float, last_width, skip_identity, std_op, topk_k, FLOAT};
use super::weights::scalar;
use crate::onnx::graph::{attr_i, node_inputs_with_subgraphs, GraphIndex};
use crate::rewrite::matcher::{axes_of, is_last_axis, rank_of};
use crate::spec::GroupScore;

/// `v` without Reshapes that only flatten the leading axes into rows, `Reshape(x, [-1, E])` with
/// x's last dimension E (transformers 4's `scores.view(-1, E)` between the scores and the choice).
pub(super) fn rows_of<'g>(g: &GraphIndex<'g>, v: &'g str, nodes: &mut Vec<usize>) -> &'g str {
    let mut cur = skip_identity(g, v, nodes);
    for _ in 0..4 {
        let Some((i, r)) = std_op(g, cur, "Reshape") else { break };
        let e = last_width(g, &r.input[0]);
        let flat = g.const_i64(&r.input[1]).is_some_and(|c| matches!(c[..], [-1, n] if Some(n) == e));
        if !flat {
            break;
        }
        nodes.push(i);
        cur = skip_identity(g, &r.input[0], nodes);
    }
    cur
}

/// A constant behind Identity and widening Casts (to float32: exact from float16 and bfloat16),
/// its name and element type. A Cast that rounds (float32 to 16 bits) is not skipped: the graph
/// would add the rounded bias, the node the constant.
fn const_root<'g>(g: &GraphIndex<'g>, v: &'g str) -> Option<(&'g str, i32)> {
    let mut cur = v;
    for _ in 0..4 {
        if let Some(t) = g.const_tensor(cur) {
            return is_float(t.data_type).then_some((cur, t.data_type));
        }
        let (_, n) = g.prod(cur).filter(|(_, n)| n.domain.is_empty() || n.domain == "ai.onnx")?;
        if n.op_type == "Identity" || (n.op_type == "Cast" && attr_i(n, "to") == Some(FLOAT as i64)) {
            cur = &n.input[0];
        } else {
            return None;
        }
    }
    None
}

/// Most nodes the group mask of a router may have (DeepSeek-V3's TorchScript export has 17).
const MOST_MASK_NODES: usize = 48;

/// The group-limited choice whose mask `cond` is, over the choice scores `b`: (n_group,
/// topk_group, group score). Recognised: a TopK of `topk_group` over the group scores, which are
/// `ReduceSum(TopK(Reshape(b, [-1, G, E/G]), 2).values)` (top2_sum) or `ReduceMax(Reshape(...))`
/// (max) over the last axis, and a mask computed from that TopK's indices, shapes and constants
/// alone. How the mask spells "these groups" (ScatterElements of ones, Unsqueeze, Expand, Reshape,
/// Not, and which branch of the Where is the fill) is left to the proof, which draws logits that
/// make every choice of groups win.
fn group_mask(g: &GraphIndex, cond: &str, b: &str, nodes: &mut Vec<usize>) -> Result<(usize, usize, GroupScore), String> {
    let mut group_topk = None;
    let mut stack = vec![cond.to_string()];
    let mut seen = std::collections::HashSet::new();
    let mut mine = Vec::new();
    while let Some(v) = stack.pop() {
        if v.is_empty() || !seen.insert(v.clone()) || g.const_tensor(&v).is_some() {
            continue;
        }
        let (i, n) = g.prod(&v).ok_or("the group mask reads a graph input")?;
        if n.op_type == "TopK" && n.output.get(1) == Some(&v) {
            if group_topk.is_some_and(|j| j != i) {
                return Err("the group mask reads two TopKs".into());
            }
            group_topk = Some(i);
            continue;
        }
        mine.push(i);
        if mine.len() > MOST_MASK_NODES {
            return Err(format!("the group mask has more than {MOST_MASK_NODES} nodes"));
        }
        // a shape is known before the values: it tells nothing of them
        if matches!(n.op_type.as_str(), "Shape" | "Size") {
            continue;
        }
        stack.extend(node_inputs_with_subgraphs(n).into_iter().map(str::to_string));
    }
    let ti = group_topk.ok_or("the group mask reads no TopK of groups")?;
    let t = g.node(ti);
    let topk_group = topk_k(g, t).map_err(|e| format!("the groups' {e}"))?;
    let mut gs_nodes = vec![ti];
    let gs = skip_identity(g, &t.input[0], &mut gs_nodes);
    let one_last_axis = |n: &NodeProto, v: &str| axes_of(g, n).is_some_and(|a| a.len() == 1 && is_last_axis(a[0], rank_of(g, v))) && attr_i(n, "keepdims") == Some(0);
    let (score, reshaped) = if let Some((ri, r)) = std_op(g, gs, "ReduceSum").filter(|(_, r)| one_last_axis(r, &r.input[0])) {
        let (ki, top2) = std_op(g, &r.input[0], "TopK").filter(|(_, k)| k.output[0] == r.input[0]).ok_or("the group scores are a ReduceSum of no TopK")?;
        if topk_k(g, top2)? != 2 {
            return Err("the group scores sum a TopK that is not the best two".into());
        }
        gs_nodes.extend([ri, ki]);
        (GroupScore::Top2Sum, top2.input[0].as_str())
    } else if let Some((mi, m)) = std_op(g, gs, "ReduceMax").filter(|(_, m)| one_last_axis(m, &m.input[0])) {
        gs_nodes.push(mi);
        (GroupScore::Max, m.input[0].as_str())
    } else {
        return Err("the groups are ranked by neither the sum of their best two nor their best".into());
    };
    let reshaped = skip_identity(g, reshaped, &mut gs_nodes);
    let (ri, r) = std_op(g, reshaped, "Reshape").ok_or("the group scores are not over a Reshape of the scores into groups")?;
    gs_nodes.push(ri);
    let mut from = Vec::new();
    if skip_identity(g, &r.input[0], &mut from) != b {
        return Err("the groups are scored on another value than the one the router ranks".into());
    }
    let shape = g.const_i64(&r.input[1]).ok_or("the scores' Reshape into groups has no constant shape")?;
    let e = last_width(g, b).ok_or("cannot tell the number of experts the groups split")?;
    let (n_group, size) = match shape[..] {
        [_, n, s] if n >= 1 && s >= 1 && n * s == e => (n as usize, s as usize),
        _ => return Err(format!("the scores' Reshape into groups has shape {shape:?}, not [-1, G, {e} / G]")),
    };
    if score == GroupScore::Top2Sum && size < 2 {
        return Err("the groups of one expert have no best two".into());
    }
    nodes.extend(mine);
    nodes.extend(gs_nodes);
    nodes.extend(from);
    Ok((n_group, topk_group, score))
}

/// What a router ranks, between its scores and its TopK.
pub(super) struct Choice<'g> {
    /// the scores (a Softmax's or Sigmoid's output, or the logits of topk_softmax)
    pub scores: &'g str,
    /// the selection bias added to them: a constant and its element type
    pub bias: Option<(&'g str, i32)>,
    /// (n_group, topk_group, group score, fill)
    pub groups: Option<(usize, usize, GroupScore, f32)>,
}

/// `Where(mask, fill, c)` (or `Where(mask, c, fill)`) over `c = scores [+ bias]`, or less of it.
pub(super) fn choice<'g>(g: &GraphIndex<'g>, c_in: &'g str, nodes: &mut Vec<usize>) -> Result<Choice<'g>, String> {
    let mut v = skip_identity(g, c_in, nodes);
    let mut groups = None;
    if let Some((wi, w)) = std_op(g, v, "Where") {
        let (fill, c) = match (scalar(g, &w.input[1]), scalar(g, &w.input[2])) {
            (Some(f), None) => (f, w.input[2].as_str()),
            (None, Some(f)) => (f, w.input[1].as_str()),
            _ => return Err("TopK ranks a Where that is not the scores with some filled".into()),
        };
        if fill.is_nan() {
            return Err("TopK ranks scores filled with NaN".into());
        }
        nodes.push(wi);
        v = skip_identity(g, c, nodes);
        let (n_group, topk_group, score) = group_mask(g, &w.input[0], v, nodes)?;
        groups = Some((n_group, topk_group, score, fill));
    }
    let mut bias = None;
    if let Some((ai, add)) = std_op(g, v, "Add") {
        let e = last_width(g, v).ok_or("cannot tell the number of experts the router ranks")?;
        let is_bias = |x: &'g str| {
            const_root(g, x).filter(|(c, _)| {
                let dims = g.const_dims(c).unwrap_or_default();
                matches!(dims[..], [n] | [1, n] if n == e)
            })
        };
        let (s, b) = match (is_bias(&add.input[0]), is_bias(&add.input[1])) {
            (None, Some(b)) => (add.input[0].as_str(), b),
            (Some(b), None) => (add.input[1].as_str(), b),
            _ => return Err("TopK ranks a sum that is not the scores plus a bias of one value an expert".into()),
        };
        if g.infer_type(v) != Some(FLOAT) {
            return Err("the selection bias is added in 16 bits, so TopK ranks rounded scores".into());
        }
        nodes.push(ai);
        bias = Some(b);
        v = skip_identity(g, s, nodes);
    }
    Ok(Choice { scores: rows_of(g, v, nodes), bias, groups })
}
