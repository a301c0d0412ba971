//! Expert blocks of the sorted rows instead of bins: transformers 4's DeepSeek-V2 `moe` (the
//! `moe_infer` of DeepSeek's own modeling code spelled with tensors). The sorted assignments' rows
//! are cut into one block per expert, `Slice(rows, start_e, end_e)` with `start_e` the sum of the
//! counts of the experts before e and `end_e = start_e + count_e`, each block goes through its
//! expert's own MLP, and the outputs are concatenated back in sort order:
//! `Ys = Concat_0(MLP_e(rows[start_e:end_e]) for e in 0..E)`.
//!
//! Checked: E blocks in expert order; each block's bounds are sums of the per-expert counts (a
//! `Split` of the count vector into E ones, `Squeeze`d, added up) covering exactly experts 0..e-1
//! and 0..e; the count vector is `ReduceSum(ScatterElements(zeros[T, E], IDX, ones, axis 1), 0)`
//! (IDX the router's TopK indices: distinct experts per token, so the scatter is a one-hot and
//! count_e is the number of assignments of expert e); every block is sliced from one rows value
//! along axis 0 with step 1. Sorted by expert, the assignments of expert e are exactly rows
//! start_e..end_e, so row i of Ys is `MLP_{s[i]}(rows[i])`, what the bins' read-back gives.
//! A loop the tracer cut short (an expert with no tokens skipped at trace time) has fewer blocks
//! and is refused.

use super::super::expr::{to_mlp, ExpertMlp, ExprParser};
use super::super::matcher::{axes_of, prod};
use super::super::routing::{is_ones, shape_vector, uncast, zeros_shape};
use crate::onnx::graph::{attr_i, strip, GraphIndex};

type R<T> = Result<T, String>;

/// The experts of `ys` when it is a Concat of per-expert blocks (None when it is not one):
/// (the MLPs in expert order, the sorted rows the blocks are cut from).
pub(super) fn expert_blocks(g: &GraphIndex, ys: &str, idx: &str) -> R<Option<(Vec<ExpertMlp>, String)>> {
    let Some(cat) = prod(g, ys, "Concat") else { return Ok(None) };
    if attr_i(cat, "axis").unwrap_or(0) != 0 || cat.input.len() < 2 {
        return Ok(None);
    }
    let e_count = cat.input.len();
    // every axis-0 Slice of one value is a candidate block
    let slices: Vec<String> = g
        .graph
        .node
        .iter()
        .filter(|n| n.op_type == "Slice" && n.domain.is_empty() && n.input.len() >= 4 && g.const_i64(&n.input[3]).is_some_and(|a| a == [0]))
        .map(|n| n.output[0].clone())
        .collect();
    if slices.is_empty() {
        return Ok(None);
    }
    let mut experts = Vec::with_capacity(e_count);
    let mut rows: Option<String> = None;
    let mut counts: Option<String> = None;
    for (e, block) in cat.input.iter().enumerate() {
        let resolver = |_: &str| None;
        let mut p = ExprParser::new(g, slices.clone(), &resolver);
        let ex = p.parse(block).map_err(|m| format!("block {e}: {m}"))?;
        let leaf = p.matched_leaf.clone().ok_or_else(|| format!("block {e} reads no slice of the sorted rows"))?;
        let d = p.d.ok_or_else(|| format!("block {e} reads no linear layer of its rows"))?;
        let mlp = to_mlp(&ex, d).map_err(|m| format!("block {e}: {m}"))?;
        if mlp.w_in.iter().map(|w| w.index).chain([mlp.w_out.index]).any(|i| i.is_some()) {
            return Err(format!("block {e}'s weights are gathered from a stack, not its expert's own"));
        }
        let sl = prod(g, &leaf, "Slice").unwrap();
        let steps_ok = sl.input.len() <= 4 || sl.input[4].is_empty() || g.const_i64(&sl.input[4]).is_some_and(|s| s == [1]);
        if !steps_ok {
            return Err(format!("block {e} is sliced with a step"));
        }
        match &rows {
            None => rows = Some(sl.input[0].clone()),
            Some(r) if *r != sl.input[0] => return Err(format!("block {e} is cut from other rows than block 0")),
            _ => {}
        }
        let start = bound(g, &sl.input[1], &mut counts).ok_or_else(|| format!("block {e}'s start is not a sum of expert counts"))?;
        let end = bound(g, &sl.input[2], &mut counts).ok_or_else(|| format!("block {e}'s end is not a sum of expert counts"))?;
        if start != (0..e).collect::<Vec<_>>() || end != (0..=e).collect::<Vec<_>>() {
            return Err(format!("block {e} runs over the counts of experts {start:?}..{end:?}, not those before it to its own"));
        }
        experts.push(mlp);
    }
    let counts = counts.ok_or("the blocks' bounds read no expert counts")?;
    check_counts(g, &counts, idx, e_count)?;
    Ok(Some((experts, rows.unwrap())))
}

/// A block bound as the sorted list of the experts whose counts it adds up: `[0]` (no expert),
/// `Squeeze(Split(counts)[j])` (expert j) and sums of those, through Unsqueeze / Cast. `counts`
/// is the split count vector, the same for every term.
fn bound(g: &GraphIndex, v: &str, counts: &mut Option<String>) -> Option<Vec<usize>> {
    let v = strip(g, v, &["Unsqueeze", "Cast", "Reshape"]);
    if let Some(c) = g.const_i64(v) {
        return (c == [0]).then(Vec::new);
    }
    let (_, n) = g.prod(v)?;
    match n.op_type.as_str() {
        "Add" => {
            let mut a = bound(g, &n.input[0], counts)?;
            a.extend(bound(g, &n.input[1], counts)?);
            a.sort_unstable();
            // an expert counted twice is no block bound
            (a.windows(2).all(|w| w[0] != w[1])).then_some(a)
        }
        "Squeeze" => {
            if !axes_of(g, n).is_some_and(|a| a == [0]) {
                return None;
            }
            let (_, sp) = g.prod(&n.input[0]).filter(|(_, s)| s.op_type == "Split")?;
            let j = sp.output.iter().position(|o| *o == n.input[0])?;
            let ones = match sp.input.get(1).filter(|s| !s.is_empty()) {
                Some(s) => g.const_i64(s).is_some_and(|s| s.iter().all(|&x| x == 1) && s.len() == sp.output.len()),
                None => crate::onnx::graph::attr_ints(sp, "split").is_none_or(|s| s.iter().all(|&x| x == 1)),
            };
            if attr_i(sp, "axis").unwrap_or(0) != 0 || !ones {
                return None;
            }
            match counts {
                Some(c) if *c != sp.input[0] => return None,
                _ => *counts = Some(sp.input[0].clone()),
            }
            Some(vec![j])
        }
        _ => None,
    }
}

/// `counts = ReduceSum(ScatterElements(zeros[T, E], IDX, ones, axis 1), axes 0)` of E entries,
/// split into exactly E ones: entry e is the number of assignments of expert e.
fn check_counts(g: &GraphIndex, counts: &str, idx: &str, e_count: usize) -> R<()> {
    let rs = prod(g, uncast(g, counts), "ReduceSum").ok_or("the block sizes are not a sum over the tokens")?;
    if axes_of(g, rs).is_none_or(|a| a != [0]) || attr_i(rs, "keepdims").unwrap_or(1) != 0 {
        return Err("the expert counts are not a sum over axis 0".into());
    }
    let sc = prod(g, uncast(g, &rs.input[0]), "ScatterElements").ok_or("the expert counts are not a sum of a one-hot mask")?;
    let axis = attr_i(sc, "axis").unwrap_or(0);
    let red = crate::onnx::graph::attr_s(sc, "reduction").unwrap_or_else(|| "none".into());
    if !(axis == 1 || axis == -1) || red != "none" || uncast(g, &sc.input[1]) != idx || !is_ones(g, &sc.input[2]) {
        return Err("the expert counts' mask is not ones scattered at the routing indices along the expert axis".into());
    }
    let last = zeros_shape(g, &sc.input[0]).and_then(|s| shape_vector(g, s)).and_then(|v| v.last().copied());
    if last.is_none_or(|d| d.t != 0 || d.c != e_count as i64) {
        return Err(format!("the count mask is not zeros [T, {e_count}] ({e_count} blocks)"));
    }
    Ok(())
}
