//! Dense MoE: every expert computed for every token over stacked weights (einsum), combined with a
//! gate tensor that holds the router's top-k weights and zeros elsewhere.
//!
//! Checked: `Y = Einsum('P e, P e d -> P d', G, H)` where `G = ScatterElements(zeros[P, E], IDX,
//! RW, axis=-1)` with IDX from TopK (distinct experts per token, so G[t, IDX[t, j]] = RW[t, j]),
//! and H[P, e, :] is one expert MLP per e over the same token rows X[P, :] (einsums with stacked
//! weights, an elementwise activation identified numerically). Then
//! `Y[t] = sum_e G[t, e] H[t, e] = sum_j RW[t, j] MLP_{IDX[t, j]}(X[t])`: ScatterMoE(X, RW, IDX).

use super::emit::MoeLayer;
use super::expr::{to_mlp, ExprParser};
use super::Rejection;
use crate::onnx::graph::{attr_i, attr_s, GraphIndex};
use crate::spec::CapacityOrder;

/// The first inputs of einsums that apply a stacked weight to shared rows (`P i, e {i o} -> P e o`).
fn shared_row_inputs(g: &GraphIndex) -> Vec<String> {
    let mut v = Vec::new();
    for n in &g.graph.node {
        if n.op_type != "Einsum" || n.input.len() != 2 {
            continue;
        }
        let eq: String = attr_s(n, "equation").unwrap_or_default().chars().filter(|c| !c.is_whitespace()).collect();
        let Some((lhs, out)) = eq.split_once("->") else { continue };
        let Some((la, lb)) = lhs.split_once(',') else { continue };
        for (xl, wl, x, w) in [(la, lb, &n.input[0], &n.input[1]), (lb, la, &n.input[1], &n.input[0])] {
            let Some(t) = g.const_tensor(w) else { continue };
            if t.dims.len() != 3 || wl.len() != 3 {
                continue;
            }
            let e = wl.chars().next().unwrap();
            if !xl.contains(e) && out.len() == xl.len() + 1 && !v.contains(x) {
                v.push(x.clone());
            }
        }
    }
    v
}

/// `P e, P e d -> P d`: (gate input, expert output input).
fn combine_roles(eq: &str) -> Option<(usize, usize)> {
    let eq: String = eq.chars().filter(|c| !c.is_whitespace()).collect();
    let (lhs, out) = eq.split_once("->")?;
    let (a, b) = lhs.split_once(',')?;
    for (ga, ya, gi, yi) in [(a, b, 0, 1), (b, a, 1, 0)] {
        if ga.is_empty() || ya.len() != ga.len() + 1 {
            continue;
        }
        let p = &ga[..ga.len() - 1];
        let e = ga.chars().last()?;
        let d = ya.chars().last()?;
        if ya == format!("{p}{e}{d}") && out == format!("{p}{d}") && !p.contains(e) && !p.contains(d) && e != d {
            return Some((gi, yi));
        }
    }
    None
}

pub fn find(g: &GraphIndex) -> (Vec<MoeLayer>, Vec<Rejection>) {
    let mut layers = Vec::new();
    let mut rejected = Vec::new();
    let leaves = shared_row_inputs(g);
    for n in &g.graph.node {
        if n.op_type == "ReduceSum" && n.domain.is_empty() {
            let at = n.output[0].clone();
            match prove_bmm(g, n) {
                Ok(Some(l)) => layers.push(l),
                Ok(None) => {}
                Err(reason) => rejected.push(Rejection { family: "dense", at, reason }),
            }
            continue;
        }
        if n.op_type != "Einsum" || n.input.len() != 2 {
            continue;
        }
        let eq = attr_s(n, "equation").unwrap_or_default();
        let Some((gi, yi)) = combine_roles(&eq) else { continue };
        let at = n.output[0].clone();
        match prove(g, &n.input[gi], &n.input[yi], &leaves, &at) {
            Ok(Some(l)) => layers.push(l),
            Ok(None) => {}
            Err(reason) => rejected.push(Rejection { family: "dense", at, reason }),
        }
    }
    (layers, rejected)
}

/// The gate `ScatterElements(zeros[P, E], IDX, RW, axis = -1)` with IDX from TopK:
/// (IDX, RW, k, E), or None when `gate` is no such scatter.
fn gate_of(g: &GraphIndex, gate: &str) -> Result<Option<(String, String, usize, usize)>, String> {
    let gv = crate::onnx::graph::strip(g, gate, &["Cast", "Identity"]);
    let Some((_, sc)) = g.prod(gv).filter(|(_, n)| n.op_type == "ScatterElements") else {
        return Ok(None);
    };
    let red = attr_s(sc, "reduction").unwrap_or_else(|| "none".into());
    let axis = attr_i(sc, "axis").unwrap_or(0);
    if red != "none" {
        return Err("the gate scatter reduces".into());
    }
    let zeros = &sc.input[0];
    let Some((_, z)) = g.prod(zeros).filter(|(_, n)| n.op_type == "ConstantOfShape") else {
        return Err("the gate is not scattered into zeros".into());
    };
    let zero_val = z.attribute.iter().find(|a| a.name == "value").and_then(|a| a.t.as_ref());
    if zero_val.is_some_and(|t| crate::onnx::tensor::tensor_f32(t, None).map(|v| v.iter().any(|&x| x != 0.0)).unwrap_or(true)) {
        return Err("the gate is not scattered into zeros".into());
    }
    let (idx, rw) = (sc.input[1].clone(), sc.input[2].clone());
    let Some((_, tk)) = g.prod(&idx).filter(|(_, n)| n.op_type == "TopK" && n.output.get(1) == Some(&idx)) else {
        return Err("the gate's indices do not come from TopK (experts could repeat)".into());
    };
    let k = g.const_i64(&tk.input[1]).filter(|k| k.len() == 1).ok_or("TopK's k is not constant")?[0] as usize;
    // the gate has E columns: zeros shaped Concat(..., [E])
    let e_gate = g
        .prod(&z.input[0])
        .filter(|(_, n)| n.op_type == "Concat")
        .and_then(|(_, c)| g.const_i64(c.input.last()?))
        .filter(|v| v.len() == 1)
        .map(|v| v[0] as usize)
        .or_else(|| g.const_i64(&z.input[0]).map(|v| *v.last().unwrap() as usize))
        .ok_or("cannot tell the gate's number of experts")?;
    let rank = g.prod(&z.input[0]).filter(|(_, n)| n.op_type == "Concat").map(|(_, c)| c.input.len() as i64);
    if !(axis == -1 || Some(axis + 1) == rank) {
        return Err(format!("the gate scatter runs along axis {axis}, not the expert axis"));
    }
    Ok(Some((idx, rw, k, e_gate)))
}

fn prove(g: &GraphIndex, gate: &str, y: &str, leaves: &[String], at: &str) -> Result<Option<MoeLayer>, String> {
    let Some((idx, rw, k, e_gate)) = gate_of(g, gate)? else { return Ok(None) };
    // the experts, on shared rows
    let resolver = |_: &str| None;
    let mut p = ExprParser::new(g, leaves.to_vec(), &resolver);
    let e = p.parse(y)?;
    let d = p.d.ok_or("the expert outputs read no stacked linear layer of the token rows")?;
    let mlp = to_mlp(&e, d)?;
    let e_count = mlp.each_count(g).ok_or("the expert weights are not stacked over the expert axis")?;
    if e_count != e_gate {
        return Err(format!("the gate has {e_gate} experts, the weights {e_count}"));
    }
    for w in mlp.w_in.iter().chain([&mlp.w_out]) {
        if g.const_dims(&w.init).map(|d| d[0] as usize) != Some(e_count) {
            return Err("stacked weights differ in their number of experts".into());
        }
    }
    let x = p.matched_leaf.clone().ok_or("cannot find the token rows")?;
    Ok(Some(MoeLayer {
        family: "dense",
        x,
        routing_weights: rw,
        routing_indices: idx,
        output: at.to_string(),
        experts: (0..e_count).map(|i| mlp.for_expert(i)).collect(),
        capacity: None,
        capacity_order: CapacityOrder::SlotMajor,
        k: Some(k),
        extra_nodes: Vec::new(),
        extra_inits: Vec::new(),
    }))
}


/// The batched-MatMul form: `Y = ReduceSum(H * Unsqueeze(Transpose(G), -1), axis 0)` where
/// `H[e] = MLP_e(Unsqueeze(X, 0))` (MatMul with stacked weights [E, in, out], the rows broadcast
/// over the expert axis) and G the top-k gate [T, E].
fn prove_bmm(g: &GraphIndex, rsum: &onnx_protobuf::NodeProto) -> Result<Option<MoeLayer>, String> {
    let Some((_, mul)) = g.prod(&rsum.input[0]).filter(|(_, n)| n.op_type == "Mul") else { return Ok(None) };
    let axes = if rsum.input.len() > 1 { g.const_i64(&rsum.input[1]) } else { crate::onnx::graph::attr_ints(rsum, "axes") };
    let mut parts = None;
    for (a, b) in [(0, 1), (1, 0)] {
        // b: Unsqueeze(Transpose(G, [1, 0]), -1)
        let Some((_, u)) = g.prod(&mul.input[b]).filter(|(_, n)| n.op_type == "Unsqueeze") else { continue };
        let ua = if u.input.len() > 1 { g.const_i64(&u.input[1]) } else { crate::onnx::graph::attr_ints(u, "axes") };
        let Some((_, t)) = g.prod(&u.input[0]).filter(|(_, n)| n.op_type == "Transpose") else { continue };
        if crate::onnx::graph::attr_ints(t, "perm").unwrap_or_else(|| vec![1, 0]) != [1, 0] {
            continue;
        }
        parts = Some((mul.input[a].clone(), t.input[0].clone(), ua));
    }
    let Some((y, gate, ua)) = parts else { return Ok(None) };
    let Some((idx, rw, k, e_gate)) = gate_of(g, &gate)? else { return Ok(None) };
    if axes.as_deref() != Some(&[0]) || attr_i(rsum, "keepdims").unwrap_or(1) != 0 {
        return Err("the weighted expert outputs are not summed over the expert axis".into());
    }
    if !matches!(ua.as_deref(), Some([-1]) | Some([2])) {
        return Err("the gate is not broadcast over the model width".into());
    }
    // leaves: Unsqueeze(X, 0), the rows broadcast over the expert axis
    let mut leaves = Vec::new();
    for n in &g.graph.node {
        if n.op_type == "Unsqueeze" && n.domain.is_empty() {
            let a = if n.input.len() > 1 { g.const_i64(&n.input[1]) } else { crate::onnx::graph::attr_ints(n, "axes") };
            if a.as_deref() == Some(&[0]) {
                leaves.push(n.output[0].clone());
            }
        }
    }
    let resolver = |_: &str| None;
    let mut p = ExprParser::new(g, leaves, &resolver);
    p.batched_leaf = true;
    let e = p.parse(&y)?;
    let d = p.d.ok_or("the expert outputs read no stacked linear layer of the token rows")?;
    let mlp = to_mlp(&e, d)?;
    let e_count = mlp.each_count(g).ok_or("the expert weights are not stacked over the expert axis")?;
    if e_count != e_gate {
        return Err(format!("the gate has {e_gate} experts, the weights {e_count}"));
    }
    let leaf = p.matched_leaf.clone().ok_or("cannot find the token rows")?;
    let x = g.prod(&leaf).map(|(_, n)| n.input[0].clone()).ok_or("cannot find the token rows")?;
    Ok(Some(MoeLayer {
        family: "dense",
        x,
        routing_weights: rw,
        routing_indices: idx,
        output: rsum.output[0].clone(),
        experts: (0..e_count).map(|i| mlp.for_expert(i)).collect(),
        capacity: None,
        capacity_order: CapacityOrder::SlotMajor,
        k: Some(k),
        extra_nodes: Vec::new(),
        extra_inits: Vec::new(),
    }))
}
