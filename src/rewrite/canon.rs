//! Canonicalisation before matching: exact rewrites that make the many spellings of one
//! computation look alike, so that one rule per family serves them all.
//!
//! Every step keeps what the graph computes, value for value:
//! - `Constant` nodes become initializers of the same name (matchers then see one kind of constant);
//! - `Identity` nodes are bypassed (their readers read the input);
//! - integer shape arithmetic over constants is folded (Shape of a fully known shape, Gather,
//!   Concat, Unsqueeze, Squeeze, Reshape, Slice, Cast between integer types, Add/Sub/Mul/Div,
//!   Equal, Where) on small tensors with inline data; float arithmetic is never folded;
//! - `Transpose(Transpose(x, p), q)` becomes one Transpose (or x, when the composition is the
//!   identity);
//! - Einsum equations with `...` get explicit labels where the operands' ranks are known;
//! - nodes and initializers nobody reads are dropped.
//!
//! `ConstantOfShape` and `Expand` stay: the rules read them as zeros and broadcasts.

use std::collections::{HashMap, HashSet};

use onnx_protobuf::{GraphProto, NodeProto, TensorProto};

use crate::onnx::graph::{attr_i, attr_ints, attr_s, prune, GraphIndex};
use crate::onnx::tensor::{is_external, make_tensor, tensor_i64, BOOL, INT32, INT64};
use crate::onnx::Model;

/// Largest integer tensor folded (shape vectors and small index constants).
const FOLD_MAX: usize = 4096;

/// What canonicalisation changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CanonStats {
    pub constants: usize,
    pub identities: usize,
    pub folded: usize,
    pub transposes: usize,
    pub einsums: usize,
    pub pruned: usize,
}

/// The graph as it was before canonicalisation: a model where nothing is replaced is written
/// back unchanged.
pub struct Undo(Option<onnx_protobuf::GraphProto>);

impl Undo {
    /// Canonicalises `model` (see [`canonicalise`]), keeping the original graph for [`Undo::keep_if`].
    pub fn canonicalise(model: &mut Model) -> Undo {
        let before = model.proto.graph.clone().into_option();
        canonicalise(model);
        Undo(before)
    }

    /// Keeps the canonical graph when `keep`, else puts the original back.
    pub fn keep_if(self, keep: bool, model: &mut Model) {
        if !keep {
            if let Some(g) = self.0 {
                model.proto.graph = protobuf::MessageField::some(g);
            }
        }
    }
}

/// Canonicalises `model`'s main graph in place (see the module comment); returns what changed.
pub fn canonicalise(model: &mut Model) -> CanonStats {
    let mut st = CanonStats::default();
    let g = model.proto.graph.mut_or_insert_default();
    // values read inside subgraphs (If/Loop/Scan bodies) keep their names and producers
    let has_subgraphs = g.node.iter().any(|n| n.attribute.iter().any(|a| a.g.is_some() || !a.graphs.is_empty()));
    st.constants = constants_to_initializers(g);
    if !has_subgraphs {
        st.identities = bypass_identities(g);
    }
    for _ in 0..8 {
        let f = fold(g);
        st.folded += f;
        if f == 0 {
            break;
        }
    }
    st.transposes = merge_transposes(g);
    // an einsum's operand rank may follow from an earlier einsum made explicit
    for _ in 0..4 {
        let n = explicit_einsums(g);
        st.einsums += n;
        if n == 0 {
            break;
        }
    }
    if !has_subgraphs {
        st.pruned = prune(g).0;
    }
    st
}

fn constants_to_initializers(g: &mut GraphProto) -> usize {
    let outputs: HashSet<String> = g.output.iter().map(|o| o.name.clone()).collect();
    let mut n = 0;
    let mut keep = Vec::with_capacity(g.node.len());
    for node in std::mem::take(&mut g.node) {
        let t = (node.op_type == "Constant" && node.domain.is_empty() && node.output.len() == 1 && !outputs.contains(&node.output[0]))
            .then(|| constant_tensor(&node))
            .flatten();
        match t {
            Some(mut t) => {
                t.name = node.output[0].clone();
                g.initializer.push(t);
                n += 1;
            }
            None => keep.push(node),
        }
    }
    g.node = keep;
    n
}

/// The tensor a Constant node holds, for the attribute forms that carry numbers.
fn constant_tensor(n: &NodeProto) -> Option<TensorProto> {
    let a = n.attribute.first().filter(|_| n.attribute.len() == 1)?;
    match a.name.as_str() {
        "value" => a.t.as_ref().cloned(),
        "value_int" => Some(i64_tensor("", &[], &[a.i])),
        "value_ints" => Some(i64_tensor("", &[a.ints.len() as i64], &a.ints)),
        "value_float" => Some(make_tensor("", crate::onnx::tensor::FLOAT, &[], a.f.to_le_bytes().to_vec())),
        "value_floats" => Some(make_tensor(
            "",
            crate::onnx::tensor::FLOAT,
            &[a.floats.len() as i64],
            a.floats.iter().flat_map(|f| f.to_le_bytes()).collect(),
        )),
        _ => None,
    }
}

fn i64_tensor(name: &str, dims: &[i64], v: &[i64]) -> TensorProto {
    make_tensor(name, INT64, dims, v.iter().flat_map(|x| x.to_le_bytes()).collect())
}

fn bypass_identities(g: &mut GraphProto) -> usize {
    let outputs: HashSet<String> = g.output.iter().map(|o| o.name.clone()).collect();
    let mut alias: HashMap<String, String> = HashMap::new();
    for n in &g.node {
        if n.op_type == "Identity" && n.domain.is_empty() && n.input.len() == 1 && n.output.len() == 1 && !outputs.contains(&n.output[0]) {
            alias.insert(n.output[0].clone(), n.input[0].clone());
        }
    }
    let resolve = |v: &str| {
        let mut cur = v.to_string();
        for _ in 0..64 {
            match alias.get(&cur) {
                Some(a) => cur = a.clone(),
                None => break,
            }
        }
        cur
    };
    for n in &mut g.node {
        for i in n.input.iter_mut() {
            if alias.contains_key(i.as_str()) {
                *i = resolve(i);
            }
        }
    }
    alias.len()
}

/// An integer constant: dims, values and element type.
#[derive(Clone)]
struct IntConst {
    dims: Vec<i64>,
    v: Vec<i64>,
    ty: i32,
}

fn int_const(g: &GraphIndex, v: &str) -> Option<IntConst> {
    let t = g.const_tensor(v)?;
    if !matches!(t.data_type, INT64 | INT32 | BOOL) || is_external(t) {
        return None;
    }
    let n: i64 = t.dims.iter().product();
    if n as usize > FOLD_MAX {
        return None;
    }
    Some(IntConst { dims: t.dims.clone(), v: tensor_i64(t, None).ok()?, ty: t.data_type })
}

fn encode(name: &str, c: &IntConst) -> TensorProto {
    let raw = match c.ty {
        INT32 => c.v.iter().flat_map(|x| (*x as i32).to_le_bytes()).collect(),
        BOOL => c.v.iter().map(|&x| (x != 0) as u8).collect(),
        _ => c.v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    };
    make_tensor(name, c.ty, &c.dims, raw)
}

/// Numpy-style broadcast of two integer constants with `f`.
fn broadcast(a: &IntConst, b: &IntConst, ty: i32, f: impl Fn(i64, i64) -> Option<i64>) -> Option<IntConst> {
    let r = a.dims.len().max(b.dims.len());
    let pad = |d: &[i64]| {
        let mut v = vec![1i64; r - d.len()];
        v.extend_from_slice(d);
        v
    };
    let (da, db) = (pad(&a.dims), pad(&b.dims));
    let mut dims = Vec::with_capacity(r);
    for i in 0..r {
        dims.push(match (da[i], db[i]) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return None,
        });
    }
    let n: i64 = dims.iter().product();
    let strides = |d: &[i64]| {
        let mut s = vec![0i64; r];
        let mut acc = 1;
        for i in (0..r).rev() {
            s[i] = if d[i] == 1 { 0 } else { acc };
            acc *= d[i];
        }
        s
    };
    let (sa, sb) = (strides(&da), strides(&db));
    let mut v = Vec::with_capacity(n as usize);
    for lin in 0..n {
        let (mut rem, mut ia, mut ib) = (lin, 0, 0);
        for i in (0..r).rev() {
            let c = rem % dims[i];
            rem /= dims[i];
            ia += c * sa[i];
            ib += c * sb[i];
        }
        v.push(f(a.v[ia as usize], b.v[ib as usize])?);
    }
    Some(IntConst { dims, v, ty })
}

/// The static shape of `v` when every dimension is declared.
fn static_shape(g: &GraphIndex, v: &str) -> Option<Vec<i64>> {
    if let Some(t) = g.const_tensor(v) {
        return Some(t.dims.clone());
    }
    // graph inputs only: a stale value_info must not become a constant
    let vi = g.graph.input.iter().find(|x| x.name == v)?;
    let Some(onnx_protobuf::type_proto::Value::TensorType(t)) = &vi.type_.as_ref()?.value else { return None };
    let s = t.shape.as_ref()?;
    s.dim
        .iter()
        .map(|d| match &d.value {
            Some(onnx_protobuf::tensor_shape_proto::dimension::Value::DimValue(x)) if *x >= 0 => Some(*x),
            _ => None,
        })
        .collect()
}

fn axes(g: &GraphIndex, n: &NodeProto) -> Option<Vec<i64>> {
    super::matcher::axes_of(g, n)
}

/// The value of `n`'s first output when every input it reads is a small integer constant.
fn eval(g: &GraphIndex, n: &NodeProto) -> Option<IntConst> {
    if !n.domain.is_empty() || n.output.len() != 1 {
        return None;
    }
    let c = |i: usize| n.input.get(i).filter(|s| !s.is_empty()).and_then(|s| int_const(g, s));
    match n.op_type.as_str() {
        "Shape" => {
            let s = static_shape(g, &n.input[0])?;
            let r = s.len() as i64;
            let cl = |x: i64| if x < 0 { (x + r).clamp(0, r) } else { x.min(r) };
            let (a, b) = (attr_i(n, "start").map_or(0, cl), attr_i(n, "end").map_or(r, cl));
            let v: Vec<i64> = s[a as usize..(b.max(a)) as usize].to_vec();
            Some(IntConst { dims: vec![v.len() as i64], v, ty: INT64 })
        }
        "Gather" => {
            let (d, i) = (c(0)?, c(1)?);
            if d.dims.len() != 1 || attr_i(n, "axis").unwrap_or(0) != 0 {
                return None;
            }
            let len = d.v.len() as i64;
            let mut v = Vec::with_capacity(i.v.len());
            for &x in &i.v {
                let j = if x < 0 { x + len } else { x };
                v.push(*d.v.get(usize::try_from(j).ok()?)?);
            }
            Some(IntConst { dims: i.dims.clone(), v, ty: d.ty })
        }
        "Concat" => {
            let parts: Option<Vec<IntConst>> = (0..n.input.len()).map(c).collect();
            let parts = parts?;
            if parts.iter().any(|p| p.dims.len() != 1 || p.ty != parts[0].ty) {
                return None;
            }
            let v: Vec<i64> = parts.iter().flat_map(|p| p.v.clone()).collect();
            Some(IntConst { dims: vec![v.len() as i64], v, ty: parts[0].ty })
        }
        "Unsqueeze" => {
            let x = c(0)?;
            let mut ax = axes(g, n)?;
            let r = (x.dims.len() + ax.len()) as i64;
            for a in ax.iter_mut() {
                if *a < 0 {
                    *a += r;
                }
            }
            ax.sort_unstable();
            let mut dims = x.dims.clone();
            for &a in &ax {
                if a < 0 || a as usize > dims.len() {
                    return None;
                }
                dims.insert(a as usize, 1);
            }
            Some(IntConst { dims, ..x })
        }
        "Squeeze" => {
            let x = c(0)?;
            let r = x.dims.len() as i64;
            let ax: Vec<i64> = match axes(g, n) {
                Some(a) => a.iter().map(|&a| if a < 0 { a + r } else { a }).collect(),
                None => (0..r).filter(|&i| x.dims[i as usize] == 1).collect(),
            };
            if ax.iter().any(|&a| a < 0 || a >= r || x.dims[a as usize] != 1) {
                return None;
            }
            let dims = x.dims.iter().enumerate().filter(|(i, _)| !ax.contains(&(*i as i64))).map(|(_, d)| *d).collect();
            Some(IntConst { dims, ..x })
        }
        "Reshape" => {
            let (x, s) = (c(0)?, c(1)?);
            if attr_i(n, "allowzero").unwrap_or(0) != 0 {
                return None;
            }
            let total = x.v.len() as i64;
            let mut dims: Vec<i64> = s.v.iter().enumerate().map(|(i, &d)| if d == 0 { x.dims.get(i).copied().unwrap_or(-2) } else { d }).collect();
            if dims.iter().any(|&d| d < -1) || dims.iter().filter(|&&d| d == -1).count() > 1 {
                return None;
            }
            let known: i64 = dims.iter().filter(|&&d| d != -1).product();
            if let Some(p) = dims.iter().position(|&d| d == -1) {
                if known == 0 || total % known != 0 {
                    return None;
                }
                dims[p] = total / known;
            }
            (dims.iter().product::<i64>() == total).then_some(IntConst { dims, ..x })
        }
        // an empty slice of a shape, whatever the shape: `Slice(Shape(x), [0], [0])`, which
        // TorchScript writes for the leading dims of a rank-1 value (`x.view(x.shape[:0] + (-1,))`)
        "Slice" if c(0).is_none() => {
            g.prod(&n.input[0]).filter(|(_, p)| p.op_type == "Shape" && p.domain.is_empty())?;
            let (s, e) = (c(1)?, c(2)?);
            let step = c(4).map_or(Some(1), |t| (t.v.len() == 1).then(|| t.v[0]))?;
            let empty = s.v.len() == 1 && e.v.len() == 1 && step == 1 && s.v[0] >= 0 && e.v[0] >= 0 && e.v[0] <= s.v[0];
            empty.then(|| IntConst { dims: vec![0], v: Vec::new(), ty: INT64 })
        }
        "Slice" => {
            let x = c(0)?;
            if x.dims.len() != 1 {
                return None;
            }
            let (s, e) = (c(1)?, c(2)?);
            if s.v.len() != 1 || e.v.len() != 1 {
                return None;
            }
            if let Some(a) = c(3) {
                if a.v != [0] && a.v != [-1] {
                    return None;
                }
            }
            let step = c(4).map_or(Some(1), |t| (t.v.len() == 1).then(|| t.v[0]))?;
            if step != 1 {
                return None;
            }
            let len = x.v.len() as i64;
            let cl = |v: i64| if v < 0 { (v + len).clamp(0, len) } else { v.min(len) };
            let (a, b) = (cl(s.v[0]), cl(e.v[0]));
            let v: Vec<i64> = if b > a { x.v[a as usize..b as usize].to_vec() } else { Vec::new() };
            Some(IntConst { dims: vec![v.len() as i64], v, ty: x.ty })
        }
        "Cast" => {
            let x = c(0)?;
            let to = attr_i(n, "to")? as i32;
            match to {
                INT64 => Some(IntConst { ty: INT64, ..x }),
                INT32 if x.v.iter().all(|&v| i32::try_from(v).is_ok()) => Some(IntConst { ty: INT32, ..x }),
                BOOL => Some(IntConst { v: x.v.iter().map(|&v| (v != 0) as i64).collect(), ty: BOOL, ..x }),
                _ => None,
            }
        }
        "Add" | "Sub" | "Mul" | "Div" => {
            let (a, b) = (c(0)?, c(1)?);
            if a.ty != b.ty || a.ty == BOOL {
                return None;
            }
            let ty = a.ty;
            let fit = move |v: i64| if ty == INT32 { i32::try_from(v).ok().map(|x| x as i64) } else { Some(v) };
            match n.op_type.as_str() {
                "Add" => broadcast(&a, &b, ty, |x, y| x.checked_add(y).and_then(fit)),
                "Sub" => broadcast(&a, &b, ty, |x, y| x.checked_sub(y).and_then(fit)),
                "Mul" => broadcast(&a, &b, ty, |x, y| x.checked_mul(y).and_then(fit)),
                // integer Div truncates toward zero, as Rust's `/` does
                _ => broadcast(&a, &b, ty, |x, y| x.checked_div(y).and_then(fit)),
            }
        }
        "Equal" => {
            let (a, b) = (c(0)?, c(1)?);
            (a.ty == b.ty).then_some(())?;
            broadcast(&a, &b, BOOL, |x, y| Some((x == y) as i64))
        }
        "Where" => {
            let (k, a, b) = (c(0)?, c(1)?, c(2)?);
            if k.ty != BOOL || a.ty != b.ty {
                return None;
            }
            // broadcast the condition against each branch, then pick
            let ka = broadcast(&k, &a, INT64, |k, x| Some(if k != 0 { x } else { i64::MIN }))?;
            broadcast(&ka, &b, a.ty, |x, y| Some(if x != i64::MIN { x } else { y })).filter(|_| !a.v.contains(&i64::MIN))
        }
        _ => None,
    }
}

fn fold(g: &mut GraphProto) -> usize {
    let results: Vec<(usize, TensorProto)> = {
        let Ok(idx) = GraphIndex::new(g, None) else { return 0 };
        let outputs: HashSet<&str> = g.output.iter().map(|o| o.name.as_str()).collect();
        g.node
            .iter()
            .enumerate()
            .filter(|(_, n)| n.output.len() == 1 && !outputs.contains(n.output[0].as_str()))
            .filter_map(|(i, n)| eval(&idx, n).map(|c| (i, encode(&n.output[0], &c))))
            .collect()
    };
    let folded: HashSet<usize> = results.iter().map(|(i, _)| *i).collect();
    let n = results.len();
    for (_, t) in results {
        g.initializer.push(t);
    }
    let mut i = 0;
    g.node.retain(|_| {
        i += 1;
        !folded.contains(&(i - 1))
    });
    n
}

fn perm_of(n: &NodeProto, rank: Option<usize>) -> Option<Vec<i64>> {
    attr_ints(n, "perm").or_else(|| rank.map(|r| (0..r as i64).rev().collect()))
}

fn merge_transposes(g: &mut GraphProto) -> usize {
    let mut changes: Vec<(usize, NodeProto)> = Vec::new();
    {
        let Ok(idx) = GraphIndex::new(g, None) else { return 0 };
        for (i, n) in g.node.iter().enumerate() {
            if n.op_type != "Transpose" || !n.domain.is_empty() {
                continue;
            }
            let Some(inner) = super::matcher::prod(&idx, &n.input[0], "Transpose") else { continue };
            let (Some(p), Some(q)) = (attr_ints(inner, "perm"), attr_ints(n, "perm")) else { continue };
            if p.len() != q.len() || q.iter().any(|&x| x < 0 || x as usize >= p.len()) {
                continue;
            }
            // out[i] = mid[q[i]] = x[p[q[i]]]
            let r: Vec<i64> = q.iter().map(|&j| p[j as usize]).collect();
            let mut m = n.clone();
            m.input[0] = inner.input[0].clone();
            m.attribute.retain(|a| a.name != "perm");
            m.attribute.push(crate::onnx::graph::attr_ints_new("perm", &r));
            changes.push((i, m));
        }
    }
    let n = changes.len();
    for (i, m) in changes {
        g.node[i] = m;
    }
    // a Transpose with the identity permutation is its input
    let outputs: HashSet<String> = g.output.iter().map(|o| o.name.clone()).collect();
    let mut alias: HashMap<String, String> = HashMap::new();
    for t in &g.node {
        if t.op_type == "Transpose" && t.domain.is_empty() && !outputs.contains(&t.output[0]) {
            if let Some(p) = perm_of(t, None) {
                if p.iter().enumerate().all(|(i, &x)| x == i as i64) {
                    alias.insert(t.output[0].clone(), t.input[0].clone());
                }
            }
        }
    }
    for node in &mut g.node {
        for i in node.input.iter_mut() {
            let mut hops = 0;
            while let Some(a) = alias.get(i.as_str()) {
                *i = a.clone();
                hops += 1;
                if hops > 64 {
                    break;
                }
            }
        }
    }
    n + alias.len()
}

/// Replaces `...` in Einsum equations by explicit labels when every operand's rank is known.
fn explicit_einsums(g: &mut GraphProto) -> usize {
    let mut changes: Vec<(usize, String)> = Vec::new();
    {
        let Ok(idx) = GraphIndex::new(g, None) else { return 0 };
        for (i, n) in g.node.iter().enumerate() {
            if n.op_type != "Einsum" || !n.domain.is_empty() {
                continue;
            }
            let Some(eq) = attr_s(n, "equation") else { continue };
            let eq: String = eq.chars().filter(|c| !c.is_whitespace()).collect();
            if !eq.contains("...") {
                continue;
            }
            let ranks: Option<Vec<usize>> = n.input.iter().map(|v| super::matcher::rank_of(&idx, v)).collect();
            if let Some(e) = ranks.and_then(|r| expand_ellipsis(&eq, &r)) {
                changes.push((i, e));
            }
        }
    }
    let n = changes.len();
    for (i, e) in changes {
        let node = &mut g.node[i];
        node.attribute.retain(|a| a.name != "equation");
        node.attribute.push(crate::onnx::graph::attr_string("equation", &e));
    }
    n
}

/// `eq` with each `...` replaced by explicit labels, given the operands' ranks (right-aligned
/// broadcasting, as Einsum defines it). None when the equation has no explicit output or the
/// ranks do not fit.
pub fn expand_ellipsis(eq: &str, ranks: &[usize]) -> Option<String> {
    let (lhs, out) = eq.split_once("->")?;
    let ops: Vec<&str> = lhs.split(',').collect();
    if ops.len() != ranks.len() {
        return None;
    }
    let used: HashSet<char> = eq.chars().filter(|c| c.is_ascii_alphabetic()).collect();
    let mut counts = Vec::new();
    for (o, &r) in ops.iter().zip(ranks) {
        let explicit = o.replace("...", "").chars().count();
        if o.contains("...") {
            counts.push(Some(r.checked_sub(explicit)?));
        } else {
            if explicit != r {
                return None;
            }
            counts.push(None);
        }
    }
    let n = counts.iter().flatten().copied().max().unwrap_or(0);
    let fresh: Vec<char> = ('A'..='Z').chain('a'..='z').filter(|c| !used.contains(c)).take(n).collect();
    if fresh.len() < n {
        return None;
    }
    let block = |k: usize| fresh[n - k..].iter().collect::<String>();
    let new_ops: Vec<String> = ops.iter().zip(&counts).map(|(o, c)| match c { Some(k) => o.replace("...", &block(*k)), None => o.to_string() }).collect();
    let new_out = out.replace("...", &block(n));
    Some(format!("{}->{}", new_ops.join(","), new_out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ellipsis_labels_are_right_aligned() {
        assert_eq!(expand_ellipsis("...d,edn->...en", &[3, 3]).as_deref(), Some("ABd,edn->ABen"));
        assert_eq!(expand_ellipsis("...e,...ed->...d", &[2, 3]).as_deref(), Some("Ae,Aed->Ad"));
        assert_eq!(expand_ellipsis("...d,...ed->...e", &[3, 3]).as_deref(), Some("ABd,Bed->ABe"));
        assert_eq!(expand_ellipsis("...d,edn->...en", &[2, 2]), None, "an explicit operand's rank must match");
        assert_eq!(expand_ellipsis("...d,edn", &[2, 3]), None, "no explicit output");
    }

    fn ic(dims: &[i64], v: &[i64]) -> IntConst {
        IntConst { dims: dims.to_vec(), v: v.to_vec(), ty: INT64 }
    }

    #[test]
    fn integer_broadcast_follows_numpy() {
        let r = broadcast(&ic(&[2, 1], &[1, 2]), &ic(&[3], &[10, 20, 30]), INT64, |a, b| Some(a + b)).unwrap();
        assert_eq!(r.dims, [2, 3]);
        assert_eq!(r.v, [11, 21, 31, 12, 22, 32]);
        assert!(broadcast(&ic(&[2], &[1, 2]), &ic(&[3], &[1, 2, 3]), INT64, |a, b| Some(a + b)).is_none());
        // integer division truncates toward zero (ONNX integer Div)
        let d = broadcast(&ic(&[2], &[-7, 7]), &ic(&[], &[2]), INT64, |a, b| a.checked_div(b)).unwrap();
        assert_eq!(d.v, [-3, 3]);
    }
}
