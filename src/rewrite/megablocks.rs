//! Megablocks-style MoE in plain torch ops: assignments sorted by expert, token rows gathered in
//! that order and scattered into padded per-expert bins, one batched MatMul per expert, results
//! gathered back, un-permuted and summed over k with the routing weights.
//!
//! Checked, with IDX [T, k] and RW [T, k] from the router and `flat = Reshape(IDX, [-1])`:
//! - `(sorted, order) = TopK(flat, len(flat), largest=0)`: a sort of the assignments by expert;
//! - `tok = order div k` (k the constant of the router's TopK);
//! - `pos = GatherElements(CumSum(OneHot(sorted, E), 0) - 1, sorted[:, None])`: the rank of each
//!   assignment among those of its expert, so (sorted, pos) pairs are distinct;
//! - `B = ScatterND(zeros[E, len(flat), d], [sorted, pos], X[tok])`: the bins;
//! - `O = MLP_e(B[e])` with stacked weights (batched MatMul over the expert axis);
//! - `Ys = Gather(Flatten(O), sorted * len(flat) + pos)`, i.e. O[sorted, pos];
//! - `Yu = ScatterElements(zeros, order, Ys)`: un-permuted, Yu[order[i]] = Ys[i];
//! - `Y = ReduceSum(Reshape(Yu, [T, k, d]) * RW[..., None], axis 1)`.
//!
//! So Y[t] = sum_j RW[t, j] MLP_{IDX[t, j]}(X[t]): ScatterMoE(X, RW, IDX).

use super::emit::MoeLayer;
use super::expr::{to_mlp, ExprParser};
use super::matcher::{axes_of, prod, strip_noop_expand};
use super::Rejection;
use crate::onnx::graph::{attr_i, strip, GraphIndex};
use crate::spec::CapacityOrder;

type R<T> = Result<T, String>;



/// `v = Unsqueeze(x, [axis])` (through Cast, and Expands that keep the shape, see
/// [`strip_noop_expand`]; `peers` are the values known to share x's shape): x.
fn unsqueezed<'g>(g: &GraphIndex<'g>, v: &'g str, axis: &[i64], peers: &[&str]) -> Option<&'g str> {
    let u = prod(g, strip_noop_expand(g, v, peers), "Unsqueeze")?;
    let a = axes_of(g, u)?;
    axis.contains(&a[0]).then(|| strip_noop_expand(g, u.input[0].as_str(), peers)).filter(|_| a.len() == 1)
}

struct Sort {
    flat: String,
    idx: String,
    sorted: String,
    order: String,
}

/// `sorted`/`order` from TopK(Reshape(IDX, [-1]), len, largest=0).
fn sort_of(g: &GraphIndex, sorted: &str) -> Option<Sort> {
    let (_, tk) = g.prod(sorted).filter(|(_, n)| n.op_type == "TopK")?;
    if tk.output[0] != sorted || attr_i(tk, "largest").unwrap_or(1) != 0 || attr_i(tk, "axis").unwrap_or(-1) != -1 && attr_i(tk, "axis") != Some(0) {
        return None;
    }
    let flat = tk.input[0].as_str();
    let rs = prod(g, flat, "Reshape")?;
    if g.const_i64(&rs.input[1])? != [-1] {
        return None;
    }
    // k = the whole length: Gather(Shape(flat), 0) (or Shape(flat) itself)
    let kv = strip(g, &tk.input[1], &["Unsqueeze", "Reshape", "Cast"]);
    let kg = g.prod(kv).map(|(_, n)| n)?;
    let sh = match kg.op_type.as_str() {
        "Gather" => prod(g, &kg.input[0], "Shape").filter(|_| g.const_i64(&kg.input[1]).is_some_and(|i| i == [0] || i == [-1]))?,
        "Shape" => kg,
        _ => return None,
    };
    if sh.input[0] != flat {
        return None;
    }
    Some(Sort { flat: flat.to_string(), idx: rs.input[0].clone(), sorted: tk.output[0].clone(), order: tk.output[1].clone() })
}

/// `v = order div k` (plain Div, or torch's floor-division Where/Sub/Div spelling): (order, k).
fn div_of(g: &GraphIndex, v: &str) -> Option<(String, i64)> {
    let v = strip(g, v, &["Cast"]);
    let div = if let Some(w) = prod(g, v, "Where") {
        // Where(cond, Div - 1, Div): equals Div only where cond is false everywhere
        let d = prod(g, &w.input[2], "Div")?;
        let s = prod(g, &w.input[1], "Sub")?;
        if s.input[0] != w.input[2] || g.const_scalar(&s.input[1]) != Some(1.0) {
            return None;
        }
        if !floor_fix_is_false(g, &w.input[0], &d.input[0], &d.input[1]) {
            return None;
        }
        d
    } else {
        prod(g, v, "Div")?
    };
    let k = g.const_scalar(&div.input[1])?;
    if k < 1.0 || k.fract() != 0.0 || !is_sort_order(g, &div.input[0]) {
        return None;
    }
    Some((div.input[0].clone(), k as i64))
}

/// Whether `v` is the second output of a TopK (indices, never negative).
fn is_sort_order(g: &GraphIndex, v: &str) -> bool {
    g.prod(v).is_some_and(|(_, n)| n.op_type == "TopK" && n.output.get(1).is_some_and(|o| o == v))
}

/// torch's floor-division correction `And(Xor(Less(num, 0), Less(k, 0)), Not(Equal(Mod(num, k), 0)))`
/// (the Xor's second operand folded to a constant), with num >= 0 (sort indices) and k > 0 a
/// constant: false everywhere. Any other condition could select `Div - 1`.
fn floor_fix_is_false(g: &GraphIndex, cond: &str, num: &str, k: &str) -> bool {
    let Some(kv) = g.const_scalar(k) else { return false };
    if kv <= 0.0 || !is_sort_order(g, num) {
        return false;
    }
    if g.const_i64(cond).is_some_and(|c| c.iter().all(|&x| x == 0)) {
        return true;
    }
    let Some(and) = prod(g, cond, "And") else { return false };
    [(0, 1), (1, 0)].into_iter().any(|(a, b)| {
        // the sign part: Xor(Less(num, 0), const false) or Xor(Less(num, 0), Less(k, 0))
        let sign_false = prod(g, &and.input[a], "Xor").is_some_and(|x| {
            [(0, 1), (1, 0)].into_iter().any(|(p, q)| {
                let num_neg = prod(g, &x.input[p], "Less").is_some_and(|l| l.input[0] == num && g.const_scalar(&l.input[1]) == Some(0.0));
                let k_neg_false = g.const_i64(&x.input[q]).is_some_and(|c| c.iter().all(|&v| v == 0))
                    || prod(g, &x.input[q], "Less").is_some_and(|l| l.input[0] == k && g.const_scalar(&l.input[1]) == Some(0.0));
                num_neg && k_neg_false
            })
        });
        // the remainder part must read the same numerator and divisor
        let rem = prod(g, &and.input[b], "Not")
            .and_then(|n| prod(g, &n.input[0], "Equal"))
            .is_some_and(|e| {
                [(0, 1), (1, 0)].into_iter().any(|(p, q)| {
                    g.const_scalar(&e.input[q]) == Some(0.0)
                        && prod(g, &e.input[p], "Mod").is_some_and(|m| m.input[0] == num && g.const_scalar(&m.input[1]) == Some(kv))
                })
            });
        sign_false && rem
    })
}

/// `pos = Squeeze(GatherElements(CumSum(OneHot(sorted, E), 0) - 1, Unsqueeze(sorted, 1), axis=1))`: E.
fn position_of(g: &GraphIndex, pos: &str, sorted: &str) -> Option<i64> {
    let sq = prod(g, pos, "Squeeze")?;
    if axes_of(g, sq)? != [1] {
        return None;
    }
    let ge = prod(g, &sq.input[0], "GatherElements")?;
    if attr_i(ge, "axis").unwrap_or(0) != 1 || unsqueezed(g, &ge.input[1], &[1, -1], &[sorted])? != sorted {
        return None;
    }
    let sub = prod(g, &ge.input[0], "Sub")?;
    if g.const_scalar(&sub.input[1])? != 1.0 {
        return None;
    }
    let cs = prod(g, &sub.input[0], "CumSum")?;
    if g.const_scalar(&cs.input[1])? != 0.0 || attr_i(cs, "exclusive").unwrap_or(0) != 0 || attr_i(cs, "reverse").unwrap_or(0) != 0 {
        return None;
    }
    let oh = prod(g, strip(g, &cs.input[0], &["Cast"]), "OneHot")?;
    if oh.input[0] != sorted || g.const_f32(&oh.input[2])? != [0.0, 1.0] || attr_i(oh, "axis").unwrap_or(-1) != -1 {
        return None;
    }
    g.const_scalar(&oh.input[1]).map(|e| e as i64)
}

pub fn find(g: &GraphIndex) -> (Vec<MoeLayer>, Vec<Rejection>) {
    let mut layers = Vec::new();
    let mut rejected = Vec::new();
    for n in &g.graph.node {
        if n.op_type != "ReduceSum" || !n.domain.is_empty() {
            continue;
        }
        // candidates: a sum over k of something un-permuted by a sort of routing indices
        let Some(mul) = prod(g, &n.input[0], "Mul") else { continue };
        let at = n.output[0].clone();
        match prove(g, n, mul) {
            Ok(Some(l)) => layers.push(l),
            Ok(None) => {}
            Err(reason) => rejected.push(Rejection { family: "megablocks", at, reason }),
        }
    }
    (layers, rejected)
}

fn prove(g: &GraphIndex, rsum: &onnx_protobuf::NodeProto, mul: &onnx_protobuf::NodeProto) -> R<Option<MoeLayer>> {
    // Y = ReduceSum(Reshape(Yu, [T, k, d]) * Unsqueeze(RW, -1), axis 1)
    let mut parts = None;
    for (a, b) in [(0, 1), (1, 0)] {
        if let (Some(rs), Some(rw)) = (prod(g, &mul.input[a], "Reshape"), unsqueezed(g, &mul.input[b], &[-1, 2], &[])) {
            parts = Some((rs, rw));
        }
    }
    let Some((rs, rw)) = parts else { return Ok(None) };
    let Some(yu_sc) = prod(g, &rs.input[0], "ScatterElements") else { return Ok(None) };
    // from here on this is a candidate
    if axes_of(g, rsum) != Some(vec![1]) || attr_i(rsum, "keepdims").unwrap_or(1) != 0 {
        return Err("the sum over k is not along axis 1".into());
    }
    if attr_i(yu_sc, "axis").unwrap_or(0) != 0 || crate::onnx::graph::attr_s(yu_sc, "reduction").is_some_and(|r| r != "none") {
        return Err("the un-permutation is not a row scatter".into());
    }
    // Expand(Unsqueeze(order, 1), S) repeats order[i] along row i; ScatterElements forces S to
    // the updates' shape, so any S keeps one row index per row
    let mut ui = yu_sc.input[1].as_str();
    if let Some(ex) = prod(g, ui, "Expand").filter(|ex| prod(g, &ex.input[0], "Unsqueeze").is_some()) {
        ui = ex.input[0].as_str();
    }
    let order_u = unsqueezed(g, ui, &[1, -1], &[]).ok_or("un-permutation indices are not one row index per row")?;
    // Ys = Reshape(Gather(Flatten(O, 2), sorted * n + pos))
    let ys = strip(g, &yu_sc.input[2], &["Reshape", "Cast"]);
    let gat = prod(g, ys, "Gather").ok_or("un-permuted rows are not gathered from the expert outputs")?;
    let fl = prod(g, &gat.input[0], "Flatten").ok_or("expert outputs are not flattened per (expert, slot)")?;
    if attr_i(fl, "axis").unwrap_or(1) != 2 {
        return Err("expert outputs are not flattened at axis 2".into());
    }
    let o = fl.input[0].clone();
    let add = prod(g, &gat.input[1], "Add").ok_or("rows are not addressed as expert * bin + position")?;
    let mut sp = None;
    for (a, b) in [(0, 1), (1, 0)] {
        if let Some(m) = prod(g, &add.input[b], "Mul") {
            for (p, q) in [(0, 1), (1, 0)] {
                // q: Gather(Shape(O), 1)
                let Some(kg) = prod(g, &m.input[q], "Gather") else { continue };
                let Some(sh) = prod(g, &kg.input[0], "Shape") else { continue };
                if sh.input[0] == o && g.const_i64(&kg.input[1]).is_some_and(|i| i == [1]) {
                    sp = Some((m.input[p].clone(), add.input[a].clone()));
                }
            }
        }
    }
    let (sorted, pos) = sp.ok_or("rows are not addressed as expert * bin size + position")?;
    let sort = sort_of(g, &sorted).ok_or("the expert order is not a TopK sort (largest=0) of the flattened routing indices")?;
    if order_u != sort.order {
        return Err("the un-permutation does not use the sort's order".into());
    }
    let e_pos = position_of(g, &pos, &sort.sorted).ok_or("bin positions are not the rank among the expert's assignments")?;
    // bins: B = ScatterND(zeros[E, n, d], Concat(sorted, pos), X[tok]), leaf of the expert MLP
    let mut bins = None;
    for n in &g.graph.node {
        if n.op_type != "ScatterND" || crate::onnx::graph::attr_s(n, "reduction").is_some_and(|r| r != "none") {
            continue;
        }
        let Some(cat) = prod(g, &n.input[1], "Concat") else { continue };
        if cat.input.len() != 2 || attr_i(cat, "axis") != Some(-1) && attr_i(cat, "axis") != Some(1) {
            continue;
        }
        // sorted and pos have the same shape (pos is read at each sorted entry)
        let peers = [sort.sorted.as_str(), pos.as_str()];
        if unsqueezed(g, &cat.input[0], &[-1, 1], &peers) == Some(sort.sorted.as_str())
            && unsqueezed(g, &cat.input[1], &[-1, 1], &peers) == Some(pos.as_str())
        {
            bins = Some(n);
        }
    }
    let bins = bins.ok_or("no per-expert bins are filled at (expert, position)")?;
    let zeros = prod(g, &bins.input[0], "ConstantOfShape").ok_or("the bins do not start as zeros")?;
    let zc = prod(g, &zeros.input[0], "Concat").ok_or("the bins' shape is not [E, n, d]")?;
    let e_bins = g.const_i64(&zc.input[0]).filter(|v| v.len() == 1).ok_or("the bins' expert count is not constant")?[0];
    // bin size n = len(flat) >= any expert's count
    let nb = strip(g, &zc.input[1], &["Unsqueeze", "Cast"]);
    let nbg = prod(g, nb, "Gather").ok_or("the bin size is not taken from the assignments")?;
    let nbs = prod(g, &nbg.input[0], "Shape").ok_or("the bin size is not taken from the assignments")?;
    if nbs.input[0] != sort.flat || g.const_i64(&nbg.input[1]).is_none_or(|i| i != [0] && i != [-1]) {
        return Err("the bins hold fewer rows than there are assignments".into());
    }
    let rows = strip(g, &bins.input[2], &["Reshape", "Cast"]);
    let rg = prod(g, rows, "Gather").ok_or("the bins are not filled with gathered token rows")?;
    if attr_i(rg, "axis").unwrap_or(0) != 0 {
        return Err("token rows gathered along another axis".into());
    }
    let x = rg.input[0].clone();
    let (ord, k) = div_of(g, &rg.input[1]).ok_or("the gathered tokens are not order div k")?;
    if ord != sort.order {
        return Err("the gathered tokens do not follow the sort's order".into());
    }
    // k of the router
    let tk = prod(g, &sort.idx, "TopK").filter(|n| n.output[1] == sort.idx).ok_or("the routing indices do not come from TopK")?;
    let k_router = g.const_i64(&tk.input[1]).filter(|v| v.len() == 1).ok_or("the router's k is not constant")?[0];
    if k != k_router {
        return Err(format!("tokens are order div {k} but the router picks {k_router}"));
    }
    // Reshape(Yu, [T, k, d]): middle dim k
    let shape_ok = g.const_i64(&rs.input[1]).map(|s| s.len() == 3 && s[1] == k).unwrap_or_else(|| {
        prod(g, &rs.input[1], "Concat").is_some_and(|c| c.input.len() == 3 && g.const_i64(&c.input[1]).is_some_and(|v| v == [k]))
    });
    if !shape_ok {
        return Err("the un-permuted rows are not reshaped to [T, k, d]".into());
    }
    // the experts: O = MLP_e(bins[e])
    let resolver = |_: &str| None;
    let mut p = ExprParser::new(g, vec![bins.output[0].clone()], &resolver);
    p.batched_leaf = true;
    let e = p.parse(&o)?;
    let d = p.d.ok_or("the experts read no linear layer of the bins")?;
    let mlp = to_mlp(&e, d)?;
    let e_count = mlp.each_count(g).ok_or("the expert weights are not stacked over the expert axis")?;
    if e_count as i64 != e_bins || e_count as i64 != e_pos {
        return Err(format!("bins for {e_bins} experts, positions over {e_pos}, weights for {e_count}"));
    }
    Ok(Some(MoeLayer {
        family: "megablocks",
        x,
        routing_weights: rw.to_string(),
        routing_indices: sort.idx,
        output: rsum.output[0].clone(),
        experts: (0..e_count).map(|i| mlp.for_expert(i)).collect(),
        capacity: None,
        capacity_order: CapacityOrder::SlotMajor,
        k: Some(k as usize),
        extra_nodes: Vec::new(),
        extra_inits: Vec::new(),
    }))
}

#[cfg(test)]
mod tests {
    use crate::onnx::tensor::make_tensor;
    use crate::rewrite::matcher::testing::{fixture, node_mut, rewrite};

    #[test]
    fn the_fixture_is_rewritten() {
        let mut m = fixture("megablocks");
        assert_eq!(rewrite(&mut m).0, 1);
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
}
