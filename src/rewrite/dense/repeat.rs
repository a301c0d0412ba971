//! transformers 4's dense experts: rows repeated over the experts (`x.repeat(E, 1).view(E, -1, d)`)
//! and the shape vectors their outputs and gate are reshaped by (`prove_bmm` reads both).

use super::super::matcher::prod;
use crate::onnx::graph::GraphIndex;

/// One entry of a shape vector: a constant, or a one-element value named in the graph.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Entry {
    Const(i64),
    Value(String),
}

/// The entries of a reshape target: a constant, or a Concat of constants and one-element values.
pub(super) fn entries(g: &GraphIndex, v: &str) -> Option<Vec<Entry>> {
    if let Some(c) = g.const_i64(v) {
        return Some(c.into_iter().map(Entry::Const).collect());
    }
    let cat = prod(g, v, "Concat")?;
    let mut out = Vec::new();
    for p in &cat.input {
        match g.const_i64(p) {
            Some(c) => out.extend(c.into_iter().map(Entry::Const)),
            // one value under its Unsqueeze / Cast: two Unsqueezes of one scalar are one entry
            None if prod(g, p, "Unsqueeze").is_some() => {
                out.push(Entry::Value(crate::onnx::graph::strip(g, p, &["Unsqueeze", "Cast", "Identity"]).to_string()))
            }
            None => return None,
        }
    }
    Some(out)
}

/// transformers 4's dense experts (Qwen3-VL-MoE, GPT-OSS on a GPU): `x.repeat(E, 1).view(E, -1, d)`,
/// written `Reshape(Tile(Expand(x, ones), [E, 1]), [E, -1, d])`: slice e of the result is x itself.
/// (the repeated value, x)
pub(super) fn repeated_rows(g: &GraphIndex, n: &onnx_protobuf::NodeProto) -> Option<(String, String)> {
    if n.op_type != "Reshape" {
        return None;
    }
    let shape = g.const_i64(&n.input[1])?;
    let tile = prod(g, &n.input[0], "Tile")?;
    let reps = g.const_i64(&tile.input[1])?;
    let mut x = tile.input[0].as_str();
    if let Some(ex) = prod(g, x, "Expand") {
        // broadcast to a shape of ones of at most x's rank (a constant, or ConstantOfShape of
        // ones): x unchanged
        let ones_shape = match g.const_i64(&ex.input[1]) {
            Some(c) => c.iter().all(|&v| v == 1) && c.len() <= 2,
            None => {
                let ones = prod(g, &ex.input[1], "ConstantOfShape")?;
                let val = ones.attribute.iter().find(|a| a.name == "value").and_then(|a| a.t.as_ref())?;
                let one = crate::onnx::tensor::tensor_f32(val, None).ok().is_some_and(|v| v.iter().all(|&x| x == 1.0))
                    || crate::onnx::tensor::tensor_i64(val, None).ok().is_some_and(|v| v.iter().all(|&x| x == 1));
                let len = g.const_i64(&ones.input[0])?;
                one && len.len() == 1 && len[0] <= 2
            }
        };
        if !ones_shape {
            return None;
        }
        x = &ex.input[0];
    }
    let d = *super::super::prove::shape::shape_of(g, x)?.get(1).filter(|d| d.t == 0)?;
    if !(super::super::matcher::rank_of(g, x) == Some(2) && reps.len() == 2 && reps[1] == 1 && reps[0] >= 1 && shape == [reps[0], -1, d.c]) {
        return None;
    }
    // rows flattened from [B, S, d] (`hidden_states.reshape(-1, hidden)`): the op takes them as they
    // are (it flattens leading axes the same way), so the shape chains the graph reads from them
    // stay computable from the op's input
    let x = match prod(g, x, "Reshape") {
        Some(r) if g.const_i64(&r.input[1]).is_some_and(|s| s == [-1, d.c]) && super::super::matcher::rank_of(g, &r.input[0]).is_some_and(|r| r >= 2) => r.input[0].as_str(),
        _ => x,
    };
    Some((n.output[0].clone(), x.to_string()))
}
