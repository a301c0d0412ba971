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
//! The expert of iteration i is either a constant, or entry i of the sorted list of hit experts;
//! in the latter form the loop has exactly E iterations (a Split into E pieces), so the graph runs
//! only when every expert is hit and entry i is expert i. A chain is replaced only when its
//! iterations cover experts 0..E-1 once each with the same routing tensors, rows and MLP form.

use std::collections::HashMap;

use super::emit::MoeLayer;
use super::expr::{to_mlp, ERef, ExprParser};
use super::matcher::prod;
use super::Rejection;
use crate::onnx::graph::{attr_i, attr_ints, strip, GraphIndex};
use crate::spec::CapacityOrder;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Axis {
    T,
    K,
}

#[derive(Debug, Clone, PartialEq)]
struct MaskInfo {
    idx: String,
    eref: ERef,
    /// which routing axis each NonZero coordinate indexes
    axes: [Axis; 2],
    experts: Option<usize>,
    capacity: Option<i64>,
    /// number of unrolled iterations the hit list was split into (Hit form)
    hit_count: Option<usize>,
}

/// One `acc + scatter(token, contribution)` step.
struct Step {
    acc_in: String,
    acc_out: String,
    index: String,
    update: String,
}


/// The scatter's index under its Expand and Cast: the Expand must broadcast the token column to
/// exactly the scattered update's shape (`Shape(update)`), so that each updated row goes to its
/// token; any other shape is not explained.
fn index_rows<'a>(g: &GraphIndex<'a>, index: &'a str, update: &str) -> Result<&'a str, String> {
    let mut cur = index;
    for _ in 0..16 {
        match g.prod(cur) {
            Some((_, n)) if n.op_type == "Cast" && n.domain.is_empty() => cur = &n.input[0],
            Some((_, n)) if n.op_type == "Expand" && n.domain.is_empty() && n.input.len() == 2 => {
                let sh = prod(g, &n.input[1], "Shape").filter(|sh| sh.attribute.is_empty() && sh.input.first().map(String::as_str) == Some(update));
                if sh.is_none() {
                    return Err("the scatter indices are expanded to a shape other than the scattered value's".into());
                }
                cur = &n.input[0];
            }
            _ => break,
        }
    }
    Ok(cur)
}

/// The scattered value under Expand / Cast / Identity. An Expand must provably keep its input's
/// shape: to all ones, or to `Shape(zeros[..1, ..])` (TorchScript's index_add_ writes
/// `Expand(v, Shape(Slice(zeros or the accumulator, 0, 1 on axis 0, everything on axis 1)))`,
/// i.e. `[1, d]`), which
/// broadcasting a `[n, d]` value leaves as it is. A shape that could repeat rows is not explained.
fn update_value<'a>(g: &GraphIndex<'a>, update: &'a str, acc: &str) -> Result<&'a str, String> {
    let keeps = |shape: &str| -> bool {
        if let Some(c) = g.const_i64(shape) {
            return c.iter().all(|&v| v == 1);
        }
        let Some(sh) = prod(g, shape, "Shape").filter(|sh| sh.attribute.is_empty()) else { return false };
        let Some(sl) = prod(g, &sh.input[0], "Slice") else { return false };
        // sliced from zeros, or from the accumulator (shaped like them) in later iterations
        if (prod(g, &sl.input[0], "ConstantOfShape").is_none() && sl.input[0] != acc) || sl.input.len() < 4 {
            return false;
        }
        let (Some(starts), Some(ends), Some(axes)) = (g.const_i64(&sl.input[1]), g.const_i64(&sl.input[2]), g.const_i64(&sl.input[3])) else {
            return false;
        };
        let steps_ok = sl.input.get(4).map_or(true, |st| g.const_i64(st).is_some_and(|v| v.iter().all(|&x| x == 1)));
        steps_ok
            && starts.len() == ends.len()
            && axes == [0, 1]
            && starts.iter().all(|&v| v == 0)
            && ends[0] == 1
            && ends[1] >= i64::MAX / 2
    };
    let mut cur = update;
    for _ in 0..16 {
        match g.prod(cur) {
            Some((_, n)) if (n.op_type == "Cast" || n.op_type == "Identity") && n.domain.is_empty() => cur = &n.input[0],
            Some((_, n)) if n.op_type == "Expand" && n.domain.is_empty() && n.input.len() == 2 => {
                if !keeps(&n.input[1]) {
                    return Err("the scattered value is expanded to a shape that is not proven to keep it".into());
                }
                cur = &n.input[0];
            }
            _ => break,
        }
    }
    Ok(cur)
}

fn is_zeros(g: &GraphIndex, v: &str) -> bool {
    if let Some(n) = prod(g, v, "ConstantOfShape") {
        let val = n.attribute.iter().find(|a| a.name == "value").and_then(|a| a.t.as_ref());
        return match val {
            None => true,
            Some(t) => crate::onnx::tensor::tensor_f32(t, None).map(|x| x.iter().all(|&v| v == 0.0)).unwrap_or(false),
        };
    }
    false
}

fn scatter_steps(g: &GraphIndex) -> Vec<Step> {
    let mut steps = Vec::new();
    for n in &g.graph.node {
        if n.op_type == "Add" && n.domain.is_empty() && n.input.len() == 2 {
            for (a, s) in [(0, 1), (1, 0)] {
                if let Some(sc) = prod(g, &n.input[s], "ScatterElements") {
                    let red = crate::onnx::graph::attr_s(sc, "reduction").unwrap_or_else(|| "none".into());
                    if attr_i(sc, "axis").unwrap_or(0) == 0 && red == "none" && is_zeros(g, &sc.input[0]) {
                        steps.push(Step {
                            acc_in: n.input[a].clone(),
                            acc_out: n.output[0].clone(),
                            index: sc.input[1].clone(),
                            update: sc.input[2].clone(),
                        });
                        break;
                    }
                }
            }
        } else if n.op_type == "ScatterElements" && n.domain.is_empty() {
            let red = crate::onnx::graph::attr_s(n, "reduction").unwrap_or_default();
            if attr_i(n, "axis").unwrap_or(0) == 0 && red == "add" {
                steps.push(Step { acc_in: n.input[0].clone(), acc_out: n.output[0].clone(), index: n.input[1].clone(), update: n.input[2].clone() });
            }
        }
    }
    steps
}

/// `v` is coordinate c of the NonZero `nz`: Squeeze(Split(Transpose(nz))[c]) or Gather(Transpose(nz), c, axis=1).
fn where_coord(g: &GraphIndex, v: &str) -> Option<(String, usize)> {
    let v = strip(g, v, &["Cast", "Identity"]);
    let (_, n) = g.prod(v)?;
    let (t, c) = match n.op_type.as_str() {
        "Squeeze" => {
            let axes = if n.input.len() > 1 { g.const_i64(&n.input[1])? } else { attr_ints(n, "axes")? };
            if axes != [1] && axes != [-1] {
                return None;
            }
            let s = prod(g, &n.input[0], "Split")?;
            if attr_i(s, "axis").unwrap_or(0) != 1 || s.output.len() != 2 {
                return None;
            }
            if s.input.len() > 1 && !s.input[1].is_empty() && g.const_i64(&s.input[1])? != [1, 1] {
                return None;
            }
            (s.input[0].as_str(), s.output.iter().position(|o| o == &n.input[0])?)
        }
        "Gather" if attr_i(n, "axis") == Some(1) => {
            let c = g.const_i64(&n.input[1])?;
            if c.len() != 1 || g.const_dims(&n.input[1]).is_some_and(|d| !d.is_empty()) {
                return None;
            }
            (n.input[0].as_str(), c[0] as usize)
        }
        _ => return None,
    };
    let tr = prod(g, t, "Transpose")?;
    if attr_ints(tr, "perm").unwrap_or_else(|| vec![1, 0]) != [1, 0] {
        return None;
    }
    let nz = prod(g, &tr.input[0], "NonZero")?;
    Some((nz.output[0].clone(), c))
}

/// Resolves an expert-number value: a constant, or entry i of the split list of hit experts.
fn resolve_eref(g: &GraphIndex, v: &str, hit_counts: &mut HashMap<ERef, usize>) -> Option<ERef> {
    let mut cur = v;
    for _ in 0..8 {
        if let Some(c) = g.const_i64(cur) {
            return (c.len() == 1).then(|| ERef::Const(c[0]));
        }
        let (_, n) = g.prod(cur)?;
        match n.op_type.as_str() {
            "Squeeze" | "Unsqueeze" | "Reshape" | "Cast" | "Identity" => cur = &n.input[0],
            "Gather" => {
                let i = g.const_i64(&n.input[1])?;
                if i != [0] || attr_i(n, "axis").unwrap_or(0) != 0 {
                    return None;
                }
                cur = &n.input[0];
            }
            "Split" => {
                if attr_i(n, "axis").unwrap_or(0) != 0 {
                    return None;
                }
                let count = n.output.len();
                if n.input.len() > 1 && !n.input[1].is_empty() {
                    let s = g.const_i64(&n.input[1])?;
                    if s.iter().any(|&x| x != 1) || s.len() != count {
                        return None;
                    }
                }
                let i = n.output.iter().position(|o| o == cur)?;
                let tr = prod(g, &n.input[0], "Transpose")?;
                let nz = prod(g, &tr.input[0], "NonZero")?;
                // the hit list: NonZero(Greater(ReduceSum(mask stack), 0)), a vector of length E
                let gr = prod(g, &nz.input[0], "Greater")?;
                if g.const_scalar(&gr.input[1]) != Some(0.0) {
                    return None;
                }
                let e = ERef::Hit(i);
                hit_counts.insert(e, count);
                return Some(e);
            }
            _ => return None,
        }
    }
    None
}

/// The one-hot routing mask `[T, K, E]` (optionally capacity-masked): (IDX, E, capacity).
fn one_hot_like(g: &GraphIndex, v: &str) -> Result<(String, usize, Option<i64>), String> {
    let v = strip(g, v, &["Cast", "Identity"]);
    if let Some(oh) = prod(g, v, "OneHot") {
        if attr_i(oh, "axis").unwrap_or(-1) != -1 {
            return Err("OneHot is not along the last axis".into());
        }
        let depth = g.const_scalar(&oh.input[1]).ok_or("OneHot depth is not constant")? as usize;
        let vals = g.const_f32(&oh.input[2]).ok_or("OneHot values are not constant")?;
        if vals != [0.0, 1.0] {
            return Err("OneHot values are not [0, 1]".into());
        }
        return Ok((oh.input[0].clone(), depth, None));
    }
    if let Some(mul) = prod(g, v, "Mul") {
        // Switch: one_hot * (cumsum(one_hot, tokens) <= C)
        for (a, b) in [(0, 1), (1, 0)] {
            let Ok((idx, e, None)) = one_hot_like(g, &mul.input[a]) else { continue };
            let m = strip(g, &mul.input[b], &["Cast"]);
            let Some(le) = prod(g, m, "LessOrEqual") else { continue };
            let Some(cs) = prod(g, &le.input[0], "CumSum") else { continue };
            if strip(g, &cs.input[0], &["Cast"]) != strip(g, &mul.input[a], &["Cast"]) {
                continue;
            }
            if attr_i(cs, "exclusive").unwrap_or(0) != 0 || attr_i(cs, "reverse").unwrap_or(0) != 0 {
                return Err("capacity CumSum is exclusive or reversed".into());
            }
            let axis = g.const_scalar(&cs.input[1]).ok_or("CumSum axis not constant")? as i64;
            let c = g.const_scalar(&le.input[1]).ok_or("capacity is not constant")?;
            let k1 = is_k1(g, &idx);
            // CumSum over the k axis (size 1 in top-1 routing) counts only the assignment itself:
            // the mask keeps everything when C >= 1 (transformers' Switch router does this).
            if (axis == 1 || axis == -2) && k1 {
                if c >= 1.0 {
                    return Ok((idx, e, None));
                }
                return Err(format!("capacity {c} drops every token"));
            }
            if !(axis == 0 || axis == -3) {
                return Err(format!("capacity CumSum runs along axis {axis}, not over tokens"));
            }
            if !k1 {
                return Err("capacity masks are recognised for top-1 routing only".into());
            }
            // kept iff the running count including itself <= C, i.e. fewer than C before it
            return Ok((idx, e, Some(c.floor() as i64)));
        }
    }
    Err(format!("'{v}' is not a one-hot routing mask"))
}

/// The routing index tensor has one slot per token (ArgMax keepdims, or TopK with k = 1).
fn is_k1(g: &GraphIndex, idx: &str) -> bool {
    if let Some(a) = prod(g, idx, "ArgMax") {
        return attr_i(a, "keepdims").unwrap_or(1) == 1;
    }
    if let Some(t) = prod(g, idx, "TopK") {
        return g.const_i64(&t.input[1]).is_some_and(|k| k == [1]);
    }
    false
}

fn mask_of(g: &GraphIndex, nz: &str, hit_counts: &mut HashMap<ERef, usize>) -> Result<MaskInfo, String> {
    let n = prod(g, nz, "NonZero").ok_or("not a NonZero")?;
    let m = strip(g, &n.input[0], &["Cast", "Identity"]);
    let (_, mn) = g.prod(m).ok_or("the mask is not computed")?;
    // Equal(IDX, e)
    if mn.op_type == "Equal" {
        for (a, b) in [(0, 1), (1, 0)] {
            if let Some(c) = g.const_i64(&mn.input[b]) {
                if c.len() == 1 {
                    return Ok(MaskInfo { idx: mn.input[a].clone(), eref: ERef::Const(c[0]), axes: [Axis::T, Axis::K], experts: None, capacity: None, hit_count: None });
                }
            }
        }
        return Err("Equal mask does not compare with a constant expert number".into());
    }
    // [Squeeze](Gather(Transpose(one_hot), e))
    let mut gat = mn;
    let mut squeezed = false;
    if mn.op_type == "Squeeze" {
        let axes = if mn.input.len() > 1 { g.const_i64(&mn.input[1]) } else { attr_ints(mn, "axes") };
        if axes.as_deref() != Some(&[0]) {
            return Err("mask Squeeze is not on axis 0".into());
        }
        gat = prod(g, &mn.input[0], "Gather").ok_or("mask is not a gathered expert slice")?;
        squeezed = true;
    }
    if gat.op_type != "Gather" || attr_i(gat, "axis").unwrap_or(0) != 0 {
        return Err(format!("the mask comes from {}", gat.op_type));
    }
    let eref = resolve_eref(g, &gat.input[1], hit_counts).ok_or("the mask's expert index is not an expert number")?;
    let _ = squeezed;
    let tr = prod(g, &gat.input[0], "Transpose").ok_or("the expert mask stack is not a transposed one-hot")?;
    let perm = attr_ints(tr, "perm").ok_or("Transpose without perm")?;
    if perm.len() != 3 || perm[0] != 2 {
        return Err(format!("one-hot transposed with perm {perm:?}"));
    }
    let (idx, e, cap) = one_hot_like(g, &tr.input[0])?;
    let ax = |p: i64| if p == 0 { Axis::T } else { Axis::K };
    Ok(MaskInfo { idx, eref, axes: [ax(perm[1]), ax(perm[2])], experts: Some(e), capacity: cap, hit_count: hit_counts.get(&eref).copied() })
}

/// `RW[token, slot]` as a column: Gather(Flatten([Unsqueeze](RW), 2), slot + token * k).
fn routing_weight(g: &GraphIndex, v: &str) -> Option<(String, String, usize, usize)> {
    let gv = strip(g, v, &["Reshape", "Unsqueeze", "Squeeze", "Cast", "Identity"]);
    let gn = prod(g, gv, "Gather")?;
    if attr_i(gn, "axis").unwrap_or(0) != 0 {
        return None;
    }
    let fl = prod(g, &gn.input[0], "Flatten")?;
    if attr_i(fl, "axis").unwrap_or(1) != 2 {
        return None;
    }
    let mut rw = fl.input[0].as_str();
    let mut unsq = None;
    if let Some(u) = prod(g, rw, "Unsqueeze") {
        let axes = if u.input.len() > 1 { g.const_i64(&u.input[1])? } else { attr_ints(u, "axes")? };
        if axes != [2] && axes != [-1] {
            return None;
        }
        unsq = Some(rw);
        rw = &u.input[0];
    }
    let add = prod(g, &gn.input[1], "Add")?;
    for (a, b) in [(0, 1), (1, 0)] {
        let Some(mul) = prod(g, &add.input[b], "Mul") else { continue };
        for (p, q) in [(0, 1), (1, 0)] {
            // q: k = Shape(RW or its unsqueeze)[1]
            let Some(kg) = prod(g, &mul.input[q], "Gather") else { continue };
            if g.const_i64(&kg.input[1]).as_deref() != Some(&[1]) {
                continue;
            }
            let Some(sh) = prod(g, &kg.input[0], "Shape") else { continue };
            if sh.input[0] != rw && Some(sh.input[0].as_str()) != unsq {
                continue;
            }
            let (nz1, c_tok) = where_coord(g, &mul.input[p])?;
            let (nz2, c_slot) = where_coord(g, &add.input[a])?;
            if nz1 != nz2 {
                return None;
            }
            return Some((rw.to_string(), nz1, c_tok, c_slot));
        }
    }
    None
}

/// The token rows of `nz`'s token coordinate: Gather(X, tok) or Reshape(Gather(Unsqueeze(X, 0), tok, axis=1)).
fn row_leaves(g: &GraphIndex, tok: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for &c in g.cons(tok) {
        let n = g.node(c);
        if n.op_type != "Gather" || n.input.get(1).map(String::as_str) != Some(tok) {
            continue;
        }
        match attr_i(n, "axis").unwrap_or(0) {
            0 => out.push((n.output[0].clone(), n.input[0].clone())),
            1 => {
                let Some(u) = prod(g, &n.input[0], "Unsqueeze") else { continue };
                let axes = if u.input.len() > 1 { g.const_i64(&u.input[1]) } else { attr_ints(u, "axes") };
                if axes.as_deref() != Some(&[0]) {
                    continue;
                }
                for &r in g.cons(&n.output[0]) {
                    let rn = g.node(r);
                    if rn.op_type == "Reshape" && is_rows_shape(g, &rn.input[1]) {
                        out.push((rn.output[0].clone(), u.input[0].clone()));
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// A reshape target of the form [-1, d] (constant or Concat(-1, dim)).
fn is_rows_shape(g: &GraphIndex, v: &str) -> bool {
    if let Some(c) = g.const_i64(v) {
        return c.len() == 2 && c[0] == -1;
    }
    if let Some(cat) = prod(g, v, "Concat") {
        return cat.input.len() == 2 && g.const_i64(&cat.input[0]).as_deref() == Some(&[-1]);
    }
    false
}

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
    let mut experts: Vec<Option<super::expr::ExpertMlp>> = Vec::new();
    // idx, rw, x, E, capacity: the same for every iteration
    type Common = (String, String, String, Option<usize>, Option<i64>);
    let mut common: Option<Common> = None;
    let mut n_hit: Option<usize> = None;
    for (it, &si) in chain.iter().enumerate() {
        let s = &steps[si];
        let fail = |m: String| format!("iteration {it} (scatter into '{}'): {m}", s.acc_out);
        // index: Expand(Unsqueeze(token, 1), ...)
        let ix = index_rows(g, &s.index, &s.update).map_err(&fail)?;
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
        let upd = update_value(g, &s.update, &s.acc_in).map_err(&fail)?;
        let mul = prod(g, upd, "Mul").ok_or_else(|| fail("the scattered value is not weighted by the router".into()))?;
        let mut found = None;
        for (a, b) in [(0, 1), (1, 0)] {
            if let Some((rw, nz2, ct, cs)) = routing_weight(g, &mul.input[b]) {
                if nz2 == nz && ct == c_tok && cs != c_tok && mask.axes[cs] == Axis::K {
                    found = Some((mul.input[a].clone(), rw));
                    break;
                }
            }
        }
        let (eo, rw) = found.ok_or_else(|| fail("no factor is the routing weight RW[token, slot] of this expert".into()))?;
        // token rows
        let leaves = row_leaves(g, tok);
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
        // weights of this expert belong to the mask's expert
        let wrefs = mlp.w_in.iter().map(|w| w.index).chain([mlp.w_out.index]).chain(mlp.b_in.iter().flatten().map(|b| b.index)).chain(mlp.b_out.iter().map(|b| b.index));
        for r in wrefs.flatten() {
            if r != mask.eref {
                return Err(fail(format!("weights indexed by expert {:?} but tokens of expert {:?}", r, mask.eref)));
            }
        }
        if let ERef::Hit(_) = mask.eref {
            let c = mask.hit_count.ok_or_else(|| fail("unknown iteration count".into()))?;
            if n_hit.is_some_and(|n| n != c) {
                return Err(fail("iterations split different hit lists".into()));
            }
            n_hit = Some(c);
        }
        let key = (mask.idx.clone(), rw.clone(), x.clone(), mask.experts, mask.capacity);
        match &common {
            None => common = Some(key),
            Some(c) if *c != key => return Err(fail("iterations read different routing tensors, rows or capacity".into())),
            _ => {}
        }
        let en = mask.eref.expert();
        if en < 0 {
            return Err(fail(format!("negative expert number {en}")));
        }
        let en = en as usize;
        if experts.len() <= en {
            experts.resize(en + 1, None);
        }
        if experts[en].is_some() {
            return Err(fail(format!("expert {en} appears twice")));
        }
        experts[en] = Some(mlp);
    }
    let (idx, rw, x, e_mask, capacity) = common.ok_or("empty chain")?;
    let e_count = match (e_mask, n_hit) {
        (Some(e), Some(h)) if e != h => return Err(format!("the loop has {h} iterations but the one-hot has {e} experts")),
        (Some(e), _) => e,
        (None, _) => router_experts(g, &idx).ok_or("cannot tell how many experts the router chooses from")?,
    };
    router_axis(g, &idx, e_count)?;
    router_axis(g, &rw, e_count)?;
    if experts.len() != e_count || experts.iter().any(Option::is_none) {
        let have: Vec<usize> = experts.iter().enumerate().filter(|(_, m)| m.is_some()).map(|(i, _)| i).collect();
        return Err(format!("the loop covers experts {have:?} of {e_count}"));
    }
    // the accumulator starts as zeros shaped like the rows
    let head = &steps[chain[0]];
    let zeros = prod(g, &head.acc_in, "ConstantOfShape").ok_or("accumulator is not zeros")?;
    let sh = prod(g, &zeros.input[0], "Shape").ok_or("accumulator shape is not taken from a tensor")?;
    if strip(g, &sh.input[0], &["Cast"]) != strip(g, &x, &["Cast"]) {
        return Err(format!("accumulator is shaped like '{}', not like the token rows '{x}'", sh.input[0]));
    }
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
    })
}

/// A routing tensor that a TopK or ArgMax makes must choose along the last axis, over the E
/// experts (where the router's width is known): any other axis picks tokens, not experts.
fn router_axis(g: &GraphIndex, v: &str, e: usize) -> Result<(), String> {
    let v = strip(g, v, &["Cast", "Identity"]);
    let Some((_, n)) = g.prod(v) else { return Ok(()) };
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
    if let Some(width) = router_experts(g, v) {
        if width != e {
            return Err(format!("the router's {} chooses among {width} values, not the {e} experts", n.op_type));
        }
    }
    Ok(())
}

/// E of a router `TopK(f(MatMul(x, W[d, E])))`, looking back through elementwise ops.
pub fn router_experts(g: &GraphIndex, idx: &str) -> Option<usize> {
    let (_, n) = g.prod(idx)?;
    if !(n.op_type == "TopK" || n.op_type == "ArgMax") {
        return None;
    }
    let mut cur = n.input[0].as_str();
    for _ in 0..16 {
        let (_, p) = g.prod(cur)?;
        match p.op_type.as_str() {
            "MatMul" => return g.const_dims(&p.input[1]).filter(|d| d.len() == 2).map(|d| d[1] as usize),
            "Gemm" => {
                let d = g.const_dims(&p.input[1]).filter(|d| d.len() == 2)?;
                return Some(if attr_i(p, "transB").unwrap_or(0) == 1 { d[0] } else { d[1] } as usize);
            }
            "Softmax" | "Sigmoid" | "Cast" | "Identity" | "Div" | "Mul" | "Add" | "Sub" | "LogSoftmax" => cur = &p.input[0],
            _ => return None,
        }
    }
    None
}
