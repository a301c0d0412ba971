//! Per-expert loops, as torch's TorchScript exporter writes them for the Hugging Face MoE blocks
//! (and for hand-written `torch.where` / `index_add_` loops).
//!
//! What the graph holds for one iteration, and what is checked (semantic anchors, not node order):
//! - a mask of the assignments of one expert: `Gather(Transpose(OneHot(IDX, E)), e)` or
//!   `Equal(IDX, e)`, optionally a Switch capacity mask `OneHot * (CumSum(OneHot) <= C)`;
//! - `torch.where` of that mask: `NonZero -> Transpose -> Split -> Squeeze` giving the token and
//!   slot coordinates (which is which follows from the mask's axis order);
//! - the token rows `Gather(X, token)`; the expert MLP on them (parsed into an expression: linear
//!   layers with weights `W[e]` or per-expert constants, an elementwise activation identified
//!   numerically); the routing weight `RW[token, slot]` (`Gather(Flatten(RW), token * k + slot)`);
//! - their product scattered back into the token rows: `acc + ScatterElements(0, token, ...)`
//!   in one chain from `zeros_like(X)`.
//!
//! The expert of iteration i is either a constant, or entry i of the sorted list of hit experts
//! (a Split of the list into pieces, or, as TorchScript writes `for e in hits: e[0]`, a Gather of
//! entry i from the flattened list); in the latter form the loop has exactly E iterations, so the
//! graph runs only when every expert is hit and entry i is expert i (fewer iterations than E only
//! with a Split with sizes, `per_hit_expert`). A chain is replaced only when its
//! iterations cover experts 0..E-1 once each with the same routing tensors, rows and MLP form.

use std::collections::HashMap;

mod dense_gate;
mod iteration;
mod scatter;

use super::emit::MoeLayer;
use super::expr::{to_mlp, ERef, ExpertMlp, ExprParser};
use super::matcher::prod;
use super::Rejection;
use crate::onnx::graph::{attr_i, attr_ints, strip, GraphIndex};
use crate::spec::CapacityOrder;
use iteration::{mask_of, resolve_eref, routing_weight, row_leaves, where_coord, Axis, HitSplit};
use dense_gate::dense_gate_weight;
use scatter::{index_rows, is_zeros, scatter_steps, update_value, Step};

/// Every per-expert loop in the graph: replaced layers and rejected candidates.
pub fn find(g: &GraphIndex) -> (Vec<MoeLayer>, Vec<Rejection>) {
    let steps = scatter_steps(g);
    let by_in: HashMap<&str, Vec<usize>> = steps.iter().enumerate().fold(HashMap::new(), |mut m, (i, s)| {
        m.entry(s.acc_in.as_str()).or_default().push(i);
        m
    });
    let mut layers = Vec::new();
    let mut rejected = Vec::new();
    for (i, head) in steps.iter().enumerate() {
        if !is_zeros(g, &head.acc_in) || steps.iter().any(|s| s.acc_out == head.acc_in) {
            continue;
        }
        // follow the chain
        let mut chain = vec![i];
        let mut cur = head.acc_out.as_str();
        while let Some(next) = by_in.get(cur) {
            if next.len() != 1 {
                break;
            }
            chain.push(next[0]);
            cur = steps[next[0]].acc_out.as_str();
        }
        let at = steps[*chain.last().unwrap()].acc_out.clone();
        match prove_chain(g, &steps, &chain) {
            Ok(layer) => layers.push(layer),
            Err(reason) => rejected.push(Rejection { family: "hf_loop", at, reason }),
        }
    }
    (layers, rejected)
}

fn prove_chain(g: &GraphIndex, steps: &[Step], chain: &[usize]) -> Result<MoeLayer, String> {
    let mut hit_counts = HashMap::new();
    let mut experts: Vec<Option<ExpertMlp>> = Vec::new();
    // idx, rw, x, E, capacity, mask stack: the same for every iteration
    type Common = (String, String, String, Option<usize>, Option<i64>, Option<String>);
    let mut common: Option<Common> = None;
    let mut n_hit: Option<HitSplit> = None;
    for (it, &si) in chain.iter().enumerate() {
        let s = &steps[si];
        let fail = |m: String| format!("iteration {it} (scatter into '{}'): {m}", s.acc_out);
        // index: Expand(Unsqueeze(token, 1), ...)
        let ix = index_rows(g, &s.index, &s.update, s.elements).map_err(&fail)?;
        let un = prod(g, ix, "Unsqueeze").ok_or_else(|| fail("scatter indices are not the token list".into()))?;
        let axes = if un.input.len() > 1 { g.const_i64(&un.input[1]) } else { attr_ints(un, "axes") };
        if axes.as_deref() != Some(&[1]) && axes.as_deref() != Some(&[-1]) {
            return Err(fail("scatter indices are not one token per row".into()));
        }
        let tok = un.input[0].as_str();
        let (nz, c_tok) = where_coord(g, tok).ok_or_else(|| fail("scatter indices are not torch.where coordinates".into()))?;
        let mask = mask_of(g, &nz, &mut hit_counts).map_err(&fail)?;
        if mask.axes[c_tok] != Axis::T {
            return Err(fail("scatter indices are the slot coordinate, not the token".into()));
        }
        // update: Cast(Mul(expert_out, RW[t, j]))
        let (upd, sliced_width) = update_value(g, &s.update, &s.acc_in, &s.index, s.elements).map_err(&fail)?;
        let mul = prod(g, upd, "Mul").ok_or_else(|| fail("the scattered value is not weighted by the router".into()))?;
        let mut found = None;
        for (a, b) in [(0, 1), (1, 0)] {
            if let Some((rw, nz2, ct, cs)) = routing_weight(g, &mul.input[b], c_tok) {
                if nz2 == nz && ct == c_tok && cs != c_tok && mask.axes[cs] == Axis::K {
                    found = Some((mul.input[a].clone(), rw));
                    break;
                }
            }
        }
        let mut gate_column = None;
        if found.is_none() {
            // GPT-OSS in transformers 4.5x: the dense gate's column of this expert at the tokens,
            // `router_scores[token, e]`
            for (a, b) in [(0, 1), (1, 0)] {
                if let Some((rw, column)) = dense_gate_weight(g, &mul.input[b], tok, &mask, &mut hit_counts).map_err(&fail)? {
                    found = Some((mul.input[a].clone(), rw));
                    gate_column = Some(column);
                    break;
                }
            }
        }
        let (eo, rw) = found.ok_or_else(|| fail("no factor is the routing weight RW[token, slot] of this expert".into()))?;
        // token rows
        let mut leaves = row_leaves(g, tok);
        // the gate's column gathered at the same tokens is the weight, not token rows
        leaves.retain(|l| gate_column.as_deref() != Some(l.0.as_str()));
        if leaves.is_empty() {
            return Err(fail("no token rows are gathered with these coordinates".into()));
        }
        let x = leaves[0].1.clone();
        if leaves.iter().any(|l| l.1 != x) {
            return Err(fail("token rows are gathered from different tensors".into()));
        }
        let hc = hit_counts.clone();
        let resolver = move |v: &str| resolve_eref(g, v, &mut hc.clone());
        let mut p = ExprParser::new(g, leaves.iter().map(|l| l.0.clone()).collect(), &resolver);
        let e = p.parse(&eo).map_err(&fail)?;
        let d = p.d.ok_or_else(|| fail("the expert reads no linear layer of the token rows".into()))?;
        let mlp = to_mlp(&e, d).map_err(&fail)?;
        if sliced_width.is_some_and(|w| w != mlp.w_out.out as i64) {
            return Err(fail(format!("the expert's rows are sliced to {} columns of its {}", sliced_width.unwrap(), mlp.w_out.out)));
        }
        // weights of this expert belong to the mask's expert
        let wrefs = mlp
            .w_in
            .iter()
            .map(|w| w.index)
            .chain([mlp.w_out.index])
            .chain(mlp.b_in.iter().flatten().map(|b| b.index))
            .chain(mlp.b_out.iter().map(|b| b.index));
        for r in wrefs.flatten() {
            if r != mask.eref {
                return Err(fail(format!("weights indexed by expert {:?} but tokens of expert {:?}", r, mask.eref)));
            }
        }
        if let ERef::Hit(_) = mask.eref {
            let h = mask.hit_split.clone().ok_or_else(|| fail("unknown iteration count".into()))?;
            if n_hit.as_ref().is_some_and(|n| *n != h) {
                return Err(fail("iterations split different hit lists".into()));
            }
            n_hit = Some(h);
        }
        let key = (mask.idx.clone(), rw.clone(), x.clone(), mask.experts, mask.capacity, mask.stack.clone());
        match &common {
            None => common = Some(key),
            Some(c) if *c != key => return Err(fail("iterations read different routing tensors, rows or capacity".into())),
            _ => {}
        }
        let en = mask.eref.expert();
        if en < 0 {
            return Err(fail(format!("negative expert number {en}")));
        }
        // every expert 0..E has its own iteration (checked below), so a larger number means a gap;
        // refused before the table of experts is sized by it (a malformed 2^40 would allocate)
        let en = en as usize;
        if en >= chain.len() {
            return Err(fail(format!("expert {en} in a loop of {} iterations, which cannot cover experts 0 to {en}", chain.len())));
        }
        if experts.len() <= en {
            experts.resize(en + 1, None);
        }
        if experts[en].is_some() {
            return Err(fail(format!("expert {en} appears twice")));
        }
        experts[en] = Some(mlp);
    }
    let (idx, rw, x, mut e_mask, capacity, stack) = common.ok_or("empty chain")?;
    // a one-hot wider than the router (GPT-OSS in transformers 4.5x: `num_classes = E + 1`, "the
    // masking class"): TopK's or ArgMax's indices over E columns never name a class from E on, so
    // those rows of the mask stack are zero, no iteration or hit entry is theirs, and the loop is
    // over the router's E experts
    let e_onehot = e_mask;
    if let (Some(e), None) = (e_mask, capacity) {
        if let Some(er) = super::routing::router_experts(g, &idx).filter(|&er| er >= 1 && er < e) {
            e_mask = Some(er);
        }
    }
    // A scatter without a reduction keeps one of the rows an iteration sends to one token: the
    // loop adds every slot's contribution only where a row never names one expert twice
    if chain.iter().any(|&si| steps[si].overwrites) && !distinct_in_rows(g, &idx) {
        return Err(format!(
            "the loop adds each expert's rows with ScatterElements without a reduction (of two rows for one token, one is kept), and the routing indices '{idx}' do not come from a router that names an expert once per token (TopK, ArgMax, or an ArgMax of the scores with the first choice masked): where a token gets one expert in two slots (a masked expert mapped to another index, say) the graph keeps one contribution and ScatterMoE would add both"
        ));
    }
    let e_count = match (e_mask, &n_hit) {
        (Some(e), Some(h)) if h.count > e => return Err(format!("the loop has {} iterations but the one-hot has {e} experts", h.count)),
        (Some(e), Some(h)) if h.count < e => {
            // unrolled over a traced input's hit list: each iteration is the expert it names
            let generic = per_hit_expert(g, &experts, e, h, stack.as_deref())?;
            experts = (0..e).map(|j| Some(generic.for_expert(j))).collect();
            e
        }
        (Some(e), _) => e,
        (None, _) => super::routing::router_experts(g, &idx).ok_or("cannot tell how many experts the router chooses from")?,
    };
    // entry i of a hit list is expert i only where the list is the NonZero of E counts: its entries
    // are then distinct, sorted and below E; or of the counts of the iterations' own mask stack over
    // a one-hot wider than the router, whose classes from E on are never named (above)
    let own_wide = |h: &HitSplit| h.stack.is_some() && h.stack == stack && h.of.map(|n| n as usize) == e_onehot;
    if let Some(h) = n_hit.as_ref().filter(|h| h.of != Some(e_count as i64) && !own_wide(h)) {
        return Err(format!("the hit list is a NonZero of {} counts, not of the {e_count} experts' counts", h.of.map_or("an unknown number of".into(), |n| n.to_string())));
    }
    router_axis(g, &idx, e_count)?;
    router_axis(g, &rw, e_count)?;
    if experts.len() != e_count || experts.iter().any(Option::is_none) {
        let have: Vec<usize> = experts.iter().enumerate().filter(|(_, m)| m.is_some()).map(|(i, _)| i).collect();
        return Err(format!("the loop covers experts {have:?} of {e_count}"));
    }
    // the accumulator starts as zeros shaped like the rows
    let head = &steps[chain[0]];
    accumulator_shaped_like_rows(g, &head.acc_in, &x)?;
    let k = if capacity.is_some() { Some(1) } else { None };
    Ok(MoeLayer {
        family: if capacity.is_some() { "capacity" } else { "hf_loop" },
        x,
        routing_weights: rw,
        routing_indices: idx,
        output: steps[*chain.last().unwrap()].acc_out.clone(),
        experts: experts.into_iter().map(Option::unwrap).collect(),
        capacity,
        capacity_order: CapacityOrder::SlotMajor,
        k,
        extra_nodes: Vec::new(),
        extra_inits: Vec::new(),
        quant: None,
    })
}

/// The accumulator `acc` is zeros (`ConstantOfShape`, or `Expand` of a zero of no more axes than
/// its shape) of the token rows' shape: `Shape(rows)` itself (`zeros_like`), or a
/// shape vector the exporter computed from the input's dimensions (transformers 4's
/// `torch.zeros((batch_size * sequence_length, hidden_dim))` becomes `Concat(Unsqueeze(Mul(Gather(
/// Shape(x), 0), Gather(Shape(x), 1))), Unsqueeze(Gather(Shape(x), 2)))`) whose entries, in terms of
/// the token count, are the rows' own at every T. Anything else is refused: a different row count
/// would change the output's shape or make the original fail where the replacement would not.
fn accumulator_shaped_like_rows(g: &GraphIndex, acc: &str, x: &str) -> Result<(), String> {
    let shape = super::routing::zeros_shape(g, acc).ok_or("accumulator is not zeros")?;
    if let Some((_, ex)) = g.prod(acc).filter(|(_, n)| n.op_type == "Expand") {
        // Expand(0, shape) has the shape's rank only if the zero has no more axes than it
        let r = super::routing::dims::shape_vector(g, shape).map(|v| v.len());
        if !g.const_dims(&ex.input[0]).is_some_and(|d| d.iter().all(|&x| x == 1) && r.is_some_and(|r| d.len() <= r)) {
            return Err("the accumulator's zeros are expanded from a value of another rank".into());
        }
    }
    if let Some(sh) = prod(g, shape, "Shape") {
        if strip(g, &sh.input[0], &["Cast"]) == strip(g, x, &["Cast"]) && attr_i(sh, "start").is_none() && attr_i(sh, "end").is_none() {
            return Ok(());
        }
    }
    let acc = super::routing::dims::shape_vector(g, shape);
    let rows = super::prove::shape::shape_of(g, x);
    match (acc, rows) {
        (Some(a), Some(r)) if a == r && a.iter().any(|d| d.t == 1) => Ok(()),
        (Some(a), Some(r)) => Err(format!(
            "the accumulator's shape {} is not the token rows' {} ('{x}')",
            super::prove::shape::text(&a),
            super::prove::shape::text(&r)
        )),
        _ => Err(format!("cannot tell that the accumulator (shape '{shape}') is shaped like the token rows '{x}'")),
    }
}

/// A loop the exporter unrolled over the hit list of its traced input, with fewer iterations than
/// experts (`for e in experts_hit` where the traced routing used only some experts): iteration i
/// takes the tokens of expert `hit[i]` and that expert's weights, gathered from [E, ...] stacks by
/// `hit[i]` itself, so it computes expert `hit[i]`'s contribution whichever expert that is. The
/// Split of the list has sizes (all ones), so the graph runs only when exactly `count` experts are
/// hit, and the list is the experts with assignments of the iterations' own mask stack: the
/// iterations then add up every expert's contribution, which is the MoE over all E experts. Returns
/// the MLP with its stacks indexed by [`ERef::Each`].
fn per_hit_expert(g: &GraphIndex, experts: &[Option<ExpertMlp>], e: usize, h: &HitSplit, stack: Option<&str>) -> Result<ExpertMlp, String> {
    let n = h.count;
    if !h.sized {
        return Err(format!("the loop has {n} iterations for {e} experts and splits the hit list without sizes (a longer list would be split unevenly)"));
    }
    if stack.is_none() || h.stack.as_deref() != stack {
        return Err(format!("the loop has {n} iterations for {e} experts, over a hit list that is not the list of experts of the masks it slices"));
    }
    let mut generic: Option<ExpertMlp> = None;
    for (i, m) in experts.iter().enumerate() {
        let m = m
            .as_ref()
            .ok_or_else(|| format!("the loop covers hit experts {:?} of {n}", (0..experts.len()).filter(|&j| experts[j].is_some()).collect::<Vec<_>>()))?;
        // every weight and bias gathered by this iteration's hit entry from a stack of E
        let mut gm = m.clone();
        let mut ok = true;
        let mut fix = |r: &mut Option<ERef>, init: &str| {
            ok &= *r == Some(ERef::Hit(i)) && super::dequant::weight_dims(g, init).is_some_and(|d| d.first() == Some(&(e as i64)));
            *r = Some(ERef::Each);
        };
        for w in gm.w_in.iter_mut() {
            fix(&mut w.index, &w.init.clone());
        }
        fix(&mut gm.w_out.index, &gm.w_out.init.clone());
        for b in gm.b_in.iter_mut().flatten().chain(gm.b_out.iter_mut()) {
            fix(&mut b.index, &b.init.clone());
        }
        if !ok {
            return Err(format!(
                "the loop has {n} iterations for {e} experts, and iteration {i}'s weights are not gathered by its hit entry from stacks of {e} experts"
            ));
        }
        match &generic {
            None => generic = Some(gm),
            Some(g0) if *g0 != gm => return Err(format!("the loop has {n} iterations for {e} experts, and they compute different MLPs")),
            _ => {}
        }
    }
    if experts.len() != n {
        return Err(format!("the loop covers {} of its {n} hit entries", experts.len()));
    }
    generic.ok_or_else(|| "empty loop".to_string())
}

/// The routing indices name an expert at most once per token, by construction: TopK's indices,
/// one ArgMax, or (PhiMoE's sparsemixer) `Concat(ArgMax(s), ArgMax(ScatterElements(s, that
/// ArgMax, -inf)))` along the last axis, whose second choice masks the first.
fn distinct_in_rows(g: &GraphIndex, idx: &str) -> bool {
    let v = strip(g, idx, &["Cast", "Identity"]);
    let Some((_, n)) = g.prod(v) else { return false };
    if !n.domain.is_empty() {
        return false;
    }
    let argmax = |v: &str| prod(g, strip(g, v, &["Cast", "Identity"]), "ArgMax").filter(|a| attr_i(a, "keepdims").unwrap_or(1) == 1);
    match n.op_type.as_str() {
        "TopK" => n.output.get(1).map(String::as_str) == Some(v),
        "ArgMax" | "ArgMin" => true,
        "Concat" if n.input.len() == 2 => {
            let (Some(a), Some(b)) = (argmax(&n.input[0]), argmax(&n.input[1])) else { return false };
            let last = |x: &onnx_protobuf::NodeProto| super::matcher::is_last_axis(attr_i(x, "axis").unwrap_or(0), super::matcher::rank_of(g, &x.input[0]));
            let Some(sc) = prod(g, &b.input[0], "ScatterElements") else { return false };
            let minus_inf = |f: &str| {
                let f = strip(g, f, &["Cast"]);
                let c = prod(g, f, "Expand").map_or(f, |e| e.input[0].as_str());
                if let Some(cs) = prod(g, c, "ConstantOfShape") {
                    let t = cs.attribute.iter().find(|a| a.name == "value").and_then(|a| a.t.as_ref());
                    return t.and_then(|t| crate::onnx::tensor::tensor_f32(t, None).ok()).is_some_and(|x| x.iter().all(|&y| y == f32::NEG_INFINITY));
                }
                g.const_scalar(c) == Some(f64::NEG_INFINITY)
            };
            let axis_of = |x: &onnx_protobuf::NodeProto| attr_i(x, "axis").unwrap_or(0);
            last(a)
                && last(b)
                && super::matcher::is_last_axis(axis_of(sc), super::matcher::rank_of(g, &sc.input[0]))
                && super::matcher::is_last_axis(attr_i(n, "axis").unwrap_or(0), super::matcher::rank_of(g, v))
                && strip(g, &sc.input[0], &["Cast"]) == strip(g, &a.input[0], &["Cast"])
                && strip(g, &sc.input[1], &["Cast", "Identity"]) == a.output[0]
                && minus_inf(&sc.input[2])
        }
        _ => false,
    }
}

/// A routing tensor that a TopK or ArgMax makes must choose along the last axis, over the E
/// experts (where the router's width is known): any other axis picks tokens, not experts.
fn router_axis(g: &GraphIndex, v: &str, e: usize) -> Result<(), String> {
    let v = strip(g, v, &["Cast", "Identity"]);
    let Some((_, n)) = g.prod(v) else { return Ok(()) };
    if n.domain.is_empty() && n.op_type == "Concat" {
        // PhiMoE's sparsemixer: each choice is an ArgMax of its own
        return n.input.iter().try_for_each(|c| router_axis(g, c, e));
    }
    if !n.domain.is_empty() || !(n.op_type == "TopK" || n.op_type == "ArgMax") {
        return Ok(());
    }
    // TopK's axis defaults to -1, ArgMax's to 0
    let axis = attr_i(n, "axis").unwrap_or(if n.op_type == "TopK" { -1 } else { 0 });
    // the last axis written from the front (TorchScript writes dim=-1 as rank-1)
    let last_from_front = axis >= 0 && super::matcher::rank_of(g, &n.input[0]) == Some(axis as usize + 1);
    if axis != -1 && !last_from_front {
        return Err(format!("the router's {} runs along axis {axis}, not the last (expert) axis", n.op_type));
    }
    // an index outside [0, E) drops out of a one-hot (a zero row) but is refused by the op, so the
    // router's width must be known to be E, not merely not contradicted
    match super::routing::router_experts(g, v) {
        Some(width) if width == e => Ok(()),
        Some(width) => Err(format!("the router's {} chooses among {width} values, not the {e} experts", n.op_type)),
        None => Err(format!("cannot tell that the router's {} chooses among exactly the {e} experts", n.op_type)),
    }
}


#[cfg(test)]
mod tests {
    use crate::rewrite::matcher::testing::{fixture, node_mut, rewrite};

    /// Ernie-4.5's loop, which torch's TorchScript exporter unrolled over the 2 experts its traced
    /// input hit (of 4): each iteration gathers its expert's weights by its hit entry, so the
    /// layer is the MoE over all 4 experts (proven where exactly 2 are hit, at 1 token).
    #[test]
    fn a_loop_over_the_traced_hit_list_is_every_expert() {
        let mut m = fixture("families/ernie45_moe");
        let r = crate::rewrite::rewrite(&mut m).unwrap();
        assert_eq!(r.layers.len(), 1, "{}", r.text());
        assert_eq!(r.layers[0].experts, 4);
        assert!(r.layers[0].proof.as_ref().is_some_and(|p| p.tokens.contains(&1)), "{}", r.text());
    }

    /// transformers 4.57's Mixtral: zeros of shape `(batch * sequence, hidden)` computed from the
    /// input's dimensions are the token rows' shape (rewritten); with the sequence's dimension
    /// swapped for the hidden one (`batch * hidden` rows, a fixed 32) the accumulator is no longer
    /// shaped like the rows, and the rule refuses it even with the proof off.
    #[test]
    fn an_accumulator_shaped_by_arithmetic_must_equal_the_rows() {
        let mut m = fixture("families/mixtral_tf4_57");
        let r = crate::rewrite::rewrite_with(&mut m, &crate::rewrite::RewriteOptions { prove: false, ..Default::default() }).unwrap();
        assert_eq!(r.layers.len(), 1, "{}", r.text());
        let mut m = fixture("families/mixtral_tf4_57");
        let hidden = node_mut(&mut m, "Gather", "/m/Gather_2_output_0").input[1].clone();
        node_mut(&mut m, "Gather", "/m/Gather_1_output_0").input[1] = hidden;
        let r = crate::rewrite::rewrite_with(&mut m, &crate::rewrite::RewriteOptions { prove: false, ..Default::default() }).unwrap();
        assert_eq!(r.layers.len(), 0);
        assert!(r.rejected.iter().any(|w| w.reason.contains("accumulator's shape [32, 32] is not the token rows' [T, 32]")), "{:?}", r.rejected);
    }

    /// transformers 4.46's loop through the dynamo exporter: rewritten with the proof off; with the
    /// router weights unsqueezed on the slot axis (GatherND then reads `[T, 1, k]` at (token,
    /// slot)), with the rows gathered per batch (batch_dims 1), or with index_add_'s ScatterND
    /// overwriting instead of adding, each is refused.
    #[test]
    fn the_dynamo_spelling_of_the_loop_and_its_mutants() {
        let unproven = crate::rewrite::RewriteOptions { prove: false, ..Default::default() };
        let mut m = fixture("families/mixtral_tf4_46_dynamo");
        let r = crate::rewrite::rewrite_with(&mut m, &unproven).unwrap();
        assert_eq!(r.layers.len(), 1, "{}", r.text());
        assert_eq!(r.layers[0].experts, 4);

        let mut m = fixture("families/mixtral_tf4_46_dynamo");
        let one = node_mut(&mut m, "Slice", "val_26").input[2].clone(); // [1]
        node_mut(&mut m, "Unsqueeze", "unsqueeze_3").input[1] = one;
        let r = crate::rewrite::rewrite_with(&mut m, &unproven).unwrap();
        assert_eq!(r.layers.len(), 0, "{}", r.text());

        let mut m = fixture("families/mixtral_tf4_46_dynamo");
        let n = node_mut(&mut m, "GatherND", "val_39");
        n.attribute.iter_mut().find(|a| a.name == "batch_dims").unwrap().i = 1;
        let r = crate::rewrite::rewrite_with(&mut m, &unproven).unwrap();
        assert_eq!(r.layers.len(), 0, "{}", r.text());

        // Gemm's transB is a flag: 2 transposes as 1 does (ONNX Runtime reads it as != 0); the
        // experts' square weights would fit either way, so reading it as "== 1" was a wrong rewrite
        let mut m = fixture("families/mixtral_tf4_46_dynamo");
        node_mut(&mut m, "Gemm", "linear_3").attribute.iter_mut().find(|a| a.name == "transB").unwrap().i = 2;
        let r = crate::rewrite::rewrite(&mut m).unwrap();
        assert_eq!(r.layers.len(), 1, "{}", r.text());

        let mut m = fixture("families/mixtral_tf4_46_dynamo");
        let n = node_mut(&mut m, "ScatterND", "val_108");
        n.attribute.iter_mut().find(|a| a.name == "reduction").unwrap().s = b"none".to_vec();
        let r = crate::rewrite::rewrite_with(&mut m, &unproven).unwrap();
        assert_eq!(r.layers.len(), 0, "{}", r.text());
    }

    /// transformers 4.57's GPT-OSS loop: a one-hot of E + 1 classes whose depth is computed from the
    /// gate's shape, each iteration weighted by the dense gate's column of its hit expert;
    /// rewritten with the proof off. Weighted by expert 0's column in every iteration instead, it
    /// is refused.
    #[test]
    fn a_loop_weighted_by_the_dense_gate_column() {
        let unproven = crate::rewrite::RewriteOptions { prove: false, ..Default::default() };
        let mut m = fixture("families/gpt_oss_tf4_57");
        let r = crate::rewrite::rewrite_with(&mut m, &unproven).unwrap();
        assert_eq!(r.layers.len(), 1, "{}", r.text());
        assert_eq!(r.layers[0].experts, 4);
        let mut m = fixture("families/gpt_oss_tf4_57");
        m.proto.graph.mut_or_insert_default().initializer.push(crate::onnx::tensor::make_i64("expert0", &[], &[0]));
        node_mut(&mut m, "Gather", "/m/experts/Gather_9_output_0").input[1] = "expert0".into();
        let r = crate::rewrite::rewrite_with(&mut m, &unproven).unwrap();
        assert_eq!(r.layers.len(), 0);
        assert!(r.rejected.iter().any(|w| w.reason.contains("not the iteration's expert")), "{:?}", r.rejected);
    }

    /// TorchScript's `out.scatter_add_(0, tok[:, None].expand(-1, d), y)`: the index a token column
    /// expanded to `[1, d]` (-1 kept as 1), the rows sliced to the index's shape; rewritten with the
    /// proof off. The index expanded to 3 columns instead scatters only the rows' first 3 columns:
    /// refused, naming the widths.
    #[test]
    fn scatter_add_rows_sliced_to_the_index() {
        let unproven = crate::rewrite::RewriteOptions { prove: false, ..Default::default() };
        let mut m = fixture("spellings/loop_7067");
        let r = crate::rewrite::rewrite_with(&mut m, &unproven).unwrap();
        assert_eq!(r.layers.len(), 1, "{}", r.text());
        let mut m = fixture("spellings/loop_7067");
        m.proto.graph.mut_or_insert_default().initializer.push(crate::onnx::tensor::make_i64("three_columns", &[2], &[1, 3]));
        node_mut(&mut m, "Expand", "/Expand_output_0").input[1] = "three_columns".into();
        let r = crate::rewrite::rewrite_with(&mut m, &unproven).unwrap();
        assert_eq!(r.layers.len(), 0);
        assert!(r.rejected.iter().any(|w| w.reason.contains("sliced to 3 columns")), "{:?}", r.rejected);
        // `expand(0, d)`: zero rows broadcast against n (an expert with one row scatters nothing,
        // with more the graph fails): the mutation harness found the proof blind to it (it only
        // differs where an expert has exactly one row); refused by structure
        let mut m = fixture("spellings/loop_7067");
        m.proto.graph.mut_or_insert_default().initializer.push(crate::onnx::tensor::make_i64("zero_rows", &[1], &[0]));
        node_mut(&mut m, "Concat", "/Concat_4_output_0").input[0] = "zero_rows".into();
        let r = crate::rewrite::rewrite_with(&mut m, &unproven).unwrap();
        assert_eq!(r.layers.len(), 0);
        assert!(r.rejected.iter().any(|w| w.reason.contains("cannot be told")), "{:?}", r.rejected);
    }

    /// Without sizes a Split of 4 hit experts into 2 pieces gives 2 experts each, and the
    /// iterations would take only the first of each: not every expert's contribution.
    #[test]
    fn a_hit_list_split_without_sizes_is_refused() {
        let mut m = fixture("families/ernie45_moe");
        node_mut(&mut m, "Split", "/m/experts/Split_output_0").input.truncate(1);
        let (n, why) = rewrite(&mut m);
        assert_eq!(n, 0);
        assert!(why.iter().any(|w| w.contains("without sizes")), "{why:?}");
    }

    /// A hit list counted over the token axis only lists (expert, slot) pairs, not the experts
    /// the iterations' masks hold: refused.
    #[test]
    fn a_hit_list_of_other_counts_is_refused() {
        let mut m = fixture("families/ernie45_moe");
        let axes = node_mut(&mut m, "ReduceSum", "/m/experts/ReduceSum_output_0").input[1].clone();
        let c = node_mut(&mut m, "Constant", &axes);
        c.attribute.retain(|a| a.name != "value");
        let mut a = onnx_protobuf::AttributeProto::new();
        a.name = "value".into();
        a.type_ = onnx_protobuf::attribute_proto::AttributeType::TENSOR.into();
        a.t = protobuf::MessageField::some(crate::onnx::tensor::make_i64("", &[1], &[-1]));
        c.attribute.push(a);
        let (n, why) = rewrite(&mut m);
        assert_eq!(n, 0);
        assert!(why.iter().any(|w| w.contains("not the list of experts")), "{why:?}");
    }

    /// Zaya's router maps its skip class to expert 0, so a token can name expert 0 in both slots;
    /// the loop's scatter has no reduction and keeps one of the two rows: refused, with why.
    #[test]
    fn repeated_experts_into_an_overwriting_scatter_are_refused() {
        let mut m = fixture("families/zaya_moe");
        let (n, why) = rewrite(&mut m);
        assert_eq!(n, 0);
        assert!(why.iter().any(|w| w.contains("without a reduction") && w.contains("ScatterMoE would add both")), "{why:?}");
    }

    /// PhiMoE's second choice is the ArgMax of the scores with the first masked to -inf, so the
    /// two differ; masked with 0 instead, the second can repeat the first: refused.
    #[test]
    fn a_second_choice_that_can_repeat_the_first_is_refused() {
        let mut m = fixture("phimoe");
        assert_eq!(rewrite(&mut m).0, 1);
        let mut m = fixture("phimoe");
        let c = node_mut(&mut m, "Constant", "/m/router/Constant_2_output_0");
        let t = c.attribute.iter_mut().find(|a| a.name == "value").unwrap().t.as_mut().unwrap();
        t.raw_data = 0f32.to_le_bytes().to_vec();
        t.float_data.clear();
        let (n, why) = rewrite(&mut m);
        assert_eq!(n, 0);
        assert!(why.iter().any(|w| w.contains("names an expert once per token")), "{why:?}");
    }
}
