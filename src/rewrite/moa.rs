//! JetMoE's Mixture-of-Attention: the per-expert query projection (`JetMoeMoA.map`) and output
//! projection (`JetMoeMoA.reduce`) become `ParallelLinear` nodes; the attention between them stays
//! as ONNX ops. The regions are read by [`super::jetmoe`] (same routing, same grouped linear):
//! - `map`: token rows, one grouped linear, scattered back to one row per assignment:
//!   `Y[t·k + j] = W[IDX[t, j]] X[t]` -> `ParallelLinear(X, IDX, W)` ([T, k, h]) reshaped to [T·k, h];
//! - `reduce`: rows already one per assignment ([T·k, h], (t, j) order), one grouped linear,
//!   weighted and summed into token rows: `Y[t] = sum_j RW[t, j] W[IDX[t, j]] X[t·k + j]` ->
//!   `ParallelLinear(X, IDX as [T·k, 1], W, gates = RW as [T·k, 1])` ([T·k, d]) reshaped to
//!   [T, k, d] and summed over k;
//! - a single weighted grouped linear on token rows: `ParallelLinear(X, IDX, W, gates = RW)`.
//!
//! Exact reformulations: the op reads the same rows with the same weights and needs no sort, so
//! the result does not depend on how the exporter's sort orders ties. Each replacement carries the
//! [`Subject`] the numeric proof ([`super::prove`]) runs it against its region with.

use anyhow::{anyhow, bail, Result};

use super::emit::{for_tensorrt, fresh_name, stack_matrices, zero_bias, Emitted, Target};
use super::jetmoe::{regions, Form, Region};
use super::prove::Subject;
use super::{LayerReport, Rejection};
use crate::onnx::graph::{attr_int, make_node, GraphIndex};
use crate::onnx::tensor::make_i64;
use crate::spec::{self, parallel_linear as pl};

pub const FAMILY: &str = "jetmoe_moa";

/// One replaced projection: the value it replaces, the nodes, the report line, and what the
/// numeric proof needs to know of it.
pub struct Replacement {
    pub output: String,
    pub emitted: Emitted,
    pub report: LayerReport,
    pub subject: Subject,
}

/// Every single grouped linear of the graph, as ParallelLinear. Regions this rule cannot read are
/// reported by [`super::jetmoe::find`].
pub fn find(g: &GraphIndex, taken: &mut Vec<String>, first_tag: usize, target: Target) -> (Vec<Replacement>, Vec<Rejection>) {
    let mut out = Vec::new();
    let mut rejected = Vec::new();
    for (at, r) in regions(g) {
        let Ok(region) = r else { continue };
        if !matches!(region.form, Form::Linear(_)) {
            continue;
        }
        let tag = format!("scattermoe_pl_{}", first_tag + out.len());
        match emit(g, &region, &tag, taken, target) {
            Ok(r) => out.push(r),
            Err(e) => rejected.push(Rejection { family: FAMILY, at, reason: e.to_string() }),
        }
    }
    (out, rejected)
}

/// The ParallelLinear replacement of one single grouped linear `r` (names from `tag`, kept
/// distinct from `taken`).
pub fn emit(g: &GraphIndex, r: &Region, tag: &str, taken: &mut Vec<String>, target: Target) -> Result<Replacement> {
    let Form::Linear(gl) = &r.form else { bail!("not a single grouped linear") };
    if gl.b.iter().any(Option::is_some) {
        bail!("the grouped projection has per-expert biases, which this rule does not write yet");
    }
    let elem = g.infer_type(&r.x).ok_or_else(|| anyhow!("cannot tell the element type of '{}'", r.x))?;
    let et = spec::ElemType::from_onnx_code(elem).ok_or_else(|| anyhow!("the rows are {}, not float32/float16/bfloat16", spec::onnx_type_name(elem)))?;
    let (d_out, d_in) = (gl.w[0].out, gl.w[0].inp);
    let k = r.routing.k;
    let mut em = Emitted::default();
    // a weight matched through DequantizeLinear: its codes, scale and zero point (`quant.rs`)
    let q = super::emit::quantized_linear_inputs(g, &gl.w, elem, &format!("{tag}.W"), taken, &mut em)?;
    let w = match &q {
        Some((codes, _, _, _)) => codes.clone(),
        None => stack_matrices(g, taken, &format!("{tag}.W"), &gl.w, elem, &mut em)?,
    };
    let mut nodes = Vec::new();
    // what the op reads as its indices and gates, and the rows per token of its input
    let (mut op_idx, mut op_gates, mut x_rows) = (r.routing.idx.clone(), None, 1);
    let shape = |taken: &mut Vec<String>, em: &mut Emitted, what: &str, v: &[i64]| {
        let name = fresh_name(g, taken, &format!("{tag}.{what}"));
        em.initializers.push(make_i64(&name, &[v.len() as i64], v));
        name
    };
    // gates in the rows' element type
    let gates = |taken: &mut Vec<String>, nodes: &mut Vec<onnx_protobuf::NodeProto>, rw: &str| -> String {
        if g.infer_type(rw) == Some(elem) {
            return rw.to_string();
        }
        let name = fresh_name(g, taken, &format!("{tag}.gates"));
        let mut c = make_node("Cast", "", &format!("{tag}/Cast"), &[rw], &[&name]);
        c.attribute.push(attr_int("to", elem as i64));
        nodes.push(c);
        name
    };
    let pl_node = |inputs: &[&str], out: &str| {
        let mut n = make_node(pl::NAME, spec::DOMAIN, tag, inputs, &[out]);
        n.attribute.push(attr_int(pl::ATTR_GROUPED_IN, 0));
        n.attribute.push(attr_int(pl::ATTR_GROUPED_OUT, 0));
        n
    };
    match (r.x_per_assignment, &r.gates, r.out_per_assignment) {
        // map: [T, k, h] -> [T·k, h]
        (false, None, true) => {
            let y = fresh_name(g, taken, &format!("{tag}.Y"));
            nodes.push(pl_node(&[&r.x, &r.routing.idx, &w], &y));
            let s = shape(taken, &mut em, "shape", &[-1, d_out as i64]);
            nodes.push(make_node("Reshape", "", &format!("{tag}/Reshape"), &[&y, &s], &[&r.output]));
        }
        // reduce: one row per assignment, weighted, summed over k
        (true, Some(rw), false) => {
            let col = shape(taken, &mut em, "column", &[-1, 1]);
            let idx1 = fresh_name(g, taken, &format!("{tag}.routing_indices"));
            nodes.push(make_node("Reshape", "", &format!("{tag}/Reshape_indices"), &[&r.routing.idx, &col], &[&idx1]));
            (op_idx, op_gates, x_rows) = (idx1.clone(), Some(rw.clone()), k);
            let rw = gates(taken, &mut nodes, rw);
            let g1 = fresh_name(g, taken, &format!("{tag}.gates_column"));
            nodes.push(make_node("Reshape", "", &format!("{tag}/Reshape_gates"), &[&rw, &col], &[&g1]));
            let y = fresh_name(g, taken, &format!("{tag}.Y"));
            nodes.push(pl_node(&[&r.x, &idx1, &w, "", &g1], &y));
            let s = shape(taken, &mut em, "per_token", &[-1, k, d_out as i64]);
            let y3 = fresh_name(g, taken, &format!("{tag}.Y_per_token"));
            nodes.push(make_node("Reshape", "", &format!("{tag}/Reshape"), &[&y, &s], &[&y3]));
            let mut sum = if g.opset >= 13 {
                let ax = shape(taken, &mut em, "axes", &[1]);
                make_node("ReduceSum", "", &format!("{tag}/ReduceSum"), &[&y3, &ax], &[&r.output])
            } else {
                let mut n = make_node("ReduceSum", "", &format!("{tag}/ReduceSum"), &[&y3], &[&r.output]);
                n.attribute.push(crate::onnx::graph::attr_ints_new("axes", &[1]));
                n
            };
            sum.attribute.push(attr_int("keepdims", 0));
            nodes.push(sum);
        }
        // one weighted grouped linear on token rows
        (false, Some(rw), false) => {
            op_gates = Some(rw.clone());
            let rw = gates(taken, &mut nodes, rw);
            nodes.push(pl_node(&[&r.x, &r.routing.idx, &w, "", &rw], &r.output));
        }
        _ => bail!("a grouped projection whose rows and output are both one per assignment"),
    }
    let quantized = q.as_ref().map(|(_, _, _, what)| what.clone());
    if let Some((_, [scale, zero], attrs, _)) = q {
        // W_scale (5) and W_zero_point (6) after the optional bias and gates
        let n = nodes.iter_mut().find(|n| n.op_type == pl::NAME).expect("the ParallelLinear node");
        n.input.resize(5, String::new());
        n.input.push(scale);
        if !zero.is_empty() {
            n.input.push(zero);
        }
        n.attribute.extend(attrs);
    }
    if target == Target::TensorRt {
        let n = nodes.iter_mut().find(|n| n.op_type == pl::NAME).expect("the ParallelLinear node");
        fill_for_tensorrt(g, taken, &mut em, n, tag, r.experts, d_out, elem)?;
    }
    em.nodes = nodes;
    let report = LayerReport {
        family: FAMILY,
        output: r.output.clone(),
        node: tag.to_string(),
        experts: r.experts,
        k: Some(k as usize),
        d: d_in,
        f: d_out,
        activation: "none",
        gated: false,
        glu_layout: "-",
        elem_type: et.name(),
        capacity: None,
        biases: false,
        quantized,
        proof: None,
        router: None,
    };
    let subject = Subject {
        output: r.output.clone(),
        x: r.x.clone(),
        x_rows,
        x_width: d_in,
        x_elem: Some(elem),
        routing_indices: op_idx,
        routing_weights: op_gates,
        experts: r.experts,
        k: Some(k as usize),
    };
    Ok(Replacement { output: r.output.clone(), emitted: em, report, subject })
}

/// The node for TensorRT's parser (the ScatterMoE node's rules, `emit.rs`): no absent input before
/// a present one (a bias left out becomes zeros; `gates` cannot be given where the node has none,
/// since gates change what the op computes, so that projection is left for TensorRT, with the
/// reason), every attribute written out, the plugin's version and namespace.
#[allow(clippy::too_many_arguments)]
fn fill_for_tensorrt(
    g: &GraphIndex,
    taken: &mut Vec<String>,
    em: &mut Emitted,
    n: &mut onnx_protobuf::NodeProto,
    tag: &str,
    experts: usize,
    d_out: usize,
    elem: i32,
) -> Result<()> {
    while n.input.last().is_some_and(String::is_empty) {
        n.input.pop();
    }
    for i in 0..n.input.len() {
        if !n.input[i].is_empty() {
            continue;
        }
        match pl::INPUTS.get(i).map(|p| p.name) {
            Some("b") => n.input[i] = zero_bias(g, taken, em, &format!("{tag}.b_zeros"), elem, experts, d_out),
            Some(what) => bail!("the TensorRT target cannot leave ParallelLinear's '{what}' out before a later input (the quantized W's scale)"),
            None => bail!("ParallelLinear has no input {i}"),
        }
    }
    for_tensorrt(n, &pl::ATTRS);
    Ok(())
}
