//! ONNX Runtime's `com.microsoft.MoE` node.
//!
//! Its semantics, as ONNX Runtime 1.31's CPU kernel computes them (checked against a float64
//! evaluation): `router_probs` [T, E] are logits; softmax over all experts, top-k, and with
//! `normalize_routing_weights = 1` the k weights are divided by their sum. `fc1_experts_weights`
//! is [E, n, d] and `fc2_experts_weights` [E, d, f] (the op's own layout); biases are [E, n] and
//! [E, d]. `activation_type`: relu, gelu (the tanh approximation), silu, or swiglu with
//! `swiglu_fusion = 1` (gate and up interleaved in fc1's rows: silu(gate) * up).
//! The router becomes Softmax -> TopK [-> ReduceSum, Div]; the experts one ScatterMoE node.
//! Forms whose semantics were not checked are left as they are, with the reason: fc3 (a separate
//! up projection), sparse mixer routing, swiglu with other fusion layouts or alpha/beta/limit,
//! quantized variants (QMoE is another op).

use super::emit::MoeLayer;
use super::expr::{BSrc, ERef, ExpertMlp, WSrc};
use super::Rejection;
use crate::onnx::graph::{attr_i, attr_int, attr_s, make_node, GraphIndex};
use crate::onnx::tensor::make_i64;
use crate::spec::{Activation, CapacityOrder, GluLayout};

pub fn find(g: &GraphIndex) -> (Vec<MoeLayer>, Vec<Rejection>) {
    let mut layers = Vec::new();
    let mut rejected = Vec::new();
    for (i, n) in g.graph.node.iter().enumerate() {
        if n.op_type != "MoE" || n.domain != "com.microsoft" {
            continue;
        }
        let at = n.output.first().cloned().unwrap_or_default();
        match convert(g, n, i) {
            Ok(l) => layers.push(l),
            Err(reason) => rejected.push(Rejection { family: "ort_moe", at, reason }),
        }
    }
    (layers, rejected)
}

fn convert(g: &GraphIndex, n: &onnx_protobuf::NodeProto, i: usize) -> Result<MoeLayer, String> {
    let inp = |j: usize| n.input.get(j).map(String::as_str).unwrap_or("");
    if n.output.len() != 1 {
        return Err("MoE with more than one output".into());
    }
    for a in &n.attribute {
        match a.name.as_str() {
            "k" | "activation_type" | "normalize_routing_weights" | "swiglu_fusion" => {}
            "use_sparse_mixer" if a.i == 0 => {}
            "use_sparse_mixer" => return Err("sparse mixer routing is not recognised".into()),
            other => return Err(format!("attribute '{other}' is not recognised")),
        }
    }
    if !inp(6).is_empty() || !inp(7).is_empty() {
        return Err("fc3 (a separate up projection) is not recognised".into());
    }
    let k = attr_i(n, "k").unwrap_or(1);
    let normalize = attr_i(n, "normalize_routing_weights").unwrap_or(0) == 1;
    let act = attr_s(n, "activation_type").unwrap_or_else(|| "relu".into());
    let (activation, gated) = match act.as_str() {
        "relu" => (Activation::Relu, false),
        "gelu" => (Activation::GeluTanh, false),
        "silu" => (Activation::Silu, false),
        "swiglu" if attr_i(n, "swiglu_fusion") == Some(1) => (Activation::Silu, true),
        "swiglu" => return Err("swiglu without swiglu_fusion = 1 (interleaved) is not recognised".into()),
        other => return Err(format!("activation_type '{other}' is not recognised")),
    };
    let (x, router, fc1, fc2) = (inp(0), inp(1), inp(2), inp(4));
    let t1 = g.const_tensor(fc1).filter(|t| t.dims.len() == 3 && g.initializers.contains_key(fc1)).ok_or("fc1 weights are not a rank-3 initializer")?;
    let t2 = g.const_tensor(fc2).filter(|t| t.dims.len() == 3 && g.initializers.contains_key(fc2)).ok_or("fc2 weights are not a rank-3 initializer")?;
    let (e, n_rows, d) = (t1.dims[0] as usize, t1.dims[1] as usize, t1.dims[2] as usize);
    let f = if gated { n_rows / 2 } else { n_rows };
    if t2.dims != [e as i64, d as i64, f as i64] || (gated && n_rows % 2 != 0) {
        return Err(format!("fc1 {:?} and fc2 {:?} are not [E, n, d] and [E, d, f]", t1.dims, t2.dims));
    }
    let bias = |name: &str, len: usize| -> Result<Option<String>, String> {
        if name.is_empty() {
            return Ok(None);
        }
        let t = g.const_tensor(name).filter(|_| g.initializers.contains_key(name)).ok_or_else(|| format!("bias '{name}' is not an initializer"))?;
        if t.dims != [e as i64, len as i64] {
            return Err(format!("bias '{name}' is {:?}, expected [{e}, {len}]", t.dims));
        }
        Ok(Some(name.to_string()))
    };
    let b1 = bias(inp(3), n_rows)?;
    let b2 = bias(inp(5), d)?;
    let experts = (0..e)
        .map(|j| {
            let r = Some(ERef::Const(j as i64));
            ExpertMlp {
                w_in: vec![WSrc { init: fc1.into(), index: r, transposed: false, out: n_rows, inp: d }],
                b_in: vec![b1.as_ref().map(|b| BSrc { init: b.clone(), index: r, len: n_rows })],
                w_out: WSrc { init: fc2.into(), index: r, transposed: false, out: d, inp: f },
                b_out: b2.as_ref().map(|b| BSrc { init: b.clone(), index: r, len: d }),
                activation,
                gated,
                glu_layout: GluLayout::Interleaved,
                alpha: 1.702,
                limit: 7.0,
                f,
                d,
            }
        })
        .collect();
    // the router as ONNX ops
    let tag = format!("ort_moe_{i}");
    let probs = format!("{tag}/probs");
    let kname = format!("{tag}/k");
    let (vals, idx) = (format!("{tag}/topk_values"), format!("{tag}/topk_indices"));
    let mut nodes = Vec::new();
    let mut inits = vec![make_i64(&kname, &[1], &[k])];
    let mut sm = make_node("Softmax", "", &format!("{tag}/Softmax"), &[router], &[&probs]);
    sm.attribute.push(attr_int("axis", -1));
    nodes.push(sm);
    let mut tk = make_node("TopK", "", &format!("{tag}/TopK"), &[&probs, &kname], &[&vals, &idx]);
    tk.attribute.push(attr_int("axis", -1));
    tk.attribute.push(attr_int("largest", 1));
    tk.attribute.push(attr_int("sorted", 1));
    nodes.push(tk);
    let weights = if normalize {
        let sum = format!("{tag}/sum");
        let w = format!("{tag}/weights");
        let mut rs = if g.default_opset() >= 13 {
            let axes = format!("{tag}/axes");
            inits.push(make_i64(&axes, &[1], &[-1]));
            make_node("ReduceSum", "", &format!("{tag}/ReduceSum"), &[&vals, &axes], &[&sum])
        } else {
            let mut r = make_node("ReduceSum", "", &format!("{tag}/ReduceSum"), &[&vals], &[&sum]);
            r.attribute.push(crate::onnx::graph::attr_ints_new("axes", &[-1]));
            r
        };
        rs.attribute.push(attr_int("keepdims", 1));
        nodes.push(rs);
        nodes.push(make_node("Div", "", &format!("{tag}/Div"), &[&vals, &sum], &[&w]));
        w
    } else {
        vals
    };
    Ok(MoeLayer {
        family: "ort_moe",
        x: x.to_string(),
        routing_weights: weights,
        routing_indices: idx,
        output: n.output[0].clone(),
        experts,
        capacity: None,
        capacity_order: CapacityOrder::SlotMajor,
        k: Some(k as usize),
        extra_nodes: nodes,
        extra_inits: inits,
    })
}
