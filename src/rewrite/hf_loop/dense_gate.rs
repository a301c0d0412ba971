//! The routing weight of a loop iteration read from the dense gate (the routing weights scattered
//! into zeros [T, E]) at the iteration's expert and tokens, as GPT-OSS under transformers 4.5x and
//! hand-written loops take it. See the parent module for the whole loop.

use std::collections::HashMap;

use super::iteration::{resolve_eref, HitSplit, MaskInfo};
use crate::onnx::graph::{attr_i, strip, GraphIndex};
use crate::rewrite::expr::ERef;
use crate::rewrite::matcher::prod;

/// `G[token, e]` as a column for the iteration's tokens: Gather(Unsqueeze(Gather(G, e, axis 1), -1),
/// token) where G is the dense gate (the routing weights scattered into zeros [T, E] at TopK's
/// indices, [`crate::rewrite::dense::gate_of`]) and e is the iteration's expert. TopK names an expert once
/// per token, so `G[t, e]` is the weight of the one slot of t that chose e, which is what the
/// iteration's mask selected t for: the iteration adds `w[t, j] MLP_e(x[t])`. Returns the routing
/// weights when the gate's indices are the mask's.
pub(super) fn dense_gate_weight(g: &GraphIndex, v: &str, tok: &str, mask: &MaskInfo, hits: &mut HashMap<ERef, HitSplit>) -> Result<Option<(String, String)>, String> {
    let v = strip(g, v, &["Cast", "Identity"]);
    let last = |u: &onnx_protobuf::NodeProto| {
        let ua = crate::rewrite::matcher::axes_of(g, u);
        matches!(ua.as_deref(), Some([1]) | Some([-1]))
    };
    let is_tok = |x: &str| strip(g, x, &["Cast"]) == strip(g, tok, &["Cast"]);
    // rows at the tokens: Gather(·, token) on axis 0, or the dynamo exporter's GatherND(·,
    // Unsqueeze(token, -1)) of a 1-D token list (the same rows)
    let at_tokens = |v: &str| {
        let (_, n) = g.prod(v)?;
        let ok = match n.op_type.as_str() {
            "Gather" => attr_i(n, "axis").unwrap_or(0) == 0 && is_tok(&n.input[1]),
            "GatherND" => {
                attr_i(n, "batch_dims").unwrap_or(0) == 0
                    && prod(g, &n.input[1], "Unsqueeze").is_some_and(|u| last(u) && is_tok(&u.input[0]) && crate::rewrite::matcher::rank_of(g, &u.input[0]) == Some(1))
            }
            _ => false,
        };
        ok.then_some(n)
    };
    // G[:, e][:, None][token] (GPT-OSS), or G[token, e][:, None] (the column gathered first): both [n, 1]
    let (at_tok, column) = match at_tokens(v) {
        Some(n) => match prod(g, &n.input[0], "Unsqueeze").filter(|u| last(u)) {
            Some(u) => (n, u.input[0].as_str()),
            None => return Ok(None),
        },
        None => {
            let Some(u) = prod(g, v, "Unsqueeze").filter(|u| last(u)) else { return Ok(None) };
            let Some(n) = at_tokens(&u.input[0]) else { return Ok(None) };
            (n, n.input[0].as_str())
        }
    };
    let Some(col) = prod(g, column, "Gather").filter(|n| matches!(attr_i(n, "axis"), Some(1) | Some(-1))) else { return Ok(None) };
    if resolve_eref(g, &col.input[1], hits) != Some(mask.eref) {
        return Err("the dense gate's column is not the iteration's expert".into());
    }
    let Some((idx, rw, _k, e)) = crate::rewrite::dense::gate_of(g, &col.input[0])? else { return Ok(None) };
    if strip(g, &idx, &["Cast"]) != strip(g, &mask.idx, &["Cast"]) {
        return Err("the dense gate is scattered at other indices than the loop's mask".into());
    }
    if crate::rewrite::routing::dims::sym(g, &col.input[1]).is_some_and(|d| d.t != 0 || d.c >= e as i64) {
        return Err("the dense gate's column is outside its experts".into());
    }
    Ok(Some((rw, at_tok.output[0].clone())))
}
