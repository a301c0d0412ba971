//! Capacity MoE, Switch/GShard style with one-hot dispatch and combine tensors [T, E, C].
//!
//! Checked, for top-1 routing from one probability tensor P:
//! - `mask = OneHot(ArgMax(P), E)`, `gate = ReduceMax(P)` (the chosen expert's probability);
//! - `pos = CumSum(mask, tokens) * mask - 1` (the token's position among the tokens of its expert);
//! - `keep = mask * (pos < C)`; `dispatch = OneHot(clip(pos, 0, C-1), C) * keep[..., None]`;
//! - `combine = dispatch * gate[:, None, None]`;
//! - `Y = Einsum('tec,ecd->td', combine, MLP_e(Einsum('tec,td->ecd', dispatch, X)))`.
//!
//! Every buffer slot (e, c) holds at most one token, so Y[t] = gate[t] MLP_e(X[t]) when the token
//! is among the first C of its expert, else 0: ScatterMoE with `capacity` = C (slot_major, k = 1).

use super::emit::MoeLayer;
use super::expr::{to_mlp, ExprParser};
use super::matcher::prod;
use super::Rejection;
use crate::onnx::graph::{attr_i, attr_ints, attr_s, make_node, strip, GraphIndex};
use crate::onnx::tensor::make_i64;
use crate::spec::CapacityOrder;


fn labels(eq: &str) -> Option<(String, String, String)> {
    let eq: String = eq.chars().filter(|c| !c.is_whitespace()).collect();
    let (lhs, out) = eq.split_once("->")?;
    let (a, b) = lhs.split_once(',')?;
    Some((a.to_string(), b.to_string(), out.to_string()))
}

/// (other operand, the Mul's operand matching `pred`)
fn mul_split<'g>(g: &GraphIndex<'g>, v: &str, pred: impl Fn(&str) -> bool) -> Option<(String, String)> {
    let m = prod(g, strip(g, v, &["Cast", "Identity"]), "Mul")?;
    for (a, b) in [(0, 1), (1, 0)] {
        if pred(&m.input[a]) {
            return Some((m.input[b].clone(), m.input[a].clone()));
        }
    }
    None
}

/// `Cast(OneHot(a, depth, [0, 1]))`: (a, depth)
fn one_hot(g: &GraphIndex, v: &str) -> Option<(String, i64)> {
    let oh = prod(g, strip(g, v, &["Cast"]), "OneHot")?;
    if attr_i(oh, "axis").unwrap_or(-1) != -1 || g.const_f32(&oh.input[2])? != [0.0, 1.0] {
        return None;
    }
    Some((oh.input[0].clone(), g.const_scalar(&oh.input[1])? as i64))
}

struct Routing {
    mask: String,
    argmax: String,
    probs: String,
    experts: i64,
}

fn routing_mask(g: &GraphIndex, v: &str) -> Option<Routing> {
    let (a, e) = one_hot(g, v)?;
    let am = prod(g, &a, "ArgMax")?;
    if attr_i(am, "keepdims").unwrap_or(1) != 0 || attr_i(am, "axis").unwrap_or(0) != -1 || attr_i(am, "select_last_index").unwrap_or(0) != 0 {
        return None;
    }
    Some(Routing { mask: strip(g, v, &["Cast"]).to_string(), argmax: a, probs: am.input[0].clone(), experts: e })
}

/// `pos = CumSum(mask, 0) * mask - 1` over the same mask: the mask value.
fn position(g: &GraphIndex, pos: &str) -> Option<String> {
    let sub = prod(g, pos, "Sub")?;
    if g.const_scalar(&sub.input[1])? != 1.0 {
        return None;
    }
    let m = prod(g, &sub.input[0], "Mul")?;
    for (a, b) in [(0, 1), (1, 0)] {
        let Some(cs) = prod(g, &m.input[a], "CumSum") else { continue };
        if attr_i(cs, "exclusive").unwrap_or(0) != 0 || attr_i(cs, "reverse").unwrap_or(0) != 0 || g.const_scalar(&cs.input[1]) != Some(0.0) {
            return None;
        }
        if strip(g, &cs.input[0], &["Cast"]) == strip(g, &m.input[b], &["Cast"]) {
            return Some(strip(g, &m.input[b], &["Cast"]).to_string());
        }
    }
    None
}

pub fn find(g: &GraphIndex) -> (Vec<MoeLayer>, Vec<Rejection>) {
    let mut layers = Vec::new();
    let mut rejected = Vec::new();
    for n in &g.graph.node {
        if n.op_type != "Einsum" || n.input.len() != 2 {
            continue;
        }
        let Some((a, b, out)) = labels(&attr_s(n, "equation").unwrap_or_default()) else { continue };
        // combine: t e c , e c d -> t d
        let roles = [(a.as_str(), b.as_str(), 0, 1), (b.as_str(), a.as_str(), 1, 0)].into_iter().find(|(c, y, _, _)| {
            let (c, y): (Vec<char>, Vec<char>) = (c.chars().collect(), y.chars().collect());
            c.len() == 3 && y.len() == 3 && y[0] == c[1] && y[1] == c[2] && out == format!("{}{}", c[0], y[2])
        });
        let Some((_, _, ci, yi)) = roles else { continue };
        let at = n.output[0].clone();
        match prove(g, &n.input[ci], &n.input[yi], &at) {
            Ok(Some(l)) => layers.push(l),
            Ok(None) => {}
            Err(reason) => rejected.push(Rejection { family: "capacity", at, reason }),
        }
    }
    (layers, rejected)
}

fn prove(g: &GraphIndex, combine: &str, expert_out: &str, at: &str) -> Result<Option<MoeLayer>, String> {
    // combine = dispatch * gate[:, None, None]
    let Some((dispatch, gate_b)) = mul_split(g, combine, |v| {
        let s = strip(g, v, &["Unsqueeze", "Cast", "Reshape"]);
        prod(g, s, "ReduceMax").is_some()
    }) else {
        return Ok(None);
    };
    let gate = strip(g, &gate_b, &["Unsqueeze", "Cast", "Reshape"]).to_string();
    let rm = prod(g, &gate, "ReduceMax").unwrap();
    let rm_axes = if rm.input.len() > 1 { g.const_i64(&rm.input[1]) } else { attr_ints(rm, "axes") };
    if rm_axes.as_deref() != Some(&[-1]) || attr_i(rm, "keepdims").unwrap_or(1) != 0 {
        return Err("the gate is not the max probability of each token".into());
    }
    // dispatch = OneHot(clip(pos), C) * Unsqueeze(keep, -1)
    let dm = prod(g, strip(g, &dispatch, &["Cast"]), "Mul").ok_or("the dispatch tensor is not a masked one-hot")?;
    let mut found = None;
    for (x, y) in [(0, 1), (1, 0)] {
        if let Some((pc, c)) = one_hot(g, &dm.input[x]) {
            found = Some((pc, c, dm.input[y].clone()));
            break;
        }
    }
    let (pos_c, cap, keep_u) = found.ok_or("the dispatch tensor is not a one-hot over buffer slots")?;
    let clip = prod(g, strip(g, &pos_c, &["Cast"]), "Clip").ok_or("buffer positions are not clipped")?;
    if g.const_scalar(&clip.input[1]) != Some(0.0) || g.const_scalar(&clip.input[2]) != Some((cap - 1) as f64) {
        return Err("buffer positions are not clipped to [0, C)".into());
    }
    let pos = clip.input[0].clone();
    let mask = position(g, &pos).ok_or("buffer positions are not the running count of each expert's tokens")?;
    let ku = prod(g, strip(g, &keep_u, &["Cast"]), "Unsqueeze").ok_or("the dispatch is not masked per token")?;
    // keep = mask * (pos < C)
    let keep = ku.input[0].clone();
    let (m2, less) = mul_split(g, &keep, |v| prod(g, strip(g, v, &["Cast"]), "Less").is_some()).ok_or("the kept tokens are not mask * (pos < C)")?;
    let ln = prod(g, strip(g, &less, &["Cast"]), "Less").unwrap();
    if strip(g, &ln.input[0], &["Cast"]) != strip(g, &pos, &["Cast"]) || g.const_scalar(&ln.input[1]) != Some(cap as f64) {
        return Err("the kept tokens are not those with position < C".into());
    }
    if strip(g, &m2, &["Cast"]) != mask {
        return Err("the kept tokens use another mask".into());
    }
    let r = routing_mask(g, &mask).ok_or("the expert mask is not OneHot(ArgMax(P))")?;
    // OneHot drops a choice outside [0, E) (a zero row); the op refuses it: the router must have
    // exactly E columns
    match super::hf_loop::router_experts(g, &r.argmax) {
        Some(w) if w as i64 == r.experts => {}
        Some(w) => return Err(format!("the router chooses among {w} values, not the {} experts", r.experts).into()),
        None => return Err("cannot tell that the router chooses among exactly the E experts".into()),
    }
    if strip(g, &rm.input[0], &["Cast"]) != strip(g, &r.probs, &["Cast"]) {
        return Err("the gate and the expert choice come from different probabilities".into());
    }
    let _ = &r.mask;
    // expert inputs: einsum('tec,td->ecd', dispatch, X)
    let mut leaves = Vec::new();
    let mut x = None;
    for &c in g.cons(&dispatch) {
        let n = g.node(c);
        if n.op_type != "Einsum" || n.input.len() != 2 {
            continue;
        }
        let Some((a, b, out)) = labels(&attr_s(n, "equation").unwrap_or_default()) else { continue };
        let (dl, xl, xi) = if n.input[0] == dispatch { (a, b, 1) } else { (b, a, 0) };
        let (dc, xc): (Vec<char>, Vec<char>) = (dl.chars().collect(), xl.chars().collect());
        if dc.len() == 3 && xc.len() == 2 && xc[0] == dc[0] && out == format!("{}{}{}", dc[1], dc[2], xc[1]) {
            leaves.push(n.output[0].clone());
            x = Some(n.input[xi].clone());
        }
    }
    let x = x.ok_or("no expert buffers are gathered with the dispatch tensor")?;
    let resolver = |_: &str| None;
    let mut p = ExprParser::new(g, leaves, &resolver);
    let e = p.parse(expert_out)?;
    let d = p.d.ok_or("the experts read no stacked linear layer of the buffers")?;
    let mlp = to_mlp(&e, d)?;
    let e_count = mlp.each_count(g).ok_or("the expert weights are not stacked over the expert axis")?;
    if e_count as i64 != r.experts {
        return Err(format!("the mask has {} experts, the weights {e_count}", r.experts));
    }
    // the op wants routing tensors [T, 1]: unsqueeze the gate and the choice
    let tag = format!("{}/capacity", at.trim_start_matches('/'));
    let axes = format!("{tag}/axes");
    let rw = format!("{tag}/routing_weights");
    let ri = format!("{tag}/routing_indices");
    let mut u1 = make_node("Unsqueeze", "", &format!("{tag}/Unsqueeze_w"), &[&gate, &axes], &[&rw]);
    let mut u2 = make_node("Unsqueeze", "", &format!("{tag}/Unsqueeze_i"), &[&r.argmax, &axes], &[&ri]);
    let mut inits = vec![make_i64(&axes, &[1], &[-1])];
    if g.default_opset() < 13 {
        u1.input.truncate(1);
        u2.input.truncate(1);
        u1.attribute.push(crate::onnx::graph::attr_ints_new("axes", &[-1]));
        u2.attribute.push(crate::onnx::graph::attr_ints_new("axes", &[-1]));
        inits.clear();
    }
    Ok(Some(MoeLayer {
        family: "capacity",
        x,
        routing_weights: rw,
        routing_indices: ri,
        output: at.to_string(),
        experts: (0..e_count).map(|i| mlp.for_expert(i)).collect(),
        capacity: Some(cap),
        capacity_order: CapacityOrder::SlotMajor,
        k: Some(1),
        extra_nodes: vec![u1, u2],
        extra_inits: inits,
    }))
}
