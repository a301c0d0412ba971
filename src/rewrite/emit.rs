//! Builds one `ai.scattermoe::ScatterMoE` node and its stacked weights in the op's layout.
//!
//! Weights are stacked lazily: each new initializer is a [`PendingTensor`] that copies its experts'
//! rows from the source initializers (memory-mapped when external) only while the model is saved.
//! Where a source already has the op's layout (a [E, n, d] stack indexed by the expert number,
//! as transformers' `gate_up_proj` / `down_proj` are), it is used as it is, without a copy.

use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use onnx_protobuf::TensorProto;

use super::expr::{BSrc, ExpertMlp, WSrc};
use crate::onnx::graph::{attr_float, attr_int, attr_string, make_node, GraphIndex};
use crate::onnx::tensor::{elem_size, encode_f32, make_i64, make_tensor, tensor_bytes, tensor_f32, ExternalStore};
use crate::onnx::PendingTensor;
use crate::spec::{self, scatter_moe as sm, AttrDefault, CapacityOrder};

/// The runtime the rewritten model is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Target {
    /// ONNX Runtime with libscattermoe_ort.so: the contract's node as it is.
    #[default]
    OnnxRuntime,
    /// TensorRT with libscattermoe_trt.so. Its ONNX parser maps a node it has no importer for to
    /// the registered plugin named by the op type, with version and namespace from the node's
    /// `plugin_version` / `plugin_namespace` attributes, and passes the attributes the creator
    /// lists as fields (absent ones warn). So the node gets those two attributes and every
    /// attribute of the op (defaults written out); and since the parser cannot pass an absent
    /// input in the middle, absent biases before a present later input become zero initializers.
    /// The node stays in the ai.scattermoe domain (the parser ignores domains), so the model also
    /// still runs in ONNX Runtime with the plugin.
    TensorRt,
}

/// Everything needed to write one MoE layer.
#[derive(Debug, Clone)]
pub struct MoeLayer {
    pub family: &'static str,
    /// token rows [*, d]
    pub x: String,
    pub routing_weights: String,
    pub routing_indices: String,
    /// the value the layer's result replaces
    pub output: String,
    /// experts in expert-number order
    pub experts: Vec<ExpertMlp>,
    pub capacity: Option<i64>,
    pub capacity_order: CapacityOrder,
    /// k when known (for the report)
    pub k: Option<usize>,
    /// nodes and initializers that build the op's inputs from what the graph has (e.g. a
    /// trailing k = 1 axis on routing tensors), placed before the op; those that read
    /// [`op_result`]`(output)` (and what they feed) finish the layer's result from the op's and
    /// go after it, and the op then writes that value instead of `output`
    pub extra_nodes: Vec<onnx_protobuf::NodeProto>,
    pub extra_inits: Vec<TensorProto>,
    /// quantized weights a rule lays out itself (`com.microsoft.QMoE`); weights matched through
    /// `DequantizeLinear` are laid out by the emitter (`quant.rs`)
    pub quant: Option<Box<super::quant::LayerQuant>>,
}

impl MoeLayer {
    pub fn mlp(&self) -> &ExpertMlp {
        &self.experts[0]
    }

    /// The element type of a value of the graph, or of one the layer's extra nodes make
    /// (see [`value_type`]).
    pub(super) fn value_type(&self, g: &GraphIndex, v: &str) -> Option<i32> {
        value_type(g, self, v, 0)
    }
}

/// The value the op writes when the layer's extra nodes compute its `output` from the op's
/// result (a sum over k of one row per assignment, say): those nodes read it under this name.
pub fn op_result(output: &str) -> String {
    format!("{output}.scattermoe_op")
}

/// A weight source, kept alive for the save.
#[derive(Clone)]
struct Src {
    t: Arc<TensorProto>,
    index: Option<usize>,
    transposed: bool,
}

fn src_of(g: &GraphIndex, init: &str, index: Option<usize>, transposed: bool) -> Result<Src> {
    let t = g.initializers.get(init).ok_or_else(|| anyhow!("initializer '{init}' not found"))?;
    Ok(Src { t: Arc::new((*t).clone()), index, transposed })
}

/// Reads rows of a matrix source as f32 when types differ, or as raw bytes.
fn append_matrix(ext: &ExternalStore, s: &Src, out_rows: usize, in_cols: usize, elem: i32, buf: &mut Vec<u8>) -> Result<()> {
    let st = &s.t;
    let esz = elem_size(elem).unwrap();
    let (r, c) = if s.transposed { (in_cols, out_rows) } else { (out_rows, in_cols) };
    let per = r * c;
    let base = s.index.unwrap_or(0) * per;
    if st.data_type == elem {
        let bytes = tensor_bytes(st, Some(ext))?;
        let m = &bytes[base * esz..(base + per) * esz];
        if !s.transposed {
            buf.extend_from_slice(m);
        } else {
            for o in 0..out_rows {
                for i in 0..in_cols {
                    let at = (i * c + o) * esz;
                    buf.extend_from_slice(&m[at..at + esz]);
                }
            }
        }
        ext.release(m);
    } else {
        let all = tensor_f32(st, Some(ext))?;
        let m = &all[base..base + per];
        let mut vals = Vec::with_capacity(per);
        for o in 0..out_rows {
            for i in 0..in_cols {
                vals.push(if s.transposed { m[i * c + o] } else { m[o * c + i] });
            }
        }
        encode_f32(&vals, elem, buf);
    }
    Ok(())
}

fn append_vector(ext: &ExternalStore, s: &Src, len: usize, elem: i32, buf: &mut Vec<u8>) -> Result<()> {
    let esz = elem_size(elem).unwrap();
    let base = s.index.unwrap_or(0) * len;
    if s.t.data_type == elem {
        let bytes = tensor_bytes(&s.t, Some(ext))?;
        buf.extend_from_slice(&bytes[base * esz..(base + len) * esz]);
        ext.release(&bytes[base * esz..(base + len) * esz]);
    } else {
        let all = tensor_f32(&s.t, Some(ext))?;
        encode_f32(&all[base..base + len], elem, buf);
    }
    Ok(())
}

/// The element type and dims of a whole weight value the op can take as it is: an initializer, a
/// graph input with a static shape, or a value the layer's own extra nodes compute (the rule that
/// wrote them vouches for their type and layout: the dims asked for).
fn whole_value(g: &GraphIndex, layer: &MoeLayer, name: &str, want: &[i64]) -> Option<(i32, Vec<i64>)> {
    if let Some(t) = g.initializers.get(name) {
        return Some((t.data_type, t.dims.clone()));
    }
    if g.graph_inputs.contains(name) {
        let dims = g.static_input_dims(name)?;
        return Some((g.elem_type(name)?, dims));
    }
    if layer.extra_nodes.iter().any(|n| n.output.iter().any(|o| o == name)) {
        let elem = g.infer_type(&layer.x)?;
        return Some((elem, want.to_vec()));
    }
    None
}

/// The whole of `init` is already `[E, rows, cols]` (`want`) with expert e at index e, untransposed.
fn as_is(g: &GraphIndex, layer: &MoeLayer, parts: &[Vec<WSrc>], elem: i32, want: &[i64]) -> Option<String> {
    let first = parts.first()?.first()?;
    let (ty, dims) = whole_value(g, layer, &first.init, want)?;
    if ty != elem || dims != want || dims[0] as usize != parts.len() {
        return None;
    }
    for (e, p) in parts.iter().enumerate() {
        if p.len() != 1 || p[0].init != first.init || p[0].transposed || p[0].index.map(|r| r.expert()) != Some(e as i64) {
            return None;
        }
    }
    Some(first.init.clone())
}

fn bias_as_is(g: &GraphIndex, layer: &MoeLayer, parts: &[Vec<BSrc>], elem: i32, want: &[i64]) -> Option<String> {
    let first = parts.first()?.first()?;
    let (ty, dims) = whole_value(g, layer, &first.init, want)?;
    if ty != elem || dims != want || dims[0] as usize != parts.len() {
        return None;
    }
    for (e, p) in parts.iter().enumerate() {
        if p.len() != 1 || p[0].init != first.init || p[0].index.map(|r| r.expert()) != Some(e as i64) {
            return None;
        }
    }
    Some(first.init.clone())
}

fn unique_name(g: &GraphIndex, taken: &mut Vec<String>, base: &str) -> String {
    let mut name = base.to_string();
    let mut i = 1;
    while g.producer.contains_key(name.as_str()) || g.initializers.contains_key(name.as_str()) || taken.contains(&name) {
        name = format!("{base}_{i}");
        i += 1;
    }
    taken.push(name.clone());
    name
}

/// What one layer adds to the model.
#[derive(Default)]
pub struct Emitted {
    pub nodes: Vec<onnx_protobuf::NodeProto>,
    pub initializers: Vec<TensorProto>,
    pub pending: Vec<PendingTensor>,
    /// the op's element type T (ONNX code; 0 where no ScatterMoE node was written)
    pub elem: i32,
    /// the quantized weights the node reads, for the report (`LayerQuant::describe`)
    pub quantized: Option<String>,
}

/// The element type of the matrix products that read `weight` (through the gathers, casts,
/// transposes and reshapes exporters put between a weight and its product), when the graph
/// computes one.
fn product_type(g: &GraphIndex, weight: &str) -> Option<i32> {
    let mut stack = vec![(weight.to_string(), 0usize)];
    let mut seen = std::collections::HashSet::new();
    while let Some((v, depth)) = stack.pop() {
        if depth > 8 || !seen.insert(v.clone()) {
            continue;
        }
        for &c in g.cons(&v) {
            let n = g.node(c);
            if !(n.domain.is_empty() || n.domain == "ai.onnx") {
                continue;
            }
            match n.op_type.as_str() {
                "MatMul" | "Gemm" | "Einsum" => return g.infer_type(&n.output[0]),
                "Gather" | "GatherND" | "Cast" | "Transpose" | "Unsqueeze" | "Squeeze" | "Reshape" | "Identity" | "Slice" | "Split" => {
                    stack.extend(n.output.iter().map(|o| (o.clone(), depth + 1)));
                }
                _ => {}
            }
        }
    }
    None
}

/// The element type the experts compute in: that of the products reading the first expert's
/// first and last weights, where both agree (an exporter may cast the token rows and weights of a
/// float16 model up and compute, weight and accumulate the experts in float32). None where the
/// graph computes no such product (`com.microsoft.MoE` reads its weights itself) or they differ.
fn compute_type(g: &GraphIndex, layer: &MoeLayer) -> Option<i32> {
    let m = layer.mlp();
    let a = product_type(g, &m.w_in.first()?.init)?;
    let b = product_type(g, &m.w_out.init)?;
    (a == b && spec::ElemType::from_onnx_code(a).is_some()).then_some(a)
}

/// The element type of `v`: the graph's, or for a value the layer's own extra nodes make (rows
/// scaled by router scores, regrouped or routed weights) the type such a node gives it: a Cast's
/// target, int64 for indices, else its first input's type.
fn value_type(g: &GraphIndex, layer: &MoeLayer, v: &str, depth: usize) -> Option<i32> {
    g.infer_type(v).or_else(|| {
        let n = layer.extra_nodes.iter().find(|n| n.output.iter().any(|o| o == v))?;
        match n.op_type.as_str() {
            "Cast" => crate::onnx::graph::attr_i(n, "to").map(|t| t as i32),
            "ArgMax" | "ArgMin" | "Shape" | "Size" | "NonZero" => Some(7),
            "TopK" if n.output.get(1).map(String::as_str) == Some(v) => Some(7),
            _ => (depth < 8).then(|| value_type(g, layer, n.input.first()?, depth + 1)).flatten(),
        }
    })
}

/// `Cast(v, to)` into a fresh value, appended to `nodes`.
fn cast_to(g: &GraphIndex, taken: &mut Vec<String>, nodes: &mut Vec<onnx_protobuf::NodeProto>, tag: &str, what: &str, v: &str, to: i32) -> String {
    let name = unique_name(g, taken, &format!("{tag}.{what}"));
    let mut c = make_node("Cast", "", &format!("{tag}/Cast_{what}"), &[v], &[&name]);
    c.attribute.push(attr_int("to", to as i64));
    nodes.push(c);
    name
}

/// The layer's node (and any Cast, capacity constant, stacked weights).
pub fn emit(g: &GraphIndex, layer: &MoeLayer, tag: &str, taken: &mut Vec<String>, target: Target) -> Result<Emitted> {
    let mut model = Emitted::default();
    let model = &mut model;
    let m0 = layer.mlp();
    let e_count = layer.experts.len();
    let (d, f) = (m0.d, m0.f);
    let n = if m0.gated { 2 * f } else { f };
    let x_elem = value_type(g, layer, &layer.x, 0).ok_or_else(|| anyhow!("cannot tell the element type of '{}'", layer.x))?;
    // T follows the original: the type its experts compute in, with Casts around the node where
    // the token rows or the replaced value have another type
    let elem = compute_type(g, layer).unwrap_or(x_elem);
    if spec::ElemType::from_onnx_code(elem).is_none() {
        bail!("the token rows are {}, not float32/float16/bfloat16", spec::onnx_type_name(elem));
    }
    for m in &layer.experts {
        if m.d != d || m.f != f || m.gated != m0.gated || m.activation != m0.activation || m.glu_layout != m0.glu_layout {
            bail!("experts differ in shape or activation");
        }
        if m.b_in.iter().any(Option::is_some) != m0.b_in.iter().any(Option::is_some) || m.b_out.is_some() != m0.b_out.is_some() {
            bail!("experts differ in which biases they have");
        }
        // one node has one alpha and one limit: experts that differ in them are not one layer
        if m0.activation.clamped() && (m.alpha.to_bits() != m0.alpha.to_bits() || m.limit.to_bits() != m0.limit.to_bits()) {
            bail!("experts differ in the {} alpha or limit ({} / {} and {} / {})", m0.activation.name(), m0.alpha, m0.limit, m.alpha, m.limit);
        }
    }
    // extra nodes that read the op's result go after it
    let result = op_result(&layer.output);
    let mut after_values = vec![result.clone()];
    let (mut nodes, mut after) = (Vec::new(), Vec::new());
    for n in &layer.extra_nodes {
        if n.input.iter().any(|i| after_values.contains(i)) {
            after_values.extend(n.output.iter().cloned());
            after.push(n.clone());
        } else {
            nodes.push(n.clone());
        }
    }
    // a replaced value of another float type than the rows (float16 experts summed in float32):
    // the op writes the rows' type, a Cast gives the value its own
    if let Some(t) = g.infer_type(&layer.output).filter(|&t| after.is_empty() && t != elem && spec::ElemType::from_onnx_code(t).is_some()) {
        let mut c = make_node("Cast", "", &format!("{tag}/Cast_output"), &[&result], &[&layer.output]);
        c.attribute.push(attr_int("to", t as i64));
        after.push(c);
    }
    let op_output = if after.is_empty() { layer.output.clone() } else { result };
    model.initializers.extend(layer.extra_inits.iter().cloned());
    let x = if x_elem == elem { layer.x.clone() } else { cast_to(g, taken, &mut nodes, tag, "x", &layer.x, elem) };

    // --- quantized weights (codes, scales, zero points), where the layer has them
    let w_in_parts: Vec<Vec<WSrc>> = layer.experts.iter().map(|m| m.w_in.clone()).collect();
    let w_out_parts: Vec<Vec<WSrc>> = layer.experts.iter().map(|m| vec![m.w_out.clone()]).collect();
    let q = quantized::inputs(g, layer, &w_in_parts, &w_out_parts, elem, tag, taken, model, target)?;
    // --- w_in [E, n, d]
    let w_in = match (q.w_in.clone(), as_is(g, layer, &w_in_parts, elem, &[e_count as i64, n as i64, d as i64])) {
        (Some(codes), _) => codes,
        (None, Some(name)) => name,
        (None, None) => {
            let name = unique_name(g, taken, &format!("{tag}.w_in"));
            let mut srcs = Vec::new();
            for p in &w_in_parts {
                let mut v = Vec::new();
                for w in p {
                    v.push((src_of(g, &w.init, w.index.map(|r| r.expert() as usize), w.transposed)?, w.out, w.inp));
                }
                srcs.push(v);
            }
            model.pending.push(PendingTensor {
                name: name.clone(),
                data_type: elem,
                dims: vec![e_count as i64, n as i64, d as i64],
                produce: Box::new(move |ext, sink| {
                    let mut buf = Vec::new();
                    for parts in &srcs {
                        for (s, out, inp) in parts {
                            buf.clear();
                            append_matrix(ext, s, *out, *inp, elem, &mut buf)?;
                            sink(&buf)?;
                        }
                    }
                    Ok(())
                }),
            });
            name
        }
    };
    // --- w_out [E, d, f]
    let w_out = match (q.w_out.clone(), as_is(g, layer, &w_out_parts, elem, &[e_count as i64, d as i64, f as i64])) {
        (Some(codes), _) => codes,
        (None, Some(name)) => name,
        (None, None) => {
            let name = unique_name(g, taken, &format!("{tag}.w_out"));
            let ws: Vec<WSrc> = w_out_parts.iter().map(|p| p[0].clone()).collect();
            model.pending.push(pending_stack(g, &name, &ws, elem)?);
            name
        }
    };
    // --- biases
    let bias = |parts: Vec<Vec<BSrc>>, len: usize, what: &str, model: &mut Emitted, taken: &mut Vec<String>| -> Result<String> {
        if let Some(name) = bias_as_is(g, layer, &parts, elem, &[e_count as i64, len as i64]) {
            return Ok(name);
        }
        let name = unique_name(g, taken, &format!("{tag}.{what}"));
        let mut srcs = Vec::new();
        for p in &parts {
            let mut v = Vec::new();
            for b in p {
                v.push((src_of(g, &b.init, b.index.map(|r| r.expert() as usize), false)?, b.len));
            }
            srcs.push(v);
        }
        model.pending.push(PendingTensor {
            name: name.clone(),
            data_type: elem,
            dims: vec![e_count as i64, len as i64],
            produce: Box::new(move |ext, sink| {
                let mut buf = Vec::new();
                for parts in &srcs {
                    for (s, len) in parts {
                        append_vector(ext, s, *len, elem, &mut buf)?;
                    }
                }
                sink(&buf)
            }),
        });
        Ok(name)
    };
    let b_in = if m0.b_in.iter().any(Option::is_some) {
        let parts: Vec<Vec<BSrc>> = layer
            .experts
            .iter()
            .map(|m| m.b_in.iter().map(|b| b.clone().ok_or_else(|| anyhow!("missing bias"))).collect::<Result<Vec<_>>>())
            .collect::<Result<_>>()?;
        Some(bias(parts, n, "b_in", model, taken)?)
    } else {
        None
    };
    let b_out = if m0.b_out.is_some() {
        let parts: Vec<Vec<BSrc>> = layer.experts.iter().map(|m| vec![m.b_out.clone().unwrap()]).collect();
        Some(bias(parts, d, "b_out", model, taken)?)
    } else {
        None
    };

    // --- routing weights in the op's element type
    let rw_type = value_type(g, layer, &layer.routing_weights, 0);
    let rw =
        if rw_type == Some(elem) { layer.routing_weights.clone() } else { cast_to(g, taken, &mut nodes, tag, "routing_weights", &layer.routing_weights, elem) };
    let capacity = match layer.capacity {
        Some(c) => {
            let name = unique_name(g, taken, &format!("{tag}.capacity"));
            model.initializers.push(make_i64(&name, &[], &[c]));
            Some(name)
        }
        None => None,
    };

    let (mut b_in, mut b_out, mut capacity) = (b_in, b_out, capacity);
    let quant_inputs = q.params.iter().any(Option::is_some);
    // without a capacity, a quantized node for TensorRT gets one no expert can reach (an expert
    // takes at most one assignment per token): every assignment is kept, as when it is absent
    let unlimited = target == Target::TensorRt && capacity.is_none() && quant_inputs;
    if unlimited {
        let name = unique_name(g, taken, &format!("{tag}.capacity_unlimited"));
        model.initializers.push(make_i64(&name, &[], &[i64::MAX]));
        capacity = Some(name);
    }
    if target == Target::TensorRt {
        // zeros where an absent bias precedes a present input
        if b_in.is_none() && (b_out.is_some() || capacity.is_some()) {
            b_in = Some(zero_bias(g, taken, model, &format!("{tag}.b_in_zeros"), elem, e_count, n));
        }
        if b_out.is_none() && capacity.is_some() {
            b_out = Some(zero_bias(g, taken, model, &format!("{tag}.b_out_zeros"), elem, e_count, d));
        }
    }
    let mut inputs: Vec<String> = vec![x, rw, layer.routing_indices.clone(), w_in, w_out];
    let [s_in, s_out, z_in, z_out] = q.params.clone();
    let opt = [b_in, b_out, capacity, s_in, s_out, z_in, z_out];
    let last = opt.iter().rposition(Option::is_some);
    if let Some(last) = last {
        for o in &opt[..=last] {
            inputs.push(o.clone().unwrap_or_default());
        }
    }
    let in_refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
    let mut node = make_node(sm::NAME, spec::DOMAIN, tag, &in_refs, &[&op_output]);
    node.attribute.push(attr_string(sm::ATTR_ACTIVATION, m0.activation.name()));
    node.attribute.push(attr_int(sm::ATTR_GATED, m0.gated as i64));
    if m0.gated {
        node.attribute.push(attr_string(sm::ATTR_GLU_LAYOUT, m0.glu_layout.name()));
    }
    if m0.activation.clamped() {
        node.attribute.push(attr_float(sm::ATTR_ALPHA, m0.alpha));
        node.attribute.push(attr_float(sm::ATTR_LIMIT, m0.limit));
    }
    if layer.capacity.is_some() {
        node.attribute.push(attr_string(sm::ATTR_CAPACITY_ORDER, layer.capacity_order.name()));
    } else if unlimited {
        // nothing is dropped, so the order only costs: token-major ranks in one pass
        node.attribute.push(attr_string(sm::ATTR_CAPACITY_ORDER, CapacityOrder::TokenMajor.name()));
    }
    node.attribute.extend(q.attrs);
    if target == Target::TensorRt {
        for_tensorrt(&mut node, &sm::ATTRS);
    }
    nodes.push(node);
    nodes.extend(after);
    let mut out = std::mem::take(model);
    out.nodes = nodes;
    out.elem = elem;
    out.quantized = q.describe;
    Ok(out)
}

/// A stack [E, out, inp] of one matrix per expert, for ops other than ScatterMoE (ParallelLinear):
/// the source itself when it already has that layout, else a new tensor produced at save time.
pub(super) fn stack_matrices(g: &GraphIndex, taken: &mut Vec<String>, base: &str, ws: &[WSrc], elem: i32, out: &mut Emitted) -> Result<String> {
    let e_count = ws.len();
    let (o, i) = (ws[0].out, ws[0].inp);
    // already [E, out, inp] in the expert order, of the op's type: used as it is
    let first = &ws[0];
    let whole = g.initializers.get(first.init.as_str()).is_some_and(|t| t.data_type == elem && t.dims == [e_count as i64, o as i64, i as i64])
        && ws.iter().enumerate().all(|(e, w)| w.init == first.init && !w.transposed && w.index.map(|r| r.expert()) == Some(e as i64));
    if whole {
        return Ok(first.init.clone());
    }
    let name = unique_name(g, taken, base);
    out.pending.push(pending_stack(g, &name, ws, elem)?);
    Ok(name)
}

/// A new [E, out, inp] tensor of one matrix per expert (`ws` in expert order), written one
/// expert's matrix at a time while the model is saved.
fn pending_stack(g: &GraphIndex, name: &str, ws: &[WSrc], elem: i32) -> Result<PendingTensor> {
    let mut srcs = Vec::new();
    for w in ws {
        srcs.push((src_of(g, &w.init, w.index.map(|r| r.expert() as usize), w.transposed)?, w.out, w.inp));
    }
    Ok(PendingTensor {
        name: name.to_string(),
        data_type: elem,
        dims: vec![ws.len() as i64, ws[0].out as i64, ws[0].inp as i64],
        produce: Box::new(move |ext, sink| {
            let mut buf = Vec::new();
            for (s, o, i) in &srcs {
                buf.clear();
                append_matrix(ext, s, *o, *i, elem, &mut buf)?;
                sink(&buf)?;
            }
            Ok(())
        }),
    })
}

mod quantized;

/// A zero bias `[experts, len]` in `elem`, added to `model` under a fresh name from `base`: what
/// stands for an absent bias where TensorRT's parser cannot leave an input out (a zero bias adds
/// nothing).
pub(super) fn zero_bias(g: &GraphIndex, taken: &mut Vec<String>, model: &mut Emitted, base: &str, elem: i32, experts: usize, len: usize) -> String {
    let name = unique_name(g, taken, base);
    let bytes = experts * len * elem_size(elem).expect("a float element type");
    model.initializers.push(make_tensor(&name, elem, &[experts as i64, len as i64], vec![0u8; bytes]));
    name
}

/// What TensorRT's ONNX parser needs of a node to map it to the plugin (the [`Target::TensorRt`]
/// doc): every attribute of the op in `attrs`, defaults written out (the parser warns about each
/// missing one; `block_size`, absent by default, stays absent), and the plugin's version and
/// namespace.
pub(super) fn for_tensorrt(node: &mut onnx_protobuf::NodeProto, attrs: &[spec::AttrDesc]) {
    for a in attrs {
        if node.attribute.iter().any(|x| x.name == a.name) {
            continue;
        }
        node.attribute.push(match a.default {
            AttrDefault::Int(v) => attr_int(a.name, v),
            AttrDefault::Float(v) => attr_float(a.name, v),
            AttrDefault::Str(v) => attr_string(a.name, v),
            AttrDefault::Ints([]) => continue,
            AttrDefault::Ints(v) => crate::onnx::graph::attr_ints_new(a.name, v),
        });
    }
    node.attribute.push(attr_string(crate::trt::PARSER_ATTR_VERSION, &crate::trt::plugin_version()));
    node.attribute.push(attr_string(crate::trt::PARSER_ATTR_NAMESPACE, &crate::trt::plugin_namespace()));
}

pub(super) use quantized::linear_inputs as quantized_linear_inputs;

/// A fresh value name.
pub(super) fn fresh_name(g: &GraphIndex, taken: &mut Vec<String>, base: &str) -> String {
    unique_name(g, taken, base)
}
