//! How many inputs and outputs a standard ONNX node must have, checked once at load.
//!
//! The rewriter reads a node's required inputs by position (`Gather`'s indices are `input[1]`).
//! A malformed model with fewer would make that an index out of bounds; ONNX Runtime refuses such
//! a model when it loads it, so the rewriter refuses it too, naming the node. The counts are the
//! ONNX operator schemas' required inputs, the lowest over the opsets where an input became
//! optional or an attribute became an input (`TopK`'s k is an input from opset 10): a valid model
//! is never refused, and every count the code relies on is checked. Ops not listed (and nodes of
//! other domains) are not checked.

use anyhow::{bail, Result};
use onnx_protobuf::{GraphProto, NodeProto};

/// Required inputs of `op` at default-domain `opset`; `None` for an op not listed.
fn min_inputs(op: &str, opset: i64) -> Option<usize> {
    Some(match op {
        "Constant" => 0,
        "Abs" | "Acos" | "Acosh" | "Asin" | "Asinh" | "Atan" | "Atanh" | "Ceil" | "Cos" | "Cosh" | "Erf" | "Exp" | "Floor" | "Identity"
        | "IsInf" | "IsNaN" | "Log" | "Neg" | "Not" | "Reciprocal" | "Relu" | "Round" | "Selu" | "Sigmoid" | "Sign" | "Sin" | "Sinh"
        | "Softplus" | "Softsign" | "Sqrt" | "Tan" | "Tanh" | "Elu" | "LeakyRelu" | "HardSigmoid" | "HardSwish" | "Mish" | "Gelu"
        | "Celu" | "Shape" | "Size" | "NonZero" | "Flatten" | "Transpose" | "Softmax" | "LogSoftmax" | "Hardmax" | "Cast" | "ArgMax"
        | "ArgMin" | "ReduceL1" | "ReduceL2" | "ReduceLogSum" | "ReduceLogSumExp" | "ReduceMax" | "ReduceMean" | "ReduceMin"
        | "ReduceProd" | "ReduceSum" | "ReduceSumSquare" | "Squeeze" | "Split" | "Concat" | "Sum" | "Max" | "Min" | "Mean" | "Einsum"
        | "Dropout" | "Clip" | "ConstantOfShape" | "Trilu" | "Resize" | "Upsample" | "If" => 1,
        "Add" | "Sub" | "Mul" | "Div" | "Pow" | "Mod" | "Equal" | "Less" | "Greater" | "LessOrEqual" | "GreaterOrEqual" | "And" | "Or"
        | "Xor" | "MatMul" | "MatMulInteger" | "Gather" | "GatherElements" | "GatherND" | "Expand" | "Tile" | "Gemm" | "PRelu"
        | "QuantizeLinear" | "DequantizeLinear" | "CumSum" | "LayerNormalization" | "Loop" => 2,
        // shape an attribute before opset 5
        "Reshape" => 1 + usize::from(opset >= 5),
        // axes an input from opset 13
        "Unsqueeze" => 1 + usize::from(opset >= 13),
        // k an input from opset 10
        "TopK" => 1 + usize::from(opset >= 10),
        // pads an input from opset 11
        "Pad" => 1 + usize::from(opset >= 11),
        // starts and ends inputs from opset 10
        "Slice" => 1 + 2 * usize::from(opset >= 10),
        "Where" | "OneHot" | "Range" | "ScatterElements" | "ScatterND" | "Scatter" => 3,
        _ => return None,
    })
}

/// Required outputs: every standard op has one, TopK two (values and indices).
fn min_outputs(op: &str) -> usize {
    if op == "TopK" {
        2
    } else {
        1
    }
}

/// Refuses a standard-domain node (in `graph` or a subgraph) with fewer inputs or outputs than its
/// op requires at `opset`.
pub fn check(graph: &GraphProto, opset: i64) -> Result<()> {
    for n in &graph.node {
        if n.domain.is_empty() || n.domain == "ai.onnx" {
            check_node(n, opset)?;
        }
        for a in &n.attribute {
            for g in a.g.as_ref().into_iter().chain(&a.graphs) {
                check(g, opset)?;
            }
        }
    }
    Ok(())
}

fn check_node(n: &NodeProto, opset: i64) -> Result<()> {
    let Some(inputs) = min_inputs(&n.op_type, opset) else { return Ok(()) };
    let short = |what: &str, have: usize, rule: String| {
        let s = if have == 1 { "" } else { "s" };
        bail!("node '{}' ({}) has {have} {what}{s}; {} {rule}: the model is malformed", n.name, n.op_type, n.op_type)
    };
    if n.input.len() < inputs {
        return short("input", n.input.len(), format!("takes at least {inputs} at opset {opset}"));
    }
    let outputs = min_outputs(&n.op_type);
    if n.output.len() < outputs {
        return short("output", n.output.len(), format!("has {outputs}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::graph::make_node;

    #[test]
    fn short_nodes_are_named_and_old_opsets_keep_their_forms() {
        let mut g = GraphProto::new();
        g.node = vec![make_node("Gather", "", "g", &["data"], &["out"])];
        let e = check(&g, 17).unwrap_err().to_string();
        assert!(e.contains("node 'g' (Gather) has 1 input; Gather takes at least 2 at opset 17"), "{e}");
        // TopK with k as an attribute (opset 1-9) is valid with one input, not from opset 10
        g.node = vec![make_node("TopK", "", "t", &["x"], &["v", "i"])];
        check(&g, 9).unwrap();
        assert!(check(&g, 11).is_err());
        g.node = vec![make_node("TopK", "", "t", &["x", "k"], &["v"])];
        assert!(check(&g, 17).unwrap_err().to_string().contains("has 1 output; TopK has 2"));
        // other domains and unlisted ops are not checked; subgraphs are
        g.node = vec![make_node("MatMulNBits", "com.microsoft", "q", &["a"], &["y"]), make_node("Frobnicate", "", "f", &[], &[])];
        check(&g, 17).unwrap();
        let mut body = GraphProto::new();
        body.node = vec![make_node("Where", "", "w", &["c", "a"], &["y"])];
        let mut iff = make_node("If", "", "if", &["c"], &["y"]);
        let mut a = onnx_protobuf::AttributeProto::new();
        a.name = "then_branch".into();
        a.g = Some(body).into();
        iff.attribute.push(a);
        g.node = vec![iff];
        assert!(check(&g, 17).unwrap_err().to_string().contains("node 'w' (Where) has 2 inputs"));
    }
}
