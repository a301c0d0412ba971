//! Megablocks-style MoE in plain torch ops: the assignments sorted by expert, each assignment's
//! token row placed in a per-expert bin, one batched MatMul per expert over the bins, the rows
//! read back, un-permuted and summed over k with the routing weights.
//!
//! Checked, with IDX [T, k] and RW [T, k] from the router and `flat = Reshape(IDX, [-1])`, each
//! step in any of the spellings [`super::routing`] reads:
//! - a sort `(s, order) = TopK(flat, len(flat), largest=0)` (`sort` or `argsort`; s may also be
//!   `flat[order]`): order is a permutation of the assignments;
//! - rows `X[order div k]` (the floor division in its exporter spellings, k the router's);
//! - a position p per sorted assignment such that the pairs (s[i], p[i]) are distinct and p lies
//!   in [0, N): the rank of assignment i among the earlier ones of its expert, computed by the
//!   slot algebra ([`super::slots::is_rank`]: a cumulative one-hot gathered at s, or any
//!   equivalent), or `i - starts[s[i]]` with `starts` the exclusive cumulative sum of the
//!   histogram of the assignments (OneHot + ReduceSum, ScatterElements add, bincount) over a
//!   sorted s;
//! - bins B [E, N, d] with N = len(flat) (so no expert overflows), `B[s[i], p[i]] = X[order[i]
//!   div k]` (ScatterND at coordinate pairs, or a row scatter at `s N + p` into [E N, d] reshaped);
//! - the experts `O[e] = MLP_e(B[e])` over stacked weights;
//! - the read-back `Ys[i] = O[s[i], p[i]]` (GatherND at the same pairs, or a row gather at
//!   `s N + p` of O flattened);
//! - the un-permutation `Yu[order[i]] = Ys[i]` (a row scatter at order, or a gather at the inverse
//!   permutation `argsort(order)`);
//! - `Y = sum_j RW[:, j] Reshape(Yu, [T, k, d])[:, j]` (Mul + ReduceSum, Einsum or batched MatMul).
//!
//! So Y[t] = sum_j RW[t, j] MLP_{IDX[t, j]}(X[t]): ScatterMoE(X, RW, IDX). Slots of the bins no
//! assignment fills are computed and never read.

use onnx_protobuf::NodeProto;

use super::emit::MoeLayer;
use super::expr::{to_mlp, ExprParser};
use super::matcher::{axes_of, prod, rank_of, shape_entries};
use super::prove::shape::{shape_of, Dim};
use super::routing::{
    coord_pair, floor_div, is_ones, is_zeros, nonneg, one_hot, row_gather, row_scatter, row_scatter_with, sort_by_order, sym, uncast, whole_length, Sort,
};
use super::slots::{is_rank, Ctx};
use super::Rejection;
use crate::onnx::graph::{attr_i, attr_s, GraphIndex};
use crate::spec::CapacityOrder;

mod blocks;
mod dims;

use dims::{last_entry, noop_expand, reshapes_to, same_shape, stride_of, zeros_like_of, Stride};

type R<T> = Result<T, String>;

/// A flat address `a = s * n + p` (Add and Mul in either order, n a dimension): (s, n, p).
fn flat_address<'g>(g: &GraphIndex<'g>, a: &'g str) -> Option<(&'g str, Stride<'g>, &'g str)> {
    let add = prod(g, a, "Add")?;
    for (m, p) in [(0, 1), (1, 0)] {
        let Some(mul) = prod(g, &add.input[m], "Mul") else { continue };
        for (s, n) in [(0, 1), (1, 0)] {
            if let (Some(st), None) = (stride_of(g, &mul.input[n]), stride_of(g, &mul.input[s])) {
                return Some((mul.input[s].as_str(), st, add.input[p].as_str()));
            }
        }
    }
    None
}

/// Addressing of one (expert, position) cell: the pair and, for a flat address, its row stride.
struct Cell<'g> {
    s: &'g str,
    p: &'g str,
    stride: Option<Stride<'g>>,
}

/// Bins filled with rows: `ScatterND(zeros [E, N, d], pairs (s, p), rows)`, or
/// `Reshape(row_scatter(zeros [E N, d], s n + p, rows), [E, N, d])`. (cell, rows, bins' shape)
fn bins_of<'g>(g: &GraphIndex<'g>, b: &'g str) -> Option<(Cell<'g>, &'g str, Vec<Dim>)> {
    let (_, n) = g.prod(b)?;
    let shape = shape_of(g, b).filter(|s| s.len() == 3)?;
    match n.op_type.as_str() {
        "ScatterND" if attr_s(n, "reduction").is_none_or(|r| r == "none") => {
            let (s, p) = coord_pair(g, &n.input[1])?;
            is_zeros(g, &n.input[0]).then_some((Cell { s, p, stride: None }, n.input[2].as_str(), shape))
        }
        "Reshape" => {
            let (base, a, rows) = row_scatter(g, &n.input[0])?;
            let (s, stride, p) = flat_address(g, a)?;
            is_zeros(g, base).then_some((Cell { s, p, stride: Some(stride) }, rows, shape))
        }
        _ => None,
    }
}

/// The read-back `Ys[i] = O[s[i], p[i]]`: GatherND at pairs, or a row gather of O flattened to
/// [E N, d] at `s n + p` (Flatten at axis 2, or a Reshape to a rank-2 shape whose last entry the
/// caller checks is O's width: the rank-2 target of an [E, N, d] value with last entry d is
/// [E N, d]). (O, cell, the Reshape's target)
fn readback<'g>(g: &GraphIndex<'g>, ys: &'g str) -> Option<(&'g str, Cell<'g>, Option<&'g str>)> {
    if let Some(gn) = prod(g, ys, "GatherND").filter(|n| attr_i(n, "batch_dims").unwrap_or(0) == 0) {
        if let Some((s, p)) = coord_pair(g, &gn.input[1]) {
            return Some((gn.input[0].as_str(), Cell { s, p, stride: None }, None));
        }
    }
    let (fl, a) = row_gather(g, ys)?;
    let (s, stride, p) = flat_address(g, a)?;
    let (o, target) = match g.prod(fl) {
        Some((_, n)) if n.op_type == "Flatten" && attr_i(n, "axis").unwrap_or(1) == 2 => (n.input[0].as_str(), None),
        Some((_, n)) if n.op_type == "Reshape" && shape_entries(g, &n.input[1]).is_some_and(|e| e.len() == 2) => {
            (n.input[0].as_str(), Some(n.input[1].as_str()))
        }
        _ => return None,
    };
    Some((o, Cell { s, p, stride: Some(stride) }, target))
}

/// The un-permutation: `Yu[order[i]] = Ys[i]` (a row scatter into zeros of Ys's shape) or
/// `Yu = Ys[argsort(order)]`. (order, Ys)
fn unpermute<'g>(g: &GraphIndex<'g>, yu: &'g str) -> Option<(&'g str, &'g str)> {
    // TorchScript's index_add: zeros_like(Ys) + (a scatter into zeros)
    let mut yu = yu;
    let mut like_ys = None;
    if let Some(a) = prod(g, yu, "Add") {
        for (z, x) in [(0, 1), (1, 0)] {
            if let Some(y) = zeros_like_of(g, &a.input[z]) {
                yu = a.input[x].as_str();
                like_ys = Some(y);
            }
        }
    }
    // order is a permutation (the caller checks it is a sort's): index_add into zeros copies
    if let Some((base, order, upd)) = row_scatter_with(g, yu, true) {
        let ys = noop_expand(g, upd);
        let ys = scatter_rows_reshape(g, ys, base, order).unwrap_or(ys);
        // zeros like Ys: every row is overwritten once order is a permutation of Ys's rows
        let same = shape_of(g, base).is_some() && shape_of(g, base) == shape_of(g, ys);
        let like = |y: Option<&str>| y.is_some_and(|y| same_shape(g, y) == same_shape(g, ys));
        let ok = is_zeros(g, base) && (same || like(zeros_like_of(g, base))) && (like_ys.is_none() || like(like_ys));
        return ok.then_some((order, ys));
    }
    let (ys, inv) = row_gather(g, yu).filter(|_| like_ys.is_none())?;
    // argsort(order) = TopK(order, len, largest = 0, sorted): the inverse permutation
    let (_, tk) = g.prod(inv).filter(|(_, n)| n.op_type == "TopK" && n.output[1] == inv)?;
    let ok = attr_i(tk, "largest") == Some(0) && attr_i(tk, "sorted").unwrap_or(1) != 0 && whole_length(g, &tk.input[1], &tk.input[0]);
    ok.then_some((tk.input[0].as_str(), ys))
}

/// TorchScript's `new_x[order] = ys`: the update reshaped to `[len(order)] + Shape(data)[1:]`, the
/// shape ScatterND requires of it. With data zeros like ys (checked by the caller), that is ys's own
/// shape whenever the graph runs (a ys of another row count makes ScatterND fail): y.
fn scatter_rows_reshape<'g>(g: &GraphIndex<'g>, v: &'g str, base: &str, order: &str) -> Option<&'g str> {
    let r = prod(g, v, "Reshape")?;
    let (rows, tail) = super::routing::rows_with_tail_of(g, &r.input[1])?;
    let from_base = tail == base || zeros_like_of(g, base).is_some_and(|y| y == tail);
    (uncast(g, rows) == uncast(g, order) && from_base).then(|| r.input[0].as_str())
}

/// The weighted sum over k ending at `n`: (RW, y3) with `Y[t] = sum_j RW[t, j] y3[t, j]` (a
/// float16 product may be widened to float32 before the sum, as the dynamo exporter writes it).
fn combine_of<'g>(g: &GraphIndex<'g>, n: &'g NodeProto) -> Option<(&'g str, &'g str)> {
    if !n.domain.is_empty() {
        return None;
    }
    match n.op_type.as_str() {
        "ReduceSum" if axes_of(g, n).is_some_and(|a| a == [1]) && attr_i(n, "keepdims") == Some(0) => {
            // a float16 sum accumulated in float32 (the dynamo exporter's): the op sums in its own type
            let m = prod(g, super::matcher::widened_16bit(g, &n.input[0]), "Mul")?;
            for (a, b) in [(0, 1), (1, 0)] {
                let Some(u) = prod(g, &m.input[b], "Unsqueeze") else { continue };
                // DeepSeek-V2's `.type(topk_weight.dtype)` casts the rows before the multiply
                if axes_of(g, u).is_some_and(|x| x == [-1] || x == [2]) && prod(g, uncast(g, &m.input[a]), "Reshape").is_some() {
                    return Some((u.input[0].as_str(), uncast(g, &m.input[a])));
                }
            }
            None
        }
        "Einsum" if n.input.len() == 2 => {
            let eq: String = attr_s(n, "equation")?.chars().filter(|c| !c.is_whitespace()).collect();
            let (lhs, out) = eq.split_once("->")?;
            let (a, b) = lhs.split_once(',')?;
            let (a, b, out): (Vec<char>, Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect(), out.chars().collect());
            for (w, y, wi, yi) in [(&a, &b, 0, 1), (&b, &a, 1, 0)] {
                if w.len() == 2 && y.len() == 3 && y[..2] == w[..] && out == [w[0], y[2]] && !w.contains(&y[2]) {
                    return Some((n.input[wi].as_str(), n.input[yi].as_str()));
                }
            }
            None
        }
        "Squeeze" if axes_of(g, n).is_some_and(|a| a == [1]) => {
            let mm = prod(g, &n.input[0], "MatMul")?;
            let u = prod(g, &mm.input[0], "Unsqueeze")?;
            axes_of(g, u).is_some_and(|a| a == [1]).then(|| (u.input[0].as_str(), mm.input[1].as_str()))
        }
        _ => None,
    }
}

pub fn find(g: &GraphIndex) -> (Vec<MoeLayer>, Vec<Rejection>) {
    let mut layers = Vec::new();
    let mut rejected = Vec::new();
    for n in &g.graph.node {
        let Some((rw, y3)) = combine_of(g, n) else { continue };
        // a candidate: what is summed over k is an un-permutation of per-assignment rows
        let Some(rs) = prod(g, y3, "Reshape") else { continue };
        let Some((order, ys)) = unpermute(g, &rs.input[0]) else { continue };
        let at = n.output[0].clone();
        match prove(g, n, rw, rs, order, ys) {
            Ok(l) => layers.push(l),
            Err(reason) => rejected.push(Rejection { family: "megablocks", at, reason }),
        }
    }
    (layers, rejected)
}

/// Whether `s` is the sort's values: its values output, or `flat[order]`.
fn is_sorted_values(g: &GraphIndex, s: &str, sort: &Sort) -> bool {
    let s = uncast(g, s);
    s == sort.values || row_gather(g, s).is_some_and(|(d, i)| uncast(g, d) == sort.flat && uncast(g, i) == sort.order)
}

fn prove(g: &GraphIndex, n: &NodeProto, rw: &str, rs: &NodeProto, order: &str, ys: &str) -> R<MoeLayer> {
    let sort = sort_by_order(g, uncast(g, order))
        .ok_or("the un-permutation's order is not a sort (TopK, largest=0, over the whole length) of the flattened routing indices")?;
    let tk = prod(g, &sort.idx, "TopK").filter(|t| t.output[1] == sort.idx).ok_or("the routing indices do not come from TopK")?;
    let k = g.const_i64(&tk.input[1]).filter(|v| v.len() == 1).ok_or("the router's k is not constant")?[0];
    if !super::matcher::is_last_axis(attr_i(tk, "axis").unwrap_or(-1), rank_of(g, &tk.input[0])) || rank_of(g, &sort.idx) != Some(2) {
        return Err("the router's TopK does not choose along the last axis of [T, E]".into());
    }
    // the read-back and the bins it reads, or per-expert blocks of the sorted rows
    let ys = same_shape(g, ys);
    if let Some((experts, rows)) = blocks::expert_blocks(g, ys, &sort.idx)? {
        return finish(g, n, rw, rs, &sort, k, &rows, experts);
    }
    let (o, rd, flat_target) = readback(g, ys).ok_or("the un-permuted rows are not read back from the expert outputs at (expert, position)")?;
    let mut bins: Vec<String> = Vec::new();
    for m in &g.graph.node {
        if bins_of(g, &m.output[0]).is_some() {
            bins.push(m.output[0].clone());
        }
    }
    let resolver = |_: &str| None;
    let mut p = ExprParser::new(g, bins, &resolver);
    p.batched_leaf = true;
    let e = p.parse(o)?;
    let b = p.matched_leaf.clone().ok_or("the experts read no per-expert bins")?;
    let d = p.d.ok_or("the experts read no linear layer of the bins")?;
    let mlp = to_mlp(&e, d)?;
    let experts = mlp.each_count(g).ok_or("the expert weights are not stacked over the expert axis")? as i64;
    let (wr, rows, bshape) = bins_of(g, &b).unwrap();
    // the bins: [E, N, d] with N the number of assignments, so that every position fits
    let flat_len = shape_of(g, &sort.flat).filter(|s| s.len() == 1).ok_or("cannot tell the number of assignments")?[0];
    if bshape[0] != Dim::fixed(experts) || bshape[1] != flat_len {
        return Err(format!("the bins are {bshape:?}, not [E = {experts}, assignments = {flat_len:?}, d]"));
    }
    // the experts keep the bins' [E, N] axes: O is [E, N, d]
    let keeps_width = |t: &str| match last_entry(g, t) {
        Some(Stride::Known(w)) => w == Dim::fixed(d as i64),
        Some(Stride::DimOf(v, axis)) => axis == 2 && uncast(g, v) == o,
        None => false,
    };
    if flat_target.is_some_and(|t| !keeps_width(t)) {
        return Err("the expert outputs are flattened to another width than d".into());
    }
    // a flat address's stride is the bin size: told, or read from the bins' or outputs' shape
    for (cell, what) in [(&wr, "bins are filled"), (&rd, "expert outputs are read")] {
        let ok = match cell.stride {
            None => true,
            Some(Stride::Known(n)) => n == bshape[1],
            Some(Stride::DimOf(v, axis)) => axis == 1 && (uncast(g, v) == o || uncast(g, v) == b),
        };
        if !ok {
            return Err(format!("the {what} at s * n + p with n not the bin size"));
        }
    }
    // the same cells are written and read
    let (s, pos) = (uncast(g, wr.s), uncast(g, wr.p));
    if uncast(g, rd.s) != s || uncast(g, rd.p) != pos {
        return Err("the expert outputs are read at other cells than the bins were filled".into());
    }
    if !is_sorted_values(g, s, &sort) {
        return Err("the bins' expert coordinate is not the sorted routing indices".into());
    }
    if !nonneg(g, s) {
        return Err("the expert coordinate may be negative".into());
    }
    positions(g, &sort, s, pos, experts)?;
    finish(g, n, rw, rs, &sort, k, rows, (0..experts as usize).map(|i| mlp.for_expert(i)).collect())
}

/// What both forms share after the experts: the rows are `X[order div k]`, the un-permuted rows are
/// reshaped to [T, k, d], the routing weights pair with the indices, the router has E columns.
#[allow(clippy::too_many_arguments)]
fn finish(g: &GraphIndex, n: &NodeProto, rw: &str, rs: &NodeProto, sort: &Sort, k: i64, rows: &str, mlps: Vec<super::expr::ExpertMlp>) -> R<MoeLayer> {
    let experts = mlps.len() as i64;
    let d = mlps.first().ok_or("no experts")?.d;
    // the rows: X[order div k]
    let (x, tok) = row_gather(g, same_shape(g, rows)).ok_or("the expert rows are not gathered token rows")?;
    // k = 1: the token is the assignment (torch writes no division)
    let (num, kk) = if uncast(g, tok) == sort.order { (uncast(g, tok), 1) } else { floor_div(g, tok).ok_or("the gathered tokens are not order div k")? };
    if num != uncast(g, &sort.order) {
        return Err("the gathered tokens do not follow the sort's order".into());
    }
    if kk != k {
        return Err(format!("tokens are order div {kk} but the router picks {k}"));
    }
    // Reshape(Yu, [T, k, d])
    let t = shape_of(g, &sort.idx).ok_or("cannot tell the routing indices' shape")?[0];
    if !reshapes_to(g, &rs.input[1], &[t, Dim::fixed(k), Dim::fixed(d as i64)]) {
        return Err("the un-permuted rows are not reshaped to [T, k, d]".into());
    }
    // the routing weights pair with the indices: one per assignment
    if let (Some(a), Some(b)) = (shape_of(g, rw), shape_of(g, &sort.idx)) {
        if a != b {
            return Err(format!("the routing weights have shape {a:?}, the indices {b:?}"));
        }
    }
    // OneHot drops, and ScatterND refuses, an index outside [0, E); the op refuses it too: the
    // router must have exactly E columns
    match super::routing::router_experts(g, &sort.idx) {
        Some(c) if c as i64 == experts => {}
        Some(c) => return Err(format!("the router chooses among {c} values, not the {experts} experts")),
        None => return Err("cannot tell that the router chooses among exactly the E experts".into()),
    }
    Ok(MoeLayer {
        family: "megablocks",
        x: x.to_string(),
        routing_weights: rw.to_string(),
        routing_indices: sort.idx.clone(),
        output: n.output[0].clone(),
        experts: mlps,
        capacity: None,
        capacity_order: CapacityOrder::SlotMajor,
        k: Some(k as usize),
        extra_nodes: Vec::new(),
        extra_inits: Vec::new(),
        quant: None,
    })
}

/// The bin positions: the rank of each sorted assignment among the earlier ones of its expert
/// (any spelling the slot algebra reads), or `i - starts[s[i]]` over the sorted s with `starts`
/// the exclusive cumulative histogram. Either way (s[i], p[i]) are distinct and p in [0, count).
fn positions(g: &GraphIndex, sort: &Sort, s: &str, p: &str, experts: i64) -> R<()> {
    let ctx = Ctx { idx: s, probs: None, experts };
    let rank = match is_rank(g, &ctx, p) {
        Ok(()) => return Ok(()),
        Err(e) => e,
    };
    let sub = prod(g, p, "Sub").ok_or_else(|| format!("the bin positions are neither ranks ({rank}) nor offsets into sorted bins"))?;
    let (ar, st) = (uncast(g, &sub.input[0]), &sub.input[1]);
    let r = prod(g, ar, "Range").ok_or("the bin positions are not arange(n) minus the bins' starts")?;
    if g.const_scalar(&r.input[0]) != Some(0.0) || g.const_scalar(&r.input[2]) != Some(1.0) || sym(g, &r.input[1]) != shape_of(g, &sort.flat).map(|s| s[0]) {
        return Err("the bin positions count from another arange than 0..len(assignments)".into());
    }
    if !sort.sorted {
        return Err("offsets into the bins need the assignments sorted (TopK sorted=1)".into());
    }
    let (starts, at) = row_gather(g, st).ok_or("the bins' starts are not gathered at the sorted experts")?;
    if uncast(g, at) != s {
        return Err("the bins' starts are gathered at other experts".into());
    }
    // starts = exclusive cumulative sum of the histogram
    let (cs, hist) = match g.prod(starts) {
        Some((_, n)) if n.op_type == "Sub" => {
            (prod(g, &n.input[0], "CumSum").filter(|c| c.input[0] == n.input[1] && attr_i(c, "exclusive").unwrap_or(0) == 0), n.input[1].as_str())
        }
        Some((_, n)) if n.op_type == "CumSum" && attr_i(n, "exclusive") == Some(1) => (Some(n), n.input[0].as_str()),
        _ => (None, ""),
    };
    let cs = cs.ok_or("the bins' starts are not the exclusive cumulative sum of a histogram")?;
    if attr_i(cs, "reverse").unwrap_or(0) != 0 || g.const_scalar(&cs.input[1]) != Some(0.0) {
        return Err("the bins' starts are summed backwards".into());
    }
    histogram(g, hist, sort, s, experts)
}

/// `h[e]` = the number of assignments of expert e: `ReduceSum(one_hot(f, E), 0)`, or
/// `ScatterElements(zeros[E], f, ones, axis 0, reduction add)` (torch's scatter_add and
/// bincount), with f the flattened indices or their sorted values.
fn histogram(g: &GraphIndex, h: &str, sort: &Sort, s: &str, experts: i64) -> R<()> {
    let h = uncast(g, h);
    let of_assignments = |f: &str| uncast(g, f) == sort.flat || uncast(g, f) == s;
    if let Some(rs) = prod(g, h, "ReduceSum") {
        let (f, e) = one_hot(g, &rs.input[0]).ok_or("the histogram sums something else than a one-hot of the experts")?;
        if !(of_assignments(&f) && e == experts && axes_of(g, rs).is_some_and(|a| a == [0]) && attr_i(rs, "keepdims") == Some(0)) {
            return Err("the histogram is not the one-hot of the assignments summed over them".into());
        }
        return Ok(());
    }
    let sc = prod(g, h, "ScatterElements").ok_or("the bins' starts are not computed from a histogram of the assignments")?;
    let zeros = |v: &str| g.const_i64(v).is_some_and(|z| z.len() == experts as usize && z.iter().all(|&x| x == 0)) || zeros_of_len(g, v, experts);
    if attr_s(sc, "reduction").as_deref() != Some("add")
        || attr_i(sc, "axis").unwrap_or(0) != 0
        || !zeros(&sc.input[0])
        || !of_assignments(&sc.input[1])
        || !is_ones(g, &sc.input[2])
    {
        return Err("the histogram is not ones added into E zeros at the assignments' experts".into());
    }
    Ok(())
}

/// `Expand(0, n)` / `ConstantOfShape(n)` zeros whose length is at least E (torch's bincount writes
/// `max(max(f) + 1, E)`): more bins than experts only add empty trailing bins.
fn zeros_of_len(g: &GraphIndex, v: &str, experts: i64) -> bool {
    if !is_zeros(g, v) {
        return false;
    }
    let (_, z) = g.prod(v).unwrap();
    let len = z.input.last().unwrap();
    if g.const_i64(len).is_some_and(|l| l == [experts]) {
        return true;
    }
    // Max(.., [E]): at least E; the counts of experts 0..E-1 are the same either way
    prod(g, len, "Max").is_some_and(|m| m.input.iter().any(|i| g.const_i64(i).is_some_and(|l| l == [experts])))
}

#[cfg(test)]
mod tests {
    use crate::onnx::tensor::make_tensor;
    use crate::rewrite::matcher::testing::{fixture, node_mut, rewrite};

    /// transformers 4.57's DeepSeek-V2: per-expert blocks of the sorted rows, sliced at the running
    /// sums of the expert counts; rewritten with the proof off. Blocks 1 and 2 concatenated in the
    /// other order (rows of expert 2 where expert 1's belong), or block 1 sliced at block 2's
    /// bounds, are refused.
    #[test]
    fn per_expert_blocks_of_the_sorted_rows() {
        let unproven = crate::rewrite::RewriteOptions { prove: false, ..Default::default() };
        let mut m = fixture("families/deepseek_v2_tf4_57");
        let r = crate::rewrite::rewrite_with(&mut m, &unproven).unwrap();
        assert_eq!(r.layers.len(), 1, "{}", r.text());
        assert_eq!(r.layers[0].experts, 4);

        let mut m = fixture("families/deepseek_v2_tf4_57");
        node_mut(&mut m, "Concat", "/m/Concat_1_output_0").input.swap(1, 2);
        let r = crate::rewrite::rewrite_with(&mut m, &unproven).unwrap();
        assert_eq!(r.layers.len(), 0);
        assert!(r.rejected.iter().any(|w| w.reason.contains("not those before it")), "{:?}", r.rejected);

        let mut m = fixture("families/deepseek_v2_tf4_57");
        let b2 = node_mut(&mut m, "Slice", "/m/Slice_2_output_0").input.clone();
        let s1 = node_mut(&mut m, "Slice", "/m/Slice_1_output_0");
        s1.input[1] = b2[1].clone();
        s1.input[2] = b2[2].clone();
        let r = crate::rewrite::rewrite_with(&mut m, &unproven).unwrap();
        assert_eq!(r.layers.len(), 0);
    }

    #[test]
    fn the_fixture_is_rewritten() {
        let mut m = fixture("megablocks");
        let (n, why) = rewrite(&mut m);
        assert_eq!(n, 1, "{why:?}");
    }

    /// torch's floor division `Where(cond, q - 1, q)`: with the condition's constant `false`
    /// turned `true`, odd assignment numbers read the previous token's row. The rule used to take
    /// any Where as the floor correction.
    #[test]
    fn a_changed_floor_division_condition_is_refused() {
        let mut m = fixture("megablocks");
        // the Xor's constant operand (Less(k, 0) folded by the exporter) becomes true
        let xor = node_mut(&mut m, "Xor", "/m/Xor").clone();
        let c = node_mut(&mut m, "Constant", &xor.input[1]);
        c.attribute[0].t.as_mut().unwrap().raw_data = vec![1];
        let (n, _) = rewrite(&mut m);
        assert_eq!(n, 0);
        // and with Not dropped (the condition is then "divides evenly")
        let mut m = fixture("megablocks");
        let not_in = node_mut(&mut m, "Not", "/m/Not").input[0].clone();
        let and = node_mut(&mut m, "And", "/m/And");
        and.input[1] = not_in;
        assert_eq!(rewrite(&mut m).0, 0);
    }

    /// An Expand of the bin coordinates to a shape other than their common shape changes which
    /// bins are filled; only Expands that provably keep the shape are looked through.
    #[test]
    fn a_changed_expand_shape_is_refused() {
        let mut m = fixture("megablocks");
        let g = m.proto.graph.mut_or_insert_default();
        g.initializer.push(make_tensor("mut/shape", crate::onnx::tensor::INT64, &[2], [1i64, 1].iter().flat_map(|x| x.to_le_bytes()).collect()));
        let e = node_mut(&mut m, "Expand", "/m/Expand_output_0");
        e.input[1] = "mut/shape".into();
        let (n, why) = rewrite(&mut m);
        assert_eq!(n, 0, "{why:?}");
    }

    /// Bins with fewer rows than there are assignments: an expert with many assignments would
    /// write past its bin.
    #[test]
    fn bins_smaller_than_the_assignments_are_refused() {
        let mut m = fixture("megablocks");
        let g = m.proto.graph.mut_or_insert_default();
        g.initializer.push(make_tensor("mut/two", crate::onnx::tensor::INT64, &[1], 2i64.to_le_bytes().to_vec()));
        let cat = g.node.iter_mut().find(|n| n.op_type == "Concat" && n.output[0] == "/m/Concat_output_0").unwrap();
        cat.input[1] = "mut/two".into();
        let (n, why) = rewrite(&mut m);
        assert_eq!(n, 0);
        assert!(why.iter().any(|w| w.contains("the bins are")), "{why:?}");
    }

    /// The hand-written spellings of the corpus in one family each: padded and flat bins, ranks
    /// and offsets, GatherND and flat read-back, every un-permutation (rewritten with the proof
    /// off: the rule alone).
    #[test]
    fn corpus_spellings_are_rewritten_by_the_rule_alone() {
        for name in ["megablocks_2", "megablocks_14", "megablocks_17", "megablocks_20", "megablocks_29", "megablocks_32", "megablocks_41"] {
            let mut m = fixture(&format!("spellings/{name}"));
            let r = crate::rewrite::rewrite_with(&mut m, &crate::rewrite::RewriteOptions { prove: false, ..Default::default() }).unwrap();
            assert_eq!(r.layers.len(), 1, "{name}: {:?}", r.rejected);
        }
    }

    /// Positions counted from 1 (the cumulative count without the - 1) leave slot 0 empty and put
    /// the last assignment of a full bin past its end.
    #[test]
    fn positions_off_by_one_are_refused() {
        let mut m = fixture("megablocks");
        let sub = node_mut(&mut m, "Sub", "/m/Sub_1_output_0").clone();
        let c = node_mut(&mut m, "Constant", &sub.input[1]);
        c.attribute[0].t.as_mut().unwrap().raw_data = 0i64.to_le_bytes().to_vec();
        let (n, why) = rewrite(&mut m);
        assert_eq!(n, 0);
        assert!(why.iter().any(|w| w.contains("bin positions")), "{why:?}");
    }
}
