//! One iteration of a per-expert loop, read from the graph: `torch.where`'s coordinates, the
//! expert mask (one-hot, `Equal`, or capacity-masked), the routing weight `RW[token, slot]` and the
//! token rows (the scatter step that adds it into the accumulator: [`super::scatter`]). [`super`]
//! puts the iterations of one chain together.

use std::collections::HashMap;

use super::super::expr::ERef;
use super::super::matcher::{axes_of, norm_axis, prod, rank_of};
use crate::onnx::graph::{attr_i, attr_ints, strip, GraphIndex};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Axis {
    T,
    K,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct MaskInfo {
    pub(super) idx: String,
    pub(super) eref: ERef,
    /// which routing axis each NonZero coordinate indexes
    pub(super) axes: [Axis; 2],
    pub(super) experts: Option<usize>,
    pub(super) capacity: Option<i64>,
    /// the mask stack [E, ., .] this iteration's mask is a slice of (one-hot form)
    pub(super) stack: Option<String>,
    /// how the hit list was split into unrolled iterations (Hit form)
    pub(super) hit_split: Option<HitSplit>,
}

/// The split of the list of hit experts `NonZero(Greater(ReduceSum(stack), 0))` into the unrolled
/// iterations of a traced loop.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct HitSplit {
    /// number of pieces (iterations)
    pub(super) count: usize,
    /// the pieces' sizes are given, all ones: the Split fails unless the list has `count` entries
    pub(super) sized: bool,
    /// the per-expert mask stack [E, ...] the list is reduced from, when it is summed over every
    /// axis but the expert axis (so the list holds exactly the experts that have assignments)
    pub(super) stack: Option<String>,
    /// the length of the counts the list is the NonZero of, where fixed: entry i of a list of
    /// distinct sorted positions below E is expert i only where it has E entries
    pub(super) of: Option<i64>,
}

/// The fixed length of the 1-D `counts` a hit list is taken from: from the shapes, or (where the
/// token axes are not known, as with a batch and a sequence axis) as the depth of the one-hot the
/// counts sum over every other axis of: `ReduceSum([Transpose(]OneHot(idx, D)[)], all axes but the
/// one-hot's, keepdims 0)`.
fn counts_len(g: &GraphIndex, counts: &str) -> Option<i64> {
    if let Some([d]) = crate::rewrite::prove::shape::shape_of(g, counts).as_deref() {
        return (d.t == 0).then_some(d.c);
    }
    let rs = prod(g, counts, "ReduceSum").filter(|n| attr_i(n, "keepdims") == Some(0))?;
    let (mut v, mut perm) = (rs.input[0].as_str(), None);
    if let Some(t) = prod(g, v, "Transpose") {
        perm = Some(attr_ints(t, "perm")?);
        v = &t.input[0];
    }
    // a one-hot along its last axis (its depth a constant or a dimension the shapes tell)
    let (idx, depth, None) = one_hot_like(g, v).ok()? else { return None };
    let r = rank_of(g, &idx)? as i64 + 1;
    // where the one-hot's axis is after the Transpose
    let at = match perm {
        Some(p) => p.iter().position(|&x| x == r - 1)? as i64,
        None => r - 1,
    };
    let mut axes: Vec<i64> = axes_of(g, rs)?.iter().map(|&x| if x < 0 { x + r } else { x }).collect();
    axes.sort_unstable();
    let others: Vec<i64> = (0..r).filter(|&x| x != at).collect();
    (axes == others).then_some(depth as i64)
}

/// `v` is coordinate c of the NonZero `nz`: Squeeze(Split(Transpose(nz))[c]) or Gather(Transpose(nz), c, axis=1).
pub(super) fn where_coord(g: &GraphIndex, v: &str) -> Option<(String, usize)> {
    let v = strip(g, v, &["Cast", "Identity"]);
    let (_, n) = g.prod(v)?;
    let (t, c) = match n.op_type.as_str() {
        "Squeeze" => {
            let axes = if n.input.len() > 1 { g.const_i64(&n.input[1])? } else { attr_ints(n, "axes")? };
            if axes != [1] && axes != [-1] {
                return None;
            }
            if let Some(sl) = prod(g, &n.input[0], "Slice") {
                // the dynamo exporter's column: Squeeze(Slice(Transpose(nz), [c], [c + 1], [1]), [1])
                let (starts, ends) = (g.const_i64(sl.input.get(1)?)?, g.const_i64(sl.input.get(2)?)?);
                let ax = g.const_i64(sl.input.get(3)?)?;
                let unit = sl.input.get(4).is_none_or(|st| st.is_empty() || g.const_i64(st).is_some_and(|v| v == [1]));
                if starts.len() != 1 || !(0..2).contains(&starts[0]) || ends != [starts[0] + 1] || (ax != [1] && ax != [-1]) || !unit {
                    return None;
                }
                let tr = prod(g, &sl.input[0], "Transpose")?;
                if attr_ints(tr, "perm").unwrap_or_else(|| vec![1, 0]) != [1, 0] {
                    return None;
                }
                let nz = prod(g, &tr.input[0], "NonZero")?;
                return Some((nz.output[0].clone(), starts[0] as usize));
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
pub(super) fn resolve_eref(g: &GraphIndex, v: &str, hit_counts: &mut HashMap<ERef, HitSplit>) -> Option<ERef> {
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
                if i.len() != 1 || attr_i(n, "axis").unwrap_or(0) != 0 {
                    return None;
                }
                // `for e in hits: e[0]` over the flattened hit list: entry i of it
                if let Some(counts) = flat_hit_list(g, &n.input[0]) {
                    let entries: Vec<i64> = g.cons(&n.input[0]).iter().filter_map(|&c| {
                        let c = g.node(c);
                        (c.op_type == "Gather" && attr_i(c, "axis").unwrap_or(0) == 0).then(|| g.const_i64(&c.input[1])).flatten().filter(|x| x.len() == 1).map(|x| x[0])
                    }).collect();
                    if i[0] < 0 {
                        return None;
                    }
                    let e = ERef::Hit(i[0] as usize);
                    // without sizes: the graph runs wherever at least as many experts are hit as
                    // it has entries (and drops the rest: refused below unless there are E)
                    hit_counts.insert(e, HitSplit { count: entries.len(), sized: false, stack: hit_stack(g, counts), of: counts_len(g, counts) });
                    return Some(e);
                }
                if i != [0] {
                    return None;
                }
                cur = &n.input[0];
            }
            "Split" => {
                if attr_i(n, "axis").unwrap_or(0) != 0 {
                    return None;
                }
                let count = n.output.len();
                let sized = n.input.len() > 1 && !n.input[1].is_empty();
                if sized {
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
                hit_counts.insert(e, HitSplit { count, sized, stack: hit_stack(g, &gr.input[0]), of: counts_len(g, &gr.input[0]) });
                return Some(e);
            }
            _ => return None,
        }
    }
    None
}

/// The hit list flattened: `Reshape(Transpose(NonZero(Greater(counts, 0))), [-1])` (the experts
/// with assignments, as a vector). Returns `counts`.
fn flat_hit_list<'g>(g: &GraphIndex<'g>, v: &str) -> Option<&'g str> {
    let r = prod(g, v, "Reshape")?;
    if g.const_i64(&r.input[1]).as_deref() != Some(&[-1]) {
        return None;
    }
    let tr = prod(g, &r.input[0], "Transpose")?;
    let nz = prod(g, &tr.input[0], "NonZero")?;
    let gr = prod(g, &nz.input[0], "Greater")?;
    (g.const_scalar(&gr.input[1]) == Some(0.0)).then_some(gr.input[0].as_str())
}

/// `ReduceSum(stack, axes)` over every axis of the rank-3 `stack` but the first (keepdims 0): the
/// per-expert counts of a mask stack [E, ., .]. Returns the stack.
fn hit_stack(g: &GraphIndex, counts: &str) -> Option<String> {
    let rs = prod(g, counts, "ReduceSum")?;
    if attr_i(rs, "keepdims").unwrap_or(1) != 0 || rank_of(g, &rs.input[0]) != Some(3) {
        return None;
    }
    let mut axes: Vec<usize> = axes_of(g, rs)?.into_iter().map(|a| norm_axis(a, Some(3))).collect::<Option<_>>()?;
    axes.sort();
    (axes == [1, 2]).then(|| rs.input[0].clone())
}

/// The one-hot routing mask `[T, K, E]` (optionally capacity-masked): (IDX, E, capacity).
pub(super) fn one_hot_like(g: &GraphIndex, v: &str) -> Result<(String, usize, Option<i64>), String> {
    let v = strip(g, v, &["Cast", "Identity"]);
    if let Some(oh) = prod(g, v, "OneHot") {
        if attr_i(oh, "axis").unwrap_or(-1) != -1 {
            return Err("OneHot is not along the last axis".into());
        }
        // a constant, or computed from a dimension the shapes tell (`routing_weights.shape[1] + 1`)
        let depth = match g.const_scalar(&oh.input[1]) {
            Some(c) => c as usize,
            None => super::super::routing::dims::sym(g, &oh.input[1]).filter(|d| d.t == 0 && d.c >= 1).ok_or("OneHot depth is not constant")?.c as usize,
        };
        let vals = g.const_f32(&oh.input[2]).ok_or("OneHot values are not constant")?;
        if vals != [0.0, 1.0] {
            return Err("OneHot values are not [0, 1]".into());
        }
        return Ok((oh.input[0].clone(), depth, None));
    }
    if prod(g, v, "Equal").is_some() {
        // the dynamo exporter's one_hot: Equal(Unsqueeze(IDX, -1), arange(E))
        let (idx, depth) = super::super::routing::one_hot(g, v).ok_or("the Equal mask is not a one-hot of the routing indices")?;
        return Ok((idx, depth as usize, None));
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
pub(super) fn is_k1(g: &GraphIndex, idx: &str) -> bool {
    if let Some(a) = prod(g, idx, "ArgMax") {
        return attr_i(a, "keepdims").unwrap_or(1) == 1;
    }
    if let Some(t) = prod(g, idx, "TopK") {
        return g.const_i64(&t.input[1]).is_some_and(|k| k == [1]);
    }
    false
}

pub(super) fn mask_of(g: &GraphIndex, nz: &str, hit_counts: &mut HashMap<ERef, HitSplit>) -> Result<MaskInfo, String> {
    let n = prod(g, nz, "NonZero").ok_or("not a NonZero")?;
    let m = strip(g, &n.input[0], &["Cast", "Identity"]);
    let (_, mn) = g.prod(m).ok_or("the mask is not computed")?;
    // Equal(IDX, e)
    if mn.op_type == "Equal" {
        for (a, b) in [(0, 1), (1, 0)] {
            if let Some(c) = g.const_i64(&mn.input[b]) {
                if c.len() == 1 {
                    return Ok(MaskInfo {
                        idx: mn.input[a].clone(),
                        eref: ERef::Const(c[0]),
                        axes: [Axis::T, Axis::K],
                        experts: None,
                        capacity: None,
                        hit_split: None,
                        stack: None,
                    });
                }
            }
        }
        // `idx == e` for e an entry of the hit list (transformers 4.5x's `for e in expert_hit`)
        for (a, b) in [(0, 1), (1, 0)] {
            if let Some(eref @ ERef::Hit(_)) = resolve_eref(g, &mn.input[b], hit_counts) {
                return Ok(MaskInfo {
                    idx: mn.input[a].clone(),
                    eref,
                    axes: [Axis::T, Axis::K],
                    experts: None,
                    capacity: None,
                    hit_split: hit_counts.get(&eref).cloned(),
                    stack: None,
                });
            }
        }
        return Err("Equal mask does not compare with a constant expert number or an entry of the hit list".into());
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
    let stack = Some(gat.input[0].clone());
    Ok(MaskInfo { idx, eref, axes: [ax(perm[1]), ax(perm[2])], experts: Some(e), capacity: cap, hit_split: hit_counts.get(&eref).cloned(), stack })
}

/// `RW[token, slot]` as a column: Gather(Flatten([Unsqueeze](RW), 2), slot + token * k).
pub(super) fn routing_weight(g: &GraphIndex, v: &str, c_tok: usize) -> Option<(String, String, usize, usize)> {
    let gv = strip(g, v, &["Reshape", "Unsqueeze", "Squeeze", "Cast", "Identity"]);
    // the flat index: Gather(flat, i), or the dynamo exporter's GatherND(flat, Unsqueeze(i, -1)) of
    // a rank-1 flat (the same gather)
    let (gn, flat_index) = match prod(g, gv, "GatherND") {
        Some(nd) if attr_i(nd, "batch_dims").unwrap_or(0) == 0 && prod(g, &nd.input[0], "Reshape").is_some_and(|r| g.const_i64(&r.input[1]).is_some_and(|t| t == [-1])) => {
            let u = prod(g, &nd.input[1], "Unsqueeze")?;
            let ax = axes_of(g, u)?;
            if (ax != [-1] && ax != [1]) || rank_of(g, &u.input[0]) != Some(1) {
                return None;
            }
            (nd, u.input[0].as_str())
        }
        Some(nd) => return routing_weight_nd(g, nd),
        None => {
            let gn = prod(g, gv, "Gather")?;
            if attr_i(gn, "axis").unwrap_or(0) != 0 {
                return None;
            }
            (gn, gn.input[1].as_str())
        }
    };
    // Flatten(Unsqueeze(RW, 2), 2) (TorchScript's w[tok, slot]), or Reshape(RW, [-1]) of RW [T, k]
    // (`w.reshape(-1)[tok * k + slot]`)
    let flat_src = match prod(g, &gn.input[0], "Flatten") {
        Some(fl) if attr_i(fl, "axis").unwrap_or(1) == 2 => fl.input[0].as_str(),
        Some(_) => return None,
        None => {
            let r = prod(g, &gn.input[0], "Reshape")?;
            if g.const_i64(&r.input[1])? != [-1] || rank_of(g, &r.input[0]) != Some(2) {
                return None;
            }
            r.input[0].as_str()
        }
    };
    let mut rw = flat_src;
    let mut unsq = None;
    if let Some(u) = prod(g, rw, "Unsqueeze") {
        let axes = if u.input.len() > 1 { g.const_i64(&u.input[1])? } else { attr_ints(u, "axes")? };
        if axes != [2] && axes != [-1] {
            return None;
        }
        unsq = Some(rw);
        rw = &u.input[0];
    }
    let add = prod(g, flat_index, "Add")?;
    for (a, b) in [(0, 1), (1, 0)] {
        let Some(mul) = prod(g, &add.input[b], "Mul") else { continue };
        for (p, q) in [(0, 1), (1, 0)] {
            // q: k = Shape(RW or its unsqueeze)[1], or a constant equal to RW's k
            let k_of_rw = match prod(g, &mul.input[q], "Gather") {
                Some(kg) => {
                    g.const_i64(&kg.input[1]).as_deref() == Some(&[1])
                        && prod(g, &kg.input[0], "Shape").is_some_and(|sh| sh.input[0] == rw || Some(sh.input[0].as_str()) == unsq)
                }
                None => g.const_scalar(&mul.input[q]).is_some_and(|k| {
                    super::super::prove::shape::shape_of(g, rw).and_then(|s| s.get(1).copied()).is_some_and(|d| d.t == 0 && d.c as f64 == k)
                }),
            };
            if !k_of_rw {
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
    // k = 1: TorchScript folds `tok * 1`, leaving `tok + slot` (slot is 0); RW must be [T, 1]
    let k1 = super::super::prove::shape::shape_of(g, rw).is_some_and(|s| s.len() == 2 && s[1].t == 0 && s[1].c == 1);
    if k1 && unsq.is_none() {
        for (a, b) in [(0, 1), (1, 0)] {
            let (Some((nz1, c1)), Some((nz2, c2))) = (where_coord(g, &add.input[a]), where_coord(g, &add.input[b])) else { continue };
            // the sum is symmetric: the token is the scatter's coordinate (`c_tok`), the other the slot
            if nz1 == nz2 && c1 == c_tok && c2 != c_tok {
                return Some((rw.to_string(), nz1, c1, c2));
            }
        }
    }
    None
}

/// The dynamo exporter's `RW[token, slot, None]`: GatherND(Unsqueeze(RW, -1), Concat(Unsqueeze(token,
/// -1), Unsqueeze(slot, -1)), batch_dims 0), one [1] row per assignment.
fn routing_weight_nd(g: &GraphIndex, gn: &onnx_protobuf::NodeProto) -> Option<(String, String, usize, usize)> {
    if attr_i(gn, "batch_dims").unwrap_or(0) != 0 {
        return None;
    }
    let u = prod(g, &gn.input[0], "Unsqueeze")?;
    let ax = axes_of(g, u)?;
    if ax != [2] && ax != [-1] {
        return None;
    }
    let rw = u.input[0].clone();
    let cat = prod(g, &gn.input[1], "Concat")?;
    if cat.input.len() != 2 || !matches!(attr_i(cat, "axis"), Some(-1) | Some(1)) {
        return None;
    }
    let col = |v: &str| -> Option<(String, usize)> {
        let cu = prod(g, v, "Unsqueeze")?;
        let a = axes_of(g, cu)?;
        if a != [1] && a != [-1] {
            return None;
        }
        where_coord(g, &cu.input[0])
    };
    let ((nz1, c_tok), (nz2, c_slot)) = (col(&cat.input[0])?, col(&cat.input[1])?);
    (nz1 == nz2).then_some((rw, nz1, c_tok, c_slot))
}

/// The token rows of `nz`'s token coordinate: Gather(X, tok) or Reshape(Gather(Unsqueeze(X, 0), tok, axis=1)).
pub(super) fn row_leaves(g: &GraphIndex, tok: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for &c in g.cons(tok) {
        let n = g.node(c);
        if n.op_type == "Unsqueeze" {
            out.extend(row_leaves_nd(g, n));
        }
        // the dynamo exporter's index_select(X, 0, token) flattens the (1-D) index first
        if n.op_type == "Reshape" && n.input[0] == tok && g.const_i64(&n.input[1]).as_deref() == Some(&[-1]) && rank_of(g, tok) == Some(1) {
            out.extend(row_leaves(g, &n.output[0]));
        }
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

/// The dynamo exporter's token rows, from `Unsqueeze(token, -1)` (`u`): `X[token]` as
/// GatherND(X, u), or `X[None, token]` as Reshape(Transpose(GatherND(Transpose(Unsqueeze(X, 0),
/// [1, 0, 2]), u), [1, 0, 2]), [-1, d]). (rows, X)
fn row_leaves_nd(g: &GraphIndex, u: &onnx_protobuf::NodeProto) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let ax = axes_of(g, u);
    if ax.as_deref() != Some(&[1]) && ax.as_deref() != Some(&[-1]) {
        return out;
    }
    let t102 = |n: &onnx_protobuf::NodeProto| n.op_type == "Transpose" && attr_ints(n, "perm").as_deref() == Some(&[1, 0, 2]);
    for &c in g.cons(&u.output[0]) {
        let n = g.node(c);
        if n.op_type != "GatherND" || n.input.get(1) != Some(&u.output[0]) || attr_i(n, "batch_dims").unwrap_or(0) != 0 {
            continue;
        }
        let src = &n.input[0];
        if rank_of(g, src) == Some(2) {
            out.push((n.output[0].clone(), src.clone()));
            continue;
        }
        // X[None, token]: the rows' axis moved first, gathered, moved back, flattened
        let Some((_, t1)) = g.prod(src).filter(|(_, t)| t102(t)) else { continue };
        let Some(x0) = prod(g, &t1.input[0], "Unsqueeze") else { continue };
        let a0 = axes_of(g, x0);
        if a0.as_deref() != Some(&[0]) {
            continue;
        }
        for &t2 in g.cons(&n.output[0]) {
            let t2 = g.node(t2);
            if !t102(t2) {
                continue;
            }
            for &r in g.cons(&t2.output[0]) {
                let rn = g.node(r);
                if rn.op_type == "Reshape" && is_rows_shape(g, &rn.input[1]) {
                    out.push((rn.output[0].clone(), x0.input[0].clone()));
                }
            }
        }
    }
    out
}

/// A reshape target of the form [-1, d] (constant or Concat(-1, dim)).
pub(super) fn is_rows_shape(g: &GraphIndex, v: &str) -> bool {
    if let Some(c) = g.const_i64(v) {
        return c.len() == 2 && c[0] == -1;
    }
    if let Some(cat) = prod(g, v, "Concat") {
        return cat.input.len() == 2 && g.const_i64(&cat.input[0]).as_deref() == Some(&[-1]);
    }
    false
}
