//! Per-assignment batched MoE: transformers' `batched_mm` experts implementation, as both torch
//! exporters write it. Every (token, slot) assignment s = t k + j gets its own copy of the token row
//! and its own expert's weights, gathered from the stacks by the flattened routing indices:
//!
//! ```text
//! Xr  = repeat_interleave(X, k)                  Tile/Expand(Unsqueeze(X, 1), [1, k, 1]) -> [T k, d]
//! e_s = Clip(Reshape(IDX, [-1]), 0, E - 1)       (the Clip optional; proven a no-op, see below)
//! H   = MLP_{e_s}(Xr[s])                         Squeeze(MatMul(Gather(W, e_s), Unsqueeze(h, -1)), -1)
//!                                                (or its transposed form), biases Gather(b, e_s)
//! Z   = H * Unsqueeze(Reshape(RW, [-1]), -1)
//! Y   = ReduceSum(Reshape(Z, [T, k, d]), axis 1)
//! ```
//!
//! so `Y[t] = sum_j RW[t, j] MLP_{IDX[t, j]}(X[t])`: ScatterMoE(X, RW, IDX) with RW and IDX
//! regrouped as [T k] -> [T, k] in the same row-major order the graph flattened them in.
//! Every value of the region is explained: the expert MLP by [`ExprParser`] (with this family's
//! batched linear layer as a hook), the repeat count and the final reshape by evaluating their
//! shape arithmetic, the index by its flatten and clip; anything else rejects the candidate.

mod shape;

use std::cell::RefCell;

use super::dequant::weight_dims;
use super::emit::MoeLayer;
use super::expr::{to_mlp, ERef, ExprParser, WSrc};
use super::matcher::{axes_of, prod};
use super::Rejection;
use crate::onnx::graph::{attr_i, keeps_rank, make_node, GraphIndex};
use crate::onnx::tensor::make_i64;
use crate::spec::CapacityOrder;
use shape::{declared_dims, eval, index_width, Facts, IVec};

const FAMILY: &str = "batched_mm";

/// `v` after any chain of the given single-input ops; a "Cast" in `ops` is passed only when it
/// stays within the same kind of number (float to float, integer to integer), so that no cast
/// that changes values beyond rounding is assumed away.
fn strip(g: &GraphIndex, v: &str, ops: &[&str]) -> String {
    let float = |t: i64| matches!(t, 1 | 10 | 11 | 16);
    let int = |t: i64| matches!(t, 6 | 7);
    let mut cur = v.to_string();
    for _ in 0..16 {
        match g.prod(&cur) {
            Some((_, n)) if ops.contains(&n.op_type.as_str()) && !n.input.is_empty() => {
                if n.op_type == "Cast" {
                    let to = attr_i(n, "to").unwrap_or(0);
                    let from = g.infer_type(&n.input[0]).map(i64::from);
                    if !from.is_some_and(|f| (float(f) && float(to)) || (int(f) && int(to))) {
                        break;
                    }
                }
                cur = n.input[0].clone();
            }
            _ => break,
        }
    }
    cur
}

// ---------------------------------------------------------------------------------------------
// The pieces of the region
// ---------------------------------------------------------------------------------------------

/// `Reshape(v, [-1])`: the flattened value's source.
fn flattened(g: &GraphIndex, v: &str) -> Option<String> {
    let r = prod(g, &strip(g, v, &["Identity"]), "Reshape")?;
    (g.const_i64(&r.input[1]).as_deref() == Some(&[-1])).then(|| r.input[0].clone())
}

/// A value that may be the repeated token rows: `Flatten(t, 2)` or `Reshape(t, [.., d])` with t a
/// Tile or Expand of `Unsqueeze(X, 1)`. Returns (X, t's producer, the reshape when not Flatten).
fn repeat_shape<'g>(g: &GraphIndex<'g>, v: &str) -> Option<(&'g str, &'g onnx_protobuf::NodeProto, Option<&'g onnx_protobuf::NodeProto>)> {
    let (_, n) = g.prod(v)?;
    let (t, reshape) = match n.op_type.as_str() {
        "Flatten" if attr_i(n, "axis") == Some(2) => (&n.input[0], None),
        "Reshape" => (&n.input[0], Some(n)),
        _ => return None,
    };
    let (_, tn) = g.prod(t).filter(|(_, n)| n.op_type == "Tile" || n.op_type == "Expand")?;
    let u = prod(g, &tn.input[0], "Unsqueeze")?;
    matches!(axes_of(g, u).as_deref(), Some([1]) | Some([-2])).then_some(())?;
    Some((u.input[0].as_str(), tn, reshape))
}

/// The expert index every weight gather reads: `Clip?(Reshape(IDX, [-1]))`.
struct FlatIndex {
    /// what the gathers read (under integer casts): the Clip's output, or the flattened indices
    read: String,
    /// the flattened indices `Reshape(IDX, [-1])`
    flat: String,
    /// IDX
    idx: String,
    /// the Clip's bounds
    clip: Option<(Option<f64>, Option<f64>)>,
}

fn flat_index(g: &GraphIndex, v: &str) -> Option<FlatIndex> {
    let v = strip(g, v, &["Identity", "Cast"]);
    if let Some(c) = prod(g, &v, "Clip") {
        let lo = c.input.get(1).filter(|s| !s.is_empty()).map(|s| g.const_scalar(s));
        let hi = c.input.get(2).filter(|s| !s.is_empty()).map(|s| g.const_scalar(s));
        // a computed bound cannot be checked
        if lo.is_some_and(|x| x.is_none()) || hi.is_some_and(|x| x.is_none()) {
            return None;
        }
        let inner = strip(g, &c.input[0], &["Identity", "Cast"]);
        let idx = flattened(g, &inner)?;
        return Some(FlatIndex { read: v, flat: inner, idx, clip: Some((lo.flatten(), hi.flatten())) });
    }
    let idx = flattened(g, &v)?;
    Some(FlatIndex { read: v.clone(), flat: v, idx, clip: None })
}

pub fn find(g: &GraphIndex) -> (Vec<MoeLayer>, Vec<Rejection>) {
    let mut layers = Vec::new();
    let mut rejected = Vec::new();
    for n in &g.graph.node {
        if n.op_type != "ReduceSum" || !(n.domain.is_empty() || n.domain == "ai.onnx") {
            continue;
        }
        match prove(g, n) {
            Ok(Some(l)) => layers.push(l),
            Ok(None) => {}
            Err(reason) => rejected.push(Rejection { family: FAMILY, at: n.output[0].clone(), reason }),
        }
    }
    (layers, rejected)
}

fn prove(g: &GraphIndex, rsum: &onnx_protobuf::NodeProto) -> Result<Option<MoeLayer>, String> {
    // anchor: ReduceSum(Reshape(H * Unsqueeze(Reshape(RW, [-1]), -1)), axis 1); anything else is
    // not this family
    if axes_of(g, rsum).as_deref() != Some(&[1]) || attr_i(rsum, "keepdims").unwrap_or(1) != 0 {
        return Ok(None);
    }
    let Some(resh) = prod(g, &strip(g, &rsum.input[0], &["Cast", "Identity"]), "Reshape") else { return Ok(None) };
    let Some(mul) = prod(g, &strip(g, &resh.input[0], &["Cast", "Identity"]), "Mul") else { return Ok(None) };
    let mut parts = None;
    for (a, b) in [(0, 1), (1, 0)] {
        let Some(u) = prod(g, &strip(g, &mul.input[b], &["Cast", "Identity"]), "Unsqueeze") else { continue };
        if !matches!(axes_of(g, u).as_deref(), Some([-1]) | Some([1])) {
            continue;
        }
        let rw_flat = strip(g, &u.input[0], &["Cast", "Identity"]);
        if flattened(g, &rw_flat).is_some() {
            parts = Some((strip(g, &mul.input[a], &["Cast", "Identity"]), rw_flat));
        }
    }
    let Some((h, rw_flat)) = parts else { return Ok(None) };

    // the per-assignment expert MLP: batched linear layers over gathered weights
    let seen_idx: RefCell<Vec<String>> = RefCell::new(Vec::new());
    let note = |v: &str| -> bool {
        if flat_index(g, v).is_some() {
            seen_idx.borrow_mut().push(v.to_string());
            true
        } else {
            false
        }
    };
    let resolver = |v: &str| note(v).then_some(ERef::Each);
    // a gathered stack that is DequantizeLinear of something the weights cannot be read from:
    // its reason, given where the parse then fails
    let why: RefCell<Option<String>> = RefCell::new(None);
    let hook = |v: &str| -> Option<(String, WSrc)> { batched_linear(g, v, &note, &why) };
    let leaves: Vec<String> = g.graph.node.iter().filter_map(|n| n.output.first()).filter(|o| repeat_shape(g, o).is_some()).cloned().collect();
    let mut p = ExprParser::new(g, leaves, &resolver);
    p.lin_hook = Some(&hook);
    let e = p.parse(&h).map_err(|e| why.borrow_mut().take().unwrap_or(e))?;
    let d = p.d.ok_or("the expert outputs read no batched linear layer of the repeated token rows")?;
    let mlp = to_mlp(&e, d)?;
    let xr = p.matched_leaf.clone().ok_or("cannot find the repeated token rows")?;
    let e_count = mlp.each_count(g).ok_or("the expert weights are not gathered from stacks by the routing indices")?;
    for w in mlp.w_in.iter().chain([&mlp.w_out]) {
        if w.index != Some(ERef::Each) || weight_dims(g, &w.init).map(|d| d[0] as usize) != Some(e_count) {
            return Err(format!("weight '{}' is not a stack of {e_count} experts gathered by the routing indices", w.init));
        }
    }
    for b in mlp.b_in.iter().flatten().chain(mlp.b_out.iter()) {
        if b.index != Some(ERef::Each) || g.const_dims(&b.init).map(|d| d[0] as usize) != Some(e_count) {
            return Err(format!("bias '{}' is not a stack of {e_count} experts gathered by the routing indices", b.init));
        }
    }

    // one flattened index for every gather
    let idx_vals = seen_idx.borrow().clone();
    let iv = idx_vals.first().cloned().ok_or("no weight is gathered by the routing indices")?;
    let Some(FlatIndex { read: idx_read, flat: idx_flat, idx, clip }) = flat_index(g, &iv) else { unreachable!("noted values are flat indices") };
    for other in &idx_vals {
        if flat_index(g, other).map(|f| f.flat).as_deref() != Some(idx_flat.as_str())
            || strip(g, other, &["Identity", "Cast"]) != strip(g, &iv, &["Identity", "Cast"])
        {
            return Err("the expert weights are gathered by different index tensors".into());
        }
    }
    // k: TopK's constant k when the indices come from TopK; else the width the router's own
    // nodes give its indices (PhiMoE's two ArgMax columns, Zaya's masked TopK)
    let topk = g.prod(&strip(g, &idx, &["Cast", "Identity"])).filter(|(_, n)| n.op_type == "TopK").map(|(_, n)| n);
    let k_topk = topk.and_then(|t| g.const_i64(&t.input[1])).filter(|k| k.len() == 1).map(|k| k[0]);
    let k_idx = k_topk.or_else(|| index_width(g, &idx, 0));

    // A Clip of the indices must keep them in [0, E-1]; where it is proven a no-op (the router's
    // own TopK over exactly E columns) the op reads the router's indices, else the clipped ones
    // the weights are gathered by, which is what the graph computes whatever the router
    let mut reads_clipped = false;
    if let Some((lo, hi)) = clip {
        if lo != Some(0.0) || hi != Some((e_count - 1) as f64) {
            return Err(format!("the routing indices are clipped to [{lo:?}, {hi:?}], not [0, {}]", e_count - 1));
        }
        reads_clipped = topk.is_none_or(|t| super::routing::chosen_width(g, &t.input[0], 0) != Some(e_count as i64));
    }

    // what the shape arithmetic may read
    let x = repeat_shape(g, &xr).unwrap().0.to_string();
    let facts = |v: &str| -> Option<IVec> {
        if v == x.as_str() {
            return Some(IVec { v: vec![Some(d as i64)], open: true, scalar: false });
        }
        if let (Some(t), Some(k)) = (topk, k_topk) {
            if t.output.iter().any(|o| o == v) {
                return Some(IVec { v: vec![Some(k)], open: true, scalar: false });
            }
        }
        if let Some(k) = k_idx.filter(|_| v == idx.as_str()) {
            return Some(IVec { v: vec![Some(k)], open: true, scalar: false });
        }
        declared_dims(g, v)
    };

    // the repeated rows: X [T, d] repeated k times along the rows, each row k times in a row
    let (_, tn, xr_reshape) = repeat_shape(g, &xr).unwrap();
    let reps = eval(g, &tn.input[1], &facts, 0).and_then(|r| r.known().map(|_| r)).ok_or("cannot evaluate the token rows' repeat count")?;
    let k = match (tn.op_type.as_str(), reps.v.as_slice()) {
        // Tile needs one repeat per axis: three, so X has rank 2
        ("Tile", [Some(1), Some(k), Some(1)]) => *k,
        // Expand broadcasts: [a, k, c] with a in {1, T} and c in {1, d} (anything else fails to run)
        ("Expand", [_, Some(k), c]) if c.is_none() || *c == Some(1) || *c == Some(d as i64) => *k,
        (op, r) => return Err(format!("the token rows are {op}'d by {r:?}, not repeated along a new second axis")),
    };
    if k < 1 {
        return Err(format!("repeat count {k}"));
    }
    if let Some(r) = xr_reshape {
        let t = eval(g, &r.input[1], &facts, 0).ok_or("cannot evaluate the repeated rows' reshape")?;
        if t.open || t.v.len() != 2 || t.v[1] != Some(d as i64) {
            return Err(format!("the repeated rows are reshaped to {:?}, not [T k, {d}]", t.v));
        }
    }
    // Expand does not fix X's rank: it must be [T, d] by construction
    if tn.op_type == "Expand" && !rank2(g, &x, &facts) {
        return Err(format!("cannot prove that the token rows '{x}' are [T, d]"));
    }
    if let Some(kt) = k_idx {
        if kt != k {
            return Err(format!("rows are repeated {k} times but the router picks {kt}"));
        }
    }
    // the final reshape: [T, k, d], summed over k
    let t = eval(g, &resh.input[1], &facts, 0).ok_or("cannot evaluate the weighted outputs' reshape")?;
    if t.open || t.v.len() != 3 || t.v[1] != Some(k) || t.v[2] != Some(d as i64) {
        return Err(format!("the weighted outputs are reshaped to {:?}, not [T, {k}, {d}]", t.v));
    }

    // the output: in the token rows' type (a trailing Cast back to it is part of the layer)
    let mut output = rsum.output[0].clone();
    let xt = g.infer_type(&x);
    if g.infer_type(&output) != xt {
        let cs = g.cons(&output);
        let cast = (cs.len() == 1).then(|| g.node(cs[0])).filter(|c| c.op_type == "Cast" && attr_i(c, "to").map(|t| t as i32) == xt);
        output = cast.ok_or("the combined output's type differs from the token rows'")?.output[0].clone();
    }

    // RW and IDX regrouped [T k] -> [T, k] in the order the graph flattened them
    let tag = format!("{output}.batched");
    let shape = format!("{tag}.k_shape");
    let (rw_tk, idx_tk) = (format!("{tag}.routing_weights"), format!("{tag}.routing_indices"));
    let mut extra_nodes = Vec::new();
    // Likewise the routing weights, when they are the flattening of a rank-2 value computed
    // elementwise from that TopK's values [T, k] or from scores gathered at its indices (softmax,
    // normalisation, scaling, casts): broadcasting cannot change a rank-2 [T, k] operand's shape
    // into another rank-2 shape.
    let rw_src = flattened(g, &rw_flat).filter(|src| {
        let mut cur = src.clone();
        for _ in 0..16 {
            let Some((_, n)) = g.prod(&cur) else { return false };
            if topk.is_some_and(|t| t.output.first() == Some(&cur)) {
                return super::matcher::rank_of(g, src) == Some(2);
            }
            // scores gathered at the chosen experts (DeepSeek-V3's router): GatherElements'
            // output has the shape of its indices, the TopK indices [T, k]
            if n.op_type == "GatherElements" && n.domain.is_empty() && n.input.len() == 2 {
                let by_topk = topk.is_some_and(|t| t.output.get(1).map(String::as_str) == Some(strip(g, &n.input[1], &["Identity"]).as_str()));
                return by_topk && super::matcher::rank_of(g, src) == Some(2);
            }
            if !n.domain.is_empty() || !matches!(n.op_type.as_str(), "Cast" | "Identity" | "Softmax" | "Sigmoid" | "Exp" | "Div" | "Mul") {
                return false;
            }
            cur = n.input[0].clone();
        }
        false
    });
    let rw_tk = match rw_src {
        Some(src) => src,
        None => {
            extra_nodes.push(make_node("Reshape", "", &format!("{tag}/rw_reshape"), &[&rw_flat, &shape], &[&rw_tk]));
            rw_tk
        }
    };
    // Indices flattened from the router's own TopK output [T, k] (both exporters write that) are
    // read as they are: regrouping a row-major flattening is the identity, and a Clip was proven
    // a no-op above. The op (and the numeric proof) then see the router's indices themselves.
    // Other indices are regrouped from what the gathers read (the Clip's output where it is not
    // proven a no-op).
    let idx_tk = if topk.is_some() && !reads_clipped && super::matcher::rank_of(g, &idx) == Some(2) {
        idx.clone()
    } else {
        let src = if reads_clipped { &idx_read } else { &idx_flat };
        extra_nodes.push(make_node("Reshape", "", &format!("{tag}/idx_reshape"), &[src, &shape], &[&idx_tk]));
        idx_tk
    };
    Ok(Some(MoeLayer {
        family: FAMILY,
        x,
        routing_weights: rw_tk,
        routing_indices: idx_tk,
        output,
        experts: (0..e_count).map(|i| mlp.for_expert(i)).collect(),
        capacity: None,
        capacity_order: CapacityOrder::SlotMajor,
        k: Some(k as usize),
        extra_nodes,
        extra_inits: vec![make_i64(&shape, &[2], &[-1, k])],
        quant: None,
    }))
}

/// X is [T, d]: of rank 2 as [`rank_of`] tells it.
fn rank2(g: &GraphIndex, x: &str, facts: Facts) -> bool {
    rank_of(g, x, facts, 0) == Some(2)
}

/// The rank of `v` where the graph fixes it: a Reshape to a shape of known length, Flatten, a
/// declared input or a constant, through ops whose output takes their inputs' largest rank
/// (`keeps_rank`): a normalisation of reshaped rows (Gemma 4's experts read an RMSNorm of
/// `x.reshape(-1, d)`) is as rank 2 as the rows. None where that is not known.
fn rank_of(g: &GraphIndex, v: &str, facts: Facts, depth: usize) -> Option<usize> {
    if depth > 32 {
        return None;
    }
    if let Some(t) = g.const_tensor(v) {
        return Some(t.dims.len());
    }
    let Some((_, n)) = g.prod(v) else { return declared_dims(g, v).map(|t| t.v.len()) };
    match n.op_type.as_str() {
        "Reshape" => eval(g, &n.input[1], facts, 0).filter(|t| !t.open).map(|t| t.v.len()),
        "Flatten" => Some(2),
        _ if keeps_rank(n) => {
            let mut r = 0;
            for i in n.input.iter().filter(|i| !i.is_empty()) {
                r = r.max(rank_of(g, i, facts, depth + 1)?);
            }
            Some(r)
        }
        _ => None,
    }
}

/// This family's linear layer, `v` = one of
///   Squeeze(MatMul(Wg, Unsqueeze(h, -1)), -1)    Wg [S, out, in] (transformers' default layout)
///   Squeeze(MatMul(Unsqueeze(h, 1), Wg), 1)      Wg [S, in, out] (`is_transposed` experts)
/// with Wg = Gather(W, e) or GatherND(W, Unsqueeze(e, -1)) of a rank-3 stack W by the flattened
/// routing indices e (which `note` checks and records).
fn batched_linear(g: &GraphIndex, v: &str, note: &dyn Fn(&str) -> bool, why: &RefCell<Option<String>>) -> Option<(String, WSrc)> {
    let sq = prod(g, v, "Squeeze")?;
    let sq_axes = axes_of(g, sq)?;
    let mm = prod(g, &sq.input[0], "MatMul")?;
    let unsq = |s: &str, ok: &[i64]| -> Option<String> {
        let u = prod(g, s, "Unsqueeze")?;
        let a = axes_of(g, u)?;
        (a.len() == 1 && ok.contains(&a[0])).then(|| u.input[0].clone())
    };
    let (xv, wg, transposed) = if let Some(x) = unsq(&mm.input[1], &[-1, 2]) {
        (matches!(sq_axes.as_slice(), [-1] | [2])).then_some(())?;
        (x, &mm.input[0], false)
    } else {
        let x = unsq(&mm.input[0], &[1, -2])?;
        (matches!(sq_axes.as_slice(), [1] | [-2])).then_some(())?;
        (x, &mm.input[1], true)
    };
    let wn = g.prod(&strip(g, wg, &["Cast", "Identity"]))?.1;
    let stack = match wn.op_type.as_str() {
        "Gather" if attr_i(wn, "axis").unwrap_or(0) == 0 && note(&wn.input[1]) => &wn.input[0],
        "GatherND" if attr_i(wn, "batch_dims").unwrap_or(0) == 0 => {
            let e = unsq(&wn.input[1], &[-1, 1])?;
            note(&e).then_some(())?;
            &wn.input[0]
        }
        _ => return None,
    };
    let dims = match super::dequant::weight_dims_or_reason(g, stack) {
        Ok(d) => d.filter(|d| d.len() == 3)?,
        Err(e) => {
            *why.borrow_mut() = Some(e);
            return None;
        }
    };
    let (out, inp) = if transposed { (dims[2], dims[1]) } else { (dims[1], dims[2]) };
    Some((xv, WSrc { init: stack.clone(), index: Some(ERef::Each), transposed, out: out as usize, inp: inp as usize }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use onnx_protobuf::GraphProto;

    fn graph(nodes: Vec<onnx_protobuf::NodeProto>, inits: Vec<onnx_protobuf::TensorProto>) -> GraphProto {
        let mut g = GraphProto::new();
        g.node = nodes;
        g.initializer = inits;
        g
    }

    /// Routers other than TopK: PhiMoE's sparsemixer (k from its two ArgMax columns) and Zaya's
    /// TopK over E + 1 classes with the skip class masked to expert 0 (its Clip is no no-op proof:
    /// the op reads the clipped indices the weights are gathered by). Both proven.
    #[test]
    fn indices_of_other_routers_are_read_as_the_weights_are_gathered() {
        use crate::rewrite::matcher::testing::fixture;
        for name in ["families/phimoe_bmm", "families/zaya_bmm_dynamo"] {
            let mut m = fixture(name);
            let r = crate::rewrite::rewrite(&mut m).unwrap();
            assert_eq!(r.layers.len(), 1, "{name}: {}", r.text());
            assert_eq!((r.layers[0].experts, r.layers[0].k), (4, Some(2)), "{name}");
            assert!(r.layers[0].proof.is_some(), "{name}");
        }
    }

    /// One weight gathered by the clipped indices and the other by the unclipped ones: no single
    /// index tensor for the op to read, refused.
    #[test]
    fn weights_gathered_by_different_indices_are_refused() {
        use crate::rewrite::matcher::testing::{fixture, node_mut, rewrite};
        let mut m = fixture("families/phimoe_bmm");
        let gathers: Vec<usize> =
            (0..m.graph().node.len()).filter(|&i| m.graph().node[i].op_type == "Gather" && m.graph().node[i].input[1].contains("Clip")).collect();
        assert_eq!(gathers.len(), 2);
        let clip = node_mut(&mut m, "Clip", "").input[0].clone();
        m.proto.graph.mut_or_insert_default().node[gathers[1]].input[1] = clip;
        let (n, why) = rewrite(&mut m);
        assert_eq!(n, 0);
        assert!(why.iter().any(|w| w.contains("different index tensors")), "{why:?}");
    }

    /// A Clip that lets an index out of [0, E-1] (a negative index wraps in Gather; the op
    /// refuses it) is refused.
    #[test]
    fn a_clip_beyond_the_experts_is_refused() {
        use crate::rewrite::matcher::testing::{fixture, node_mut, rewrite};
        let mut m = fixture("families/phimoe_bmm");
        let lo = node_mut(&mut m, "Clip", "").input[1].clone();
        let c = node_mut(&mut m, "Constant", &lo);
        let t = c.attribute.iter_mut().find(|a| a.name == "value").unwrap().t.as_mut().unwrap();
        t.raw_data = (-1i64).to_le_bytes().to_vec();
        t.int64_data.clear();
        let (n, why) = rewrite(&mut m);
        assert_eq!(n, 0);
        assert!(why.iter().any(|w| w.contains("clipped to")), "{why:?}");
    }

    /// A ReduceSum over another axis, or of something other than the weighted per-assignment
    /// outputs, is not this family's candidate (no rejection noise for routers' sums).
    #[test]
    fn other_reducesums_are_not_candidates() {
        let mut rs = make_node("ReduceSum", "", "rs", &["a", "ax"], &["y"]);
        rs.attribute.push(crate::onnx::graph::attr_int("keepdims", 1));
        let gp = graph(vec![make_node("Mul", "", "m", &["p", "q"], &["a"]), rs], vec![make_i64("ax", &[1], &[-1])]);
        let g = GraphIndex::new(&gp, None).unwrap();
        let (layers, rejected) = find(&g);
        assert!(layers.is_empty() && rejected.is_empty());
    }
}
