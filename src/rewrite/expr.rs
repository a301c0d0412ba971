//! The expert MLP as an expression: what the nodes between the gathered token rows and the
//! routing-weight multiply compute, read backwards from the graph. Linear layers keep references to
//! their weights; everything elementwise becomes a small tree that is evaluated numerically to
//! identify the activation (so any spelling of SiLU, GELU or the clamped SwiGLU is recognised).

use std::collections::HashMap;

use crate::onnx::graph::{attr_i, attr_ints, GraphIndex};
use crate::spec::{Activation, GluLayout};

/// Which expert a per-expert value belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ERef {
    /// a constant expert number
    Const(i64),
    /// the i-th entry of the sorted list of experts that received tokens; when the exporter
    /// unrolled exactly E iterations (a Split into E pieces) the graph only runs when all E are
    /// hit, so entry i is expert i (with fewer iterations, see `hf_loop::per_hit_expert`)
    Hit(usize),
    /// a stacked weight used by every expert at once (an einsum over the expert axis): expert e
    /// uses slice e; replaced by `Const(e)` per expert with [`ExpertMlp::for_expert`]
    Each,
}

impl ERef {
    pub fn expert(self) -> i64 {
        match self {
            ERef::Const(c) => c,
            ERef::Hit(i) => i as i64,
            ERef::Each => panic!("ERef::Each has no single expert"),
        }
    }
}

/// A weight matrix W [out, in] of one expert: `init` (rank 2, or rank 3 indexed by `index`),
/// transposed when the stored matrix is [in, out].
#[derive(Debug, Clone, PartialEq)]
pub struct WSrc {
    pub init: String,
    pub index: Option<ERef>,
    pub transposed: bool,
    /// (out, in)
    pub out: usize,
    pub inp: usize,
}

/// A bias vector [out] of one expert: `init` (rank 1 or [1, out]), or row `index` of a rank-2 stack.
#[derive(Debug, Clone, PartialEq)]
pub struct BSrc {
    pub init: String,
    pub index: Option<ERef>,
    pub len: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    /// the gathered token rows (width d)
    Leaf,
    Lin { x: Box<Expr>, w: WSrc, b: Option<BSrc> },
    /// columns [start, end) step `step` of the input
    Slice { x: Box<Expr>, start: usize, end: usize, step: usize },
    Op(&'static str, Vec<Expr>),
    Const(f64),
    Clip { x: Box<Expr>, lo: Option<f64>, hi: Option<f64> },
}

impl Expr {
    /// Number of columns.
    pub fn width(&self, d: usize) -> Option<usize> {
        match self {
            Expr::Leaf => Some(d),
            Expr::Lin { w, .. } => Some(w.out),
            Expr::Slice { start, end, step, .. } => Some((end - start).div_ceil(*step)),
            Expr::Op(_, args) => args.iter().filter(|a| !matches!(a, Expr::Const(_))).find_map(|a| a.width(d)),
            Expr::Const(_) => None,
            Expr::Clip { x, .. } => x.width(d),
        }
    }
}

/// Why a parse failed: the value and what was found there.
pub type ParseResult<T> = Result<T, String>;

pub struct ExprParser<'a, 'g> {
    pub g: &'a GraphIndex<'g>,
    /// values that are the gathered token rows
    pub leaves: Vec<String>,
    /// resolves an expert-index value to an ERef
    pub eref: &'a dyn Fn(&str) -> Option<ERef>,
    /// model width, once known
    pub d: Option<usize>,
    /// the leaf value the expression reads
    pub matched_leaf: Option<String>,
    /// the leaf is [E, rows, d] (per-expert bins): a MatMul with a rank-3 constant weight
    /// [E, in, out] is then one linear layer per expert
    pub batched_leaf: bool,
    /// a family's own linear-layer forms (e.g. a batched MatMul with per-row gathered weights):
    /// `v` -> (the layer's input value, its weight); consulted before the generic forms
    pub lin_hook: Option<&'a dyn Fn(&str) -> Option<(String, WSrc)>>,
    memo: HashMap<String, Expr>,
}

fn is_float_type(t: i64) -> bool {
    matches!(t, 1 | 10 | 11 | 16)
}

impl<'a, 'g> ExprParser<'a, 'g> {
    pub fn new(g: &'a GraphIndex<'g>, leaves: Vec<String>, eref: &'a dyn Fn(&str) -> Option<ERef>) -> Self {
        ExprParser { g, leaves, eref, d: None, matched_leaf: None, batched_leaf: false, lin_hook: None, memo: HashMap::new() }
    }

    pub fn parse(&mut self, v: &str) -> ParseResult<Expr> {
        if let Some(e) = self.memo.get(v) {
            return Ok(e.clone());
        }
        let e = self.parse_inner(v)?;
        self.memo.insert(v.to_string(), e.clone());
        Ok(e)
    }

    fn scalar_const(&self, v: &str) -> Option<f64> {
        let t = self.g.const_tensor(v);
        if let Some(t) = t {
            if crate::onnx::tensor::numel(&t.dims) != 1 {
                return None;
            }
        }
        self.g.const_scalar(v)
    }

    fn parse_inner(&mut self, v: &str) -> ParseResult<Expr> {
        if self.leaves.iter().any(|l| l == v) {
            if self.matched_leaf.as_deref().is_some_and(|m| m != v) {
                return Err(format!("the expert reads two row tensors ('{}' and '{v}')", self.matched_leaf.as_deref().unwrap()));
            }
            self.matched_leaf = Some(v.to_string());
            return Ok(Expr::Leaf);
        }
        if let Some(c) = self.scalar_const(v) {
            return Ok(Expr::Const(c));
        }
        if let Some((xv, w)) = self.lin_hook.and_then(|h| h(v)) {
            let x = self.parse(&xv)?;
            self.check_in(&x, &w)?;
            return Ok(Expr::Lin { x: Box::new(x), w, b: None });
        }
        let Some((_, n)) = self.g.prod(v) else { return Err(format!("'{v}' is not computed from the token rows")) };
        let op = n.op_type.as_str();
        let inp = |i: usize| n.input.get(i).map(String::as_str).unwrap_or("");
        match op {
            "Identity" => self.parse(inp(0)),
            "Reshape" => {
                // row-preserving: [n, w] -> [-1, w]
                let x = self.parse(inp(0))?;
                let t = self.g.const_i64(inp(1)).ok_or_else(|| format!("Reshape producing '{v}' has a computed shape"))?;
                let w = x.width(self.d.unwrap_or(0)).ok_or("reshape of a value of unknown width")?;
                if t.len() == 2 && t[0] == -1 && t[1] == w as i64 {
                    Ok(x)
                } else {
                    Err(format!("Reshape producing '{v}' to {t:?} does not keep the rows"))
                }
            }
            // Squeeze(Unsqueeze(y, a), a) is y (the dynamo exporter writes such pairs around
            // in-place adds)
            "Squeeze" if self.g.prod(inp(0)).is_some_and(|(_, u)| {
                let ax = |m: &onnx_protobuf::NodeProto| if m.input.len() > 1 { self.g.const_i64(&m.input[1]) } else { attr_ints(m, "axes") };
                u.op_type == "Unsqueeze" && ax(u).is_some_and(|a| a.len() == 1) && ax(u) == ax(n)
            }) =>
            {
                let (_, u) = self.g.prod(inp(0)).unwrap();
                self.parse(&u.input[0].clone())
            }
            "Cast" => {
                if !is_float_type(attr_i(n, "to").unwrap_or(0)) {
                    return Err(format!("'{v}' casts to a non-float type"));
                }
                self.parse(inp(0))
            }
            "MatMul" => {
                let x = self.parse(inp(0))?;
                let w = self.weight(inp(1), false)?;
                self.check_in(&x, &w)?;
                Ok(Expr::Lin { x: Box::new(x), w, b: None })
            }
            "Einsum" if n.input.len() == 2 => {
                let eq = crate::onnx::graph::attr_s(n, "equation").unwrap_or_default();
                let (x, w) = self.einsum_lin(&eq, inp(0), inp(1)).ok_or_else(|| format!("Einsum '{eq}' producing '{v}' is not a per-expert linear layer"))?;
                let x = self.parse(x)?;
                self.check_in(&x, &w)?;
                Ok(Expr::Lin { x: Box::new(x), w, b: None })
            }
            "Gemm" => {
                if attr_i(n, "transA").unwrap_or(0) != 0
                    || crate::onnx::graph::attr_f(n, "alpha").unwrap_or(1.0) != 1.0
                    || crate::onnx::graph::attr_f(n, "beta").unwrap_or(1.0) != 1.0
                {
                    return Err(format!("Gemm producing '{v}' has transA/alpha/beta"));
                }
                let x = self.parse(inp(0))?;
                let w = self.weight(inp(1), attr_i(n, "transB").unwrap_or(0) != 0)?;
                self.check_in(&x, &w)?;
                let b = if inp(2).is_empty() { None } else { Some(self.bias(inp(2), w.out)?) };
                Ok(Expr::Lin { x: Box::new(x), w, b })
            }
            "Add" => {
                // a bias on a linear layer?
                for (a, b) in [(inp(0), inp(1)), (inp(1), inp(0))] {
                    if self.scalar_const(b).is_some() {
                        continue;
                    }
                    if let Ok(Expr::Lin { x, w, b: None }) = self.parse(a) {
                        // an einsum over stacked weights leaves [..., E, out]: a bias [E, out]
                        // adds row e to expert e
                        let stack = (!self.batched_leaf && w.index == Some(ERef::Each)).then(|| super::dequant::weight_dims(self.g, &w.init).map(|d| d[0])).flatten();
                        if let Ok(bias) = self.bias_stacked(b, w.out, stack) {
                            return Ok(Expr::Lin { x, w, b: Some(bias) });
                        }
                    }
                }
                self.binary("Add", n)
            }
            "Mul" | "Sub" | "Div" | "Pow" | "Min" | "Max" if n.input.len() == 2 => self.binary(leak(op), n),
            "Sigmoid" | "Erf" | "Tanh" | "Relu" | "Neg" | "Exp" | "Log" | "Softplus" | "Abs" | "Sqrt" | "Reciprocal" => {
                Ok(Expr::Op(leak(op), vec![self.parse(inp(0))?]))
            }
            "Gelu" => {
                let approx = crate::onnx::graph::attr_s(n, "approximate").unwrap_or_else(|| "none".into());
                Ok(Expr::Op(if approx == "tanh" { "GeluTanh" } else { "Gelu" }, vec![self.parse(inp(0))?]))
            }
            "Clip" => {
                let x = self.parse(inp(0))?;
                let lo = if inp(1).is_empty() { None } else { Some(self.scalar_const(inp(1)).ok_or("Clip min is not constant")?) };
                let hi = if inp(2).is_empty() { None } else { Some(self.scalar_const(inp(2)).ok_or("Clip max is not constant")?) };
                Ok(Expr::Clip { x: Box::new(x), lo, hi })
            }
            "Slice" => {
                let x = self.parse(inp(0))?;
                let width = x.width(self.d.unwrap_or(0)).ok_or("slice of a value of unknown width")?;
                let starts = self.int_vec(inp(1), &x)?;
                let ends = self.int_vec(inp(2), &x)?;
                let axes = if inp(3).is_empty() { vec![-1] } else { self.g.const_i64(inp(3)).ok_or("Slice axes not constant")? };
                let steps = if inp(4).is_empty() { vec![1] } else { self.g.const_i64(inp(4)).ok_or("Slice steps not constant")? };
                // the column axis is the last one: axis 1 only of a rank-2 value
                let last = axes.len() == 1 && super::matcher::is_last_axis(axes[0], super::matcher::rank_of(self.g, inp(0)));
                if starts.len() != 1 || ends.len() != 1 || axes.len() != 1 || steps.len() != 1 || !(last || (self.batched_leaf && axes[0] == 2)) {
                    return Err(format!("Slice producing '{v}' is not a column slice"));
                }
                let clampi = |s: i64| -> usize {
                    let s = if s < 0 { s + width as i64 } else { s };
                    s.clamp(0, width as i64) as usize
                };
                let (start, end, step) = (clampi(starts[0]), clampi(ends[0]), steps[0]);
                if step < 1 || start >= end {
                    return Err(format!("Slice producing '{v}' has an unsupported step or is empty"));
                }
                Ok(Expr::Slice { x: Box::new(x), start, end, step: step as usize })
            }
            "Split" => {
                let x = self.parse(inp(0))?;
                let width = x.width(self.d.unwrap_or(0)).ok_or("split of a value of unknown width")?;
                let axis = attr_i(n, "axis").unwrap_or(0);
                // columns: the last axis of [rows, w], or of per-expert bins [E, rows, w]
                if !(super::matcher::is_last_axis(axis, super::matcher::rank_of(self.g, inp(0))) || (self.batched_leaf && axis == 2)) {
                    return Err(format!("Split producing '{v}' is not along columns"));
                }
                let k = n.output.len();
                let sizes = if !inp(1).is_empty() {
                    self.g.const_i64(inp(1)).ok_or("Split sizes not constant")?
                } else if let Some(s) = attr_ints(n, "split") {
                    s
                } else {
                    if width % k != 0 {
                        return Err("uneven Split".into());
                    }
                    vec![(width / k) as i64; k]
                };
                // one non-negative size an output, summing within i64 (a malformed model's are not)
                if sizes.len() != k || sizes.iter().any(|&s| s < 0) {
                    return Err(format!("Split producing '{v}' has {} sizes for {k} outputs, or a negative one", sizes.len()));
                }
                let pos = n.output.iter().position(|o| o == v).unwrap();
                let start = sizes[..pos].iter().try_fold(0i64, |a, &s| a.checked_add(s)).ok_or("Split sizes past i64")?;
                let end = start.checked_add(sizes[pos]).ok_or("Split sizes past i64")?;
                Ok(Expr::Slice { x: Box::new(x), start: start as usize, end: end as usize, step: 1 })
            }
            _ => Err(format!("'{v}' comes from {op}, which is not part of an expert MLP")),
        }
    }

    fn binary(&mut self, op: &'static str, n: &onnx_protobuf::NodeProto) -> ParseResult<Expr> {
        let a = self.parse(&n.input[0])?;
        let b = self.parse(&n.input[1])?;
        Ok(match op {
            "Min" | "Max" => {
                let (x, c) = match (&a, &b) {
                    (x, Expr::Const(c)) | (Expr::Const(c), x) => (x.clone(), *c),
                    _ => return Ok(Expr::Op(op, vec![a, b])),
                };
                if op == "Min" {
                    Expr::Clip { x: Box::new(x), lo: None, hi: Some(c) }
                } else {
                    Expr::Clip { x: Box::new(x), lo: Some(c), hi: None }
                }
            }
            _ => Expr::Op(op, vec![a, b]),
        })
    }

    fn check_in(&mut self, x: &Expr, w: &WSrc) -> ParseResult<()> {
        if matches!(x, Expr::Leaf) {
            match self.d {
                None => self.d = Some(w.inp),
                Some(d) if d != w.inp => return Err(format!("weight '{}' expects {} inputs, rows have {d}", w.init, w.inp)),
                _ => {}
            }
        } else if let Some(width) = x.width(self.d.unwrap_or(0)) {
            if width != w.inp {
                return Err(format!("weight '{}' expects {} inputs, its input has {width}", w.init, w.inp));
            }
        }
        Ok(())
    }

    /// An integer (vector) computed from constants and the last dimension of `x`.
    fn int_vec(&mut self, v: &str, x: &Expr) -> ParseResult<Vec<i64>> {
        if let Some(c) = self.g.const_i64(v) {
            return Ok(c);
        }
        self.int_expr(v, x, 0).map(|i| vec![i]).ok_or_else(|| format!("slice bound '{v}' is not computable"))
    }

    fn int_expr(&mut self, v: &str, x: &Expr, depth: usize) -> Option<i64> {
        if depth > 12 {
            return None;
        }
        if let Some(c) = self.g.const_i64(v) {
            return (c.len() == 1).then(|| c[0]);
        }
        let (_, n) = self.g.prod(v)?;
        let a = |s: &mut Self, i: usize| s.int_expr(&n.input[i], x, depth + 1);
        match n.op_type.as_str() {
            // checked: a malformed model's constants may overflow i64 (then the bound is unknown)
            "Add" => a(self, 0)?.checked_add(a(self, 1)?),
            "Sub" => a(self, 0)?.checked_sub(a(self, 1)?),
            "Mul" => a(self, 0)?.checked_mul(a(self, 1)?),
            "Div" => a(self, 0)?.checked_div_euclid(a(self, 1)?),
            "Unsqueeze" | "Squeeze" | "Cast" | "Identity" | "Reshape" => a(self, 0),
            "Concat" if n.input.len() == 1 => a(self, 0),
            "Gather" => {
                // Shape(y)[-1] (or [1]) where y is the sliced value itself
                let idx = self.g.const_i64(&n.input[1])?;
                let (_, s) = self.g.prod(&n.input[0])?;
                if s.op_type != "Shape" || idx.len() != 1 || !(idx[0] == -1 || idx[0] == 1 || (self.batched_leaf && idx[0] == 2)) {
                    return None;
                }
                let y = self.parse(&s.input[0]).ok()?;
                if &y != x {
                    return None;
                }
                y.width(self.d.unwrap_or(0)).map(|w| w as i64)
            }
            _ => None,
        }
    }

    /// `x` (labels Q + i) times a stacked weight W (labels e + {i, o}) giving Q [+ e] + o: one
    /// linear layer per expert, expert e using W[e]. Returns (x, weight).
    fn einsum_lin<'s>(&self, eq: &str, a: &'s str, b: &'s str) -> Option<(&'s str, WSrc)> {
        let eq: String = eq.chars().filter(|c| !c.is_whitespace()).collect();
        let (lhs, out) = eq.split_once("->")?;
        let (la, lb) = lhs.split_once(',')?;
        for (xl, wl, x, w) in [(la, lb, a, b), (lb, la, b, a)] {
            let Some(dims) = super::dequant::weight_dims(self.g, w) else { continue };
            if dims.len() != 3 || wl.len() != 3 || xl.contains('.') || out.contains('.') {
                continue;
            }
            let wc: Vec<char> = wl.chars().collect();
            let (e, p, q) = (wc[0], wc[1], wc[2]);
            let i = xl.chars().last()?;
            let qx = &xl[..xl.len() - 1];
            let o = if p == i { q } else if q == i { p } else { continue };
            let want = if qx.contains(e) { format!("{qx}{o}") } else { format!("{qx}{e}{o}") };
            if out != want || qx.contains(o) || qx.contains(i) {
                continue;
            }
            // W[e] stored [p, q]; [out, in] when p is the output label
            let transposed = p == i;
            let (r, c) = (dims[1] as usize, dims[2] as usize);
            let (outd, ind) = if transposed { (c, r) } else { (r, c) };
            return Some((x, WSrc { init: w.to_string(), index: Some(ERef::Each), transposed, out: outd, inp: ind }));
        }
        None
    }

    /// Resolves a weight operand of MatMul (`gemm_trans_b`: Gemm with transB = 1).
    fn weight(&mut self, v: &str, gemm_trans_b: bool) -> ParseResult<WSrc> {
        // B as used: y = x @ B (B is [in, out]) unless Gemm transB (B is [out, in]).
        let (init, index, stored_t, dims) = self.matrix(v, 0)?;
        // stored_t: B = S^T. W = B^T for MatMul, W = B for Gemm transB.
        let b_is_s_t = stored_t;
        let transposed = if gemm_trans_b { b_is_s_t } else { !b_is_s_t };
        let (out, inp) = if transposed { (dims[1], dims[0]) } else { (dims[0], dims[1]) };
        Ok(WSrc { init, index, transposed, out, inp })
    }

    /// (initializer, expert index, transposed, stored [rows, cols]) of a matrix operand.
    fn matrix(&mut self, v: &str, depth: usize) -> ParseResult<(String, Option<ERef>, bool, [usize; 2])> {
        if depth > 6 {
            return Err("weight chain too deep".into());
        }
        // an initializer, or DequantizeLinear of initializers (`dequant.rs`)
        if let Some(dims) = super::dequant::weight_dims_or_reason(self.g, v)? {
            if dims.len() == 3 && self.batched_leaf {
                return Ok((v.to_string(), Some(ERef::Each), false, [dims[1] as usize, dims[2] as usize]));
            }
            if dims.len() != 2 {
                return Err(format!("weight '{v}' has rank {}", dims.len()));
            }
            return Ok((v.to_string(), None, false, [dims[0] as usize, dims[1] as usize]));
        }
        if self.g.const_tensor(v).is_some() {
            return Err(format!("weight '{v}' is a Constant node, not an initializer"));
        }
        let (_, n) = self.g.prod(v).ok_or_else(|| format!("weight '{v}' is neither constant nor computed"))?;
        match n.op_type.as_str() {
            "Transpose" => {
                let perm = attr_ints(n, "perm").unwrap_or_else(|| vec![1, 0]);
                if perm != [1, 0] {
                    return Err(format!("weight transpose perm {perm:?}"));
                }
                let (i, e, t, d) = self.matrix(&n.input[0], depth + 1)?;
                Ok((i, e, !t, d))
            }
            "Cast" | "Identity" => self.matrix(&n.input[0], depth + 1),
            "Squeeze" => self.matrix(&n.input[0], depth + 1),
            "Gather" => {
                if attr_i(n, "axis").unwrap_or(0) != 0 {
                    return Err("weight gathered along an axis other than 0".into());
                }
                let stack = &n.input[0];
                let dims = super::dequant::weight_dims_or_reason(self.g, stack)?.ok_or_else(|| format!("weight stack '{stack}' is not constant"))?;
                if dims.len() != 3 {
                    return Err(format!("weight stack '{stack}' is not a rank-3 initializer"));
                }
                let e = (self.eref)(&n.input[1]).ok_or_else(|| format!("expert index of weight '{stack}' is not an expert number"))?;
                Ok((stack.clone(), Some(e), false, [dims[1] as usize, dims[2] as usize]))
            }
            op => Err(format!("weight '{v}' comes from {op}")),
        }
    }

    fn bias(&mut self, v: &str, out: usize) -> ParseResult<BSrc> {
        self.bias_stacked(v, out, None)
    }

    /// A bias of `out`; with `stack` = Some(E), also a per-expert stack [E, out].
    fn bias_stacked(&mut self, v: &str, out: usize, stack: Option<i64>) -> ParseResult<BSrc> {
        let mut cur = v.to_string();
        for _ in 0..4 {
            if let Some(t) = self.g.const_tensor(&cur) {
                if stack.is_some_and(|e| t.dims.len() == 2 && t.dims[0] == e && t.dims[1] as usize == out) && self.g.initializers.contains_key(cur.as_str()) {
                    return Ok(BSrc { init: cur, index: Some(ERef::Each), len: out });
                }
                // one bias row per expert, broadcast over the rows of batched bins: [E, 1, out]
                if self.batched_leaf && t.dims.len() == 3 && t.dims[1] == 1 && t.dims[2] as usize == out && self.g.initializers.contains_key(cur.as_str()) {
                    return Ok(BSrc { init: cur, index: Some(ERef::Each), len: out });
                }
                let n = crate::onnx::tensor::numel(&t.dims);
                let ok_shape = t.dims.len() == 1 || (t.dims.len() == 2 && t.dims[0] == 1);
                if n != out || !ok_shape || !self.g.initializers.contains_key(cur.as_str()) {
                    return Err(format!("'{cur}' is not a bias of {out}"));
                }
                return Ok(BSrc { init: cur, index: None, len: out });
            }
            let (_, n) = self.g.prod(&cur).ok_or("bias not constant")?;
            match n.op_type.as_str() {
                "Cast" | "Identity" => cur = n.input[0].clone(),
                "Gather" if attr_i(n, "axis").unwrap_or(0) == 0 => {
                    let stack = &n.input[0];
                    let t = self.g.const_tensor(stack).ok_or("bias stack not constant")?;
                    if t.dims.len() != 2 || t.dims[1] as usize != out || !self.g.initializers.contains_key(stack.as_str()) {
                        return Err(format!("'{stack}' is not a bias stack [E, {out}]"));
                    }
                    let e = (self.eref)(&n.input[1]).ok_or("bias expert index is not an expert number")?;
                    return Ok(BSrc { init: stack.clone(), index: Some(e), len: out });
                }
                // GatherND(stack, Unsqueeze(i, -1)) with batch_dims 0 is Gather(stack, i) for a
                // rank-1 `i` (the resolvers that call a value an expert number only do so for rank-1
                // index vectors; the unsqueezed axis is then 1 = -1)
                "GatherND" if attr_i(n, "batch_dims").unwrap_or(0) == 0 => {
                    let stack = &n.input[0];
                    let (_, u) = self.g.prod(&n.input[1]).filter(|(_, u)| u.op_type == "Unsqueeze").ok_or("bias GatherND index is not an unsqueezed vector")?;
                    let ax = if u.input.len() > 1 { self.g.const_i64(&u.input[1]) } else { attr_ints(u, "axes") };
                    if !matches!(ax.as_deref(), Some([-1]) | Some([1])) {
                        return Err("bias GatherND index is not unsqueezed on its last axis".into());
                    }
                    let t = self.g.const_tensor(stack).ok_or("bias stack not constant")?;
                    if t.dims.len() != 2 || t.dims[1] as usize != out || !self.g.initializers.contains_key(stack.as_str()) {
                        return Err(format!("'{stack}' is not a bias stack [E, {out}]"));
                    }
                    let e = (self.eref)(&u.input[0]).ok_or("bias expert index is not an expert number")?;
                    return Ok(BSrc { init: stack.clone(), index: Some(e), len: out });
                }
                op => return Err(format!("bias comes from {op}")),
            }
        }
        Err("bias chain too deep".into())
    }
}

fn leak(s: &str) -> &'static str {
    match s {
        "Add" => "Add",
        "Mul" => "Mul",
        "Sub" => "Sub",
        "Div" => "Div",
        "Pow" => "Pow",
        "Min" => "Min",
        "Max" => "Max",
        "Sigmoid" => "Sigmoid",
        "Erf" => "Erf",
        "Tanh" => "Tanh",
        "Relu" => "Relu",
        "Neg" => "Neg",
        "Exp" => "Exp",
        "Log" => "Log",
        "Softplus" => "Softplus",
        "Abs" => "Abs",
        "Sqrt" => "Sqrt",
        "Reciprocal" => "Reciprocal",
        _ => "?",
    }
}

mod identify;
mod mlp;
#[cfg(test)]
mod tests;

pub use identify::*;
pub use mlp::*;
