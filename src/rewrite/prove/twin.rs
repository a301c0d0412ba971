//! The float32 twin: the reference a region is compared with where it cannot be run, or trusted,
//! in its own 16-bit type on ONNX Runtime's CPU provider.
//!
//! Why a twin is needed (ONNX Runtime 1.31.1, CPU; measured by running each op alone):
//! - float16 has no `ScatterND` with a reduction (add, mul, max, min) and no `ScatterElements`
//!   with `add` or `mul`: the kernel is registered but refuses at run time, so a region that
//!   accumulates with them (JetMoE's `index_add` from the dynamo exporter) runs at no token count.
//!   (Ops without a float16 kernel at all, e.g. `CumSum`, `TopK`, `Einsum`, are run by ONNX
//!   Runtime itself in float32 between inserted casts, and run.)
//! - bfloat16 has almost nothing: `MatMul`, `Gemm`, `Add`, `Mul`, `Softmax`, `TopK`, the reductions,
//!   `CumSum`, `Where`, the activations, comparisons, `Expand`, `Tile`, every scatter with a
//!   reduction are missing, so a bfloat16 layer does not even load.
//! - `com.microsoft.MoE` has no bfloat16 kernel, and its float16 kernel returns zeros whenever
//!   `normalize_routing_weights` is not 1 (docs/rewriter.md, "com.microsoft.MoE in float16 and
//!   bfloat16"); its float32 kernel computes the node's semantics (checked against a float64
//!   evaluation by `python/tests/test_ort_moe_matrix.py`). That node is always run in float32.
//!
//! The twin computes the chosen nodes in float32 on the same values: every 16-bit value they read
//! from outside (the proof's 16-bit inputs, shared nodes' results, initializers) is cast up
//! exactly (the inputs are still drawn in the 16-bit type, so both proof models see the same
//! values), constants they hold are converted exactly, and a `Cast` (or `CastLike`) to a 16-bit
//! type among them is kept as a rounding step (a `Cast` to the 16-bit type, then one back to
//! float32), so the twin rounds where the graph itself asks for rounding. The nodes both proof
//! models compute (`Region::shared`, e.g. a router the proof derives) must give both models the
//! same values: where they are 16-bit they are computed in float32 in both models alike (ONNX
//! Runtime cannot run a bfloat16 router either), their results rounded to 16 bits, so both models
//! see one routing (`prove.rs` builds the replacement's side so). The twin's output is float32: the region's result is not rounded
//! to 16 bits at the end (ONNX Runtime 1.31's float32 `com.microsoft.MoE` kernel, too, returns
//! zeros without normalised weights when its token rows come from a Cast and its result goes on to
//! a Cast: measured; with its result as the graph's output it matches the float64 evaluation).
//!
//! What the twin does not reproduce is the rounding of every intermediate to 16 bits that the
//! original's kernels do; the tolerance this costs is argued at [`ROUNDING_GAP`].

use std::collections::{HashMap, HashSet};

use anyhow::{bail, Result};
use onnx_protobuf::{NodeProto, TensorProto};

use crate::onnx::graph::{attr_i, attr_int, make_node, GraphIndex};

const FLOAT: i32 = 1;
const FLOAT16: i32 = 10;
const BFLOAT16: i32 = 16;

fn is16(t: Option<i32>) -> bool {
    matches!(t, Some(FLOAT16 | BFLOAT16))
}

/// How far the original's own 16-bit rounding may take a region from its float32 twin, relative
/// to the largest |output|: 16 u for float16 (0) and bfloat16 (1), u the type's unit roundoff
/// (2^-11, 2^-8).
///
/// The estimate. The original rounds each node's result to its 16-bit type (|error| <= u |value|);
/// inside, the kernels accumulate in float32 (ONNX Runtime's CPU provider: MLAS, and the float32
/// kernels it runs between casts it inserts for ops without a 16-bit one; torch likewise), so a
/// node adds one rounding of its result. The twin computes the same nodes on the same values
/// without these roundings (the graph's explicit casts round in both). To first order the gap at an
/// output y is the sum, over the rounded results v, of (v's rounding error) * dy/dv. Per token and
/// expert an MoE layer rounds about eight results in a chain: the first linear layer, the
/// activation's one to three elementwise ops, the gate-up product, the second linear layer, the
/// weighting, the sum over k, the scatter into the tokens (gathers, reshapes and splits move values
/// without rounding them). A result rounded after the second linear layer carries its error to y
/// at most one to one (routing weights are at most 1); one rounded before it is carried with that
/// layer's gain sum_j |W_ij| |a_j| / max |y|, which cancellation inside the dot product makes
/// larger than 1. Taking the gain as at most 4 and the eight errors as adding up to at most half
/// their worst case gives 8 * 4 * u / 2 = 16 u: 7.8e-3 for float16, 6.3e-2 for bfloat16. It is an
/// estimate, not a worst case (a layer whose dot products cancel far more has a larger gain), so
/// it is measured: `tests/rewrite_prove.rs` (`the_float32_twin_is_within_the_rounding_gap_of_16_bit_
/// computation`) rounds every node's result of each 16-bit fixture's region (to float16, and to
/// bfloat16 as if the layer were bfloat16) and compares with the twin on the proof's own inputs:
/// at most 1.1e-3 (2.3 u) in float16 and 1.2e-2 (3.1 u) in bfloat16 (2026-12-06), and the test
/// holds every region to half the gap.
///
/// The proof compares the replacement with the twin at the type's tolerance plus this gap: a
/// replacement within the type's tolerance of the original (what a native comparison accepts) is
/// within tolerance + gap of the twin, so no right candidate is refused for the twin's want of
/// rounding; and a replacement accepted is within tolerance + 2 gap of the original (float16:
/// 2.6e-2 at most, 1.2e-2 with the gap measured). A wrong candidate differs by far more and is still
/// refused: `tests/rewrite_families.rs` checks JetMoE's float16 block with two experts swapped and
/// with gelu for silu, and a bfloat16 block.
pub const ROUNDING_GAP: [f64; 2] = [16.0 / 2048.0, 16.0 / 256.0];

/// [`ROUNDING_GAP`] of the 16-bit type the chosen nodes compute in (bfloat16's where both occur).
pub(super) fn rounding_gap(g: &GraphIndex, nodes: &[NodeProto], chosen: &[bool]) -> f64 {
    let bf16 = nodes.iter().zip(chosen).filter(|(_, &c)| c).any(|(n, _)| n.input.iter().chain(&n.output).any(|v| g.infer_type(v) == Some(BFLOAT16)));
    ROUNDING_GAP[bf16 as usize]
}

/// The node computing `output` when it is a 16-bit `com.microsoft.MoE`, whose ONNX Runtime kernel
/// is missing (bfloat16) or defective (float16), or a bfloat16 `com.microsoft.QMoE` (no kernel):
/// its index in `nodes`.
pub(super) fn untrusted_node(g: &GraphIndex, nodes: &[NodeProto], output: &str) -> Option<usize> {
    let at = nodes.iter().position(|n| n.output.first().map(String::as_str) == Some(output))?;
    let n = &nodes[at];
    // com.microsoft.QMoE has no bfloat16 CPU kernel either; its float16 one is right.
    let t = g.infer_type(output);
    let untrusted = n.domain == "com.microsoft" && ((n.op_type == "MoE" && is16(t)) || (n.op_type == "QMoE" && t == Some(BFLOAT16)));
    (untrusted && !nodes.iter().any(|n| n.input.iter().any(|i| i == output))).then_some(at)
}

/// Whether any of the chosen nodes reads or makes a 16-bit value (or holds a 16-bit constant):
/// only then is there a twin to make.
pub(super) fn touches_16bit(g: &GraphIndex, nodes: &[NodeProto], chosen: &[bool]) -> bool {
    nodes.iter().zip(chosen).filter(|(_, &c)| c).any(|(n, _)| {
        n.input.iter().chain(&n.output).any(|v| !v.is_empty() && is16(g.infer_type(v)))
            || n.attribute.iter().any(|a| a.t.as_ref().is_some_and(|t| is16(Some(t.data_type))))
    })
}

/// A float32 copy of a 16-bit constant (a Constant's or ConstantOfShape's `value`): exact, every
/// 16-bit number is a float32 number.
fn widened(t: &TensorProto) -> Result<TensorProto> {
    let v = crate::onnx::tensor::tensor_f32(t, None)?;
    let mut raw = Vec::with_capacity(v.len() * 4);
    crate::onnx::tensor::encode_f32(&v, FLOAT, &mut raw);
    let mut w = crate::onnx::tensor::make_tensor(&t.name, FLOAT, &t.dims, raw);
    w.doc_string = t.doc_string.clone();
    Ok(w)
}

/// Which nodes a twin computes in float32, and which of their 16-bit results it rounds.
pub(super) struct Plan<'a> {
    /// computed in float32
    pub chosen: &'a [bool],
    /// of the chosen, those whose 16-bit results are rounded to 16 bits (a `Cast` there and back):
    /// nodes left in 16 bits may read these, and read the rounded value
    pub rounded: &'a [bool],
    /// round to this type instead of each result's own: as if the layer were of that type (for
    /// measuring [`ROUNDING_GAP`])
    pub round_to: Option<i32>,
}

/// `nodes` (in order) with the chosen ones computed in float32 on the same values, as the module
/// says. Errs where a chosen node cannot be run so: a subgraph (its inner types are not rewritten),
/// an attribute naming a 16-bit output type other than a Cast's, or a 16-bit result of a chosen
/// node that is not rounded read by one left as it is.
///
/// Rounding every result of every chosen node emulates a backend that computes each node in
/// float32 and stores its result in 16 bits (torch's eager float16, ONNX Runtime's kernels that
/// have the type); rounding the results of the nodes both proof models compute (a router the
/// proof derives, which ONNX Runtime cannot run in bfloat16) gives both models one routing.
pub(super) fn float32_twin(g: &GraphIndex, nodes: &[NodeProto], plan: &Plan) -> Result<Vec<NodeProto>> {
    let tag = "scattermoe_proof_f32";
    let chosen = |i: usize| plan.chosen.get(i).copied().unwrap_or(false);
    let made: HashSet<&str> = nodes.iter().enumerate().filter(|(i, _)| chosen(*i)).flat_map(|(_, n)| n.output.iter().map(String::as_str)).collect();
    // the 16-bit value a rounded result (or an explicit cast to 16 bits) leaves, for readers left in 16 bits
    let rounded_name = |o: &str| format!("{o}/{tag}_rounded");
    let mut rounded16: HashSet<String> = HashSet::new();
    let mut up: HashMap<String, String> = HashMap::new();
    let mut out = Vec::with_capacity(nodes.len() * 2);
    for (i, n) in nodes.iter().enumerate() {
        if !chosen(i) {
            let mut n = n.clone();
            for v in n.input.iter_mut().filter(|v| made.contains(v.as_str()) && is16(g.infer_type(v))) {
                if !rounded16.contains(v.as_str()) {
                    bail!("node '{}' reads the 16-bit value '{v}' of the part computed in float32", n.name);
                }
                *v = rounded_name(v);
            }
            out.push(n);
            continue;
        }
        if n.attribute.iter().any(|a| a.g.is_some() || !a.graphs.is_empty()) {
            bail!("node '{}' ({}) has a subgraph", n.name, n.op_type);
        }
        let mut n = n.clone();
        // 16-bit values from outside the twin: cast up once, before their first reader
        let like16 = (n.op_type == "CastLike").then(|| n.input.get(1).and_then(|v| g.infer_type(v)).filter(|&t| is16(Some(t)))).flatten();
        for v in n.input.iter_mut() {
            if v.is_empty() || made.contains(v.as_str()) || !is16(g.infer_type(v)) {
                continue;
            }
            let f = up.entry(v.clone()).or_insert_with(|| {
                let f = format!("{v}/{tag}");
                let mut c = make_node("Cast", "", &format!("{tag}/Cast_{}", out.len()), &[v.as_str()], &[&f]);
                c.attribute.push(attr_int("to", FLOAT as i64));
                out.push(c);
                f
            });
            *v = f.clone();
        }
        let round = |x: &str, y: &str, t: i32, j: usize, out: &mut Vec<NodeProto>| {
            let r = rounded_name(y);
            let mut down = make_node("Cast", "", &format!("{}/{tag}_round{j}", n.name), &[x], &[&r]);
            down.attribute.push(attr_int("to", t as i64));
            let mut back = make_node("Cast", "", &format!("{}/{tag}_back{j}", n.name), &[&r], &[y]);
            back.attribute.push(attr_int("to", FLOAT as i64));
            out.extend([down, back]);
        };
        let casts_to = match n.op_type.as_str() {
            "Cast" if n.domain.is_empty() => attr_i(&n, "to").map(|t| t as i32).filter(|&t| is16(Some(t))),
            "CastLike" if n.domain.is_empty() => like16,
            _ => None,
        };
        if let Some(t) = casts_to {
            // the graph rounds here: round, then go on in float32
            round(&n.input[0], &n.output[0], plan.round_to.unwrap_or(t), 0, &mut out);
            rounded16.insert(n.output[0].clone());
            continue;
        }
        for a in n.attribute.iter_mut() {
            match a.t.as_mut() {
                Some(t) if is16(Some(t.data_type)) && a.name == "value" && matches!(n.op_type.as_str(), "Constant" | "ConstantOfShape") => *t = widened(t)?,
                Some(t) if is16(Some(t.data_type)) => bail!("node '{}' ({}) holds a 16-bit tensor in attribute '{}'", n.name, n.op_type, a.name),
                _ => {}
            }
            if a.name == "dtype" && is16(Some(a.i as i32)) {
                bail!("node '{}' ({}) makes a 16-bit value by its 'dtype'", n.name, n.op_type);
            }
        }
        let mut rounding = Vec::new();
        if plan.rounded.get(i).copied().unwrap_or(false) {
            for (j, o) in n.output.iter_mut().enumerate() {
                let Some(t) = g.infer_type(o).filter(|&t| !o.is_empty() && is16(Some(t))) else { continue };
                let exact = format!("{o}/{tag}_exact");
                round(&exact, o, plan.round_to.unwrap_or(t), j, &mut rounding);
                rounded16.insert(o.clone());
                *o = exact;
            }
        }
        out.push(n);
        out.extend(rounding);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::graph::attr_int;
    use onnx_protobuf::{type_proto, GraphProto, TypeProto, ValueInfoProto};

    fn vi(name: &str, elem: i32) -> ValueInfoProto {
        let mut tt = type_proto::Tensor::new();
        tt.elem_type = elem;
        let mut t = TypeProto::new();
        t.value = Some(type_proto::Value::TensorType(tt));
        let mut v = ValueInfoProto::new();
        v.name = name.into();
        v.type_ = Some(t).into();
        v
    }

    /// x (f16) -> Mul(x, w16) -> Cast(f16 -> f32) -> Add(., one f32) -> Cast(to f16) -> Relu -> y
    fn graph() -> GraphProto {
        let mut g = GraphProto::new();
        g.input.push(vi("x", FLOAT16));
        g.output.push(vi("y", FLOAT16));
        let mut raw = Vec::new();
        crate::onnx::tensor::encode_f32(&[0.5, 3.0], FLOAT16, &mut raw);
        g.initializer.push(crate::onnx::tensor::make_tensor("w16", FLOAT16, &[2], raw));
        let n = |op: &str, i: &[&str], o: &[&str]| make_node(op, "", op, i, o);
        g.node.push(n("Mul", &["x", "w16"], &["a"]));
        let mut c = n("Cast", &["a"], &["b"]);
        c.attribute.push(attr_int("to", FLOAT as i64));
        g.node.push(c);
        g.node.push(n("Add", &["b", "b"], &["c"]));
        let mut c = n("Cast", &["c"], &["d"]);
        c.name = "Cast16".into();
        c.attribute.push(attr_int("to", FLOAT16 as i64));
        g.node.push(c);
        g.node.push(n("Relu", &["d"], &["y"]));
        g
    }

    #[test]
    fn reads_are_cast_up_once_and_casts_to_16_bit_round() {
        let g = graph();
        let gi = GraphIndex::new(&g, None).unwrap();
        let t = float32_twin(&gi, &g.node, &Plan { chosen: &[true; 5], rounded: &[], round_to: None }).unwrap();
        let ops: Vec<String> = t.iter().map(|n| format!("{}({})->{}", n.op_type, n.input.join(","), n.output.join(","))).collect();
        let f = |v: &str| format!("{v}/scattermoe_proof_f32");
        assert_eq!(
            ops,
            [
                format!("Cast(x)->{}", f("x")),
                format!("Cast(w16)->{}", f("w16")),
                format!("Mul({},{})->a", f("x"), f("w16")),
                "Cast(a)->b".into(),
                "Add(b,b)->c".into(),
                "Cast(c)->d/scattermoe_proof_f32_rounded".to_string(),
                "Cast(d/scattermoe_proof_f32_rounded)->d".to_string(),
                "Relu(d)->y".into(),
            ]
        );
        let to = |i: usize| attr_i(&t[i], "to").unwrap() as i32;
        assert_eq!([to(0), to(1), to(5), to(6)], [FLOAT, FLOAT, FLOAT16, FLOAT]);
    }

    #[test]
    fn only_the_chosen_nodes_are_twinned() {
        let g = graph();
        let gi = GraphIndex::new(&g, None).unwrap();
        // Mul left in float16: its result is cast up for the float32 part
        let t = float32_twin(&gi, &g.node, &Plan { chosen: &[false, true, true, true, true], rounded: &[], round_to: None }).unwrap();
        assert_eq!(t[0].op_type, "Mul");
        assert_eq!(t[0].input, ["x", "w16"]);
        // a node left as it is reads a cast to 16 bits of the twin: the rounded 16-bit value
        let t = float32_twin(&gi, &g.node, &Plan { chosen: &[true, true, true, true, false], rounded: &[], round_to: None }).unwrap();
        assert_eq!(t.last().unwrap().input, ["d/scattermoe_proof_f32_rounded"]);
        // ... but an unrounded 16-bit result of the twin: refused
        assert!(float32_twin(&gi, &g.node, &Plan { chosen: &[true, false, false, false, false], rounded: &[], round_to: None }).is_err());
        // rounded, it reads the rounded value; the twin reads it cast back up
        let t = float32_twin(&gi, &g.node, &Plan { chosen: &[true, false, false, false, false], rounded: &[true], round_to: None }).unwrap();
        let ops: Vec<String> = t.iter().take(6).map(|n| format!("{}({})->{}", n.op_type, n.input.join(","), n.output.join(","))).collect();
        let f = |v: &str| format!("{v}/scattermoe_proof_f32");
        assert_eq!(
            ops,
            [
                format!("Cast(x)->{}", f("x")),
                format!("Cast(w16)->{}", f("w16")),
                format!("Mul({},{})->{}_exact", f("x"), f("w16"), f("a")),
                format!("Cast({}_exact)->{}_rounded", f("a"), f("a")),
                format!("Cast({}_rounded)->a", f("a")),
                format!("Cast({}_rounded)->b", f("a")),
            ]
        );
        // as if bfloat16: the rounding casts go to bfloat16
        let t = float32_twin(&gi, &g.node, &Plan { chosen: &[true; 5], rounded: &[true; 5], round_to: Some(BFLOAT16) }).unwrap();
        assert!(t.iter().filter(|n| n.op_type == "Cast" && attr_i(n, "to") == Some(BFLOAT16 as i64)).count() >= 3);
        assert!(!t.iter().any(|n| n.op_type == "Cast" && attr_i(n, "to") == Some(FLOAT16 as i64)));
        assert!(!touches_16bit(&gi, &g.node, &[false, false, true, false, false]));
        assert!(touches_16bit(&gi, &g.node, &[false, false, false, false, true]));
    }

    #[test]
    fn constants_widen_and_16_bit_dtypes_are_refused() {
        let mut g = graph();
        let mut raw = Vec::new();
        crate::onnx::tensor::encode_f32(&[0.1], FLOAT16, &mut raw);
        let mut n = make_node("ConstantOfShape", "", "zeros", &["s"], &["z"]);
        let mut a = onnx_protobuf::AttributeProto::new();
        a.name = "value".into();
        a.t = Some(crate::onnx::tensor::make_tensor("", FLOAT16, &[1], raw)).into();
        n.attribute.push(a);
        g.node.insert(0, n);
        let gi = GraphIndex::new(&g, None).unwrap();
        let t = float32_twin(&gi, &g.node, &Plan { chosen: &[true; 6], rounded: &[], round_to: None }).unwrap();
        let z = t[0].attribute[0].t.as_ref().unwrap();
        assert_eq!(z.data_type, FLOAT);
        assert_eq!(crate::onnx::tensor::tensor_f32(z, None).unwrap(), [half::f16::from_f32(0.1).to_f32()]);
        let mut e = make_node("EyeLike", "", "eye", &["x"], &["e"]);
        e.attribute.push(attr_int("dtype", FLOAT16 as i64));
        g.node.push(e);
        let gi = GraphIndex::new(&g, None).unwrap();
        assert!(float32_twin(&gi, &g.node, &Plan { chosen: &[true; 7], rounded: &[], round_to: None }).is_err());
    }
}
