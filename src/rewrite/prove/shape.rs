//! Shapes of the values at a region's boundary, in terms of the token count T, so that the proof
//! can feed inputs of the right shape at any T. The fixtures (TorchScript exports) carry no
//! value_info, so the shape is read from declarations where there are any and otherwise from
//! the producers, for the ops that build the values a MoE region reads (token rows, router
//! outputs, shape chains). An op not listed makes the shape unknown: the proof then says so.

use std::cell::RefCell;
use std::collections::HashMap;

use crate::onnx::graph::{attr_i, attr_ints, GraphIndex};
use onnx_protobuf::type_proto;

/// One dimension: `c * T^t` (t is 0 or 1: a dimension is either fixed or a multiple of T).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dim {
    pub t: u8,
    pub c: i64,
}

impl Dim {
    pub const fn fixed(c: i64) -> Self {
        Dim { t: 0, c }
    }
    pub const TOKENS: Dim = Dim { t: 1, c: 1 };
    pub fn at(self, tokens: usize) -> usize {
        (self.c as usize) * if self.t == 1 { tokens } else { 1 }
    }
}

pub type Shape = Vec<Dim>;

/// `[T, 2]`, `[4, 32, 2]`, `[2*T, 8]`: a shape as the proof's messages print it.
pub fn text(s: &Shape) -> String {
    let d: Vec<String> = s
        .iter()
        .map(|d| match (d.t, d.c) {
            (0, c) => c.to_string(),
            (_, 1) => "T".to_string(),
            (_, c) => format!("{c}*T"),
        })
        .collect();
    format!("[{}]", d.join(", "))
}

thread_local! {
    /// The shapes of every value a node of one graph (by [`GraphIndex::id`]) produces, computed
    /// once in topological order: each value is then told from its inputs' stored shapes, so a
    /// value deep in a whole LM is told as cheaply as one near its inputs.
    static MEMO: RefCell<(u64, HashMap<String, Option<Shape>>)> = RefCell::new((u64::MAX, HashMap::new()));
}

fn ensure(g: &GraphIndex) {
    if MEMO.with(|m| m.borrow().0 == g.id) {
        return;
    }
    MEMO.with(|m| {
        let mut m = m.borrow_mut();
        m.0 = g.id;
        m.1.clear();
    });
    for &i in &g.topo {
        for o in g.node(i).output.iter().filter(|o| !o.is_empty()) {
            let s = infer(g, o, 0);
            MEMO.with(|m| m.borrow_mut().1.insert(o.clone(), s));
        }
    }
}

fn memo(v: &str) -> Option<Option<Shape>> {
    MEMO.with(|m| m.borrow().1.get(v).cloned())
}

/// The shape of `v`, or None when it cannot be told.
pub fn shape_of(g: &GraphIndex, v: &str) -> Option<Shape> {
    ensure(g);
    infer(g, v, 0)
}

fn declared(g: &GraphIndex, v: &str) -> Option<Shape> {
    if let Some(t) = g.const_tensor(v) {
        return Some(t.dims.iter().map(|&d| Dim::fixed(d)).collect());
    }
    let vi = g.declared.get(v)?;
    let Some(type_proto::Value::TensorType(tt)) = vi.type_.as_ref()?.value.as_ref() else {
        return None;
    };
    let s = tt.shape.as_ref()?;
    let mut syms = 0;
    let out: Option<Shape> = s
        .dim
        .iter()
        .map(|d| {
            if d.has_dim_value() {
                Some(Dim::fixed(d.dim_value()))
            } else {
                syms += 1;
                symbolic(d.dim_param())
            }
        })
        .collect();
    // one symbolic axis is the token axis; two (batch, sequence) would make T ambiguous
    out.filter(|_| syms <= 1)
}

/// A symbolic dimension in terms of T: a product of names (`S`, onnxruntime-genai's
/// `batch_size * sequence_length`) is the token count, times its integer factors (the dynamo
/// exporter's `2*S`); a sum or any other expression (or none) is not told, nor is a name ONNX's
/// shape inference made up for a size it could not tell (`unk__5`: the dynamo exporter declares
/// a flattened [T k] so, and it is not T).
fn symbolic(p: &str) -> Option<Dim> {
    let made_up = |x: &str| x.strip_prefix("unk__").is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()));
    let name = |x: &str| {
        !x.is_empty() && x.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') && !x.starts_with(|c: char| c.is_ascii_digit()) && !made_up(x)
    };
    let (mut c, mut names) = (1i64, 0);
    for f in p.split('*').map(str::trim) {
        if let Ok(x) = f.parse::<i64>() {
            c = c.checked_mul(x)?;
        } else if name(f) {
            names += 1;
        } else {
            return None;
        }
    }
    (names > 0 && c > 0).then_some(Dim { t: 1, c })
}

fn broadcast(a: &Shape, b: &Shape) -> Option<Shape> {
    let n = a.len().max(b.len());
    let mut out = vec![Dim::fixed(1); n];
    for i in 0..n {
        let x = if i + a.len() >= n { a[i + a.len() - n] } else { Dim::fixed(1) };
        let y = if i + b.len() >= n { b[i + b.len() - n] } else { Dim::fixed(1) };
        out[i] = if x == Dim::fixed(1) {
            y
        } else if y == Dim::fixed(1) || x == y {
            x
        } else {
            return None;
        };
    }
    Some(out)
}

fn norm_axis(a: i64, rank: usize) -> Option<usize> {
    let r = rank as i64;
    let a = if a < 0 { a + r } else { a };
    (0..r).contains(&a).then_some(a as usize)
}

/// The `axes` of a Reduce/Squeeze/Unsqueeze node: `Some(None)` when it has none (the op's
/// default), `Some(Some(axes))` when they are an attribute or a constant input, None when an
/// input computes them (the shape then cannot be told).
fn axes(g: &GraphIndex, n: &onnx_protobuf::NodeProto) -> Option<Option<Vec<i64>>> {
    if let Some(a) = attr_ints(n, "axes") {
        return Some(Some(a));
    }
    match n.input.get(1).filter(|s| !s.is_empty()) {
        None => Some(None),
        Some(a) => Some(Some(g.const_i64(a)?)),
    }
}

/// A declared shape of `v` (value_info, an input or output of the graph) that its producer,
/// over its inputs' shapes, contradicts: another rank, or another size of an axis both tell.
/// A hand-edited graph keeps the declarations of the values it rewired; ONNX Runtime computes
/// the shapes again, so a proof fed the declared ones would not see the graph ONNX Runtime runs.
/// Returns (declared, computed).
pub fn stale_declaration(g: &GraphIndex, v: &str) -> Option<(Shape, Shape)> {
    ensure(g);
    if g.const_tensor(v).is_some() {
        return None;
    }
    let d = declared(g, v)?;
    let p = produced(g, v, 0)?;
    // a fixed size against a multiple of T is a contradiction only where no token count makes
    // them equal (traced exports declare the traced length where the graph computes T)
    let never_equal = |f: Dim, t: Dim| t.c <= 0 || f.c % t.c != 0 || f.c < t.c;
    let differ = d.len() != p.len()
        || d.iter().zip(&p).any(|(&a, &b)| match (a.t, b.t) {
            (x, y) if x == y => a.c != b.c,
            (0, _) => never_equal(a, b),
            _ => never_equal(b, a),
        });
    differ.then_some((d, p))
}

/// An elementwise node whose inputs' shapes (all told) broadcast at no token count but one, or
/// none: `[1, T, 16] * [2T, 16]` runs only at T = 1, where the declared `[1, T, 16]` is wrong.
/// Returns its inputs' shapes.
pub fn impossible_broadcast(g: &GraphIndex, node: &onnx_protobuf::NodeProto) -> Option<Vec<Shape>> {
    const ELEMENTWISE: [&str; 17] =
        ["Add", "Sub", "Mul", "Div", "Pow", "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Max", "Min", "Mod", "Where"];
    if !(node.domain.is_empty() || node.domain == "ai.onnx") || !ELEMENTWISE.contains(&node.op_type.as_str()) || node.input.len() < 2 {
        return None;
    }
    let shapes: Vec<Shape> = node.input.iter().map(|i| (!i.is_empty()).then(|| shape_of(g, i)).flatten()).collect::<Option<_>>()?;
    let n = shapes.iter().map(Vec::len).max()?;
    // two sizes of one axis, neither 1, that no token count makes equal (a fixed size against T
    // is left: traced exports bake the traced length, and run there)
    for i in 0..n {
        let sizes: Vec<Dim> = shapes.iter().filter(|s| i + s.len() >= n).map(|s| s[i + s.len() - n]).filter(|d| *d != Dim::fixed(1)).collect();
        if sizes.iter().any(|a| sizes.iter().any(|b| a.t == b.t && a.c != b.c)) {
            return Some(shapes);
        }
    }
    None
}

/// The last axis' size of `v`, where its shape is not told whole (a whole LM traced by TorchScript:
/// two symbolic axes): followed back through ops that keep the last axis to a MatMul or Gemm by a
/// constant (a router's projection).
pub fn last_width(g: &GraphIndex, v: &str) -> Option<i64> {
    width(g, v, 0)
}

/// The last axis' size of `v`: told by its shape, or followed back through ops that keep the
/// last axis to a MatMul or Gemm by a constant.
fn width(g: &GraphIndex, v: &str, depth: usize) -> Option<i64> {
    if let Some(&Dim { t: 0, c }) = shape_of(g, v).as_ref().and_then(|s| s.last()) {
        return Some(c);
    }
    let (_, n) = g.prod(v).filter(|_| depth < 16)?;
    if !(n.domain.is_empty() || n.domain == "ai.onnx") {
        return None;
    }
    let dims = |i: usize| n.input.get(i).and_then(|x| g.const_tensor(x)).map(|t| t.dims.clone());
    match n.op_type.as_str() {
        "Cast" | "Identity" | "Softmax" | "LogSoftmax" | "Sigmoid" | "Tanh" | "Relu" | "Neg" | "Exp" => width(g, &n.input[0], depth + 1),
        // by a constant whose last axis is 1 (or absent): the other operand's width
        "Add" | "Sub" | "Mul" | "Div" if n.input.len() == 2 => {
            let side = (0..2).find(|&i| dims(1 - i).is_some_and(|d| d.last().is_none_or(|&x| x == 1)))?;
            width(g, &n.input[side], depth + 1)
        }
        "MatMul" => dims(1).filter(|d| d.len() >= 2).map(|d| d[d.len() - 1]),
        "Gemm" => {
            let d = dims(1).filter(|d| d.len() == 2)?;
            Some(if attr_i(n, "transB").unwrap_or(0) != 0 { d[0] } else { d[1] })
        }
        _ => None,
    }
}

fn infer(g: &GraphIndex, v: &str, depth: usize) -> Option<Shape> {
    if let Some(s) = declared(g, v) {
        return Some(s);
    }
    if let Some(s) = memo(v) {
        return s;
    }
    if depth > 48 {
        return None;
    }
    produced(g, v, depth)
}

/// The shape of `v` from its producer's rule over its inputs' shapes.
fn produced(g: &GraphIndex, v: &str, depth: usize) -> Option<Shape> {
    let (_, n) = g.prod(v)?;
    if !(n.domain.is_empty() || n.domain == "ai.onnx") {
        return None;
    }
    let inp = |i: usize| -> Option<Shape> { n.input.get(i).filter(|s| !s.is_empty()).and_then(|x| infer(g, x, depth + 1)) };
    let out_index = n.output.iter().position(|o| o == v)?;
    match n.op_type.as_str() {
        "Constant" => {
            let a = n.attribute.iter().find(|a| a.name == "value")?;
            Some(a.t.as_ref()?.dims.iter().map(|&d| Dim::fixed(d)).collect())
        }
        "Cast" | "Softmax" | "LogSoftmax" | "Sigmoid" | "Relu" | "Tanh" | "Exp" | "Log" | "Neg" | "Abs" | "Sqrt" | "Reciprocal" | "Erf" | "Identity"
        | "Not" | "Clip" | "CumSum" | "Gelu" | "HardSigmoid" | "Softplus" | "IsNaN" | "Floor" | "Ceil" | "DequantizeLinear" => inp(0),
        "Add" | "Sub" | "Mul" | "Div" | "Pow" | "Equal" | "Less" | "Greater" | "LessOrEqual" | "GreaterOrEqual" | "And" | "Or" | "Max" | "Min" | "Mod" => {
            let mut s = inp(0)?;
            for i in 1..n.input.len() {
                s = broadcast(&s, &inp(i)?)?;
            }
            Some(s)
        }
        "Where" => broadcast(&broadcast(&inp(0)?, &inp(1)?)?, &inp(2)?),
        // arange(n): n entries
        "Range" if n.input.len() == 3 && g.const_scalar(&n.input[0]) == Some(0.0) && g.const_scalar(&n.input[2]) == Some(1.0) => {
            let l = value(g, n.input.get(1)?, depth + 1)?;
            (l.len() == 1).then(|| vec![l[0]])
        }
        // one_hot(idx, depth) along a new axis (torch's F.one_hot: the last)
        "OneHot" => {
            let mut s = inp(0)?;
            let depth = g.const_scalar(n.input.get(1)?).filter(|d| *d >= 1.0 && d.fract() == 0.0)? as i64;
            let ax = norm_axis(attr_i(n, "axis").unwrap_or(-1), s.len() + 1)?;
            s.insert(ax, Dim::fixed(depth));
            Some(s)
        }
        "TopK" => {
            let mut s = inp(0)?;
            let ax = norm_axis(attr_i(n, "axis").unwrap_or(-1), s.len())?;
            let k = g.const_i64(n.input.get(1)?).filter(|k| k.len() == 1)?[0];
            s[ax] = Dim::fixed(k);
            Some(s)
        }
        "ArgMax" | "ArgMin" | "ReduceSum" | "ReduceMean" | "ReduceMax" | "ReduceMin" | "ReduceProd" | "ReduceL1" | "ReduceL2" | "ReduceLogSum"
        | "ReduceLogSumExp" | "ReduceSumSquare" => {
            let s = inp(0)?;
            let keep = attr_i(n, "keepdims").unwrap_or(1) == 1;
            let ax: Vec<usize> = if n.op_type.starts_with("Arg") {
                vec![norm_axis(attr_i(n, "axis").unwrap_or(0), s.len())?]
            } else {
                match axes(g, n)? {
                    Some(a) if !a.is_empty() => a.iter().map(|&a| norm_axis(a, s.len())).collect::<Option<_>>()?,
                    _ if attr_i(n, "noop_with_empty_axes") == Some(1) => vec![],
                    _ => (0..s.len()).collect(),
                }
            };
            Some(s.iter().enumerate().filter_map(|(i, d)| if ax.contains(&i) { keep.then_some(Dim::fixed(1)) } else { Some(*d) }).collect())
        }
        "MatMul" => {
            let (a, b) = (inp(0)?, inp(1)?);
            if a.len() < 2 || b.len() < 2 {
                return None;
            }
            let mut batch = broadcast(&a[..a.len() - 2].to_vec(), &b[..b.len() - 2].to_vec())?;
            batch.push(a[a.len() - 2]);
            batch.push(b[b.len() - 1]);
            Some(batch)
        }
        "Gemm" => {
            let (a, b) = (inp(0)?, inp(1)?);
            if a.len() != 2 || b.len() != 2 {
                return None;
            }
            let m = if attr_i(n, "transA").unwrap_or(0) != 0 { a[1] } else { a[0] };
            let nn = if attr_i(n, "transB").unwrap_or(0) != 0 { b[0] } else { b[1] };
            Some(vec![m, nn])
        }
        "Transpose" => {
            let s = inp(0)?;
            let perm = attr_ints(n, "perm").unwrap_or_else(|| (0..s.len() as i64).rev().collect());
            perm.iter().map(|&p| s.get(p as usize).copied()).collect()
        }
        "Unsqueeze" => {
            let mut s = inp(0)?;
            let mut ax = axes(g, n)??;
            let r = s.len() + ax.len();
            for a in ax.iter_mut() {
                *a = norm_axis(*a, r)? as i64;
            }
            ax.sort();
            if ax.windows(2).any(|w| w[0] == w[1]) {
                return None; // repeated axes: ONNX refuses the node
            }
            for a in ax {
                s.insert(a as usize, Dim::fixed(1));
            }
            Some(s)
        }
        "Squeeze" => {
            let s = inp(0)?;
            let ax: Vec<usize> = match axes(g, n)? {
                Some(a) => a.iter().map(|&a| norm_axis(a, s.len())).collect::<Option<_>>()?,
                None => (0..s.len()).filter(|&i| s[i] == Dim::fixed(1)).collect(),
            };
            Some(s.iter().enumerate().filter(|(i, _)| !ax.contains(i)).map(|(_, d)| *d).collect())
        }
        "ScatterElements" | "ScatterND" => inp(0),
        "GatherElements" => inp(1),
        "Expand" => broadcast(&inp(0)?, &value(g, n.input.get(1)?, depth + 1)?),
        "ConstantOfShape" => value(g, n.input.get(0)?, depth + 1),
        "Reshape" => {
            let s = inp(0)?;
            let target = value(g, n.input.get(1)?, depth + 1)?;
            let (mut t_all, mut c_all) = (0u32, 1i64);
            for d in &s {
                t_all += d.t as u32;
                c_all = c_all.checked_mul(d.c)?;
            }
            let mut out = Vec::new();
            let mut hole = None;
            let (mut t_known, mut c_known) = (0u32, 1i64);
            for (i, &d) in target.iter().enumerate() {
                let dim = match d {
                    Dim { t: 0, c: -1 } => {
                        hole = Some(i);
                        Dim::fixed(1)
                    }
                    Dim { t: 0, c: 0 } if attr_i(n, "allowzero").unwrap_or(0) == 0 => *s.get(i)?,
                    d => d,
                };
                if hole != Some(i) {
                    t_known += dim.t as u32;
                    c_known = c_known.checked_mul(dim.c)?;
                }
                out.push(dim);
            }
            if let Some(h) = hole {
                if t_all < t_known || t_all - t_known > 1 || c_known == 0 || c_all.checked_rem(c_known) != Some(0) {
                    return None;
                }
                out[h] = Dim { t: (t_all - t_known) as u8, c: c_all / c_known };
            }
            Some(out)
        }
        "Flatten" => {
            let s = inp(0)?;
            let ax = norm_axis(attr_i(n, "axis").unwrap_or(1), s.len() + 1)?;
            let fold = |p: &[Dim]| -> Option<Dim> {
                let t: u8 = p.iter().map(|d| d.t).sum();
                (t <= 1).then(|| Dim { t, c: p.iter().map(|d| d.c).product() })
            };
            Some(vec![fold(&s[..ax])?, fold(&s[ax..])?])
        }
        "Gather" => {
            let (d, i) = (inp(0)?, inp(1)?);
            let ax = norm_axis(attr_i(n, "axis").unwrap_or(0), d.len())?;
            let mut s = d[..ax].to_vec();
            s.extend(i);
            s.extend_from_slice(&d[ax + 1..]);
            Some(s)
        }
        "Shape" if attr_i(n, "start").is_none() && attr_i(n, "end").is_none() => Some(vec![Dim::fixed(inp(0)?.len() as i64)]),
        "Concat" => {
            let mut s = inp(0)?;
            let ax = norm_axis(attr_i(n, "axis")?, s.len())?;
            for i in 1..n.input.len() {
                let o = inp(i)?;
                if o.len() != s.len() || s[ax].t + o[ax].t > 1 || (s[ax].t == 1 && o[ax].t == 1) {
                    return None;
                }
                if s[ax].t != o[ax].t {
                    return None;
                }
                s[ax].c = s[ax].c.checked_add(o[ax].c)?;
            }
            Some(s)
        }
        "Split" if out_index < n.output.len() => {
            let mut s = inp(0)?;
            let ax = norm_axis(attr_i(n, "axis").unwrap_or(0), s.len())?;
            let sizes = attr_ints(n, "split").or_else(|| n.input.get(1).filter(|x| !x.is_empty()).and_then(|x| g.const_i64(x)));
            if s[ax].t == 1 {
                return None;
            }
            s[ax] = match sizes {
                Some(sz) => Dim::fixed(*sz.get(out_index)?),
                None => {
                    let parts = n.output.len() as i64;
                    (s[ax].c % parts == 0).then(|| Dim::fixed(s[ax].c / parts))?
                }
            };
            Some(s)
        }
        _ => None,
    }
}

/// The value of a 1-D (or scalar) integer shape tensor, element by element, in terms of T:
/// constants, `Shape(x)`, and the Gather/Slice/Concat/Unsqueeze/Squeeze/Cast exporters build
/// target shapes with.
fn value(g: &GraphIndex, v: &str, depth: usize) -> Option<Vec<Dim>> {
    if let Some(c) = g.const_i64(v) {
        return Some(c.into_iter().map(Dim::fixed).collect());
    }
    if depth > 48 {
        return None;
    }
    let (_, n) = g.prod(v)?;
    let arg = |i: usize| value(g, n.input.get(i)?, depth + 1);
    match n.op_type.as_str() {
        "Shape" => {
            let s = infer(g, n.input.get(0)?, depth + 1)?;
            let r = s.len() as i64;
            let clamp = |x: i64| (if x < 0 { x + r } else { x }).clamp(0, r) as usize;
            let a = clamp(attr_i(n, "start").unwrap_or(0));
            let b = clamp(attr_i(n, "end").unwrap_or(r));
            Some(s.get(a..b.max(a))?.to_vec())
        }
        "Cast" | "Identity" | "Unsqueeze" | "Squeeze" => arg(0),
        "Concat" => {
            let mut out = Vec::new();
            for i in 0..n.input.len() {
                out.extend(arg(i)?);
            }
            Some(out)
        }
        "Gather" => {
            let data = arg(0)?;
            let idx = g.const_i64(n.input.get(1)?)?;
            idx.iter().map(|&i| data.get(if i < 0 { (i + data.len() as i64) as usize } else { i as usize }).copied()).collect()
        }
        "Slice" => {
            let data = arg(0)?;
            let r = data.len() as i64;
            let (st, en) = (g.const_i64(n.input.get(1)?)?, g.const_i64(n.input.get(2)?)?);
            let step = n.input.get(4).and_then(|s| g.const_i64(s)).map_or(Some(1), |s| s.first().copied())?;
            if st.len() != 1 || en.len() != 1 || step != 1 {
                return None;
            }
            let clamp = |x: i64| (if x < 0 { x + r } else { x }).clamp(0, r) as usize;
            let (a, b) = (clamp(st[0]), clamp(en[0]));
            Some(data.get(a..b.max(a))?.to_vec())
        }
        "Mul" | "Div" => {
            let (a, b) = (arg(0)?, arg(1)?);
            if a.len() != 1 || b.len() != 1 {
                return None;
            }
            match n.op_type.as_str() {
                // either factor may be the multiple of T (the dynamo exporter writes `k * S`)
                "Mul" if a[0].t + b[0].t <= 1 => Some(vec![Dim { t: a[0].t + b[0].t, c: a[0].c.checked_mul(b[0].c)? }]),
                "Div" if b[0].t == 0 && b[0].c != 0 && a[0].c.checked_rem(b[0].c) == Some(0) => Some(vec![Dim { t: a[0].t, c: a[0].c.checked_div(b[0].c)? }]),
                _ => None,
            }
        }
        // a vector reshaped to its own length
        "Reshape" => {
            let a = arg(0)?;
            let t = g.const_i64(n.input.get(1)?)?;
            (t == [-1] || t == [a.len() as i64]).then_some(a)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn symbolic_dims_are_multiples_of_the_token_count_or_unknown() {
        assert_eq!(super::symbolic("S"), Some(Dim::TOKENS));
        assert_eq!(super::symbolic("2*S"), Some(Dim { t: 1, c: 2 }));
        assert_eq!(super::symbolic("s53*4"), Some(Dim { t: 1, c: 4 }));
        assert_eq!(super::symbolic("batch_size * sequence_length"), Some(Dim::TOKENS));
        for other in ["", "S + 1", "2*3", "-2*S", "(S)", "S*", "unk__5", "2*unk__12"] {
            assert_eq!(super::symbolic(other), None, "{other}");
        }
    }

    use super::*;
    use crate::onnx::graph::make_node;
    use crate::onnx::tensor::make_i64;
    use onnx_protobuf::{tensor_shape_proto, GraphProto, TensorShapeProto, TypeProto, ValueInfoProto};

    fn input(name: &str, dims: &[Option<i64>]) -> ValueInfoProto {
        let mut shape = TensorShapeProto::new();
        for d in dims {
            let mut x = tensor_shape_proto::Dimension::new();
            match d {
                Some(v) => x.set_dim_value(*v),
                None => x.set_dim_param("S".into()),
            }
            shape.dim.push(x);
        }
        let mut tt = type_proto::Tensor::new();
        tt.elem_type = 1;
        tt.shape = Some(shape).into();
        let mut t = TypeProto::new();
        t.value = Some(type_proto::Value::TensorType(tt));
        let mut vi = ValueInfoProto::new();
        vi.name = name.into();
        vi.type_ = Some(t).into();
        vi
    }

    #[test]
    fn router_chain_of_a_batched_input() {
        let mut g = GraphProto::new();
        g.input.push(input("h", &[Some(1), None, Some(32)]));
        g.initializer.push(make_i64("shape", &[2], &[-1, 32]));
        g.initializer.push(make_i64("k", &[1], &[2]));
        let mut w = make_i64("w", &[32, 8], &[0; 256]);
        w.data_type = 1;
        w.int64_data.clear();
        w.raw_data = vec![0; 32 * 8 * 4];
        g.initializer.push(w);
        g.node.push(make_node("Reshape", "", "r", &["h", "shape"], &["x"]));
        g.node.push(make_node("MatMul", "", "m", &["x", "w"], &["logits"]));
        g.node.push(make_node("Softmax", "", "s", &["logits"], &["p"]));
        g.node.push(make_node("TopK", "", "t", &["p", "k"], &["rw", "idx"]));
        g.node.push(make_node("Shape", "", "sh", &["h"], &["hs"]));
        // a target shape built from the input's own shape: [-1, h.shape[2]]
        g.initializer.push(make_i64("minus1", &[1], &[-1]));
        g.initializer.push(make_i64("two", &[], &[2]));
        g.initializer.push(make_i64("ax0", &[1], &[0]));
        g.node.push(make_node("Gather", "", "g2", &["hs", "two"], &["d"]));
        g.node.push(make_node("Unsqueeze", "", "u", &["d", "ax0"], &["d1"]));
        g.node.push(make_node("Concat", "", "c", &["minus1", "d1"], &["target"]));
        g.node[5].attribute.push(crate::onnx::graph::attr_int("axis", 0));
        g.node.push(make_node("Reshape", "", "r2", &["h", "target"], &["x2"]));
        let gi = GraphIndex::new(&g, None).unwrap();
        assert_eq!(shape_of(&gi, "x").unwrap(), vec![Dim::TOKENS, Dim::fixed(32)]);
        assert_eq!(shape_of(&gi, "logits").unwrap(), vec![Dim::TOKENS, Dim::fixed(8)]);
        assert_eq!(shape_of(&gi, "idx").unwrap(), vec![Dim::TOKENS, Dim::fixed(2)]);
        assert_eq!(shape_of(&gi, "hs").unwrap(), vec![Dim::fixed(3)]);
        assert_eq!(shape_of(&gi, "x2").unwrap(), vec![Dim::TOKENS, Dim::fixed(32)]);
        assert_eq!(shape_of(&gi, "idx").unwrap().iter().map(|d| d.at(7)).collect::<Vec<_>>(), vec![7, 2]);
    }
}
