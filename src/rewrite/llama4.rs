//! Llama-4's MoE block (transformers `Llama4TextMoe`): every expert runs on every token, and the
//! router's score multiplies the expert's *input*:
//!
//! ```text
//! P      = Sigmoid(ScatterElements(full(-inf, [T, E]), IDX, TopKValues, axis=1))   [T, E]
//! V      = Tile(X, [E, 1]) * Reshape(Transpose(P), [-1, 1])                         [E·T, d]
//! Y      = ReduceSum(Reshape(MLP_e(Reshape(V, [E, -1, d])), [E, -1, d]), axis 0)   [T, d]
//! ```
//!
//! with MLP_e the batched MatMuls over the stacks `gate_up_proj` [E, d, 2f] / `down_proj` [E, f, d]
//! (no biases). sigmoid(-inf) = 0 and MLP_e(0) = 0, so experts outside the top k add nothing:
//! `Y[t] = sum_j MLP_{IDX[t, j]}(sigmoid(v_tj) x_t)`. The shared expert stays as ONNX ops.
//! - k = 1 (Llama-4's configuration): `ScatterMoE(X * Sigmoid(TopKValues), ones, IDX)`.
//! - k > 1: each assignment has an input of its own, so every assignment is one row:
//!   `rows[t, j] = x_t * sigmoid(v_tj)` ([T, k, d], T·k tokens of the op), each routed to its one
//!   expert (`IDX` as [T, k, 1]) with weight 1, and the op's [T, k, d] result summed over k. The
//!   activation stays fused in the op; the only extra work is the k-fold row tensor and the sum.

use onnx_protobuf::NodeProto;

use super::dequant::weight_dims;
use super::emit::{op_result, MoeLayer};
use super::expr::{to_mlp, ERef, Expr, ExprParser, WSrc};
use super::matcher::{axes_of, prod};
use super::Rejection;
use crate::onnx::graph::{attr_i, attr_int, attr_ints, attr_ints_new, make_node, strip, GraphIndex};
use crate::onnx::tensor::{encode_f32, make_i64, make_tensor};
use crate::spec::CapacityOrder;

type R<T> = Result<T, String>;

pub const FAMILY: &str = "llama4";



/// Small integer values computed from shapes: constants, `Shape(P)[1]` (= E, P being the [T, E]
/// scores), Unsqueeze/Squeeze/Cast/Concat of those. None when anything else is involved.
fn ints(g: &GraphIndex, v: &str, p: &str, e: i64, depth: usize) -> Option<Vec<i64>> {
    if let Some(c) = g.const_i64(v) {
        return Some(c);
    }
    if depth > 8 {
        return None;
    }
    let (_, n) = g.prod(v)?;
    match n.op_type.as_str() {
        "Unsqueeze" | "Squeeze" | "Cast" | "Identity" => ints(g, &n.input[0], p, e, depth + 1),
        "Concat" => {
            let mut out = Vec::new();
            for i in &n.input {
                out.extend(ints(g, i, p, e, depth + 1)?);
            }
            Some(out)
        }
        "ConstantOfShape" => {
            // ones of a known length
            let len = ints(g, &n.input[0], p, e, depth + 1)?;
            let val = n.attribute.iter().find(|a| a.name == "value").and_then(|a| a.t.as_ref())?;
            let vals = crate::onnx::tensor::tensor_f32(val, None).ok()?;
            (len.len() == 1 && vals.len() == 1 && len[0] >= 0 && len[0] <= 8).then(|| vec![vals[0] as i64; len[0] as usize])
        }
        // the length of a vector whose values are known
        "Shape" if attr_i(n, "start").is_none() && attr_i(n, "end").is_none() => ints(g, &n.input[0], p, e, depth + 1).map(|v| vec![v.len() as i64]),
        "Gather" => {
            let s = prod(g, &n.input[0], "Shape")?;
            let i = g.const_i64(&n.input[1])?;
            (s.input[0] == p && (i == [1] || i == [-1]) && attr_i(s, "start").is_none()).then(|| vec![e])
        }
        _ => None,
    }
}

struct Scores {
    /// P [T, E]
    p: String,
    idx: String,
    values: String,
    k: i64,
}

/// P = Sigmoid(ScatterElements(full(-inf), IDX, VALUES, axis=1)) through Casts.
fn scores_of(g: &GraphIndex, v: &str) -> R<Scores> {
    let sg = prod(g, strip(g, v, &["Cast"]), "Sigmoid").ok_or("the expert inputs are not scaled by sigmoid scores")?;
    let sc = prod(g, strip(g, &sg.input[0], &["Cast"]), "ScatterElements").ok_or("the scores are not scattered top-k values")?;
    let red = crate::onnx::graph::attr_s(sc, "reduction").unwrap_or_else(|| "none".into());
    if !matches!(attr_i(sc, "axis").unwrap_or(0), 1 | -1) || red != "none" {
        return Err("the scores are not scattered along the expert axis".into());
    }
    let tk = prod(g, &sc.input[1], "TopK").ok_or("the scores' indices are not a TopK's")?;
    if tk.output.get(1) != Some(&sc.input[1]) || strip(g, &sc.input[2], &["Cast"]) != tk.output[0] {
        return Err("the scattered scores are not the TopK's own values at its indices".into());
    }
    if !matches!(attr_i(tk, "axis").unwrap_or(-1), 1 | -1) {
        return Err("the router's TopK is not along the expert axis".into());
    }
    let k = g.const_i64(&tk.input[1]).filter(|k| k.len() == 1).ok_or("the router's k is not constant")?[0];
    // the fill: -inf everywhere (sigmoid(-inf) = 0: experts outside the top k get a zero input)
    let fill = &sc.input[0];
    let (_, f) = g.prod(fill).ok_or("the score fill is not computed")?;
    let neg_inf = match f.op_type.as_str() {
        "Expand" => g.const_f32(&f.input[0]).is_some_and(|v| v.len() == 1 && v[0] == f32::NEG_INFINITY),
        "ConstantOfShape" => f
            .attribute
            .iter()
            .find(|a| a.name == "value")
            .and_then(|a| a.t.as_ref())
            .and_then(|t| crate::onnx::tensor::tensor_f32(t, None).ok())
            .is_some_and(|v| v.len() == 1 && v[0] == f32::NEG_INFINITY),
        _ => false,
    };
    if !neg_inf {
        return Err("the scores outside the top k are not -inf".into());
    }
    // the fill has the logits' shape: Shape(logits) of the TopK's input
    let shape_src = prod(g, &f.input[if f.op_type == "Expand" { 1 } else { 0 }], "Shape").ok_or("the score fill's shape is not the logits' shape")?;
    if shape_src.input[0] != tk.input[0] || attr_i(shape_src, "start").unwrap_or(0) != 0 || attr_i(shape_src, "end").is_some() {
        return Err("the score fill's shape is not the logits' shape".into());
    }
    Ok(Scores { p: v.to_string(), idx: tk.output[1].clone(), values: tk.output[0].clone(), k })
}

/// Reads the block ending at ReduceSum `n`.
fn block(g: &GraphIndex, n: &NodeProto) -> R<MoeLayer> {
    if axes_of(g, n) != Some(vec![0]) || attr_i(n, "keepdims").unwrap_or(1) != 0 {
        return Err("not a sum over the expert axis".into());
    }
    // Y_e = Reshape*(MatMul(H, down [E, f, d]))
    let mut cur = n.input[0].as_str();
    let mut reshapes = Vec::new();
    loop {
        if let Some(r) = prod(g, cur, "Reshape") {
            reshapes.push(r);
            cur = &r.input[0];
        } else if let Some(c) = prod(g, cur, "Cast") {
            // float16/bfloat16 blocks sum in float32
            if g.infer_type(&c.input[0]).is_none_or(|t| !matches!(t, 1 | 10 | 16)) || !matches!(attr_i(c, "to"), Some(1 | 10 | 16)) {
                return Err("the expert outputs are cast to a non-float type".into());
            }
            cur = &c.input[0];
        } else {
            break;
        }
    }
    let down = prod(g, cur, "MatMul").ok_or("the summed value is not a batched MatMul")?;
    let wd = weight_dims(g, &down.input[1]).filter(|d| d.len() == 3).ok_or("the second projection is not a stacked initializer [E, f, d]")?;
    let (e_count, f, d) = (wd[0], wd[1], wd[2]);
    let h_v = down.input[0].as_str();
    // the first projection: MatMul(V, gate_up [E, d, n]) with V [E, rows, d]
    let first = {
        let mut stack = vec![h_v.to_string()];
        let mut found = None;
        let mut seen = 0;
        while let Some(v) = stack.pop() {
            seen += 1;
            if seen > 64 {
                break;
            }
            let Some((_, p)) = g.prod(&v) else { continue };
            if p.op_type == "MatMul" && weight_dims(g, &p.input[1]).is_some_and(|dd| dd.len() == 3) {
                found = Some(p);
                break;
            }
            stack.extend(p.input.iter().filter(|i| !i.is_empty() && g.const_tensor(i).is_none() && weight_dims(g, i).is_none()).cloned());
        }
        found.ok_or("no batched first projection")?
    };
    let wg = weight_dims(g, &first.input[1]).unwrap();
    if wg[0] != e_count || wg[1] != d {
        return Err("the first projection is not a stacked initializer [E, d, n]".into());
    }
    let n_in = wg[2];
    // the activation between them
    let none = |_: &str| None;
    let mut p = ExprParser::new(g, vec![first.output[0].clone()], &none);
    p.d = Some(n_in as usize);
    // the leaf is per-expert bins [E, rows, n]: columns are its axis 2
    p.batched_leaf = true;
    let h = p.parse(h_v)?;
    // V = Reshape(Tile(X, [E, 1]) * Reshape(Transpose(P), [-1, 1]), [E, -1, d])
    let vr = prod(g, &first.input[0], "Reshape").ok_or("the expert inputs are not reshaped per expert")?;
    let mul = prod(g, &vr.input[0], "Mul").ok_or("the expert inputs are not scaled rows")?;
    let (mut x, mut scores) = (None, None);
    for (a, b) in [(&mul.input[0], &mul.input[1]), (&mul.input[1], &mul.input[0])] {
        let (Some(tile), Some(sr)) = (prod(g, a, "Tile"), prod(g, b, "Reshape")) else { continue };
        if g.const_i64(&sr.input[1]) != Some(vec![-1, 1]) {
            return Err("the scores are not one per row".into());
        }
        let tr = prod(g, &sr.input[0], "Transpose").ok_or("the scores are not expert-major")?;
        if attr_ints(tr, "perm").unwrap_or_else(|| vec![1, 0]) != [1, 0] {
            return Err("the scores' transpose is not [1, 0]".into());
        }
        let s = scores_of(g, &tr.input[0])?;
        if ints(g, &tile.input[1], &s.p, e_count, 0) != Some(vec![e_count, 1]) {
            return Err("the rows are not repeated once per expert".into());
        }
        // Expand by ones is the identity
        let mut xv = tile.input[0].as_str();
        if let Some(ex) = prod(g, xv, "Expand") {
            if !ints(g, &ex.input[1], &s.p, e_count, 0).is_some_and(|v| v.iter().all(|&i| i == 1)) {
                return Err("the rows are broadcast before the repeat".into());
            }
            xv = &ex.input[0];
        }
        x = Some(xv.to_string());
        scores = Some(s);
    }
    let (Some(x), Some(s)) = (x, scores) else { return Err("the expert inputs are not the repeated rows times the scores".into()) };
    if ints(g, &vr.input[1], &s.p, e_count, 0) != Some(vec![e_count, -1, d]) {
        return Err("the scaled rows are not reshaped to [E, -1, d]".into());
    }
    // the summed value: [E, rows, d] (one or two row-preserving reshapes)
    let last = reshapes.first().ok_or("the expert outputs are not reshaped per expert before the sum")?;
    if ints(g, &last.input[1], &s.p, e_count, 0).is_none_or(|v| v.len() != 3 || v[0] != e_count || v[1] != -1 || (v[2] != d && v[2] != -1)) {
        // TorchScript: [E, -1, Shape(.)[1]]; the last dimension is d whatever its spelling
        let c = prod(g, &last.input[1], "Concat").ok_or("the expert outputs are not reshaped to [E, -1, d]")?;
        let first_ok = c.input.len() == 3 && ints(g, &c.input[0], &s.p, e_count, 0) == Some(vec![e_count]) && g.const_i64(&c.input[1]) == Some(vec![-1]);
        if !first_ok {
            return Err("the expert outputs are not reshaped to [E, -1, d]".into());
        }
    }
    for r in &reshapes[1..] {
        if g.const_i64(&r.input[1]).is_none_or(|v| v != [-1, d]) {
            return Err("the expert outputs are reshaped other than by rows".into());
        }
    }
    if s.k < 1 || s.k > e_count {
        return Err(format!("the router's k = {} is not in 1..={e_count}", s.k));
    }
    let mut experts = Vec::new();
    for e in 0..e_count as usize {
        let w_in = WSrc { init: first.input[1].clone(), index: Some(ERef::Const(e as i64)), transposed: true, out: n_in as usize, inp: d as usize };
        let w_out = WSrc { init: down.input[1].clone(), index: Some(ERef::Const(e as i64)), transposed: true, out: d as usize, inp: f as usize };
        let he = subst(&h, &Expr::Lin { x: Box::new(Expr::Leaf), w: w_in, b: None });
        experts.push(to_mlp(&Expr::Lin { x: Box::new(he), w: w_out, b: None }, d as usize)?);
    }
    // X' = X * Sigmoid(values) in X's type; routing weights: ones
    let elem = g.infer_type(&x).ok_or("cannot tell the rows' element type")?;
    let tag = format!("{}_llama4", n.output[0]);
    let sig = format!("{tag}.score");
    let mut extra = vec![make_node("Sigmoid", "", &format!("{tag}/Sigmoid"), &[&s.values], &[&sig])];
    let sig_t = if g.infer_type(&s.values) == Some(elem) {
        sig
    } else {
        let c = format!("{tag}.score_cast");
        let mut n = make_node("Cast", "", &format!("{tag}/Cast"), &[&sig], &[&c]);
        n.attribute.push(attr_int("to", elem as i64));
        extra.push(n);
        c
    };
    let mut inits = Vec::new();
    let (xs, idx) = if s.k == 1 {
        let xs = format!("{tag}.scaled_rows");
        extra.push(make_node("Mul", "", &format!("{tag}/Mul"), &[&x, &sig_t], &[&xs]));
        (xs, s.idx.clone())
    } else {
        // rows [T, k, d] = X [T, 1, d] * scores [T, k, 1]; indices [T, k, 1]: one expert per row
        let (row_shape, col_shape) = (format!("{tag}.row_shape"), format!("{tag}.slot_shape"));
        inits.push(make_i64(&row_shape, &[3], &[-1, 1, d]));
        inits.push(make_i64(&col_shape, &[3], &[-1, s.k, 1]));
        let (xr, sr, xs, idx) = (format!("{tag}.rows"), format!("{tag}.score_column"), format!("{tag}.scaled_rows"), format!("{tag}.indices"));
        extra.push(make_node("Reshape", "", &format!("{tag}/Reshape_rows"), &[&x, &row_shape], &[&xr]));
        extra.push(make_node("Reshape", "", &format!("{tag}/Reshape_scores"), &[&sig_t, &col_shape], &[&sr]));
        extra.push(make_node("Mul", "", &format!("{tag}/Mul"), &[&xr, &sr], &[&xs]));
        extra.push(make_node("Reshape", "", &format!("{tag}/Reshape_indices"), &[&s.idx, &col_shape], &[&idx]));
        (xs, idx)
    };
    let shape = format!("{tag}.index_shape");
    extra.push(make_node("Shape", "", &format!("{tag}/Shape"), &[&idx], &[&shape]));
    let ones = format!("{tag}.ones");
    let mut cos = make_node("ConstantOfShape", "", &format!("{tag}/ConstantOfShape"), &[&shape], &[&ones]);
    let mut one = Vec::new();
    encode_f32(&[1.0], elem, &mut one);
    let mut a = onnx_protobuf::AttributeProto::new();
    a.name = "value".into();
    a.type_ = onnx_protobuf::attribute_proto::AttributeType::TENSOR.into();
    a.t = protobuf::MessageField::some(make_tensor("", elem, &[1], one));
    cos.attribute.push(a);
    extra.push(cos);
    // the op writes the rows' type: the sum itself, or the Cast back to the rows' type that
    // follows a float32 sum
    let sum = n.output[0].as_str();
    let output = if g.infer_type(sum) == Some(elem) {
        sum.to_string()
    } else {
        let cons = g.cons(sum);
        let cast = (cons.len() == 1).then(|| g.node(cons[0])).filter(|c| c.op_type == "Cast" && attr_i(c, "to") == Some(elem as i64) && !g.graph_outputs.contains(sum));
        cast.ok_or("the sum over experts is in another type than the rows and not cast back to it")?.output[0].clone()
    };
    if s.k > 1 {
        // the op's [T, k, d] result summed over the slots
        let mut sum = if g.opset >= 13 {
            let axes = format!("{tag}.slot_axis");
            inits.push(make_i64(&axes, &[1], &[1]));
            make_node("ReduceSum", "", &format!("{tag}/ReduceSum"), &[&op_result(&output), &axes], &[&output])
        } else {
            let mut r = make_node("ReduceSum", "", &format!("{tag}/ReduceSum"), &[&op_result(&output)], &[&output]);
            r.attribute.push(attr_ints_new("axes", &[1]));
            r
        };
        sum.attribute.push(attr_int("keepdims", 0));
        extra.push(sum);
    }
    Ok(MoeLayer {
        family: FAMILY,
        x: xs,
        routing_weights: ones,
        routing_indices: idx,
        output,
        experts,
        capacity: None,
        capacity_order: CapacityOrder::SlotMajor,
        // the router's k (the op sees one slot per row when k > 1)
        k: Some(s.k as usize),
        extra_nodes: extra,
        extra_inits: inits,
        quant: None,
    })
}

fn subst(e: &Expr, leaf: &Expr) -> Expr {
    match e {
        Expr::Leaf => leaf.clone(),
        Expr::Lin { x, w, b } => Expr::Lin { x: Box::new(subst(x, leaf)), w: w.clone(), b: b.clone() },
        Expr::Slice { x, start, end, step } => Expr::Slice { x: Box::new(subst(x, leaf)), start: *start, end: *end, step: *step },
        Expr::Op(o, a) => Expr::Op(o, a.iter().map(|x| subst(x, leaf)).collect()),
        Expr::Const(c) => Expr::Const(*c),
        Expr::Clip { x, lo, hi } => Expr::Clip { x: Box::new(subst(x, leaf)), lo: *lo, hi: *hi },
    }
}

/// Candidates: sums over axis 0 of a batched MatMul whose inputs are rows scaled by scattered
/// sigmoid scores.
pub fn find(g: &GraphIndex) -> (Vec<MoeLayer>, Vec<Rejection>) {
    let mut layers = Vec::new();
    let mut rejected = Vec::new();
    for n in &g.graph.node {
        if n.op_type != "ReduceSum" || !n.domain.is_empty() {
            continue;
        }
        // cheap filter: the summed value comes (through reshapes) from a MatMul with a rank-3 initializer
        let v = strip(g, &n.input[0], &["Reshape", "Cast"]);
        let Some(mm) = prod(g, v, "MatMul") else { continue };
        if weight_dims(g, &mm.input[1]).is_none_or(|d| d.len() != 3) {
            continue;
        }
        match block(g, n) {
            Ok(l) => layers.push(l),
            Err(reason) => {
                // only blocks scaled by router scores are this family's
                if !reason.starts_with("the expert inputs are not scaled") {
                    rejected.push(Rejection { family: FAMILY, at: n.output[0].clone(), reason });
                }
            }
        }
    }
    (layers, rejected)
}
