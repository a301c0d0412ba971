//! The reference a region is compared with where its own element type cannot be trusted or run:
//! ONNX Runtime 1.31's CPU `com.microsoft.MoE` kernel has no bfloat16 implementation (the region
//! runs at no token count), and its float16 implementation returns zeros whenever
//! `normalize_routing_weights` is not 1 (docs/rewriter.md, "com.microsoft.MoE in float16 and
//! bfloat16"). Its float32 kernel computes the node's semantics (checked against a float64
//! evaluation by `python/tests/test_ort_moe_matrix.py`). So such a node is run in float32 on its
//! own 16-bit values: every 16-bit input (token rows, router logits, weights, biases) is cast up
//! exactly, the node runs in float32, and its result is cast back to the node's type under the
//! node's own output name, so the rest of the region and the comparison are unchanged. The inputs
//! are still drawn in the 16-bit type, so both models see the same values; the comparison keeps
//! the 16-bit tolerance.

use onnx_protobuf::NodeProto;

use crate::onnx::graph::{attr_int, make_node, GraphIndex};

const FLOAT: i32 = 1;
const FLOAT16: i32 = 10;
const BFLOAT16: i32 = 16;

/// Whether ONNX Runtime's CPU kernel for `n` cannot be trusted in the 16-bit type `elem`
/// (`com.microsoft.QMoE` has no bfloat16 CPU kernel either; its float16 one is right).
fn untrusted(n: &NodeProto, elem: i32) -> bool {
    n.domain == "com.microsoft" && ((n.op_type == "MoE" && matches!(elem, FLOAT16 | BFLOAT16)) || (n.op_type == "QMoE" && elem == BFLOAT16))
}

/// The region `nodes` (in order) with the node that computes its `output` run in float32 on the
/// same values, where that node's 16-bit kernel cannot be trusted; the region's output is then
/// float32. None: the region is its own reference.
///
/// The float32 result is the region's output itself, not cast back to the 16-bit type: ONNX
/// Runtime 1.31's float32 kernel, too, returns zeros without normalised routing weights when its
/// token rows come from a Cast and its result goes on to a Cast (measured; with its result as the
/// graph's output it matches the float64 evaluation in every combination the tests build).
pub(super) fn float32_twin(g: &GraphIndex, nodes: &[NodeProto], output: &str) -> Option<Vec<NodeProto>> {
    let at = nodes.iter().position(|n| n.output.first().map(String::as_str) == Some(output))?;
    let elem = g.infer_type(output)?;
    if !untrusted(&nodes[at], elem) || nodes.iter().any(|n| n.input.iter().any(|i| i == output)) {
        return None;
    }
    let mut out = Vec::with_capacity(nodes.len() + 8);
    for (i, n) in nodes.iter().enumerate() {
        if i != at {
            out.push(n.clone());
            continue;
        }
        let mut n = n.clone();
        let tag = "scattermoe_proof_f32";
        for (j, v) in n.input.iter_mut().enumerate() {
            if v.is_empty() || !matches!(g.infer_type(v), Some(FLOAT16 | BFLOAT16)) {
                continue;
            }
            let up = format!("{tag}/in{j}");
            let mut c = make_node("Cast", "", &format!("{tag}/Cast_in{j}"), &[v.as_str()], &[&up]);
            c.attribute.push(attr_int("to", FLOAT as i64));
            out.push(c);
            *v = up;
        }
        out.push(n);
    }
    Some(out)
}
