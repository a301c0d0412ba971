//! Which weights of which nodes `scattermoe quantize` replaces, checked before anything is
//! quantized ([`plan`]), and the rewiring of the graph onto the quantized initializers, produced
//! expert by expert while the model is saved ([`apply`]).

use std::collections::HashSet;

use anyhow::{anyhow, bail, Context, Result};
use onnx_protobuf::{NodeProto, TensorProto};

use super::codec::quantize_matrix;
use super::Options;
use crate::onnx::graph::{attr_f, attr_i, attr_int, attr_ints, attr_ints_new, attr_s, node_inputs_with_subgraphs};
use crate::onnx::tensor::{tensor_bytes, tensor_f32, FLOAT, UINT8};
use crate::onnx::{GraphIndex, Model, PendingTensor};
use crate::signature::Signature;
use crate::spec::{self, parallel_linear, quant, scatter_moe, AttrSource, Dim, ElemType, Port, Quant, QuantFormat, ScaleLayout};

/// A node's attributes as the contract's parsers read them.
struct NodeAttrs<'a>(&'a NodeProto);

impl AttrSource for NodeAttrs<'_> {
    fn int(&self, name: &str) -> Option<i64> {
        attr_i(self.0, name)
    }
    fn float(&self, name: &str) -> Option<f32> {
        attr_f(self.0, name)
    }
    fn string(&self, name: &str) -> Option<String> {
        attr_s(self.0, name)
    }
    fn ints(&self, name: &str) -> Option<Vec<i64>> {
        attr_ints(self.0, name)
    }
}

#[derive(Debug, Clone, Copy)]
pub enum Attrs {
    Moe(scatter_moe::Attrs),
    Linear(parallel_linear::Attrs),
}

/// One weight to quantize.
pub struct WeightPlan {
    /// the contract's name of the input (`w_in`, `w_out`, `W`)
    pub port: &'static str,
    /// node input positions of the weight, its scale and its zero point
    pub at: [usize; 3],
    /// the initializer (its bytes stay where they are: inline, or external data)
    pub tensor: TensorProto,
    pub elem: ElemType,
    pub experts: usize,
    pub out: usize,
    pub in_: usize,
    pub quant: Quant,
}

impl WeightPlan {
    /// The whole weight as f32 (one node's weight at a time, for the error report).
    pub fn values(&self, model: &Model) -> Result<Vec<f32>> {
        tensor_f32(&self.tensor, Some(&model.ext))
    }
}

/// One node to quantize.
pub struct Plan {
    pub node_index: usize,
    pub node_name: String,
    pub attrs: Attrs,
    /// the node's `T`
    pub elem: ElemType,
    /// `w_in`, `w_out` (ScatterMoE) or `W` (ParallelLinear)
    pub weights: Vec<WeightPlan>,
    /// `b_in`, `b_out` or `b`, when they are initializers
    pub biases: Vec<Option<TensorProto>>,
    /// experts a token, from the routing's declared shape (2 when it is not declared)
    pub k: usize,
}

impl Plan {
    pub fn op_name(&self) -> &'static str {
        match self.attrs {
            Attrs::Moe(_) => scatter_moe::NAME,
            Attrs::Linear(_) => parallel_linear::NAME,
        }
    }
}

/// The weight format of the plan's options.
fn quant_of(opts: &Options) -> Quant {
    let zero_point = opts.zero_point && opts.format != QuantFormat::Fp8E4M3Fn;
    Quant { format: opts.format, layout: opts.layout, scale: ElemType::F32, zero_point }
}

/// The quantization attributes a node takes for `q`.
fn quant_attrs(q: &Quant) -> spec::QuantAttrs {
    let block_size = match q.layout {
        ScaleLayout::PerChannel => None,
        ScaleLayout::Blocks { block_out, block_in } => Some([block_out, block_in]),
    };
    spec::QuantAttrs { weight_bits: q.format.bits() as u8, block_size }
}

/// The declared shape of value `v`: an initializer's dims, or a graph input's, output's or
/// value_info's shape (None for a dimension not fixed); empty when nothing is declared.
fn declared_shape(g: &GraphIndex, graph: &onnx_protobuf::GraphProto, v: &str) -> Vec<Dim> {
    if let Some(t) = g.const_tensor(v) {
        return t.dims.iter().map(|&d| u64::try_from(d).ok()).collect();
    }
    let vi = graph.input.iter().chain(&graph.output).chain(&graph.value_info).find(|x| x.name == v);
    let Some(onnx_protobuf::type_proto::Value::TensorType(t)) = vi.and_then(|vi| vi.type_.as_ref()).and_then(|t| t.value.as_ref()) else {
        return Vec::new();
    };
    t.shape.as_ref().map_or(Vec::new(), |s| {
        s.dim
            .iter()
            .map(|d| match d.value {
                Some(onnx_protobuf::tensor_shape_proto::dimension::Value::DimValue(v)) => u64::try_from(v).ok(),
                _ => None,
            })
            .collect()
    })
}

/// Every node to quantize, checked: its weights are constant initializers in `T` of rank 3, and
/// the node with them quantized passes the contract's check. Nodes that already hold a quantized
/// weight are left out.
pub fn plan(model: &Model, opts: &Options) -> Result<Vec<Plan>> {
    let graph = model.graph();
    let g = GraphIndex::new(graph, Some(&model.ext))?;
    let q = quant_of(opts);
    let mut plans = Vec::new();
    for (node_index, n) in graph.node.iter().enumerate() {
        if n.domain != spec::DOMAIN {
            continue;
        }
        let what = || format!("node '{}' ({})", n.name, n.op_type);
        let (ports, attrs, weights, biases, routing): (&[Port], Attrs, &[[usize; 3]], &[usize], usize) = match n.op_type.as_str() {
            scatter_moe::NAME => {
                use scatter_moe::*;
                let mut a = Attrs::parse(&NodeAttrs(n)).with_context(what)?;
                a.quant = quant_attrs(&q);
                (&INPUTS, self::Attrs::Moe(a), &[[W_IN, W_IN_SCALE, W_IN_ZERO_POINT], [W_OUT, W_OUT_SCALE, W_OUT_ZERO_POINT]], &[B_IN, B_OUT], ROUTING_INDICES)
            }
            parallel_linear::NAME => {
                use parallel_linear::*;
                let mut a = Attrs::parse(&NodeAttrs(n)).with_context(what)?;
                a.quant = quant_attrs(&q);
                (&INPUTS, self::Attrs::Linear(a), &[[W, W_SCALE, W_ZERO_POINT]], &[B], ROUTING_INDICES)
            }
            _ => continue,
        };
        let input = |i: usize| n.input.get(i).map(String::as_str).filter(|s| !s.is_empty());
        // a node with a quantized weight already is left as it is
        if weights.iter().any(|w| input(w[1]).is_some() || input(w[2]).is_some()) {
            continue;
        }
        let mut wplans = Vec::new();
        for &at in weights {
            let port = ports[at[0]].name;
            let name = input(at[0]).ok_or_else(|| anyhow!("{}: input '{port}' is absent", what()))?;
            let t = graph
                .initializer
                .iter()
                .find(|t| t.name == name)
                .ok_or_else(|| anyhow!("{}: input '{port}' ('{name}') is not an initializer: only constant expert weights can be quantized", what()))?;
            let elem = ElemType::from_onnx_code(t.data_type)
                .ok_or_else(|| anyhow!("{}: input '{port}' ('{name}') is {}, not float32, float16 or bfloat16", what(), spec::onnx_type_name(t.data_type)))?;
            let &[experts, out, in_] = t.dims.as_slice() else { bail!("{}: input '{port}' ('{name}') has shape {:?}, not [E, out, in]", what(), t.dims) };
            let [experts, out, in_] = [experts, out, in_].map(|d| d.max(0) as usize);
            wplans.push(WeightPlan { port, at, tensor: t.clone(), elem, experts, out, in_, quant: q });
        }
        let bias = |i: usize| input(i).and_then(|b| graph.initializer.iter().find(|t| t.name == b)).cloned();
        let k = declared_shape(&g, graph, input(routing).unwrap_or("")).last().copied().flatten().map_or(2, |k| k as usize);
        // the node with its weights quantized, through the contract's check
        let mut types: Vec<Option<i32>> = Vec::new();
        let mut shapes: Vec<Option<Vec<Dim>>> = Vec::new();
        for i in 0..ports.len() {
            let v = input(i);
            types.push(v.and_then(|v| g.elem_type(v)));
            shapes.push(v.map(|v| declared_shape(&g, graph, v)));
        }
        for w in &wplans {
            let [e, o, i] = [w.experts, w.out, w.in_].map(|d| d as u64);
            types[w.at[0]] = Some(q.format.onnx_code());
            shapes[w.at[0]] = Some(q.stored_shape(e, o, i).iter().map(|&d| Some(d)).collect());
            types[w.at[1]] = Some(ElemType::F32.onnx_code());
            shapes[w.at[1]] = Some(q.scale_shape(e, o, i).into_iter().map(Some).collect());
            if q.zero_point {
                types[w.at[2]] = Some(quant::UINT8);
                shapes[w.at[2]] = shapes[w.at[1]].clone();
            }
        }
        let sig = Signature::before_run(ports, types, shapes);
        let elem = match &attrs {
            Attrs::Moe(a) => scatter_moe::check(a, &sig.types, &sig.shape_refs()).map(|r| r.0),
            Attrs::Linear(a) => parallel_linear::check(a, &sig.types, &sig.shape_refs()).map(|r| r.0),
        }
        .with_context(what)?;
        if let Some(w) = wplans.iter().find(|w| w.elem != elem) {
            bail!("{}: input '{}' is {} but the node computes in {}", what(), w.port, w.elem.name(), elem.name());
        }
        let biases = biases.iter().map(|&b| bias(b)).collect();
        plans.push(Plan { node_index, node_name: n.name.clone(), attrs, elem, weights: wplans, biases, k });
    }
    Ok(plans)
}

/// One expert's `[out, in_]` matrix of a weight in `elem`, as f32, from the tensor's bytes.
fn expert_f32(bytes: &[u8], elem: ElemType, e: usize, len: usize) -> Vec<f32> {
    let size = elem.size_bytes();
    let b = &bytes[e * len * size..(e + 1) * len * size];
    match elem {
        ElemType::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
        ElemType::F16 => b.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        ElemType::BF16 => b.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
    }
}

/// Names not used anywhere in the graph yet.
struct Names(HashSet<String>);

impl Names {
    fn of(graph: &onnx_protobuf::GraphProto) -> Self {
        let mut s: HashSet<String> = graph.initializer.iter().map(|t| t.name.clone()).collect();
        s.extend(graph.input.iter().chain(&graph.output).chain(&graph.value_info).map(|v| v.name.clone()));
        for n in &graph.node {
            s.extend(n.input.iter().chain(&n.output).cloned());
        }
        Names(s)
    }

    fn fresh(&mut self, base: &str) -> String {
        let mut name = base.to_string();
        let mut i = 1;
        while self.0.contains(&name) {
            name = format!("{base}_{i}");
            i += 1;
        }
        self.0.insert(name.clone());
        name
    }
}

/// Rewires every planned node onto quantized initializers (codes, float32 scales, zero points)
/// produced at save time, sets its `weight_bits` and `block_size`, and drops the original weights
/// no node reads any more.
pub fn apply(model: &mut Model, plans: Vec<Plan>, opts: &Options) -> Result<()> {
    let q = quant_of(opts);
    let suffix = match q.format {
        QuantFormat::Fp8E4M3Fn => "fp8",
        QuantFormat::Int8 => "int8",
        QuantFormat::Int4 => "int4",
    };
    let graph = model.proto.graph.mut_or_insert_default();
    let mut names = Names::of(graph);
    let mut replaced = Vec::new();
    for p in plans {
        let node = &mut graph.node[p.node_index];
        for w in p.weights {
            let orig = w.tensor.name.clone();
            let [codes, scale] = [format!("{orig}.{suffix}"), format!("{orig}.scale")].map(|b| names.fresh(&b));
            let zero = q.zero_point.then(|| names.fresh(&format!("{orig}.zero_point")));
            let need = w.at.iter().copied().filter(|&i| i != w.at[2] || zero.is_some()).max().unwrap() + 1;
            if node.input.len() < need {
                node.input.resize(need, String::new());
            }
            node.input[w.at[0]] = codes.clone();
            node.input[w.at[1]] = scale.clone();
            if let Some(z) = &zero {
                node.input[w.at[2]] = z.clone();
            }
            let [e, o, i] = [w.experts, w.out, w.in_];
            let (t, elem) = (std::sync::Arc::new(w.tensor), w.elem);
            // each producer quantizes expert by expert and writes its part (deterministic: the
            // three parts agree with one another and with what the report ran)
            let part = |pick: fn(super::Quantized) -> Vec<u8>| -> crate::onnx::io::Producer {
                let t = t.clone();
                Box::new(move |ext, sink| {
                    let bytes = tensor_bytes(&t, Some(ext))?;
                    for ex in 0..e {
                        sink(&pick(quantize_matrix(&q, &expert_f32(&bytes, elem, ex, o * i), o, i)))?;
                    }
                    Ok(())
                })
            };
            let dims = |d: Vec<u64>| d.into_iter().map(|v| v as i64).collect::<Vec<i64>>();
            let scale_dims = dims(q.scale_shape(e as u64, o as u64, i as u64));
            model.pending.push(PendingTensor {
                name: codes,
                data_type: q.format.onnx_code(),
                dims: dims(q.stored_shape(e as u64, o as u64, i as u64).to_vec()),
                produce: part(|r| r.codes),
            });
            model.pending.push(PendingTensor {
                name: scale,
                data_type: FLOAT,
                dims: scale_dims.clone(),
                produce: part(|r| r.scales.iter().flat_map(|s| s.to_le_bytes()).collect()),
            });
            if let Some(z) = zero {
                model.pending.push(PendingTensor { name: z, data_type: UINT8, dims: scale_dims, produce: part(|r| r.zero_points) });
            }
            replaced.push(orig);
        }
        let qa = quant_attrs(&q);
        node.attribute.retain(|a| a.name != quant::ATTR_WEIGHT_BITS && a.name != quant::ATTR_BLOCK_SIZE);
        if q.format != QuantFormat::Fp8E4M3Fn {
            node.attribute.push(attr_int(quant::ATTR_WEIGHT_BITS, qa.weight_bits as i64));
        }
        if let Some(b) = qa.block_size {
            node.attribute.push(attr_ints_new(quant::ATTR_BLOCK_SIZE, &[b[0] as i64, b[1] as i64]));
        }
    }
    // the original weights, unless something else still reads them
    let mut used: HashSet<String> = graph.node.iter().flat_map(|n| node_inputs_with_subgraphs(n).into_iter().map(str::to_string)).collect();
    used.extend(graph.output.iter().map(|o| o.name.clone()));
    let gone: HashSet<String> = replaced.into_iter().filter(|r| !used.contains(r)).collect();
    graph.initializer.retain(|t| !gone.contains(&t.name));
    graph.input.retain(|i| !gone.contains(&i.name));
    graph.value_info.retain(|v| !gone.contains(&v.name));
    Ok(())
}
