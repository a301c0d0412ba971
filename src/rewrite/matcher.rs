//! Graph helpers shared by the rules: producers of a given op,
//! axes in either opset form, ranks and vector lengths read from the graph, and the no-op forms of
//! broadcasts and floor divisions that exporters write around index tensors.

use onnx_protobuf::NodeProto;

use crate::onnx::graph::{attr_i, attr_ints, GraphIndex};

/// The producer of `v` when it is the default-domain op `op` (the domain written "" or "ai.onnx").
pub fn prod<'g>(g: &GraphIndex<'g>, v: &str, op: &str) -> Option<&'g NodeProto> {
    g.prod(v).map(|(_, n)| n).filter(|n| n.op_type == op && (n.domain.is_empty() || n.domain == "ai.onnx"))
}

/// `axes` of Unsqueeze/Squeeze/Reduce*: the second input (opset 13+) or the attribute.
pub fn axes_of(g: &GraphIndex, n: &NodeProto) -> Option<Vec<i64>> {
    if n.input.len() > 1 && !n.input[1].is_empty() {
        g.const_i64(&n.input[1])
    } else {
        attr_ints(n, "axes")
    }
}

fn declared_rank(g: &GraphIndex, v: &str) -> Option<usize> {
    if let Some(t) = g.const_tensor(v) {
        return Some(t.dims.len());
    }
    let vi = g.graph.input.iter().chain(&g.graph.output).chain(&g.graph.value_info).find(|x| x.name == v)?;
    match &vi.type_.as_ref()?.value {
        Some(onnx_protobuf::type_proto::Value::TensorType(t)) => t.shape.as_ref().map(|s| s.dim.len()),
        _ => None,
    }
}

/// The rank of `v`, from declarations or through ops whose output rank follows from their inputs.
pub fn rank_of(g: &GraphIndex, v: &str) -> Option<usize> {
    rank_depth(g, v, 0)
}

fn rank_depth(g: &GraphIndex, v: &str, depth: usize) -> Option<usize> {
    if let Some(r) = declared_rank(g, v) {
        return Some(r);
    }
    if depth > 48 {
        return None;
    }
    let (_, n) = g.prod(v)?;
    if !n.domain.is_empty() {
        return None;
    }
    let r = |i: usize| n.input.get(i).filter(|s| !s.is_empty()).and_then(|s| rank_depth(g, s, depth + 1));
    match n.op_type.as_str() {
        "Cast" | "Identity" | "Softmax" | "LogSoftmax" | "Sigmoid" | "Relu" | "Tanh" | "Exp" | "Neg" | "Abs" | "Sqrt" | "Erf" | "Not"
        | "TopK" | "CumSum" | "Clip" | "ScatterElements" | "ScatterND" | "GatherElements" | "Floor" | "Ceil" | "Round" | "Sign"
        | "DequantizeLinear" => r(0),
        "Add" | "Sub" | "Mul" | "Div" | "Pow" | "Mod" | "Equal" | "Less" | "Greater" | "LessOrEqual" | "GreaterOrEqual" | "And" | "Or" | "Xor"
        | "Where" | "Max" | "Min" => {
            let mut m = 0;
            for i in 0..n.input.len() {
                m = m.max(r(i)?);
            }
            Some(m)
        }
        "MatMul" => {
            let (a, b) = (r(0)?, r(1)?);
            (a >= 2 && b >= 2).then(|| a.max(b))
        }
        "Gemm" => Some(2),
        "OneHot" => r(0).map(|x| x + 1),
        "Shape" => Some(1),
        "Reshape" | "ConstantOfShape" | "Expand" => {
            let len = vec_len(g, &n.input[if n.op_type == "ConstantOfShape" { 0 } else { 1 }])?;
            if n.op_type == "Expand" {
                Some(len.max(r(0)?))
            } else {
                Some(len)
            }
        }
        "Unsqueeze" => r(0)?.checked_add(axes_of(g, n)?.len()),
        // a malformed model can squeeze more axes than there are: no rank then
        "Squeeze" => r(0)?.checked_sub(axes_of(g, n)?.len()),
        "ReduceSum" | "ReduceMax" | "ReduceMean" | "ArgMax" => {
            let keep = attr_i(n, "keepdims").unwrap_or(1) != 0;
            if keep {
                r(0)
            } else if n.op_type == "ArgMax" {
                r(0)?.checked_sub(1)
            } else {
                r(0)?.checked_sub(axes_of(g, n)?.len())
            }
        }
        "Transpose" | "Concat" | "Slice" | "Split" | "Pad" | "Gelu" | "Softplus" => r(0),
        "Gather" => r(0)?.checked_sub(1)?.checked_add(r(1)?),
        "NonZero" => Some(2),
        "Range" => Some(1),
        "Size" => Some(0),
        "Flatten" => Some(2),
        "Einsum" => {
            let eq = crate::onnx::graph::attr_s(n, "equation")?;
            let out = eq.split_once("->")?.1.trim().to_string();
            (!out.contains('.')).then(|| out.chars().filter(|c| c.is_ascii_alphabetic()).count())
        }
        _ => None,
    }
}

/// The length of a 1-D value (a shape vector): constants, `Shape(x)` of a known rank,
/// `Unsqueeze` of a scalar, `Concat`, `Slice` with constant bounds.
pub fn vec_len(g: &GraphIndex, v: &str) -> Option<usize> {
    if let Some(c) = g.const_i64(v) {
        return Some(c.len());
    }
    let (_, n) = g.prod(v)?;
    match n.op_type.as_str() {
        "Shape" => {
            let r = rank_of(g, &n.input[0])? as i64;
            let clamp = |x: i64| if x < 0 { (x + r).clamp(0, r) } else { x.min(r) };
            let s = attr_i(n, "start").map_or(0, clamp);
            let e = attr_i(n, "end").map_or(r, clamp);
            Some((e - s).max(0) as usize)
        }
        "Unsqueeze" => (rank_of(g, &n.input[0]) == Some(0) && axes_of(g, n)?.len() == 1).then_some(1),
        "Concat" => n.input.iter().map(|i| vec_len(g, i)).sum(),
        "Cast" | "Identity" | "Abs" | "Neg" => vec_len(g, &n.input[0]),
        // entries of a shape picked by a 1-D constant index
        "Gather" => g.const_dims(&n.input[1]).filter(|d| d.len() == 1).map(|d| d[0] as usize),
        "Slice" => {
            let len = vec_len(g, &n.input[0])? as i64;
            let s = g.const_i64(&n.input[1]).filter(|x| x.len() == 1)?[0];
            let e = g.const_i64(&n.input[2]).filter(|x| x.len() == 1)?[0];
            if n.input.len() > 4 && !n.input[4].is_empty() && g.const_i64(&n.input[4])? != [1] {
                return None;
            }
            let clamp = |x: i64| if x < 0 { (x + len).clamp(0, len) } else { x.min(len) };
            Some((clamp(e) - clamp(s)).max(0) as usize)
        }
        _ => None,
    }
}

/// The entries of a 1-D shape vector, each a constant or None where computed: a constant, or a
/// Concat of constants and one-element computed parts (an Unsqueeze of a scalar, a Reshape to
/// [1], a one-element Slice or Gather of a shape).
pub fn shape_entries(g: &GraphIndex, v: &str) -> Option<Vec<Option<i64>>> {
    if let Some(c) = g.const_i64(v) {
        return Some(c.into_iter().map(Some).collect());
    }
    let cat = prod(g, v, "Concat")?;
    let mut out = Vec::new();
    for part in &cat.input {
        if let Some(c) = g.const_i64(part) {
            out.extend(c.into_iter().map(Some));
            continue;
        }
        let scalar_to_1 = |r: &NodeProto| g.const_i64(&r.input[1]).is_some_and(|t| t == [1] || t == [-1]) && rank_of(g, &r.input[0]) == Some(0);
        if !(vec_len(g, part) == Some(1) || prod(g, part, "Reshape").is_some_and(scalar_to_1)) {
            return None;
        }
        out.push(None);
    }
    Some(out)
}

/// A normalised axis: `axis` of a tensor of rank `rank`, when both are known.
pub fn norm_axis(axis: i64, rank: Option<usize>) -> Option<usize> {
    let r = rank? as i64;
    let a = if axis < 0 { axis + r } else { axis };
    (0..r).contains(&a).then_some(a as usize)
}

/// Whether `axis` is the last axis of a tensor of rank `rank` (rank unknown: only -1 is).
pub fn is_last_axis(axis: i64, rank: Option<usize>) -> bool {
    axis == -1 || rank.is_some_and(|r| axis == r as i64 - 1)
}

/// The shape vector `s` with torch's `expand` idiom unwrapped: `Where(Equal(S, -1 * ones), ones, S)`
/// is S wherever S holds no -1, which a `Shape` never does.
fn unwrap_expand_shape<'g>(g: &GraphIndex<'g>, s: &'g str) -> &'g str {
    if let Some(w) = prod(g, s, "Where") {
        if let Some(eq) = prod(g, &w.input[0], "Equal") {
            let shape_like = |v: &str| prod(g, v, "Shape").is_some();
            if eq.input[0] == w.input[2] && shape_like(&w.input[2]) {
                return g.graph.node[g.producer[w.input[2].as_str()]].output[0].as_str();
            }
        }
    }
    s
}

/// Strips Cast and Expand from `v` while each Expand provably keeps its input's shape: its target
/// is `Shape(t)` with t one of `peers` or a broadcast (Add/Mul/Sub) of peers, where every peer is
/// known to have the same shape as the Expand's input; or a constant of ones no longer than the
/// input's rank. Any other Expand stays (and the caller's pattern then fails on it).
pub fn strip_noop_expand<'g>(g: &GraphIndex<'g>, v: &'g str, peers: &[&str]) -> &'g str {
    let mut cur = v;
    for _ in 0..8 {
        let Some((_, n)) = g.prod(cur) else { break };
        if !n.domain.is_empty() {
            break;
        }
        match n.op_type.as_str() {
            "Cast" => cur = &n.input[0],
            "Expand" => {
                let x = n.input[0].as_str();
                let s = unwrap_expand_shape(g, &n.input[1]);
                let inner = crate::onnx::graph::strip(g, x, &["Cast"]);
                let ok = if let Some(c) = g.const_i64(s) {
                    c.iter().all(|&d| d == 1) && rank_of(g, x).is_some_and(|r| c.len() <= r)
                } else if let Some(sh) = prod(g, s, "Shape") {
                    let t = sh.input[0].as_str();
                    let same = |v: &str| peers.contains(&v) || peers.contains(&crate::onnx::graph::strip(g, v, &["Cast"]));
                    attr_i(sh, "start").is_none()
                        && attr_i(sh, "end").is_none()
                        && same(inner)
                        && (same(t) || ["Add", "Mul", "Sub"].iter().any(|op| prod(g, t, op).is_some_and(|b| b.input.iter().all(|i| same(i)))))
                } else {
                    false
                };
                if !ok {
                    break;
                }
                cur = x;
            }
            _ => break,
        }
    }
    cur
}

/// Fixture loading and single-node mutations for the rule tests beside each rule.
#[cfg(test)]
pub(crate) mod testing {
    use onnx_protobuf::NodeProto;

    use crate::onnx::Model;

    pub fn fixture(name: &str) -> Model {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models").join(format!("{name}.onnx"));
        crate::onnx::load(&p).unwrap()
    }

    /// The first node of `op` whose output name contains `tag` (mutable).
    pub fn node_mut<'m>(m: &'m mut Model, op: &str, tag: &str) -> &'m mut NodeProto {
        let g = m.proto.graph.mut_or_insert_default();
        g.node.iter_mut().find(|n| n.op_type == op && n.output.iter().any(|o| o.contains(tag))).unwrap_or_else(|| panic!("no {op} node {tag}"))
    }

    pub fn set_int_attr(n: &mut NodeProto, name: &str, v: i64) {
        n.attribute.retain(|a| a.name != name);
        n.attribute.push(crate::onnx::graph::attr_int(name, v));
    }

    /// Rewrites `m`; (layers replaced, every rejection reason).
    pub fn rewrite(m: &mut Model) -> (usize, Vec<String>) {
        let r = crate::rewrite::rewrite(m).unwrap();
        (r.layers.len(), r.rejected.iter().map(|x| format!("{}: {}", x.family, x.reason)).collect())
    }
}

/// The 16-bit value `v` widens when `v` is its exact `Cast` to float32 (the dynamo exporter writes a
/// float16 sum as `ReduceSum(Cast(x, float32))`, torch accumulating in float32), else `v`.
pub fn widened_16bit<'g>(g: &GraphIndex<'g>, v: &'g str) -> &'g str {
    match prod(g, v, "Cast") {
        Some(c) if crate::onnx::graph::attr_i(c, "to") == Some(1) && matches!(g.infer_type(&c.input[0]), Some(10 | 16)) => &c.input[0],
        _ => v,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::graph::make_node;
    use crate::onnx::tensor::make_i64;

    /// A malformed model may squeeze or reduce more axes than its value has: no rank, not a
    /// wrapped one (fuzz/ci.sh's rewrite target found the Squeeze).
    #[test]
    fn removing_more_axes_than_there_are_has_no_rank() {
        let mut gp = onnx_protobuf::GraphProto::new();
        gp.node = vec![
            make_node("Squeeze", "", "sq", &["x", "axes3"], &["over"]),
            make_node("Squeeze", "", "sq1", &["x", "axes1"], &["fine"]),
            make_node("Gather", "", "g", &["scalar", "x"], &["gathered"]),
        ];
        gp.initializer =
            vec![make_i64("x", &[2, 1], &[0, 0]), make_i64("axes3", &[3], &[0, 1, 2]), make_i64("axes1", &[1], &[1]), make_i64("scalar", &[], &[5])];
        let g = GraphIndex::new(&gp, None).unwrap();
        assert_eq!(rank_of(&g, "over"), None);
        assert_eq!(rank_of(&g, "fine"), Some(1));
        assert_eq!(rank_of(&g, "gathered"), None);
    }
}
