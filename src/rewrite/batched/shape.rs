//! Shape arithmetic of the batched_mm family: the exporters build repeat counts and reshape
//! targets from `Shape()` of the token rows and the routing indices; this evaluates them with the
//! dimensions that are known, and answers nothing it cannot tell.

use super::super::matcher::axes_of;
use crate::onnx::graph::{attr_i, GraphIndex};

/// An integer vector whose entries may be unknown (`None`); `open` when it may have further
/// leading entries of unknown number (the shape of a value of unknown rank).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct IVec {
    pub(super) v: Vec<Option<i64>>,
    pub(super) open: bool,
    pub(super) scalar: bool,
}

impl IVec {
    pub(super) fn known(&self) -> Option<Vec<i64>> {
        if self.open {
            return None;
        }
        self.v.iter().copied().collect()
    }
}

/// The most entries a shape vector built by OneHot may have (ONNX Runtime's own limit on rank is
/// far above the 3 to 5 the exporters build; 64 keeps a malformed depth from being materialised).
const MAX_RANK: i64 = 64;

/// What is known of value shapes.
pub(super) type Facts<'a> = &'a dyn Fn(&str) -> Option<IVec>;

pub(super) fn eval(g: &GraphIndex, v: &str, facts: Facts, depth: usize) -> Option<IVec> {
    if depth > 24 {
        return None;
    }
    if let Some(c) = g.const_i64(v) {
        let scalar =
            g.const_dims(v).map_or(c.len() == 1 && g.prod(v).is_some_and(|(_, n)| n.attribute.iter().any(|a| a.name == "value_int")), |d| d.is_empty());
        return Some(IVec { v: c.into_iter().map(Some).collect(), open: false, scalar });
    }
    let (_, n) = g.prod(v)?;
    let arg = |i: usize| eval(g, n.input.get(i)?, facts, depth + 1);
    match n.op_type.as_str() {
        "Identity" => arg(0),
        "Cast" => {
            let t = attr_i(n, "to")?;
            // integer casts only: a float round trip could change values
            matches!(t, 6 | 7).then_some(())?;
            arg(0)
        }
        "Shape" => {
            let mut s = facts(&n.input[0])?;
            let start = attr_i(n, "start");
            let end = attr_i(n, "end");
            if start.is_some() || end.is_some() {
                let k = s.known()?;
                let len = k.len() as i64;
                let c = |x: i64| (if x < 0 { x + len } else { x }).clamp(0, len) as usize;
                let (a, b) = (c(start.unwrap_or(0)), c(end.unwrap_or(len)));
                s = IVec { v: k[a..b.max(a)].iter().copied().map(Some).collect(), open: false, scalar: false };
            }
            Some(IVec { scalar: false, ..s })
        }
        "Gather" => {
            if attr_i(n, "axis").unwrap_or(0) != 0 {
                return None;
            }
            let data = arg(0)?;
            let idx = g.const_i64(&n.input[1])?;
            let scalar = g.const_dims(&n.input[1]).is_some_and(|d| d.is_empty());
            let mut out = Vec::new();
            for i in idx {
                if i < 0 {
                    let p = data.v.len() as i64 + i;
                    if p < 0 {
                        if data.open {
                            out.push(None);
                            continue;
                        }
                        return None;
                    }
                    out.push(data.v[p as usize]);
                } else if data.open {
                    out.push(None);
                } else {
                    out.push(*data.v.get(i as usize)?);
                }
            }
            Some(IVec { v: out, open: false, scalar })
        }
        "Slice" => {
            let starts = arg(1)?.known()?;
            let ends = arg(2)?.known()?;
            if n.input.len() > 3 && !n.input[3].is_empty() && !matches!(g.const_i64(&n.input[3]).as_deref(), Some([0]) | Some([-1])) {
                return None;
            }
            if n.input.len() > 4 && !n.input[4].is_empty() && g.const_i64(&n.input[4]).as_deref() != Some(&[1]) {
                return None;
            }
            let (s, e) = (*starts.first()?, *ends.first()?);
            if s >= 0 && e >= 0 && s >= e {
                return Some(IVec { v: Vec::new(), open: false, scalar: false });
            }
            let data = arg(0)?;
            if data.open {
                // only a tail of a vector of unknown length: [-m:]
                if s < 0 && e >= i64::MAX / 2 && (-s) as usize <= data.v.len() {
                    return Some(IVec { v: data.v[data.v.len() - (-s) as usize..].to_vec(), open: false, scalar: false });
                }
                return None;
            }
            let len = data.v.len() as i64;
            let c = |x: i64| (if x < 0 { x + len } else { x }).clamp(0, len) as usize;
            let (a, b) = (c(s), c(e));
            Some(IVec { v: data.v[a..b.max(a)].to_vec(), open: false, scalar: false })
        }
        "Squeeze" => {
            let a = arg(0)?;
            (a.v.len() == 1 && !a.open).then_some(IVec { scalar: true, ..a })
        }
        "Unsqueeze" => {
            let a = arg(0)?;
            (a.scalar && axes_of(g, n).as_deref() == Some(&[0])).then_some(IVec { scalar: false, ..a })
        }
        "Reshape" => {
            let a = arg(0)?;
            let t = arg(1)?.known()?;
            (!a.open && (t == [-1] || t == [a.v.len() as i64])).then_some(IVec { scalar: false, ..a })
        }
        "Concat" => {
            let mut out = IVec { v: Vec::new(), open: false, scalar: false };
            for (i, x) in n.input.iter().enumerate() {
                let p = eval(g, x, facts, depth + 1)?;
                if p.open && i > 0 {
                    return None;
                }
                out.open |= p.open;
                out.v.extend(p.v);
            }
            Some(out)
        }
        "Add" | "Sub" | "Mul" | "Div" => {
            let (a, b) = (arg(0)?, arg(1)?);
            if a.open || b.open {
                return None;
            }
            let len = a.v.len().max(b.v.len());
            if !(a.v.len() == len || a.v.len() == 1) || !(b.v.len() == len || b.v.len() == 1) {
                return None;
            }
            let at = |x: &IVec, i: usize| if x.v.len() == 1 { x.v[0] } else { x.v[i] };
            let mut out = Vec::new();
            for i in 0..len {
                out.push(match (at(&a, i), at(&b, i)) {
                    // a value past i64 (a malformed model) is not a shape this can tell
                    (Some(p), Some(q)) => Some(match n.op_type.as_str() {
                        "Add" => p.checked_add(q)?,
                        "Sub" => p.checked_sub(q)?,
                        "Mul" => p.checked_mul(q)?,
                        _ => p.checked_div_euclid(q)?,
                    }),
                    _ => None,
                });
            }
            Some(IVec { v: out, open: false, scalar: a.scalar && b.scalar })
        }
        // torch's TorchScript exporter builds repeat_interleave's repeats [1, k, 1] as
        // OneHot([1], 3, [1, k]): indices rank 1, so the output is [n, depth], flattened here
        "OneHot" => {
            if attr_i(n, "axis").unwrap_or(-1) != -1 {
                return None;
            }
            let idx = g.const_i64(&n.input[0])?;
            let depth_v = arg(1)?.known()?;
            let vals = arg(2)?;
            if depth_v.len() != 1 || vals.v.len() != 2 || vals.open || g.const_dims(&n.input[0]).is_none_or(|d| d.len() != 1) {
                return None;
            }
            let depth = depth_v[0];
            // a shape vector has a few entries: a depth or index count past that is not this
            // idiom (and a malformed model's depth of 2^31 must not be materialised)
            if !(1..=MAX_RANK).contains(&depth) || idx.len() > MAX_RANK as usize {
                return None;
            }
            let mut out = Vec::new();
            for i in idx {
                let i = if i < 0 { i + depth } else { i };
                for j in 0..depth {
                    out.push(if j == i { vals.v[1] } else { vals.v[0] });
                }
            }
            Some(IVec { v: out, open: false, scalar: false })
        }
        _ => None,
    }
}

/// Declared dimensions of a graph input or value_info (unknown ones as `None`).
pub(super) fn declared_dims(g: &GraphIndex, v: &str) -> Option<IVec> {
    let vi = g.graph.input.iter().chain(&g.graph.value_info).find(|x| x.name == v)?;
    match &vi.type_.as_ref()?.value {
        Some(onnx_protobuf::type_proto::Value::TensorType(t)) => {
            let s = t.shape.as_ref()?;
            let v = s
                .dim
                .iter()
                .map(|d| match &d.value {
                    Some(onnx_protobuf::tensor_shape_proto::dimension::Value::DimValue(x)) => Some(*x),
                    _ => None,
                })
                .collect();
            Some(IVec { v, open: false, scalar: false })
        }
        _ => None,
    }
}

/// The width k of routing indices [T, k] (their last axis), from the router's own nodes: TopK's
/// constant k, 1 for ArgMax/ArgMin with keepdims along the last axis, the sum over a Concat along
/// the last axis, a Reshape to a constant shape ending in k, and elementwise ops (casts, Where,
/// Equal, arithmetic) whose operands other than scalar constants all have that width.
pub(super) fn index_width(g: &GraphIndex, v: &str, depth: usize) -> Option<i64> {
    if depth > 24 {
        return None;
    }
    let (_, n) = g.prod(v)?;
    if !(n.domain.is_empty() || n.domain == "ai.onnx") {
        return None;
    }
    let rank = |x: &str| super::super::matcher::rank_of(g, x);
    let last = |axis: i64, x: &str| super::super::matcher::is_last_axis(axis, rank(x));
    match n.op_type.as_str() {
        "TopK" if n.output.get(1).map(String::as_str) == Some(v) && last(attr_i(n, "axis").unwrap_or(-1), &n.input[0]) => {
            g.const_i64(&n.input[1]).filter(|k| k.len() == 1).map(|k| k[0])
        }
        "ArgMax" | "ArgMin" if attr_i(n, "keepdims").unwrap_or(1) == 1 && last(attr_i(n, "axis").unwrap_or(0), &n.input[0]) => Some(1),
        "Concat" if last(attr_i(n, "axis")?, v) => n.input.iter().map(|i| index_width(g, i, depth + 1)).sum(),
        "Reshape" => g.const_i64(&n.input[1]).and_then(|t| t.last().copied()).filter(|&k| k > 0),
        "Cast" | "Identity" | "Where" | "Equal" | "Not" | "And" | "Or" | "Add" | "Sub" | "Mul" => {
            let mut w = None;
            for i in n.input.iter().filter(|i| !i.is_empty()) {
                if g.const_tensor(i).is_some_and(|t| t.dims.iter().product::<i64>() == 1) {
                    continue;
                }
                let wi = index_width(g, i, depth + 1)?;
                if w.is_some_and(|w| w != wi) {
                    return None;
                }
                w = Some(wi);
            }
            w
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::graph::make_node;
    use crate::onnx::tensor::make_i64;
    use onnx_protobuf::GraphProto;

    fn graph(nodes: Vec<onnx_protobuf::NodeProto>, inits: Vec<onnx_protobuf::TensorProto>) -> GraphProto {
        let mut g = GraphProto::new();
        g.node = nodes;
        g.initializer = inits;
        g
    }

    fn none(_: &str) -> Option<IVec> {
        None
    }

    /// TorchScript's repeat_interleave(X, k) repeats: OneHot([1], 3, [1, k]) flattened = [1, k, 1],
    /// with k read from the routing indices' shape.
    #[test]
    fn onehot_repeat_counts_evaluate_to_one_k_one() {
        let nodes = vec![
            make_node("Shape", "", "s", &["idx"], &["shape"]),
            make_node("Slice", "", "sl", &["shape", "m1", "big", "zero"], &["last"]),
            make_node("Squeeze", "", "sq", &["last", "zero"], &["k"]),
            make_node("Reshape", "", "r", &["k", "one_v"], &["k1"]),
            make_node("Concat", "", "c", &["one_v", "k1"], &["vals"]),
            make_node("OneHot", "", "oh", &["one_v", "three", "vals"], &["oh"]),
            make_node("Reshape", "", "flat", &["oh", "m1"], &["reps"]),
        ];
        let inits = vec![
            make_i64("m1", &[1], &[-1]),
            make_i64("big", &[1], &[i64::MAX]),
            make_i64("zero", &[1], &[0]),
            make_i64("one_v", &[1], &[1]),
            make_i64("three", &[], &[3]),
        ];
        let gp = graph(nodes, inits);
        let g = GraphIndex::new(&gp, None).unwrap();
        let facts = |v: &str| (v == "idx").then(|| IVec { v: vec![Some(2)], open: true, scalar: false });
        let r = eval(&g, "reps", &facts, 0).unwrap();
        assert_eq!(r.known(), Some(vec![1, 2, 1]));
        // without knowing the indices' shape the count is not known, and nothing is assumed
        assert!(eval(&g, "reps", &none, 0).is_none());
    }

    /// A malformed model's numbers are not materialised or wrapped: a OneHot depth of 2^31 (it
    /// took 24 GB before), a product past i64 (found by fuzz/ci.sh's rewrite target).
    #[test]
    fn huge_depths_and_overflowing_products_are_unknown() {
        let nodes = vec![
            make_node("OneHot", "", "oh", &["one_v", "huge", "vals"], &["oh"]),
            make_node("Mul", "", "m", &["big", "big"], &["prod"]),
            make_node("Sub", "", "s", &["min", "one_v"], &["diff"]),
        ];
        let inits = vec![
            make_i64("one_v", &[1], &[1]),
            make_i64("huge", &[], &[0x7f96_9801]),
            make_i64("vals", &[2], &[1, 2]),
            make_i64("big", &[1], &[i64::MAX / 2]),
            make_i64("min", &[1], &[i64::MIN]),
        ];
        let gp = graph(nodes, inits);
        let g = GraphIndex::new(&gp, None).unwrap();
        assert!(eval(&g, "oh", &none, 0).is_none());
        assert!(eval(&g, "prod", &none, 0).is_none());
        assert!(eval(&g, "diff", &none, 0).is_none());
    }

    /// A Gather of a known position of an open shape is unknown, of its tail known.
    #[test]
    fn open_shapes_answer_only_from_the_end() {
        let nodes = vec![
            make_node("Shape", "", "s", &["x"], &["shape"]),
            make_node("Gather", "", "g0", &["shape", "i0"], &["first"]),
            make_node("Gather", "", "g1", &["shape", "im1"], &["last"]),
        ];
        let inits = vec![make_i64("i0", &[], &[0]), make_i64("im1", &[], &[-1])];
        let gp = graph(nodes, inits);
        let g = GraphIndex::new(&gp, None).unwrap();
        let facts = |v: &str| (v == "x").then(|| IVec { v: vec![Some(32)], open: true, scalar: false });
        assert_eq!(eval(&g, "first", &facts, 0).unwrap().v, vec![None]);
        let last = eval(&g, "last", &facts, 0).unwrap();
        assert_eq!((last.v, last.scalar), (vec![Some(32)], true));
    }

    /// Routing index widths: PhiMoE's two keepdims ArgMax columns, Zaya's masked TopK, a constant
    /// reshape; an ArgMax along another axis or a Concat along the tokens tells nothing.
    #[test]
    fn index_widths_come_from_the_routers_own_nodes() {
        use crate::onnx::graph::attr_int;
        let mut a0 = make_node("ArgMax", "", "a0", &["s"], &["i0"]);
        a0.attribute.extend([attr_int("axis", -1), attr_int("keepdims", 1)]);
        let mut a1 = make_node("ArgMax", "", "a1", &["s"], &["i1"]);
        a1.attribute.extend([attr_int("axis", -1), attr_int("keepdims", 1)]);
        let mut a2 = make_node("ArgMax", "", "a2", &["s"], &["i2"]);
        a2.attribute.extend([attr_int("axis", 0), attr_int("keepdims", 1)]);
        let mut c = make_node("Concat", "", "c", &["i0", "i1"], &["pair"]);
        c.attribute.push(attr_int("axis", -1));
        let mut c0 = make_node("Concat", "", "c0", &["i0", "i1"], &["tall"]);
        c0.attribute.push(attr_int("axis", 0));
        let mut c2 = make_node("Concat", "", "c2", &["i0", "i2"], &["mixed"]);
        c2.attribute.push(attr_int("axis", -1));
        let mut tk = make_node("TopK", "", "tk", &["s", "k"], &["v", "ti"]);
        tk.attribute.push(attr_int("axis", -1));
        let nodes = vec![
            a0,
            a1,
            a2,
            c,
            c0,
            c2,
            tk,
            make_node("Equal", "", "eq", &["ti", "skip"], &["is_skip"]),
            make_node("Where", "", "w", &["is_skip", "zero", "ti"], &["masked"]),
            make_node("Reshape", "", "r", &["masked", "shape"], &["flat2"]),
        ];
        let inits = vec![make_i64("k", &[1], &[2]), make_i64("skip", &[], &[4]), make_i64("zero", &[], &[0]), make_i64("shape", &[2], &[-1, 3])];
        let gp = graph(nodes, inits);
        let g = GraphIndex::new(&gp, None).unwrap();
        assert_eq!(index_width(&g, "pair", 0), Some(2));
        assert_eq!(index_width(&g, "masked", 0), Some(2));
        assert_eq!(index_width(&g, "flat2", 0), Some(3));
        assert_eq!(index_width(&g, "tall", 0), None);
        assert_eq!(index_width(&g, "mixed", 0), None);
    }
}
