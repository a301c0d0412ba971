//! JetMoE's grouped experts (transformers `JetMoeMoE`, and the expert projections of its
//! Mixture-of-Attention `JetMoeMoA`), as torch's dynamo exporter writes them.
//!
//! JetMoE sorts the T·k assignments by expert, gathers one row per assignment, splits the rows into
//! per-expert blocks (`ParallelExperts`: `Split` by the per-expert counts, one linear layer per
//! block, `Concat`), weights them and adds them back with `index_add`. Checked, with IDX [T, k] and
//! the router's TopK:
//! - `order = TopK(Reshape(IDX, [-1]), len, largest=0)[1]`: a sort of the assignments by expert;
//! - `tok = order div k` (integer Div, or the float trunc spelling `Floor(|q|) * Sign(q)`);
//! - rows gathered by `tok` (one token row per assignment) or by `order` (rows that are already one
//!   per assignment, [T·k, d_in], in (t, j) order);
//! - a grouped linear: `Concat_0(Lin_e(Split_0(rows, counts)[e]))`, counts[e] =
//!   `ReduceSum(ScatterElements(zeros[T, E], IDX, 1, axis=1), 0)[e]`: block e holds exactly the
//!   assignments of expert e (any order inside a block: every row is scattered back to its own
//!   place), and uses expert e's weight;
//! - for the MoE: an elementwise (gated) activation, then a second grouped linear over the same
//!   counts;
//! - optionally `* RW_flat[order][:, None]` (the routing weight of each assignment, RW [T, k]
//!   aligned with IDX: the router's TopK values through Softmax/Cast);
//! - `ScatterND(zeros, tok[:, None], ., reduction=add)` (sum over k into token rows) or
//!   `ScatterND(zeros, order[:, None], ., reduction=add)` (back to one row per assignment).
//!
//! The MoE form becomes one `ScatterMoE` (here); the single grouped linears of the MoA become
//! `ParallelLinear` nodes ([`super::moa`]).
//!
//! torch's TorchScript exporter writes the `index_add` as `ScatterElements` without a reduction
//! (a token's k rows overwrite each other, so that graph does not compute JetMoE) and the counts as
//! the traced constants: such candidates are reported, not rewritten.

use super::emit::MoeLayer;
use super::expr::{to_mlp, ERef, Expr, ExprParser, WSrc, BSrc};
use super::matcher::{axes_of, prod};
use super::prove::shape::{shape_of, Dim};
use super::routing::{shape_vector, zeros_shape};
use super::Rejection;
use crate::onnx::graph::{attr_i, strip, GraphIndex};
use crate::spec::CapacityOrder;

type R<T> = Result<T, String>;

pub const FAMILY: &str = "jetmoe";



/// `v = Unsqueeze(x, [-1 or 1])` (through Cast): x.
fn unsqueezed_last<'g>(g: &GraphIndex<'g>, v: &'g str) -> Option<&'g str> {
    let u = prod(g, strip(g, v, &["Cast"]), "Unsqueeze")?;
    let a = axes_of(g, u)?;
    (a == [1] || a == [-1]).then(|| strip(g, u.input[0].as_str(), &["Cast"]))
}

/// `Reshape(x, [-1])` (the shape constant, or torch's `shape[:0] + [-1]`): x.
fn flattened<'g>(g: &GraphIndex<'g>, v: &'g str) -> Option<&'g str> {
    let rs = prod(g, v, "Reshape")?;
    let flat = match g.const_i64(&rs.input[1]) {
        Some(s) => s == [-1],
        None => {
            // Concat(Slice(Shape(x), a, a), [-1])
            let c = prod(g, &rs.input[1], "Concat")?;
            c.input.len() == 2 && g.const_i64(&c.input[1]).is_some_and(|s| s == [-1]) && {
                let sl = prod(g, &c.input[0], "Slice");
                sl.is_some_and(|sl| {
                    let (s, e) = (g.const_i64(&sl.input[1]), g.const_i64(&sl.input[2]));
                    matches!((s, e), (Some(s), Some(e)) if s == e)
                })
            }
        }
    };
    flat.then_some(rs.input[0].as_str())
}

/// The routing shared by every grouped linear of one layer.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    /// the router's TopK indices [T, k]
    pub idx: String,
    /// the router's TopK values (what the routing weights are computed from)
    pub topk_values: String,
    pub k: i64,
    /// the sort of the flattened assignments by expert
    pub order: String,
}

/// `order = TopK(Reshape(IDX, [-1]), len(flat), largest=0)[1]`, IDX from a TopK with constant k
/// along its last axis.
fn routing_of(g: &GraphIndex, order: &str) -> R<Routing> {
    let (_, tk) = g.prod(order).filter(|(_, n)| n.op_type == "TopK").ok_or_else(|| format!("'{order}' is not a TopK sort"))?;
    if tk.output.get(1).map(String::as_str) != Some(order) || attr_i(tk, "largest").unwrap_or(1) != 0 || !matches!(attr_i(tk, "axis").unwrap_or(-1), 0 | -1) {
        return Err(format!("'{order}' is not the order of an ascending TopK sort along axis 0"));
    }
    let flat = tk.input[0].as_str();
    let idx = flattened(g, flat).ok_or_else(|| format!("the sorted experts '{flat}' are not the flattened routing indices"))?;
    // the sort keeps every assignment: K = Shape(flat)[0]
    let kv = strip(g, &tk.input[1], &["Unsqueeze", "Reshape", "Cast", "Squeeze"]);
    let kn = g.prod(kv).map(|(_, n)| n).ok_or("the sort length is not computed")?;
    let sh = match kn.op_type.as_str() {
        "Gather" => prod(g, &kn.input[0], "Shape").filter(|_| g.const_i64(&kn.input[1]).is_some_and(|i| i == [0] || i == [-1])),
        "Shape" => Some(kn),
        _ => None,
    };
    if !sh.is_some_and(|s| s.input[0] == flat && attr_i(s, "start").unwrap_or(0) == 0 && attr_i(s, "end").is_none_or(|e| e == 1 || e == -1)) {
        return Err("the sort does not keep every assignment (its length is not the number of assignments)".into());
    }
    let rt = prod(g, idx, "TopK").ok_or_else(|| format!("the routing indices '{idx}' do not come from a TopK"))?;
    if rt.output.get(1).map(String::as_str) != Some(idx) {
        return Err(format!("'{idx}' is not TopK's indices"));
    }
    let k = g.const_i64(&rt.input[1]).filter(|k| k.len() == 1).ok_or("the router's k is not constant")?[0];
    let axis = attr_i(rt, "axis").unwrap_or(-1);
    if !(axis == -1 || axis == 1) {
        return Err(format!("the router's TopK runs along axis {axis}"));
    }
    Ok(Routing { idx: idx.to_string(), topk_values: rt.output[0].clone(), k, order: order.to_string() })
}

/// `v = order div k`, truncating (integer Div, or `Floor(|q|) * Sign(q)` with q = order / k in
/// float): (order, k).
fn token_of(g: &GraphIndex, v: &str) -> Option<(String, i64)> {
    let v = strip(g, v, &["Cast"]);
    if let Some(d) = prod(g, v, "Div") {
        let k = g.const_scalar(&d.input[1])?;
        // an integer Div truncates; a float one would not be a token index
        let t = g.infer_type(&d.input[0])?;
        return (matches!(t, 6 | 7) && k >= 1.0 && k.fract() == 0.0).then(|| (strip(g, &d.input[0], &["Cast"]).to_string(), k as i64));
    }
    let m = prod(g, v, "Mul")?;
    for (a, b) in [(&m.input[0], &m.input[1]), (&m.input[1], &m.input[0])] {
        let (Some(fl), Some(sg)) = (prod(g, a, "Floor"), prod(g, b, "Sign")) else { continue };
        let ab = prod(g, &fl.input[0], "Abs")?;
        if ab.input[0] != sg.input[0] {
            return None;
        }
        let d = prod(g, &ab.input[0], "Div")?;
        let k = g.const_scalar(&d.input[1])?;
        if k < 1.0 || k.fract() != 0.0 {
            return None;
        }
        // the float cast of an index below 2^24 is exact, and so is trunc(i / k) then
        return Some((strip(g, &d.input[0], &["Cast"]).to_string(), k as i64));
    }
    None
}

/// counts[e] = ReduceSum(ScatterElements(zeros[T, E], IDX, 1, axis=1), axis 0)[e].
fn count_of(g: &GraphIndex, v: &str, idx: &str, e_count: usize) -> R<usize> {
    let mut cur = v;
    for _ in 0..8 {
        let (_, n) = g.prod(cur).ok_or_else(|| format!("split size '{cur}' is not computed from the routing"))?;
        match n.op_type.as_str() {
            "Reshape" | "Squeeze" | "Unsqueeze" | "Cast" | "Identity" => cur = &n.input[0],
            "Gather" if g.const_i64(&n.input[1]).is_some_and(|i| i == [0]) && attr_i(n, "axis").unwrap_or(0) == 0 => cur = &n.input[0],
            "Slice" => {
                let (s, e) = (g.const_i64(&n.input[1]), g.const_i64(&n.input[2]));
                let axes = if n.input.len() > 3 && !n.input[3].is_empty() { g.const_i64(&n.input[3]) } else { Some(vec![0]) };
                let steps_ok = n.input.len() <= 4 || n.input[4].is_empty() || g.const_i64(&n.input[4]).is_some_and(|s| s == [1]);
                let (Some(s), Some(e), Some(axes)) = (s, e, axes) else { return Err("a split size is a computed slice".into()) };
                if s.len() != 1 || e.len() != 1 || s[0] < 0 || Some(e[0]) != s[0].checked_add(1) || axes != [0] || !steps_ok {
                    return Err(format!("a split size is not one element of the expert counts ({s:?}..{e:?})"));
                }
                let rs = prod(g, &n.input[0], "ReduceSum").ok_or("the split sizes are not a sum over tokens")?;
                if axes_of(g, rs) != Some(vec![0]) || attr_i(rs, "keepdims").unwrap_or(1) != 0 {
                    return Err("the expert counts are not a sum over axis 0".into());
                }
                let sc = prod(g, strip(g, &rs.input[0], &["Cast"]), "ScatterElements").ok_or("the expert counts are not a sum of a one-hot mask")?;
                let axis = attr_i(sc, "axis").unwrap_or(0);
                let red = crate::onnx::graph::attr_s(sc, "reduction").unwrap_or_else(|| "none".into());
                if !(axis == 1 || axis == -1) || red != "none" || sc.input[1] != idx {
                    return Err("the expert counts' mask is not scattered from the routing indices along axis 1".into());
                }
                // updates: ones of IDX's shape; data: zeros [*, E]
                let ones = prod(g, &sc.input[2], "ConstantOfShape").ok_or("the count mask's updates are not ones")?;
                let one = ones.attribute.iter().find(|a| a.name == "value").and_then(|a| a.t.as_ref()).map(|t| crate::onnx::tensor::tensor_f32(t, None));
                if !matches!(one, Some(Ok(ref v)) if v == &[1.0]) {
                    return Err("the count mask's updates are not ones".into());
                }
                if !zeros_with_last(g, &sc.input[0], e_count as i64) {
                    return Err(format!("the count mask is not zeros [T, {e_count}]"));
                }
                return Ok(s[0] as usize);
            }
            op => return Err(format!("split size '{cur}' comes from {op}")),
        }
    }
    Err("split size chain too deep".into())
}

/// `v` is all zeros with last dimension `last`: Expand(0, Concat(..., [last])) or
/// ConstantOfShape(Concat(..., [last]), 0).
fn zeros_with_last(g: &GraphIndex, v: &str, last: i64) -> bool {
    let Some((_, n)) = g.prod(v) else { return false };
    let shape = match n.op_type.as_str() {
        "Expand" if g.const_scalar(&n.input[0]) == Some(0.0) && g.const_tensor(&n.input[0]).is_some_and(|t| crate::onnx::tensor::numel(&t.dims) == 1) => &n.input[1],
        "ConstantOfShape" => {
            // the default value is a float zero
            let z = n.attribute.iter().find(|a| a.name == "value").and_then(|a| a.t.as_ref());
            if z.is_some_and(|t| !matches!(crate::onnx::tensor::tensor_f32(t, None), Ok(ref v) if v == &[0.0])) {
                return false;
            }
            &n.input[0]
        }
        _ => return false,
    };
    if let Some(s) = g.const_i64(shape) {
        return s.last() == Some(&last);
    }
    prod(g, shape, "Concat").is_some_and(|c| c.input.last().and_then(|l| g.const_i64(l)).is_some_and(|l| l == [last]))
}

/// One linear layer per expert over consecutive row blocks.
#[derive(Debug, Clone)]
pub struct GroupedLinear {
    /// the rows that are split
    pub rows: String,
    /// the split sizes value
    pub sizes: String,
    pub w: Vec<WSrc>,
    pub b: Vec<Option<BSrc>>,
}

fn grouped_linear(g: &GraphIndex, concat: &str) -> R<GroupedLinear> {
    let c = prod(g, concat, "Concat").ok_or_else(|| format!("'{concat}' is not a Concat of expert blocks"))?;
    if attr_i(c, "axis") != Some(0) {
        return Err(format!("Concat '{concat}' is not along rows"));
    }
    let mut split: Option<&onnx_protobuf::NodeProto> = None;
    let eref = |v: &str| g.const_i64(v).filter(|c| c.len() == 1).map(|c| ERef::Const(c[0]));
    let (mut ws, mut bs) = (Vec::new(), Vec::new());
    for (e, part) in c.input.iter().enumerate() {
        let (_, lin) = g.prod(part).ok_or("an expert block is not computed")?;
        if !matches!(lin.op_type.as_str(), "MatMul" | "Gemm" | "Add") {
            return Err(format!("expert block {e} comes from {}, not a linear layer", lin.op_type));
        }
        // the block's rows: piece e of one Split along rows
        let mut p = ExprParser::new(g, vec![], &eref);
        let sp = {
            let mut cur = lin;
            while cur.op_type == "Add" {
                cur = g.prod(&cur.input[0]).map(|(_, n)| n).filter(|n| matches!(n.op_type.as_str(), "MatMul" | "Gemm")).ok_or("expert block is not a linear layer")?;
            }
            g.prod(&cur.input[0]).map(|(_, n)| n).filter(|n| n.op_type == "Split").ok_or_else(|| format!("expert block {e} does not read a Split of the rows"))?
        };
        if sp.output.get(e) != Some(&lin_input(g, lin)) {
            return Err(format!("expert block {e} does not read piece {e} of the Split"));
        }
        if attr_i(sp, "axis").unwrap_or(0) != 0 || sp.output.len() != c.input.len() {
            return Err("the rows are not split into one block per expert along rows".into());
        }
        match split {
            None => split = Some(sp),
            Some(s) if s.name == sp.name && s.output == sp.output => {}
            _ => return Err("the expert blocks read different Splits".into()),
        }
        p.leaves = vec![sp.output[e].clone()];
        let ex = p.parse(part)?;
        let Expr::Lin { x, w, b } = ex else { return Err(format!("expert block {e} is not one linear layer")) };
        if *x != Expr::Leaf {
            return Err(format!("expert block {e} is not one linear layer of its rows"));
        }
        for r in w.index.iter().chain(b.iter().filter_map(|b| b.index.as_ref())) {
            if *r != ERef::Const(e as i64) {
                return Err(format!("expert block {e} uses the weights of expert {:?}", r));
            }
        }
        ws.push(w);
        bs.push(b);
    }
    let sp = split.ok_or("no expert blocks")?;
    let sizes = sp.input.get(1).filter(|s| !s.is_empty()).ok_or("the Split has no sizes")?;
    if ws.iter().any(|w| w.out != ws[0].out || w.inp != ws[0].inp) {
        return Err("the experts' linear layers differ in shape".into());
    }
    Ok(GroupedLinear { rows: sp.input[0].clone(), sizes: sizes.clone(), w: ws, b: bs })
}

/// The input of a MatMul/Gemm (through a bias Add).
fn lin_input(g: &GraphIndex, n: &onnx_protobuf::NodeProto) -> String {
    let mut cur = n;
    while cur.op_type == "Add" {
        match g.prod(&cur.input[0]) {
            Some((_, m)) => cur = m,
            None => return String::new(),
        }
    }
    cur.input[0].clone()
}

/// The split sizes are the per-expert counts of `idx`.
fn check_counts(g: &GraphIndex, sizes: &str, idx: &str, e_count: usize) -> R<()> {
    if g.const_i64(sizes).is_some() {
        return Err("the expert blocks have constant sizes (the traced counts), so the graph only holds for the traced routing".into());
    }
    let c = prod(g, sizes, "Concat").ok_or("the split sizes are not a Concat of per-expert counts")?;
    if c.input.len() != e_count {
        return Err(format!("{} split sizes for {e_count} experts", c.input.len()));
    }
    for (e, v) in c.input.iter().enumerate() {
        let at = count_of(g, v, idx, e_count)?;
        if at != e {
            return Err(format!("block {e} has the size of expert {at}"));
        }
    }
    Ok(())
}

/// The scatter adds into zeros of exactly the output's shape: one row per token (the routing
/// indices' rows) or one per assignment (k times as many), each as wide as the projection. An
/// `index_add` onto any other value keeps that value in the sum, which the replacement does not
/// compute; more rows than that would be rows the replacement does not write.
fn check_base(g: &GraphIndex, data: &str, routing: &Routing, per_token: bool, width: usize) -> R<()> {
    let sh = zeros_shape(g, data).ok_or_else(|| format!("the rows are added into '{data}', which is not zeros (the replacement drops it)"))?;
    let dims = shape_vector(g, sh).ok_or_else(|| format!("cannot tell the shape of the zeros '{data}' the rows are added into"))?;
    let t = shape_of(g, &routing.idx).filter(|s| s.len() == 2).map(|s| s[0]).ok_or("cannot tell the token count of the routing indices")?;
    let rows = if per_token { t } else { Dim { t: t.t, c: t.c * routing.k } };
    let want = [rows, Dim::fixed(width as i64)];
    if dims != want {
        return Err(format!("the rows are added into zeros of shape {dims:?}, not {want:?} (the output's rows and width)"));
    }
    Ok(())
}

/// Rows gathered by `by`: Gather(X, by, axis 0) or GatherND(X, Unsqueeze(by, -1)). (X, by)
fn gathered<'g>(g: &GraphIndex<'g>, v: &str) -> Option<(&'g str, &'g str)> {
    let (_, n) = g.prod(v)?;
    match n.op_type.as_str() {
        "Gather" if attr_i(n, "axis").unwrap_or(0) == 0 => Some((&n.input[0], strip(g, &n.input[1], &["Cast"]))),
        "GatherND" if attr_i(n, "batch_dims").unwrap_or(0) == 0 => Some((&n.input[0], unsqueezed_last(g, &n.input[1])?)),
        _ => None,
    }
}

/// What a grouped region computes.
#[derive(Debug, Clone)]
pub enum Form {
    /// two grouped linears with an activation between, gated and summed over k: ScatterMoE
    Mlp(Vec<super::expr::ExpertMlp>),
    /// one grouped linear
    Linear(GroupedLinear),
}

/// One matched region, ending at `output` (a ScatterND add).
#[derive(Debug, Clone)]
pub struct Region {
    pub output: String,
    pub routing: Routing,
    pub form: Form,
    /// rows gathered: one row per token (`X` has T rows) or one per assignment (T·k rows, in (t, j) order)
    pub x: String,
    pub x_per_assignment: bool,
    /// routing weights [T, k] when the rows are weighted
    pub gates: Option<String>,
    /// the output has one row per assignment (scattered by `order`), else one per token
    pub out_per_assignment: bool,
    pub experts: usize,
}

/// Reads the region ending at ScatterND `n`.
pub fn region(g: &GraphIndex, n: &onnx_protobuf::NodeProto) -> R<Region> {
    let out = n.output[0].clone();
    let red = crate::onnx::graph::attr_s(n, "reduction").unwrap_or_else(|| "none".into());
    if red != "add" {
        return Err(format!("ScatterND reduction '{red}' is not add"));
    }
    let scat_by = unsqueezed_last(g, &n.input[1]).ok_or("the scatter indices are not one index per row")?;
    let upd = strip(g, &n.input[2], &["Expand"]);
    // optional gate: Mul(A, Unsqueeze(RW_flat[order], -1))
    let (body, gate) = match prod(g, upd, "Mul") {
        Some(m) => {
            let mut found = None;
            for (a, b) in [(&m.input[0], &m.input[1]), (&m.input[1], &m.input[0])] {
                if let Some(bg) = unsqueezed_last(g, b) {
                    if let Some((rwf, by)) = gathered(g, bg) {
                        found = Some((a.as_str(), rwf, by));
                        break;
                    }
                }
            }
            let (a, rwf, by) = found.ok_or("the expert outputs are multiplied by something other than a gathered routing weight")?;
            (a, Some((rwf, by)))
        }
        None => (upd, None),
    };
    let last = grouped_linear(g, body)?;
    let e_count = last.w.len();
    // the rows of the last grouped linear: gathered directly, or an activation of a first one
    let (first, mlp_expr) = if gathered(g, &last.rows).is_some() {
        (None, None)
    } else {
        // the activation reads one Concat of expert blocks
        let inner = find_concat(g, &last.rows).ok_or("the expert blocks' rows are neither gathered nor an activation of expert blocks")?;
        let first = grouped_linear(g, &inner)?;
        if first.sizes != last.sizes {
            return Err("the two projections split their rows by different sizes".into());
        }
        if first.w.len() != e_count {
            return Err("the two projections have different numbers of experts".into());
        }
        let eref = |_: &str| None;
        let mut p = ExprParser::new(g, vec![inner.clone()], &eref);
        p.d = Some(first.w[0].out);
        let h = p.parse(&last.rows)?;
        (Some(first), Some(h))
    };
    let rows_src = first.as_ref().map_or(last.rows.clone(), |f| f.rows.clone());
    let (x, by) = gathered(g, &rows_src).ok_or("the expert rows are not gathered")?;
    // routing: the sort behind whichever of by / scat_by is the order
    let by_tok = token_of(g, by);
    let scat_tok = token_of(g, scat_by);
    let order = match (&by_tok, &scat_tok) {
        (Some((o, _)), _) => o.clone(),
        (None, Some((o, _))) => o.clone(),
        _ => return Err("neither the gather nor the scatter goes through order div k".into()),
    };
    let routing = routing_of(g, &order)?;
    let check_index = |v: &str, tok: &Option<(String, i64)>| -> R<bool> {
        match tok {
            Some((o, k)) if *o == routing.order && *k == routing.k => Ok(true),
            Some(_) => Err("a token index divides another order or by another k".into()),
            None if v == routing.order => Ok(false),
            None => Err(format!("'{v}' is neither the sort order nor order div k")),
        }
    };
    let x_per_token = check_index(by, &by_tok)?;
    let out_per_token = check_index(scat_by, &scat_tok)?;
    check_counts(g, &last.sizes, &routing.idx, e_count)?;
    check_base(g, &n.input[0], &routing, out_per_token, last.w[0].out)?;
    let gates = match gate {
        Some((rwf, gby)) => {
            if gby != routing.order {
                return Err("the routing weights are gathered in another order".into());
            }
            let rw = flattened(g, rwf).ok_or("the gathered routing weights are not the flattened [T, k] weights")?;
            // aligned with IDX: computed from the same TopK's values
            let mut cur = rw;
            loop {
                if cur == routing.topk_values {
                    break;
                }
                let (_, p) = g.prod(cur).ok_or("the routing weights are not computed from the router's TopK")?;
                match p.op_type.as_str() {
                    "Cast" | "Identity" => cur = &p.input[0],
                    "Softmax" if matches!(attr_i(p, "axis").unwrap_or(-1), -1 | 1) => cur = &p.input[0],
                    op => return Err(format!("the routing weights come from {op}, not a Softmax of the router's TopK values")),
                }
            }
            Some(rw.to_string())
        }
        None => None,
    };
    if !out_per_token && gates.is_some() {
        return Err("weighted rows scattered back one per assignment".into());
    }
    let form = match (first, mlp_expr) {
        (Some(first), Some(h)) => {
            let d = first.w[0].inp;
            let mut experts = Vec::with_capacity(e_count);
            for e in 0..e_count {
                let lin_in = Expr::Lin { x: Box::new(Expr::Leaf), w: first.w[e].clone(), b: first.b[e].clone() };
                let he = substitute(&h, &lin_in);
                let full = Expr::Lin { x: Box::new(he), w: last.w[e].clone(), b: last.b[e].clone() };
                experts.push(to_mlp(&full, d)?);
            }
            Form::Mlp(experts)
        }
        _ => Form::Linear(last),
    };
    Ok(Region { output: out, routing, form, x: x.to_string(), x_per_assignment: !x_per_token, gates, out_per_assignment: !out_per_token, experts: e_count })
}

/// The Concat an elementwise activation of `v` reads (the first one found walking back).
fn find_concat(g: &GraphIndex, v: &str) -> Option<String> {
    let mut stack = vec![v.to_string()];
    let mut seen = 0;
    while let Some(cur) = stack.pop() {
        seen += 1;
        if seen > 64 {
            return None;
        }
        let (_, n) = g.prod(&cur)?;
        if n.op_type == "Concat" {
            return Some(cur);
        }
        for i in &n.input {
            if !i.is_empty() && g.const_tensor(i).is_none() && g.prod(i).is_some() {
                stack.push(i.clone());
            }
        }
    }
    None
}

fn substitute(e: &Expr, leaf: &Expr) -> Expr {
    match e {
        Expr::Leaf => leaf.clone(),
        Expr::Lin { x, w, b } => Expr::Lin { x: Box::new(substitute(x, leaf)), w: w.clone(), b: b.clone() },
        Expr::Slice { x, start, end, step } => Expr::Slice { x: Box::new(substitute(x, leaf)), start: *start, end: *end, step: *step },
        Expr::Op(o, a) => Expr::Op(o, a.iter().map(|x| substitute(x, leaf)).collect()),
        Expr::Const(c) => Expr::Const(*c),
        Expr::Clip { x, lo, hi } => Expr::Clip { x: Box::new(substitute(x, leaf)), lo: *lo, hi: *hi },
    }
}

/// Every grouped region of the graph (ScatterND add nodes that read expert blocks), matched or not.
pub fn regions(g: &GraphIndex) -> Vec<(String, R<Region>)> {
    let mut out = Vec::new();
    for n in &g.graph.node {
        if !n.domain.is_empty() {
            continue;
        }
        match n.op_type.as_str() {
            "ScatterND" => {
                // candidates: scattered updates that are (weighted) expert blocks
                let upd = strip(g, &n.input[2], &["Expand"]);
                if !reads_expert_blocks(g, upd) {
                    continue;
                }
                out.push((n.output[0].clone(), region(g, n)));
            }
            "ScatterElements" => {
                let upd = strip(g, &n.input[2], &["Expand"]);
                if reads_expert_blocks(g, upd) {
                    let red = crate::onnx::graph::attr_s(n, "reduction").unwrap_or_else(|| "none".into());
                    let why = if red == "none" {
                        "index_add written as ScatterElements without a reduction: a token's k rows overwrite each other, so the exported graph does not compute the expert sum".to_string()
                    } else {
                        format!("expert blocks scattered by ScatterElements (reduction '{red}'), a form this rule does not read")
                    };
                    out.push((n.output[0].clone(), Err(why)));
                }
            }
            _ => {}
        }
    }
    out
}

/// `v` is a Concat of expert blocks, possibly multiplied by something.
fn reads_expert_blocks(g: &GraphIndex, v: &str) -> bool {
    let is_blocks = |v: &str| prod(g, v, "Concat").is_some_and(|c| c.input.len() > 1 && attr_i(c, "axis") == Some(0) && c.input.iter().all(|i| g.prod(i).is_some_and(|(_, n)| matches!(n.op_type.as_str(), "MatMul" | "Gemm" | "Add"))));
    if is_blocks(v) {
        return true;
    }
    prod(g, v, "Mul").is_some_and(|m| m.input.iter().any(|i| is_blocks(i)))
}

/// The JetMoE MoE layers (two grouped linears with an activation): one ScatterMoE each.
pub fn find(g: &GraphIndex) -> (Vec<MoeLayer>, Vec<Rejection>) {
    let mut layers = Vec::new();
    let mut rejected = Vec::new();
    for (at, r) in regions(g) {
        match r {
            Ok(Region { form: Form::Mlp(experts), routing, x, x_per_assignment: false, gates: Some(rw), out_per_assignment: false, output, .. }) => {
                layers.push(MoeLayer {
                    family: FAMILY,
                    x,
                    routing_weights: rw,
                    routing_indices: routing.idx,
                    output,
                    experts,
                    capacity: None,
                    capacity_order: CapacityOrder::SlotMajor,
                    k: Some(routing.k as usize),
                    extra_nodes: vec![],
                    extra_inits: vec![],
                    quant: None,
                });
            }
            Ok(Region { form: Form::Mlp(_), .. }) => {
                rejected.push(Rejection { family: FAMILY, at, reason: "two grouped projections whose rows or output are not one per token with routing weights".into() })
            }
            // single grouped linears are the MoA's (super::moa)
            Ok(_) => {}
            Err(reason) => rejected.push(Rejection { family: FAMILY, at, reason }),
        }
    }
    (layers, rejected)
}
