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
use crate::onnx::graph::{attr_i, attr_ints, attr_s, GraphIndex};
use crate::spec::CapacityOrder;

mod repeat;
use repeat::{entries, repeated_rows, Entry};

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
            let Some(dims) = super::dequant::weight_dims(g, w) else { continue };
            if dims.len() != 3 || wl.len() != 3 {
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
        if let Some((gate, y)) = combine_of(g, n) {
            let at = n.output[0].clone();
            match prove(g, &gate, &y, &leaves, &at) {
                Ok(Some(l)) => layers.push(l),
                Ok(None) => {}
                Err(reason) => rejected.push(Rejection { family: "dense", at, reason }),
            }
            continue;
        }
        if n.op_type == "ReduceSum" && n.domain.is_empty() {
            let at = n.output[0].clone();
            match prove_bmm(g, n) {
                Ok(Some(l)) => layers.push(l),
                Ok(None) => {}
                Err(reason) => rejected.push(Rejection { family: "dense", at, reason }),
            }
        }
    }
    (layers, rejected)
}

/// The gate `ScatterElements(zeros[P, E], IDX, RW, axis = -1)` with IDX from TopK:
/// (IDX, RW, k, E), or None when `gate` is no such scatter.
pub(super) fn gate_of(g: &GraphIndex, gate: &str) -> Result<Option<(String, String, usize, usize)>, String> {
    let gv = crate::onnx::graph::strip(g, gate, &["Cast", "Identity"]);
    if let Some(r) = onehot_gate(g, gv) {
        return r.map(Some);
    }
    let Some((_, sc)) = g.prod(gv).filter(|(_, n)| n.op_type == "ScatterElements") else {
        return Ok(None);
    };
    let red = attr_s(sc, "reduction").unwrap_or_else(|| "none".into());
    let axis = attr_i(sc, "axis").unwrap_or(0);
    if red != "none" {
        return Err("the gate scatter reduces".into());
    }
    let shape = zeros_shape(g, &sc.input[0]).ok_or("the gate is not scattered into zeros")?;
    let (idx, rw) = (sc.input[1].clone(), sc.input[2].clone());
    let Some((_, tk)) = g.prod(&idx).filter(|(_, n)| n.op_type == "TopK" && n.output.get(1) == Some(&idx)) else {
        return Err("the gate's indices do not come from TopK (experts could repeat)".into());
    };
    let k = g.const_i64(&tk.input[1]).filter(|k| k.len() == 1).ok_or("TopK's k is not constant")?[0] as usize;
    // the gate's rank, read from its shape vector (a Concat input may hold several dims)
    let rank = super::matcher::vec_len(g, &shape);
    let tk_axis = attr_i(tk, "axis").unwrap_or(-1);
    if !super::matcher::is_last_axis(tk_axis, super::matcher::rank_of(g, &tk.input[0]).or(rank)) {
        return Err(format!("the router's TopK runs along axis {tk_axis}, not the expert axis"));
    }
    // the gate has E columns: zeros shaped Concat(..., [E])
    let e_gate = g
        .prod(&shape)
        .filter(|(_, n)| n.op_type == "Concat")
        .and_then(|(_, c)| g.const_i64(c.input.last()?))
        .filter(|v| v.len() == 1)
        .map(|v| v[0] as usize)
        .or_else(|| g.const_i64(&shape).and_then(|v| v.last().map(|&e| e as usize)))
        // zeros_like(router_logits): the shape vector's last entry, a fixed dimension
        .or_else(|| super::routing::shape_vector(g, &shape).and_then(|v| v.last().filter(|d| d.t == 0 && d.c > 0).map(|d| d.c as usize)))
        .ok_or("cannot tell the gate's number of experts")?;
    if !super::matcher::is_last_axis(axis, rank) {
        return Err(format!("the gate scatter runs along axis {axis}, not the expert axis"));
    }
    // the gate's leading axes are the routing's: zeros of another shape broadcast the gate
    // against the experts' outputs differently
    let lead = super::prove::shape::shape_of(g, &idx).filter(|s| !s.is_empty());
    let gate_shape = super::routing::shape_vector(g, &shape);
    match (lead, gate_shape) {
        (Some(l), Some(gs)) if gs.len() == l.len() && gs[..l.len() - 1] == l[..l.len() - 1] => {}
        (Some(l), Some(gs)) => return Err(format!("the gate is scattered into zeros of shape {gs:?}, not the routing's leading shape {:?} and E", &l[..l.len() - 1])),
        _ => return Err("cannot tell that the gate has the routing's leading shape".into()),
    }
    Ok(Some((idx, rw, k, e_gate)))
}


/// The shape vector of a zeros tensor: `ConstantOfShape(shape)` with value 0 (or no value), or
/// `Expand(0, shape)` with a scalar constant 0.
fn zeros_shape(g: &GraphIndex, v: &str) -> Option<String> {
    let (_, z) = g.prod(v)?;
    match z.op_type.as_str() {
        "ConstantOfShape" => {
            let val = z.attribute.iter().find(|a| a.name == "value").and_then(|a| a.t.as_ref());
            let zero = val.is_none_or(|t| crate::onnx::tensor::tensor_f32(t, None).is_ok_and(|v| v.iter().all(|&x| x == 0.0)));
            zero.then(|| z.input[0].clone())
        }
        "Expand" => {
            let t = g.const_tensor(&z.input[0])?;
            let zero = crate::onnx::tensor::numel(&t.dims) == 1 && g.const_scalar(&z.input[0]) == Some(0.0);
            zero.then(|| z.input[1].clone())
        }
        _ => None,
    }
}

/// TopK's k when `idx` is its index output along the last axis (distinct entries per row).
fn topk_k(g: &GraphIndex, idx: &str) -> Result<usize, String> {
    let Some((_, tk)) = g.prod(idx).filter(|(_, n)| n.op_type == "TopK" && n.output.get(1).is_some_and(|o| o == idx)) else {
        return Err("the gate's indices do not come from TopK (experts could repeat)".into());
    };
    let k = g.const_i64(&tk.input[1]).filter(|k| k.len() == 1).ok_or("TopK's k is not constant")?[0] as usize;
    let axis = attr_i(tk, "axis").unwrap_or(-1);
    if !super::matcher::is_last_axis(axis, super::matcher::rank_of(g, &tk.input[0])) {
        return Err(format!("the router's TopK runs along axis {axis}, not the expert axis"));
    }
    Ok(k)
}

/// The one-hot spelling of the gate: `ReduceSum(one_hot(IDX, E) * Unsqueeze(RW, -1), axis -2)`,
/// i.e. G[t, e] = sum_j [IDX[t, j] = e] RW[t, j] (the scatter's value, IDX distinct), with the
/// one-hot in any spelling [`super::routing::one_hot`] reads (OneHot, or a comparison with an
/// arange). A one-hot drops an index outside [0, E) that the op would refuse, so the router must
/// have exactly E columns.
fn onehot_gate(g: &GraphIndex, v: &str) -> Option<Result<(String, String, usize, usize), String>> {
    use super::matcher::{axes_of, prod, rank_of};
    let rs = prod(g, v, "ReduceSum")?;
    let mul = prod(g, crate::onnx::graph::strip(g, &rs.input[0], &["Cast"]), "Mul")?;
    let mut parts = None;
    for (a, b) in [(0, 1), (1, 0)] {
        let Some((idx, e)) = super::routing::one_hot(g, &mul.input[a]) else { continue };
        let Some(u) = prod(g, &mul.input[b], "Unsqueeze") else { continue };
        parts = Some((idx, e, u));
    }
    let (idx, e, u) = parts?;
    let check = || -> Result<(String, String, usize, usize), String> {
        let r = rank_of(g, &idx);
        let ua = axes_of(g, u).ok_or("the routing weights are unsqueezed along a computed axis")?;
        if !(ua.len() == 1 && super::matcher::is_last_axis(ua[0], r.map(|r| r + 1))) {
            return Err("the routing weights are not broadcast over the experts".into());
        }
        let ra = axes_of(g, rs).ok_or("the gate's sum runs along a computed axis")?;
        let second_last = ra.len() == 1 && (ra[0] == -2 || r.is_some_and(|r| ra[0] == r as i64 - 1));
        if !second_last || attr_i(rs, "keepdims").unwrap_or(1) != 0 {
            return Err("the gate's one-hot sum is not over the k choices".into());
        }
        let k = topk_k(g, &idx)?;
        match super::routing::router_experts(g, &idx) {
            Some(w) if w as i64 == e => {}
            Some(w) => return Err(format!("the router chooses among {w} values, not the gate's {e} experts")),
            None => return Err("cannot tell that the router chooses among exactly the gate's experts".into()),
        }
        Ok((idx, u.input[0].clone(), k, e as usize))
    };
    Some(check())
}

/// The combine forms of `Y[t] = sum_e G[t, e] H[t, e, :]` ending at node `n`: the einsum
/// `P e, P e d -> P d`; `Squeeze(MatMul(Unsqueeze(G, -2), H), -2)`; and
/// `ReduceSum(H * Unsqueeze(G, -1), axis -2)` (its float16 product widened to float32 before the
/// sum, as the dynamo exporter writes a float16 sum). (gate, expert outputs).
fn combine_of(g: &GraphIndex, n: &onnx_protobuf::NodeProto) -> Option<(String, String)> {
    use super::matcher::{axes_of, prod, rank_of};
    if !n.domain.is_empty() {
        return None;
    }
    // `axes == [from_end]` counted from the end of a value of rank `r` (exporters write either)
    let at_end = |ax: Option<Vec<i64>>, v: &str, from_end: i64| {
        ax.is_some_and(|a| a.len() == 1 && (a[0] == from_end || rank_of(g, v).is_some_and(|r| a[0] == r as i64 + from_end)))
    };
    match n.op_type.as_str() {
        "Einsum" if n.input.len() == 2 => {
            let (gi, yi) = combine_roles(&attr_s(n, "equation").unwrap_or_default())?;
            Some((n.input[gi].clone(), n.input[yi].clone()))
        }
        "Squeeze" => {
            if !at_end(axes_of(g, n), &n.input[0], -2) {
                return None;
            }
            let mm = prod(g, &n.input[0], "MatMul")?;
            let u = prod(g, &mm.input[0], "Unsqueeze")?;
            at_end(axes_of(g, u), &u.output[0], -2).then(|| (u.input[0].clone(), mm.input[1].clone()))
        }
        "ReduceSum" => {
            if !at_end(axes_of(g, n), &n.input[0], -2) || attr_i(n, "keepdims").unwrap_or(1) != 0 {
                return None;
            }
            // a float16 sum accumulated in float32 (the dynamo exporter's): the op sums in its own type
            let m = prod(g, super::matcher::widened_16bit(g, &n.input[0]), "Mul")?;
            for (a, b) in [(0, 1), (1, 0)] {
                if let Some(u) = prod(g, &m.input[b], "Unsqueeze") {
                    if at_end(axes_of(g, u), &u.output[0], -1) {
                        return Some((u.input[0].clone(), m.input[a].clone()));
                    }
                }
            }
            None
        }
        _ => None,
    }
}

/// The experts applied to every token: H[.., t, e, :] = MLP_e(X[.., t, :]), either einsums with
/// stacked weights (`leaves` are their row inputs) or a batched MatMul of the rows broadcast
/// over a new expert axis, `Unsqueeze(X, -3) @ W[E, in, out]` ([.., E, t, out]), moved next to
/// the width by a Transpose that swaps the expert and token axes. (MLP parse, token rows X).
fn experts_of(g: &GraphIndex, y: &str, leaves: &[String]) -> Result<(super::expr::ExpertMlp, String), String> {
    use super::matcher::{axes_of, prod, rank_of};
    let resolver = |_: &str| None;
    if let Some(t) = prod(g, y, "Transpose") {
        let perm = attr_ints(t, "perm").ok_or("the expert outputs are transposed without a permutation")?;
        let r = perm.len();
        let swapped = r >= 3 && (0..r).all(|i| perm[i] == if i == r - 3 { r as i64 - 2 } else if i == r - 2 { r as i64 - 3 } else { i as i64 });
        if !swapped {
            return Err(format!("the expert outputs are transposed by {perm:?}, not by a swap of the expert and token axes"));
        }
        // rows broadcast over the expert axis: Unsqueeze(X, axis -3 of the result)
        let mut bl = Vec::new();
        for n in &g.graph.node {
            if n.op_type == "Unsqueeze" && n.domain.is_empty() {
                let Some(a) = axes_of(g, n) else { continue };
                let Some(xr) = rank_of(g, &n.input[0]) else { continue };
                if xr + 1 == r && a.len() == 1 && (a[0] == -3 || a[0] == xr as i64 - 2) {
                    bl.push(n.output[0].clone());
                }
            }
        }
        let mut p = ExprParser::new(g, bl, &resolver);
        p.batched_leaf = true;
        let e = p.parse(&t.input[0])?;
        let d = p.d.ok_or("the expert outputs read no stacked linear layer of the token rows")?;
        let mlp = to_mlp(&e, d)?;
        let leaf = p.matched_leaf.clone().ok_or("cannot find the token rows")?;
        let x = g.prod(&leaf).map(|(_, n)| n.input[0].clone()).ok_or("cannot find the token rows")?;
        return Ok((mlp, x));
    }
    let mut p = ExprParser::new(g, leaves.to_vec(), &resolver);
    let e = p.parse(y)?;
    let d = p.d.ok_or("the expert outputs read no stacked linear layer of the token rows")?;
    let mlp = to_mlp(&e, d)?;
    let x = p.matched_leaf.clone().ok_or("cannot find the token rows")?;
    Ok((mlp, x))
}

fn prove(g: &GraphIndex, gate: &str, y: &str, leaves: &[String], at: &str) -> Result<Option<MoeLayer>, String> {
    let Some((idx, rw, k, e_gate)) = gate_of(g, gate)? else { return Ok(None) };
    let (mlp, x) = experts_of(g, y, leaves)?;
    let e_count = mlp.each_count(g).ok_or("the expert weights are not stacked over the expert axis")?;
    if e_count != e_gate {
        return Err(format!("the gate has {e_gate} experts, the weights {e_count}"));
    }
    for w in mlp.w_in.iter().chain([&mlp.w_out]) {
        if super::dequant::weight_dims(g, &w.init).map(|d| d[0] as usize) != Some(e_count) {
            return Err("stacked weights differ in their number of experts".into());
        }
    }
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
        quant: None,
    }))
}


/// The batched-MatMul form: `Y = ReduceSum(H * Unsqueeze(Transpose(G), -1), axis 0)` where
/// `H[e] = MLP_e(Unsqueeze(X, 0))` (MatMul with stacked weights [E, in, out], the rows broadcast
/// over the expert axis) and G the top-k gate [T, E].
/// `ReduceSum(Mul(Y, Unsqueeze([Reshape](Transpose(G), s), -1)), axes 0)`: the experts' outputs of
/// every token, [E, T, d] or reshaped alike to [E, A.., d], weighted by the gate and summed over
/// the experts.
fn prove_bmm(g: &GraphIndex, rsum: &onnx_protobuf::NodeProto) -> Result<Option<MoeLayer>, String> {
    // the dynamo exporter sums 16-bit values as ReduceSum(Cast(x, float32)): read through the widening
    let mut summed = rsum.input[0].as_str();
    let mut widened = false;
    if let Some((_, c)) = g.prod(summed).filter(|(_, n)| n.op_type == "Cast" && attr_i(n, "to") == Some(1)) {
        if matches!(g.infer_type(&c.input[0]), Some(10) | Some(16)) {
            summed = &c.input[0];
            widened = true;
        }
    }
    let Some((_, mul)) = g.prod(summed).filter(|(_, n)| n.op_type == "Mul") else { return Ok(None) };
    let axes = if rsum.input.len() > 1 { g.const_i64(&rsum.input[1]) } else { crate::onnx::graph::attr_ints(rsum, "axes") };
    let mut parts = None;
    for (a, b) in [(0, 1), (1, 0)] {
        // b: Unsqueeze([Reshape](Transpose(G, [1, 0]), s_g), -1)
        let Some((_, u)) = g.prod(&mul.input[b]).filter(|(_, n)| n.op_type == "Unsqueeze") else { continue };
        let ua = if u.input.len() > 1 { g.const_i64(&u.input[1]) } else { crate::onnx::graph::attr_ints(u, "axes") };
        let mut inner = u.input[0].as_str();
        let mut s_g = None;
        if let Some((_, r)) = g.prod(inner).filter(|(_, n)| n.op_type == "Reshape") {
            s_g = Some(r.input[1].clone());
            inner = &r.input[0];
        }
        let Some((_, t)) = g.prod(inner).filter(|(_, n)| n.op_type == "Transpose") else { continue };
        if crate::onnx::graph::attr_ints(t, "perm").unwrap_or_else(|| vec![1, 0]) != [1, 0] {
            continue;
        }
        parts = Some((mul.input[a].clone(), t.input[0].clone(), ua, s_g));
    }
    let Some((y, gate, ua, s_g)) = parts else { return Ok(None) };
    let Some((idx, rw, k, e_gate)) = gate_of(g, &gate)? else { return Ok(None) };
    if axes.as_deref() != Some(&[0]) || attr_i(rsum, "keepdims").unwrap_or(1) != 0 {
        return Err("the weighted expert outputs are not summed over the expert axis".into());
    }
    // reshaped alike: the gate [E, T] to s_g = [E, A..] and the outputs [E, T, d] to [E, A.., d],
    // so entry (e, a..) of both is the same (expert, token); the sum is then the op's rows
    // reshaped to [A.., d], which a Reshape after the op writes
    let (y, out_shape) = match &s_g {
        None => (y, None),
        Some(s_g) => {
            let ry = super::matcher::prod(g, &y, "Reshape").ok_or("the gate is reshaped and the experts' outputs are not")?;
            let (eg, ey) = (entries(g, s_g).ok_or("the gate's reshape target is not read")?, entries(g, &ry.input[1]).ok_or("the outputs' reshape target is not read")?);
            let same = ey.len() == eg.len() + 1 && ey[..eg.len()] == eg[..] && eg.first() == Some(&Entry::Const(e_gate as i64));
            if !same || eg.iter().chain(&ey).any(|e| *e == Entry::Const(0)) {
                return Err(format!("the gate (reshaped to {eg:?}) and the experts' outputs (to {ey:?}) are not reshaped alike"));
            }
            (ry.input[0].clone(), Some((ry.input[1].clone(), eg.len())))
        }
    };
    let width = out_shape.as_ref().map_or(2, |(_, r)| *r);
    if !matches!(ua.as_deref(), Some([-1])) && ua.as_deref() != Some(&[width as i64]) {
        return Err("the gate is not broadcast over the model width".into());
    }
    // leaves: Unsqueeze(X, 0), or X repeated E times, the rows broadcast over the expert axis
    let mut leaves = Vec::new();
    for n in &g.graph.node {
        if n.op_type == "Unsqueeze" && n.domain.is_empty() {
            let a = if n.input.len() > 1 { g.const_i64(&n.input[1]) } else { crate::onnx::graph::attr_ints(n, "axes") };
            if a.as_deref() == Some(&[0]) {
                leaves.push((n.output[0].clone(), n.input[0].clone()));
            }
        } else if let Some(l) = repeated_rows(g, n).filter(|_| n.domain.is_empty()) {
            leaves.push(l);
        }
    }
    let resolver = |_: &str| None;
    let mut p = ExprParser::new(g, leaves.iter().map(|l| l.0.clone()).collect(), &resolver);
    p.batched_leaf = true;
    let e = p.parse(&y)?;
    let d = p.d.ok_or("the expert outputs read no stacked linear layer of the token rows")?;
    let mlp = to_mlp(&e, d)?;
    let e_count = mlp.each_count(g).ok_or("the expert weights are not stacked over the expert axis")?;
    if e_count != e_gate {
        return Err(format!("the gate has {e_gate} experts, the weights {e_count}"));
    }
    let leaf = p.matched_leaf.clone().ok_or("cannot find the token rows")?;
    let x = leaves.iter().find(|l| l.0 == leaf).map(|l| l.1.clone()).ok_or("cannot find the token rows")?;
    let output = rsum.output[0].clone();
    let (mut extra_nodes, mut extra_inits) = (Vec::new(), Vec::new());
    if let Some((s_y, _)) = out_shape {
        // the op's rows [T, d] as the graph's [A.., d]: s_y without its expert entry
        let tag = format!("{output}/scattermoe_rows");
        let (one, big, zero) = (format!("{tag}/one"), format!("{tag}/end"), format!("{tag}/axis"));
        for (n, v) in [(&one, 1i64), (&big, i64::MAX), (&zero, 0)] {
            extra_inits.push(crate::onnx::tensor::make_i64(n, &[1], &[v]));
        }
        let shape = format!("{tag}/shape");
        extra_nodes.push(crate::onnx::graph::make_node("Slice", "", &format!("{tag}/Slice"), &[&s_y, &one, &big, &zero], &[&shape]));
        // a float32 sum of 16-bit products: the op's rows in their type, then widened as the graph does
        let rows = if widened { format!("{tag}/rows") } else { output.clone() };
        extra_nodes.push(crate::onnx::graph::make_node("Reshape", "", &format!("{tag}/Reshape"), &[&super::emit::op_result(&output), &shape], &[&rows]));
        if widened {
            let mut c = crate::onnx::graph::make_node("Cast", "", &format!("{tag}/Cast"), &[&rows], &[&output]);
            c.attribute.push(crate::onnx::graph::attr_int("to", 1));
            extra_nodes.push(c);
        }
    }
    Ok(Some(MoeLayer {
        family: "dense",
        x,
        routing_weights: rw,
        routing_indices: idx,
        output,
        experts: (0..e_count).map(|i| mlp.for_expert(i)).collect(),
        capacity: None,
        capacity_order: CapacityOrder::SlotMajor,
        k: Some(k),
        extra_nodes,
        extra_inits,
        quant: None,
    }))
}

#[cfg(test)]
mod tests {
    use crate::rewrite::matcher::testing::{fixture, node_mut, rewrite, set_int_attr};

    #[test]
    fn the_fixtures_are_rewritten() {
        for name in ["dense_einsum", "dense_bmm"] {
            let mut m = fixture(name);
            assert_eq!(rewrite(&mut m).0, 1, "{name}");
        }
    }

    /// transformers 4.57's Qwen3-VL-MoE (rows repeated E times, outputs and gate reshaped to [E,
    /// batch, -1(, d)]): rewritten with the proof off; with the gate reshaped to [E, -1, batch]
    /// instead (entry (e, b, s) of the outputs no longer meets its own gate), or with the rows
    /// tiled twice along the width, refused.
    #[test]
    fn repeated_rows_and_reshaped_sums() {
        let unproven = crate::rewrite::RewriteOptions { prove: false, ..Default::default() };
        for name in ["families/qwen3_vl_moe_tf4_57", "families/qwen3_vl_moe_tf4_57_dynamo_f16"] {
            let mut m = fixture(name);
            let r = crate::rewrite::rewrite_with(&mut m, &unproven).unwrap();
            assert_eq!(r.layers.len(), 1, "{name}: {}", r.text());
        }
        let mut m = fixture("families/qwen3_vl_moe_tf4_57");
        let c = node_mut(&mut m, "Concat", "/m/experts/Concat_1_output_0");
        c.input.swap(1, 2);
        let r = crate::rewrite::rewrite_with(&mut m, &unproven).unwrap();
        assert_eq!(r.layers.len(), 0);
        assert!(r.rejected.iter().any(|w| w.reason.contains("not reshaped alike")), "{:?}", r.rejected);

        let mut m = fixture("families/qwen3_vl_moe_tf4_57");
        m.proto.graph.mut_or_insert_default().initializer.push(crate::onnx::tensor::make_i64("reps_mut", &[2], &[4, 2]));
        node_mut(&mut m, "Tile", "/m/experts/Tile_output_0").input[1] = "reps_mut".into();
        let r = crate::rewrite::rewrite_with(&mut m, &unproven).unwrap();
        assert_eq!(r.layers.len(), 0);
    }

    /// A router TopK along the token axis picks tokens, not distinct experts: the gate it builds
    /// is no top-k gate (ORT runs the mutant at 7 tokens and it differs from any MoE).
    #[test]
    fn a_topk_along_the_token_axis_is_refused() {
        let mut m = fixture("dense_einsum");
        set_int_attr(node_mut(&mut m, "TopK", "/m/router/TopK"), "axis", 1);
        let (n, why) = rewrite(&mut m);
        assert_eq!(n, 0);
        assert!(why.iter().any(|w| w.contains("TopK runs along axis 1")), "{why:?}");
    }

    /// The dynamo exporter's one-hot, `Equal(Unsqueeze(IDX, -1), arange(E))`, read as OneHot; with
    /// an arange shorter than the router's width the gate drops the last expert's choices, which
    /// the op would refuse: left with the reason.
    #[test]
    fn an_equal_one_hot_gate_is_read_and_its_width_checked() {
        let mut m = fixture("spellings/dense_6");
        let r = crate::rewrite::rewrite_with(&mut m, &crate::rewrite::RewriteOptions { prove: false, ..Default::default() }).unwrap();
        assert_eq!(r.layers.len(), 1, "{:?}", r.rejected);
        let mut m = fixture("spellings/dense_6");
        let g = m.proto.graph.mut_or_insert_default();
        let ar = g.initializer.iter_mut().find(|t| t.name == "arange").unwrap();
        let v: Vec<i64> = (0..7).collect();
        ar.dims = vec![7];
        ar.int64_data.clear();
        ar.raw_data = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        let (n, why) = rewrite(&mut m);
        assert_eq!(n, 0);
        assert!(why.iter().any(|w| w.contains("router chooses among 8")), "{why:?}");
    }

    /// The gate's zeros shaped from another dimension of the input (a changed Gather index in the
    /// shape arithmetic): the gate broadcasts against the experts' outputs into another shape.
    /// Found by the mutation harness (rewritten wrongly with the proof off).
    #[test]
    fn a_gate_of_another_leading_shape_is_refused() {
        let mut m = fixture("dense_einsum");
        let g = m.proto.graph.mut_or_insert_default();
        let ga = g.node.iter().find(|n| n.op_type == "Gather" && n.output[0] == "/m/Gather_output_0").unwrap().input[1].clone();
        let c = g.node.iter_mut().find(|n| n.op_type == "Constant" && n.output[0] == ga).unwrap();
        c.attribute[0].t.as_mut().unwrap().raw_data = 1i64.to_le_bytes().to_vec();
        let r = crate::rewrite::rewrite_with(&mut m, &crate::rewrite::RewriteOptions { prove: false, ..Default::default() }).unwrap();
        assert_eq!(r.layers.len(), 0);
        assert!(r.rejected.iter().any(|w| w.reason.contains("leading shape")), "{:?}", r.rejected);
    }

    /// The gate scattered along another axis than the expert axis.
    #[test]
    fn a_gate_scattered_along_the_token_axis_is_refused() {
        for (name, axis) in [("dense_einsum", 1), ("dense_einsum", -2), ("dense_bmm", 0)] {
            let mut m = fixture(name);
            set_int_attr(node_mut(&mut m, "ScatterElements", ""), "axis", axis);
            let (n, why) = rewrite(&mut m);
            assert_eq!(n, 0, "{name} axis {axis}");
            assert!(why.iter().any(|w| w.contains("not the expert axis")), "{why:?}");
        }
    }
}
