//! Capacity MoE, Switch/GShard style: top-1 routing, a dispatch tensor D [T, E, C] that places
//! each token in one slot of its expert's buffer of C slots, and a combine tensor that reads the
//! buffers' outputs back weighted by the gate.
//!
//! Checked, for top-1 routing `idx = ArgMax(P)` from probabilities P (E columns, the router's
//! width):
//! - the combine `Y[t] = sum_{e,c} W[t, e, c] O[e, c]` (`Einsum('tec,ecd->td')`, or a MatMul of
//!   W and O reshaped to [T, E C] and [E C, d]);
//! - the expert buffers `B[e, c] = sum_t D[t, e, c] X[t]` (`Einsum('tec,td->ecd')`, or a MatMul of
//!   D transposed to [E C, T] with X, reshaped to [E, C, d]) and `O[e] = MLP_e(B[e])`;
//! - what D and W hold, read by the slot algebra ([`super::slots`]) whatever ops compute them: D
//!   places the token of rank r (r earlier tokens chose its expert) in slot s(r) for r < K and
//!   nowhere after, with s one-to-one, and is 0 at the experts a token did not choose; W places
//!   the same tokens in the same slots with the chosen probability instead of 1.
//!
//! Every buffer slot then holds at most one token, so Y[t] = P[t, idx[t]] MLP_idx[t](X[t]) when
//! the token is among the first K of its expert, else 0: ScatterMoE with `capacity` = K (k = 1,
//! so the order of ranking is the token order either way). What a layer adds for the dropped
//! tokens (Switch passes them through) stays as ONNX ops around the node.

use super::emit::MoeLayer;
use super::expr::{to_mlp, ExpertMlp, ExprParser};
use super::matcher::{prod, shape_entries};
use super::routing::{one_hot, uncast};
use super::slots::{assignment, sem, Ax, Ctx};
use super::Rejection;
use crate::onnx::graph::{attr_i, attr_ints, attr_s, make_node, GraphIndex};
use crate::onnx::tensor::make_i64;
use crate::spec::CapacityOrder;

mod top2;

pub(super) type R<T> = Result<T, String>;

fn labels(eq: &str) -> Option<(Vec<char>, Vec<char>, Vec<char>)> {
    let eq: String = eq.chars().filter(|c| !c.is_whitespace()).collect();
    let (lhs, out) = eq.split_once("->")?;
    let (a, b) = lhs.split_once(',')?;
    Some((a.chars().collect(), b.chars().collect(), out.chars().collect()))
}

/// A combine at node `n`: (W, O) with `Y = sum_{e,c} W[t, e, c] O[e, c]`, W [T, E, C], O [E, C, d].
fn combine_of(g: &GraphIndex, n: &onnx_protobuf::NodeProto) -> Option<(String, String)> {
    if !n.domain.is_empty() || n.input.len() != 2 {
        return None;
    }
    match n.op_type.as_str() {
        "Einsum" => {
            let (a, b, out) = labels(&attr_s(n, "equation")?)?;
            for (w, o, wi, oi) in [(&a, &b, 0, 1), (&b, &a, 1, 0)] {
                if w.len() == 3 && o.len() == 3 && o[0] == w[1] && o[1] == w[2] && out == [w[0], o[2]] && w[0] != o[2] {
                    return Some((n.input[wi].clone(), n.input[oi].clone()));
                }
            }
            None
        }
        // MatMul(Reshape(W, [T, E C]), Reshape(O, [E C, d])): which E C is checked once E and C are known
        "MatMul" => {
            let (rw, ro) = (prod(g, &n.input[0], "Reshape")?, prod(g, &n.input[1], "Reshape")?);
            let (sw, so) = (shape_entries(g, &rw.input[1])?, shape_entries(g, &ro.input[1])?);
            (sw.len() == 2 && so.len() == 2 && sw[1].is_some() && sw[1] == so[0]).then(|| (rw.input[0].clone(), ro.input[0].clone()))
        }
        _ => None,
    }
}

/// Expert buffers `B = sum_t D[t, e, c] X[t]` anywhere in the graph: (B, D, X, the [E, C] a
/// MatMul spelling reshapes to).
fn buffers(g: &GraphIndex) -> Vec<Buf> {
    let mut out = Vec::new();
    for n in &g.graph.node {
        if !n.domain.is_empty() {
            continue;
        }
        if n.op_type == "Einsum" && n.input.len() == 2 {
            let Some((a, b, o)) = labels(&attr_s(n, "equation").unwrap_or_default()) else {
                continue;
            };
            for (d, x, di, xi) in [(&a, &b, 0, 1), (&b, &a, 1, 0)] {
                if d.len() == 3 && x.len() == 2 && x[0] == d[0] && o == [d[1], d[2], x[1]] && !d.contains(&x[1]) {
                    out.push((n.output[0].clone(), n.input[di].clone(), n.input[xi].clone(), None));
                }
            }
        }
        // Reshape(MatMul(Transpose(Reshape(D, [T, E C])), X), [E, C, d])
        if n.op_type == "Reshape" {
            let Some(outer) = shape_entries(g, &n.input[1]) else {
                continue;
            };
            let Some(mm) = prod(g, &n.input[0], "MatMul") else {
                continue;
            };
            let Some(t) = prod(g, &mm.input[0], "Transpose") else {
                continue;
            };
            if attr_ints(t, "perm").is_some_and(|p| p != [1, 0]) {
                continue;
            }
            let Some(inner) = prod(g, &t.input[0], "Reshape") else {
                continue;
            };
            let Some(ie) = shape_entries(g, &inner.input[1]) else {
                continue;
            };
            if let ([Some(e), Some(c), _], [_, Some(ec)]) = (outer.as_slice(), ie.as_slice()) {
                if e * c == *ec {
                    out.push((n.output[0].clone(), inner.input[0].clone(), mm.input[1].clone(), Some((*e, *c))));
                }
            }
        }
    }
    out
}

/// The top-1 routing a tensor is built from: the mask `one_hot(ArgMax(P))` among its ancestors.
fn routing_of(g: &GraphIndex, v: &str) -> Option<(String, String, i64)> {
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![v.to_string()];
    while let Some(cur) = stack.pop() {
        if !seen.insert(cur.clone()) || seen.len() > 400 {
            continue;
        }
        if let Some((i, e)) = one_hot(g, &cur) {
            if let Some(am) = prod(g, uncast(g, &i), "ArgMax") {
                return Some((am.output[0].clone(), am.input[0].clone(), e));
            }
        }
        if let Some((_, n)) = g.prod(&cur) {
            stack.extend(n.input.iter().filter(|x| !x.is_empty()).cloned());
        }
    }
    None
}

pub fn find(g: &GraphIndex) -> (Vec<MoeLayer>, Vec<Rejection>) {
    let mut layers = Vec::new();
    let mut rejected = Vec::new();
    let bufs = buffers(g);
    if bufs.is_empty() {
        return (layers, rejected);
    }
    for n in &g.graph.node {
        let Some((w, o)) = combine_of(g, n) else {
            continue;
        };
        let at = n.output[0].clone();
        match prove(g, n, &w, &o, &bufs) {
            Ok(Some(l)) => layers.push(l),
            Ok(None) => {}
            Err(reason) => rejected.push(Rejection { family: "capacity", at, reason }),
        }
    }
    (layers, rejected)
}

/// A dispatch buffer: (B, D, X, the [E, C] a MatMul spelling reshapes to).
pub(super) type Buf = (String, String, String, Option<(i64, i64)>);

/// The experts the combine's other input `o` computes from one of the dispatch buffers: that
/// buffer and one MLP per expert (stacked over exactly `experts`).
pub(super) fn experts_of(g: &GraphIndex, o: &str, bufs: &[Buf], experts: i64) -> R<(Buf, Vec<ExpertMlp>)> {
    let leaves: Vec<String> = bufs.iter().map(|b| b.0.clone()).collect();
    let resolver = |_: &str| None;
    let mut p = ExprParser::new(g, leaves, &resolver);
    p.batched_leaf = true;
    let e = p.parse(o)?;
    let leaf = p.matched_leaf.clone().ok_or("the experts read no dispatch buffer")?;
    let buf = bufs.iter().find(|b| b.0 == leaf).cloned().unwrap();
    let dx = p.d.ok_or("the experts read no stacked linear layer of the buffers")?;
    let mlp = to_mlp(&e, dx)?;
    let e_count = mlp.each_count(g).ok_or("the expert weights are not stacked over the expert axis")?;
    if e_count as i64 != experts {
        return Err(format!("the mask has {experts} experts, the weights {e_count}"));
    }
    Ok((buf, (0..e_count).map(|i| mlp.for_expert(i)).collect()))
}

/// That the buffers and a MatMul combine are reshaped to E x C slots.
pub(super) fn check_slots(g: &GraphIndex, n: &onnx_protobuf::NodeProto, ec_buf: Option<(i64, i64)>, experts: i64, slots: i64) -> R<()> {
    if ec_buf.is_some_and(|b| b != (experts, slots)) {
        return Err(format!("the buffers are reshaped to {ec_buf:?}, not [E = {experts}, C = {slots}]"));
    }
    if n.op_type == "MatMul" {
        let rw = prod(g, &n.input[0], "Reshape").unwrap();
        if shape_entries(g, &rw.input[1]).and_then(|s| s[1]) != Some(experts * slots) {
            return Err("the combine is reshaped to another number of slots than E x C".into());
        }
    }
    Ok(())
}

fn prove(g: &GraphIndex, n: &onnx_protobuf::NodeProto, w: &str, o: &str, bufs: &[Buf]) -> R<Option<MoeLayer>> {
    if let Some(two) = top2::candidate(g, w) {
        return top2::prove(g, n, w, o, bufs, two);
    }
    // a candidate: the combine weights are built from a one-hot of a top-1 choice
    let Some((idx, probs, experts)) = routing_of(g, w) else {
        return Ok(None);
    };
    // the experts read one of the dispatch buffers
    let ((_, dispatch, x, ec_buf), experts_mlp) = experts_of(g, o, bufs, experts)?;
    if routing_of(g, &dispatch).is_none_or(|r| r.0 != idx) {
        return Err("the dispatch and the combine are built from different expert choices".into());
    }
    let am = prod(g, &idx, "ArgMax").unwrap();
    if attr_i(am, "keepdims").unwrap_or(1) != 0
        || !super::matcher::is_last_axis(attr_i(am, "axis").unwrap_or(0), super::matcher::rank_of(g, &probs))
        || attr_i(am, "select_last_index").unwrap_or(0) != 0
    {
        return Err("the expert choice is not ArgMax(P) over the last axis (first index on ties)".into());
    }
    if super::matcher::rank_of(g, &idx) != Some(1) {
        return Err("the expert choice is not one index per token".into());
    }
    // OneHot drops a choice outside [0, E) (a zero row); the op refuses it: the router must have
    // exactly E columns
    match super::routing::router_experts(g, &idx) {
        Some(c) if c as i64 == experts => {}
        Some(c) => return Err(format!("the router chooses among {c} values, not the {experts} experts")),
        None => return Err("cannot tell that the router chooses among exactly the E experts".into()),
    }
    let ctx = Ctx { idx: &idx, probs: Some(&probs), experts };
    let d = assignment(g, &ctx, &dispatch, false).map_err(|e| format!("the dispatch tensor: {e}"))?;
    let c = assignment(g, &ctx, w, true).map_err(|e| format!("the combine tensor: {e}"))?;
    if d.slots != c.slots || d.slot != c.slot {
        return Err(format!("the dispatch keeps {} tokens of an expert, the combine reads {} (or other slots)", d.kept(), c.kept()));
    }
    check_slots(g, n, ec_buf, experts, d.slots)?;
    let at = n.output[0].clone();
    let tag = format!("{}/capacity", at.trim_start_matches('/'));
    let (extra_nodes, extra_inits, rw, ri) = routing_inputs(g, &ctx, &tag, w)?;
    Ok(Some(MoeLayer {
        family: "capacity",
        x,
        routing_weights: rw,
        routing_indices: ri,
        output: at,
        experts: experts_mlp,
        capacity: Some(d.kept()),
        capacity_order: CapacityOrder::SlotMajor,
        k: Some(1),
        extra_nodes,
        extra_inits,
        quant: None,
    }))
}

/// The op's routing tensors [T, 1]: the gate (the graph's own value of P[t, idx[t]] where it
/// computes one among the combine's inputs, else `GatherElements(P, idx)`) and the choice.
fn routing_inputs(g: &GraphIndex, ctx: &Ctx, tag: &str, w: &str) -> R<(Vec<onnx_protobuf::NodeProto>, Vec<onnx_protobuf::TensorProto>, String, String)> {
    let axes = format!("{tag}/axes");
    let rw = format!("{tag}/routing_weights");
    let ri = format!("{tag}/routing_indices");
    let unsq = |name: &str, x: &str, y: &str| {
        let mut u = make_node("Unsqueeze", "", &format!("{tag}/{name}"), &[x, &axes], &[y]);
        if g.default_opset() < 13 {
            u.input.truncate(1);
            u.attribute.push(crate::onnx::graph::attr_ints_new("axes", &[-1]));
        }
        u
    };
    let mut nodes = vec![unsq("Unsqueeze_i", ctx.idx, &ri)];
    // the graph's own gate where the proof can feed it (its shape is told), else P at the choice:
    // the same value either way
    match token_gate(g, ctx, w).filter(|v| super::prove::shape::shape_of(g, v).is_some()) {
        Some(gate) => nodes.push(unsq("Unsqueeze_w", &gate, &rw)),
        None => {
            let mut ge = make_node("GatherElements", "", &format!("{tag}/GatherElements_w"), &[ctx.probs.unwrap(), &ri], &[&rw]);
            ge.attribute.push(crate::onnx::graph::attr_int("axis", -1));
            nodes.push(ge);
        }
    }
    let inits = if g.default_opset() < 13 { Vec::new() } else { vec![make_i64(&axes, &[1], &[-1])] };
    Ok((nodes, inits, rw, ri))
}

/// A value [T] among the ancestors of `w` that is the chosen probability P[t, idx[t]].
fn token_gate(g: &GraphIndex, ctx: &Ctx, w: &str) -> Option<String> {
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![w.to_string()];
    while let Some(cur) = stack.pop() {
        if !seen.insert(cur.clone()) || seen.len() > 400 {
            continue;
        }
        let Some((_, n)) = g.prod(&cur) else { continue };
        if matches!(n.op_type.as_str(), "ReduceMax" | "Squeeze" | "GatherElements" | "ReduceSum") {
            if let Ok(s) = sem(g, ctx, &cur) {
                if s.axes == [Ax::T] && s.chosen.is_gate() {
                    return Some(cur);
                }
            }
        }
        stack.extend(n.input.iter().filter(|x| !x.is_empty()).cloned());
    }
    None
}

#[cfg(test)]
mod tests {
    use crate::rewrite::matcher::testing::{fixture, node_mut, rewrite};

    #[test]
    fn the_fixture_is_rewritten_with_its_capacity() {
        let mut m = fixture("capacity_einsum");
        let r = crate::rewrite::rewrite_with(&mut m, &crate::rewrite::RewriteOptions { prove: false, ..Default::default() }).unwrap();
        assert_eq!(r.layers.len(), 1, "{:?}", r.rejected);
        assert!(r.layers[0].capacity.is_some());
    }

    /// A running count from the last token keeps the last tokens of an expert: no capacity order
    /// of the op does that.
    #[test]
    fn a_reverse_running_count_is_refused() {
        let mut m = fixture("capacity_einsum");
        crate::rewrite::matcher::testing::set_int_attr(node_mut(&mut m, "CumSum", "/m/CumSum"), "reverse", 1);
        let (n, why) = rewrite(&mut m);
        assert_eq!(n, 0);
        assert!(why.iter().any(|w| w.contains("starts from the last token")), "{why:?}");
    }

    /// Without the kept mask, every token past the buffer is clipped into its last slot, where
    /// it adds to the token already there: not a capacity.
    #[test]
    fn a_dispatch_without_the_kept_mask_is_refused() {
        let mut m = fixture("capacity_einsum");
        // dispatch = one-hot slot * Unsqueeze(mask) (the mask without `pos < C`)
        let mask = node_mut(&mut m, "Mul", "/m/Mul_1_output_0").input[0].clone();
        node_mut(&mut m, "Unsqueeze", "/m/Unsqueeze_output_0").input[0] = mask;
        let (n, why) = rewrite(&mut m);
        assert_eq!(n, 0);
        assert!(why.iter().any(|w| w.contains("share slot")), "{why:?}");
    }

    /// The combine weighted by 1 instead of the gate is not the routed sum.
    #[test]
    fn an_ungated_combine_is_refused() {
        let mut m = fixture("capacity_einsum");
        let d = node_mut(&mut m, "Mul", "/m/Mul_2_output_0").output[0].clone();
        let g = m.proto.graph.mut_or_insert_default();
        let comb = g.node.iter_mut().find(|n| n.op_type == "Einsum" && n.output[0] == "output").unwrap();
        comb.input[0] = d;
        let (n, why) = rewrite(&mut m);
        assert_eq!(n, 0);
        assert!(why.iter().any(|w| w.contains("combine tensor")), "{why:?}");
    }
}
