//! The number of experts a router chooses among: the last dimension of what its TopK or ArgMax
//! reads, told from shapes or through the ops routers are built of. Every rule asks it (an index
//! outside [0, E) drops out of a one-hot but is refused by the op).

use crate::onnx::graph::{attr_i, GraphIndex};

/// E of a router `TopK(f(MatMul(x, W[d, E])))`: the last dimension of what the TopK or ArgMax
/// chooses from ([`chosen_width`]).
pub fn router_experts(g: &GraphIndex, idx: &str) -> Option<usize> {
    let (_, n) = g.prod(idx)?;
    if !(n.op_type == "TopK" || n.op_type == "ArgMax") {
        return None;
    }
    chosen_width(g, &n.input[0], 0).and_then(|w| usize::try_from(w).ok())
}

/// The last dimension of `v` where it can be told: from the shapes `prove/shape.rs` infers, else
/// through the ops a router is built of (elementwise ops and masks broadcast to the widest known
/// operand, a MatMul or Gemm takes its weight's width, a Reshape its target's last entry). A
/// masked router (DeepSeek's group limit: `Where(mask, 0, scores)`) keeps its scores' width though
/// the mask's shape is computed.
pub fn chosen_width(g: &GraphIndex, v: &str, depth: usize) -> Option<i64> {
    if let Some(d) = super::super::prove::shape::shape_of(g, v).and_then(|s| s.last().copied()) {
        return (d.t == 0 && d.c > 0).then_some(d.c);
    }
    if let Some(t) = g.const_tensor(v) {
        return t.dims.last().copied();
    }
    if depth > 24 {
        return None;
    }
    let (_, p) = g.prod(v)?;
    if !p.domain.is_empty() {
        return None;
    }
    let arg = |i: usize| chosen_width(g, p.input.get(i)?, depth + 1);
    match p.op_type.as_str() {
        "Softmax" | "LogSoftmax" | "Sigmoid" | "Cast" | "Identity" | "Neg" | "Exp" | "Log" | "Relu" | "Tanh" | "Abs" | "Sqrt" | "Reciprocal" | "Not"
        | "Clip" | "Softplus" | "Erf" | "DequantizeLinear" => arg(0),
        "Add" | "Sub" | "Mul" | "Div" | "Pow" | "Max" | "Min" | "Where" | "Equal" | "Less" | "Greater" | "And" | "Or" => {
            // broadcasting aligns last axes: a known width above 1 is the result's (a scalar or a
            // width of 1 stretches), two different ones are not a valid graph
            let mut wide = None;
            for i in 0..p.input.len() {
                let rank0 = g.const_tensor(&p.input[i]).is_some_and(|t| t.dims.is_empty());
                match arg(i) {
                    Some(w) if w > 1 && !rank0 => match wide {
                        Some(x) if x != w => return None,
                        _ => wide = Some(w),
                    },
                    _ => {}
                }
            }
            wide
        }
        "MatMul" => super::super::dequant::weight_dims(g, &p.input[1]).and_then(|d| d.last().copied()).or_else(|| arg(1)),
        "Gemm" => {
            let d = super::super::dequant::weight_dims(g, &p.input[1]).filter(|d| d.len() == 2)?;
            Some(if attr_i(p, "transB").unwrap_or(0) != 0 { d[0] } else { d[1] })
        }
        "Reshape" => super::shape_vector(g, &p.input[1])?.last().filter(|d| d.t == 0 && d.c > 0).map(|d| d.c),
        _ => None,
    }
}
