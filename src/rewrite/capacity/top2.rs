//! GShard-style top-2 capacity: two choices per token, each with its own dispatch and combine
//! term, `D = D1 + D2` and `W = W1 + W2`, the second choice ranked after every first choice of
//! its expert (its position is the running count of second choices plus the expert's count of
//! first choices).
//!
//! Checked, for two routing indices that are each `ArgMax` over exactly E columns (which two,
//! and how the second is chosen, does not matter: the op reads the graph's own indices, so ties
//! are broken as the graph breaks them, and a token whose two choices coincide is ranked by the
//! op exactly as the graph ranks it):
//! - the combine and the dispatch are sums of one term per choice;
//! - the first choice's dispatch term places the token of rank r (earlier first choices of its
//!   expert) in slot s(r) for r < K and nowhere after, s one-to-one, as in [`super`];
//! - the second choice's dispatch term places it by `N + r` (N its expert's count of first
//!   choices, r its rank among the second choices) through the same s: its slot-major rank, so
//!   every kept assignment of an expert has its own slot;
//! - each combine term places the same ranks in the same slots, weighted by one per-token value
//!   g_j [T] (or [T, 1]) whatever computes it: normalised or not, zeroed for a dropped choice or
//!   not, the op reads that value as the routing weight of choice j.
//!
//! Then `Y[t] = sum_j g_j[t] MLP_e_j(X[t])` over the kept assignments: ScatterMoE with k = 2,
//! `capacity` = K and `capacity_order = slot_major`, indices [e1, e2], weights [g1, g2].

use super::{check_slots, experts_of, Buf, R};
use crate::onnx::graph::{attr_i, attr_int, attr_ints_new, make_node, GraphIndex};
use crate::onnx::tensor::make_i64;
use crate::rewrite::emit::MoeLayer;
use crate::rewrite::matcher::{is_last_axis, prod, rank_of};
use crate::rewrite::prove::shape::{shape_of, Dim};
use crate::rewrite::routing::{one_hot, uncast};
use crate::rewrite::slots::{assignment_in, sem_in, Assignment, Ctx, Extra};
use crate::spec::CapacityOrder;

/// The routing indices (ArgMax outputs) a top-2 candidate is built from, with the experts.
pub struct Choices(Vec<(String, i64)>);

/// The two terms of a sum `a + b`.
fn terms(g: &GraphIndex, v: &str) -> Option<(String, String)> {
    let n = prod(g, uncast(g, v), "Add")?;
    (n.input.len() == 2).then(|| (n.input[0].clone(), n.input[1].clone()))
}

/// Ancestors of `v`, at most `cap` values, visited depth first.
fn ancestors(g: &GraphIndex, v: &str, cap: usize, mut each: impl FnMut(&str) -> bool) {
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![v.to_string()];
    while let Some(cur) = stack.pop() {
        if !seen.insert(cur.clone()) || seen.len() > cap {
            continue;
        }
        if !each(&cur) {
            continue;
        }
        if let Some((_, n)) = g.prod(&cur) {
            stack.extend(n.input.iter().filter(|x| !x.is_empty()).cloned());
        }
    }
}

/// A combine that is a sum of terms and reads the one-hots of two or more `ArgMax` choices.
pub fn candidate(g: &GraphIndex, w: &str) -> Option<Choices> {
    terms(g, w)?;
    let mut found: Vec<(String, i64)> = Vec::new();
    ancestors(g, w, 600, |cur| {
        if let Some((i, e)) = one_hot(g, cur) {
            if let Some(am) = prod(g, uncast(g, &i), "ArgMax") {
                if !found.iter().any(|f| f.0 == am.output[0]) {
                    found.push((am.output[0].clone(), e));
                }
            }
        }
        true
    });
    (found.len() >= 2).then_some(Choices(found))
}

/// That `idx` is one expert per token in [0, E): ArgMax without kept axis over a last axis of E.
fn check_choice(g: &GraphIndex, idx: &str, experts: i64) -> R<()> {
    let am = prod(g, idx, "ArgMax").ok_or("a choice that is not an ArgMax")?;
    let input_shape = shape_of(g, &am.input[0]);
    let last = is_last_axis(attr_i(am, "axis").unwrap_or(0), rank_of(g, &am.input[0]).or(input_shape.as_ref().map(|s| s.len())));
    if attr_i(am, "keepdims").unwrap_or(1) != 0 || !last || rank_of(g, idx) != Some(1) {
        return Err(format!("the choice '{idx}' is not one ArgMax index per token over the last axis"));
    }
    // OneHot drops an index outside [0, E) (a zero row) where the op refuses it
    let cols = input_shape.or_else(|| shape_in(g, &am.input[0], 0)).and_then(|s| s.last().copied());
    let router = crate::rewrite::routing::router_experts(g, idx).map(|c| Dim::fixed(c as i64));
    if cols.or(router) != Some(Dim::fixed(experts)) {
        return Err(format!("cannot tell that the choice '{idx}' is among exactly the {experts} experts"));
    }
    Ok(())
}

/// Whether `target` is among the ancestors of `v`.
fn depends(g: &GraphIndex, v: &str, target: &str) -> bool {
    let mut hit = false;
    ancestors(g, v, 600, |cur| {
        hit |= cur == target;
        !hit
    });
    hit
}

/// A per-token value [T] or [T, 1].
fn per_token(g: &GraphIndex, v: &str) -> bool {
    let t = Dim::TOKENS;
    match shape_in(g, v, 0).as_deref() {
        Some([d]) => *d == t,
        Some([d, one]) => *d == t && *one == Dim::fixed(1),
        _ => false,
    }
}

/// [`shape_of`], and through the ops a routing weight is computed with that it does not read
/// (the one-hot of a choice, the elementwise and reduction ops over it).
fn shape_in(g: &GraphIndex, v: &str, depth: usize) -> Option<Vec<Dim>> {
    if let Some(s) = shape_of(g, v) {
        return Some(s);
    }
    let (_, n) = g.prod(v).filter(|(_, n)| n.domain.is_empty() && depth < 24)?;
    let inp = |i: usize| shape_in(g, n.input.get(i)?, depth + 1);
    match n.op_type.as_str() {
        "OneHot" => {
            let depth = g.const_scalar(&n.input[1]).filter(|d| *d >= 1.0 && d.fract() == 0.0)? as i64;
            let mut s = inp(0)?;
            is_last_axis(attr_i(n, "axis").unwrap_or(-1), Some(s.len() + 1)).then(|| s.push(Dim::fixed(depth)))?;
            Some(s)
        }
        "Cast" | "Identity" | "Neg" | "Clip" | "Not" | "Reciprocal" => inp(0),
        "Add" | "Sub" | "Mul" | "Div" | "Equal" | "Less" | "Greater" | "LessOrEqual" | "GreaterOrEqual" | "And" | "Or" | "Max" | "Min" | "Where" => {
            let mut s = inp(0)?;
            for i in 1..n.input.len() {
                s = broadcast(&s, &inp(i)?)?;
            }
            Some(s)
        }
        "ReduceSum" | "ReduceMax" | "ArgMax" => {
            let mut s = inp(0)?;
            let ax = if n.op_type == "ArgMax" { vec![attr_i(n, "axis").unwrap_or(0)] } else { crate::rewrite::matcher::axes_of(g, n)? };
            let r = s.len() as i64;
            let mut ax: Vec<usize> = ax.iter().map(|&a| if a < 0 { a + r } else { a }).filter(|a| (0..r).contains(a)).map(|a| a as usize).collect();
            (ax.len() == 1).then_some(())?;
            if attr_i(n, "keepdims").unwrap_or(1) != 0 {
                s[ax[0]] = Dim::fixed(1);
            } else {
                s.remove(ax.pop()?);
            }
            Some(s)
        }
        "Unsqueeze" => {
            let mut s = inp(0)?;
            let mut ax = crate::rewrite::matcher::axes_of(g, n)?;
            let r = (s.len() + ax.len()) as i64;
            ax.iter_mut().for_each(|a| *a = if *a < 0 { *a + r } else { *a });
            ax.sort_unstable();
            for a in ax {
                (0..r).contains(&a).then(|| s.insert(a as usize, Dim::fixed(1)))?;
            }
            Some(s)
        }
        _ => None,
    }
}

fn broadcast(a: &[Dim], b: &[Dim]) -> Option<Vec<Dim>> {
    let n = a.len().max(b.len());
    let at = |s: &[Dim], i: usize| if i + s.len() >= n { s[i + s.len() - n] } else { Dim::fixed(1) };
    (0..n)
        .map(|i| match (at(a, i), at(b, i)) {
            (x, y) if x == y || y == Dim::fixed(1) => Some(x),
            (x, y) if x == Dim::fixed(1) => Some(y),
            _ => None,
        })
        .collect()
}

/// The one per-token value a combine term is weighted by: the outermost per-token values
/// among its ancestors that the slot algebra does not read as bookkeeping.
fn gate_of(g: &GraphIndex, ctx: &Ctx, x: &Extra, w: &str) -> R<String> {
    let mut found = Vec::new();
    ancestors(g, w, 400, |cur| {
        if sem_in(g, ctx, x, cur).is_ok() {
            return false;
        }
        if per_token(g, cur) {
            found.push(cur.to_string());
            return false;
        }
        true
    });
    match found.as_slice() {
        [one] => Ok(one.clone()),
        _ => Err(format!("the term is weighted by {} per-token values ({found:?}), not one", found.len())),
    }
}

/// Reads the terms (a, b) as (first choice, second choice) or (second, first), whichever the
/// analysis reads; the error of the closer attempt otherwise.
fn pair<T>(a: &str, b: &str, first: impl Fn(&str) -> R<T>, second: impl Fn(&str) -> R<T>) -> R<(T, T)> {
    let fa = first(a);
    if fa.is_ok() {
        match second(b) {
            Ok(y) => return Ok((fa?, y)),
            // b is not the second choice, and a reads as the first: b's error is the closer one
            Err(e) if first(b).is_err() => return Err(e),
            Err(_) => {}
        }
    }
    match first(b) {
        Ok(x) => Ok((x, second(a)?)),
        Err(e) => Err(fa.err().unwrap_or(e)),
    }
}

/// What the analysis of one order of the two choices finds: the four placements, the gates.
struct Read {
    d: [Assignment; 2],
    w: [Assignment; 2],
    gates: [String; 2],
}

fn read(g: &GraphIndex, experts: i64, i1: &str, i2: &str, d: &(String, String), w: &(String, String)) -> R<Read> {
    let c1 = Ctx { idx: i1, probs: None, experts };
    let c2 = Ctx { idx: i2, probs: None, experts };
    let x1 = Extra::default();
    let x2 = Extra { first: Some(i1), gates: &[] };
    let (d1, d2) = pair(&d.0, &d.1, |v| assignment_in(g, &c1, &x1, v, false), |v| assignment_in(g, &c2, &x2, v, false))
        .map_err(|e| format!("the dispatch tensor: {e}"))?;
    let gated = |c: &Ctx, x: &Extra, v: &str| -> R<(Assignment, String)> {
        let gate = gate_of(g, c, x, v)?;
        let gates = [gate.clone()];
        let a = assignment_in(g, c, &Extra { gates: &gates, ..*x }, v, true)?;
        Ok((a, gate))
    };
    let ((w1, g1), (w2, g2)) = pair(&w.0, &w.1, |v| gated(&c1, &x1, v), |v| gated(&c2, &x2, v)).map_err(|e| format!("the combine tensor: {e}"))?;
    Ok(Read { d: [d1, d2], w: [w1, w2], gates: [g1, g2] })
}

pub fn prove(g: &GraphIndex, n: &onnx_protobuf::NodeProto, w: &str, o: &str, bufs: &[Buf], two: Choices) -> R<Option<MoeLayer>> {
    let Choices(ch) = two;
    if ch.len() != 2 {
        return Err(format!("the combine is built from {} expert choices (the capacity rule reads one or two)", ch.len()));
    }
    let experts = ch[0].1;
    if ch[1].1 != experts {
        return Err(format!("the two choices' one-hots have {} and {} experts", ch[0].1, ch[1].1));
    }
    let ((_, dispatch, x, ec_buf), mlps) = experts_of(g, o, bufs, experts)?;
    for (idx, _) in &ch {
        check_choice(g, idx, experts)?;
    }
    let wt = terms(g, w).ok_or("the combine is not the sum of one tensor per choice")?;
    let dt = terms(g, &dispatch).ok_or("the dispatch is not the sum of one tensor per choice (a dispatch read from the combine's nonzeros is not)")?;
    let mut random = None;
    ancestors(g, &dispatch, 600, |cur| {
        let op = g.prod(cur).map(|(_, n)| n.op_type.as_str()).unwrap_or("");
        if op.starts_with("Random") || op == "Bernoulli" || op == "Multinomial" {
            random.get_or_insert(op.to_string());
        }
        true
    });
    if let Some(op) = random {
        return Err(format!("the dispatch reads a random draw ({op}: GShard's random routing of the second choice), which no capacity computes"));
    }
    let (a, b) = (ch[0].0.as_str(), ch[1].0.as_str());
    // the second choice is the one computed from the first (its ArgMax masks the first out);
    // both orders where neither is
    let input = |i: &str| prod(g, i, "ArgMax").unwrap().input[0].clone();
    let orders: Vec<(&str, &str)> = match (depends(g, &input(b), a), depends(g, &input(a), b)) {
        (true, false) => vec![(a, b)],
        (false, true) => vec![(b, a)],
        (false, false) => vec![(a, b), (b, a)],
        (true, true) => return Err("each choice is computed from the other".into()),
    };
    let mut first_err = None;
    let mut found = None;
    for (i1, i2) in orders {
        match read(g, experts, i1, i2, &dt, &wt) {
            Ok(r) => {
                found = Some((i1, i2, r));
                break;
            }
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    let Some((i1, i2, r)) = found else {
        return Err(first_err.unwrap());
    };
    let d1 = &r.d[0];
    for (what, other) in [("second choice's dispatch", &r.d[1]), ("first choice's combine", &r.w[0]), ("second choice's combine", &r.w[1])] {
        if other.slots != d1.slots || other.slot != d1.slot {
            return Err(format!("the first choice's dispatch keeps {} ranks of an expert, the {what} {} (or other slots)", d1.kept(), other.kept()));
        }
    }
    check_slots(g, n, ec_buf, experts, d1.slots)?;
    let at = n.output[0].clone();
    let tag = format!("{}/capacity", at.trim_start_matches('/'));
    let (extra_nodes, extra_inits, rw, ri) = routing_inputs(g, &tag, [i1, i2], [&r.gates[0], &r.gates[1]]);
    Ok(Some(MoeLayer {
        family: "capacity",
        x,
        routing_weights: rw,
        routing_indices: ri,
        output: at,
        experts: mlps,
        capacity: Some(d1.kept()),
        capacity_order: CapacityOrder::SlotMajor,
        k: Some(2),
        extra_nodes,
        extra_inits,
        quant: None,
    }))
}

type Built = (Vec<onnx_protobuf::NodeProto>, Vec<onnx_protobuf::TensorProto>, String, String);

/// The op's routing tensors [T, 2]: the graph's own indices and weights, one column per choice.
fn routing_inputs(g: &GraphIndex, tag: &str, idx: [&str; 2], gates: [&str; 2]) -> Built {
    let axes = format!("{tag}/axes");
    let (rw, ri) = (format!("{tag}/routing_weights"), format!("{tag}/routing_indices"));
    let mut nodes = Vec::new();
    // a [T] value as a column [T, 1]
    let mut column = |name: &str, v: &str| -> String {
        if rank_of(g, v) == Some(2) {
            return v.to_string();
        }
        let y = format!("{tag}/{name}");
        let mut u = make_node("Unsqueeze", "", &format!("{tag}/Unsqueeze_{name}"), &[v, &axes], &[&y]);
        if g.default_opset() < 13 {
            u.input.truncate(1);
            u.attribute.push(attr_ints_new("axes", &[-1]));
        }
        nodes.push(u);
        y
    };
    let cols_i = [column("i1", idx[0]), column("i2", idx[1])];
    let cols_w = [column("w1", gates[0]), column("w2", gates[1])];
    for (cols, out, name) in [(cols_i, &ri, "Concat_i"), (cols_w, &rw, "Concat_w")] {
        let mut c = make_node("Concat", "", &format!("{tag}/{name}"), &[&cols[0], &cols[1]], &[out]);
        c.attribute.push(attr_int("axis", -1));
        nodes.push(c);
    }
    let inits = if g.default_opset() < 13 { Vec::new() } else { vec![make_i64(&axes, &[1], &[-1])] };
    (nodes, inits, rw, ri)
}

#[cfg(test)]
mod tests {
    use crate::onnx::graph::{attr_int, make_node};
    use crate::rewrite::matcher::testing::{fixture, node_mut, rewrite};

    /// GShard top-2 from the spellings corpus (TorchScript, gates normalised before the drop, E = 4,
    /// C = 6): `/Add_1` is the second choice's position `cumsum - 1 + counts`, `/ReduceSum_2` the
    /// first choices' counts, `/Add_2` the dispatch D1 + D2, `/Mul_4` the second choice's kept mask.
    fn gshard() -> crate::onnx::Model {
        fixture("spellings/capacity_52")
    }

    fn refused(m: &mut crate::onnx::Model, why: &str) {
        let (n, reasons) = rewrite(m);
        assert_eq!(n, 0, "{reasons:?}");
        assert!(reasons.iter().any(|r| r.starts_with("capacity:") && r.contains(why)), "{reasons:?}");
    }

    #[test]
    fn a_gshard_top2_layer_is_rewritten_with_k_2() {
        let mut m = gshard();
        let r = crate::rewrite::rewrite_with(&mut m, &crate::rewrite::RewriteOptions { prove: false, ..Default::default() }).unwrap();
        assert_eq!(r.layers.len(), 1, "{:?}", r.rejected);
        assert_eq!((r.layers[0].k, r.layers[0].capacity), (Some(2), Some(6)));
    }

    /// Second positions from the second choices alone, or scaled: first and second choices of one
    /// expert would share slots.
    #[test]
    fn a_second_choice_position_without_the_first_choices_count_is_refused() {
        let mut m = gshard();
        let pos = node_mut(&mut m, "Add", "/Add_1_output_0");
        pos.input[1] = pos.input[0].clone();
        refused(&mut m, "second choice's slot does not read");
        // the counts of the second choices instead of the first
        let mut m = gshard();
        node_mut(&mut m, "ReduceSum", "/ReduceSum_2_output_0").input[0] = "/Cast_1_output_0".into();
        refused(&mut m, "the dispatch tensor");
    }

    #[test]
    fn a_dispatch_that_is_not_a_sum_of_the_choices_is_refused() {
        let mut m = gshard();
        node_mut(&mut m, "Add", "/Add_2_output_0").op_type = "Max".into();
        refused(&mut m, "dispatch is not the sum");
    }

    /// GShard's random routing (the second choice kept where `g2 > uniform`) and a threshold on
    /// the second gate: the kept mask then depends on more than the ranks.
    #[test]
    fn a_second_choice_dropped_at_random_or_by_a_threshold_is_refused() {
        for (random, why) in [(true, "random draw (RandomUniformLike"), (false, "'/Softmax_output_0' comes from Softmax")] {
            let mut m = gshard();
            let g = m.proto.graph.mut_or_insert_default();
            let at = g.node.iter().position(|n| n.output[0] == "/Mul_4_output_0").unwrap();
            let mut nodes = Vec::new();
            if random {
                nodes.push(make_node("RandomUniformLike", "", "t/rnd", &["/ReduceSum_1_output_0"], &["t/bar"]));
            } else {
                g.initializer.push(crate::onnx::tensor::make_tensor("t/bar", 1, &[], 0.2f32.to_le_bytes().to_vec()));
            }
            nodes.push(make_node("Greater", "", "t/gt", &["/ReduceSum_1_output_0", "t/bar"], &["t/keep"]));
            let mut cast = make_node("Cast", "", "t/cast", &["t/keep"], &["t/keepf"]);
            cast.attribute.push(attr_int("to", 1));
            nodes.push(cast);
            nodes.push(make_node("Unsqueeze", "", "t/unsq", &["t/keepf", "/Constant_15_output_0"], &["t/keepu"]));
            nodes.push(make_node("Mul", "", "t/mask2", &["/Cast_1_output_0", "t/keepu"], &["t/mask2"]));
            g.node[at].input[0] = "t/mask2".into();
            for (i, n) in nodes.into_iter().enumerate() {
                g.node.insert(at + i, n);
            }
            refused(&mut m, why);
        }
    }
}
