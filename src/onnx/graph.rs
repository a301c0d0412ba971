//! A read-only index over a graph: who produces and who consumes each value, initializers,
//! constants, topological order, and small helpers that read constant tensors.

use std::collections::{HashMap, HashSet};

use anyhow::{bail, Result};
use onnx_protobuf::attribute_proto::AttributeType;
use onnx_protobuf::{GraphProto, NodeProto, TensorProto};

use super::tensor::{tensor_f32, tensor_i64, ExternalStore};

pub struct GraphIndex<'g> {
    pub graph: &'g GraphProto,
    pub ext: Option<&'g ExternalStore>,
    /// value name -> producing node
    pub producer: HashMap<&'g str, usize>,
    /// value name -> consuming nodes (a node consuming twice appears twice)
    pub consumers: HashMap<&'g str, Vec<usize>>,
    pub initializers: HashMap<&'g str, &'g TensorProto>,
    pub graph_inputs: HashSet<&'g str>,
    pub graph_outputs: HashSet<&'g str>,
    /// value name -> its declaration (the graph's inputs, then value_info, then outputs; the
    /// first one of a name)
    pub declared: HashMap<&'g str, &'g onnx_protobuf::ValueInfoProto>,
    /// unique per index made (caches keyed by a graph use it: an address can be reused)
    pub id: u64,
    /// node indices in a topological order
    pub topo: Vec<usize>,
    /// position of each node in `topo`
    pub topo_pos: Vec<usize>,
    /// the model's default-domain opset (set by the caller; 17 when unknown)
    pub opset: i64,
}

impl<'g> GraphIndex<'g> {
    pub fn new(graph: &'g GraphProto, ext: Option<&'g ExternalStore>) -> Result<Self> {
        let mut producer = HashMap::new();
        let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, n) in graph.node.iter().enumerate() {
            for o in &n.output {
                if !o.is_empty() {
                    producer.insert(o.as_str(), i);
                }
            }
            for v in node_inputs_with_subgraphs(n) {
                consumers.entry(v).or_default().push(i);
            }
        }
        let initializers = graph.initializer.iter().map(|t| (t.name.as_str(), t)).collect();
        let graph_inputs = graph.input.iter().map(|v| v.name.as_str()).collect();
        let graph_outputs = graph.output.iter().map(|v| v.name.as_str()).collect();
        let mut declared = HashMap::new();
        for v in graph.input.iter().chain(&graph.value_info).chain(&graph.output) {
            declared.entry(v.name.as_str()).or_insert(v);
        }
        // Kahn's algorithm, stable in file order.
        let n = graph.node.len();
        let mut indeg = vec![0usize; n];
        let mut succ: Vec<Vec<usize>> = vec![Vec::new(); n];
        for (i, node) in graph.node.iter().enumerate() {
            let mut seen = HashSet::new();
            for v in node_inputs_with_subgraphs(node) {
                if let Some(&p) = producer.get(v) {
                    // A node reading its own output is the smallest cycle: walkers that follow
                    // producers would recurse without end (a stack overflow, found by fuzzing).
                    if p == i {
                        bail!("the graph has a cycle: node '{}' ({}) consumes its own output '{v}'", node.name, node.op_type);
                    }
                    if seen.insert(p) {
                        indeg[i] += 1;
                        succ[p].push(i);
                    }
                }
            }
        }
        let mut ready: std::collections::BTreeSet<usize> = (0..n).filter(|&i| indeg[i] == 0).collect();
        let mut topo = Vec::with_capacity(n);
        while let Some(i) = ready.pop_first() {
            topo.push(i);
            for &s in &succ[i] {
                indeg[s] -= 1;
                if indeg[s] == 0 {
                    ready.insert(s);
                }
            }
        }
        if topo.len() != n {
            bail!("the graph has a cycle ({} of {} nodes could be ordered)", topo.len(), n);
        }
        let mut topo_pos = vec![0; n];
        for (p, &i) in topo.iter().enumerate() {
            topo_pos[i] = p;
        }
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(GraphIndex { graph, ext, producer, consumers, initializers, graph_inputs, graph_outputs, declared, id, topo, topo_pos, opset: 17 })
    }

    pub fn default_opset(&self) -> i64 {
        self.opset
    }

    pub fn node(&self, i: usize) -> &'g NodeProto {
        &self.graph.node[i]
    }

    /// The node producing `v`, if any.
    pub fn prod(&self, v: &str) -> Option<(usize, &'g NodeProto)> {
        self.producer.get(v).map(|&i| (i, &self.graph.node[i]))
    }

    /// The node producing `v` when it has op type `op`.
    pub fn prod_op(&self, v: &str, op: &str) -> Option<(usize, &'g NodeProto)> {
        self.prod(v).filter(|(_, n)| n_is(n, op))
    }

    pub fn cons(&self, v: &str) -> &[usize] {
        self.consumers.get(v).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The constant tensor behind `v`: an initializer, or a Constant node's `value`.
    pub fn const_tensor(&self, v: &str) -> Option<&'g TensorProto> {
        if let Some(t) = self.initializers.get(v) {
            if !self.graph_inputs.contains(v) {
                return Some(t);
            }
        }
        let (_, n) = self.prod(v)?;
        if n.op_type != "Constant" || !n.domain.is_empty() {
            return None;
        }
        n.attribute.iter().find(|a| a.name == "value").and_then(|a| a.t.as_ref())
    }

    pub fn const_f32(&self, v: &str) -> Option<Vec<f32>> {
        if let Some(x) = self.const_scalar_attr_float(v) {
            return Some(vec![x]);
        }
        tensor_f32(self.const_tensor(v)?, self.ext).ok()
    }

    pub fn const_i64(&self, v: &str) -> Option<Vec<i64>> {
        if let Some((_, n)) = self.prod(v) {
            if n.op_type == "Constant" {
                if let Some(a) = n.attribute.iter().find(|a| a.name == "value_int") {
                    return Some(vec![a.i]);
                }
                if let Some(a) = n.attribute.iter().find(|a| a.name == "value_ints") {
                    return Some(a.ints.clone());
                }
            }
        }
        tensor_i64(self.const_tensor(v)?, self.ext).ok()
    }

    /// A single constant number (any numeric type), as f64.
    pub fn const_scalar(&self, v: &str) -> Option<f64> {
        if let Some(i) = self.const_i64(v) {
            return (i.len() == 1).then(|| i[0] as f64);
        }
        let f = self.const_f32(v)?;
        (f.len() == 1).then(|| f[0] as f64)
    }

    fn const_scalar_attr_float(&self, v: &str) -> Option<f32> {
        let (_, n) = self.prod(v)?;
        if n.op_type != "Constant" {
            return None;
        }
        n.attribute.iter().find(|a| a.name == "value_float").map(|a| a.f)
    }

    /// Dimensions of a constant tensor.
    pub fn const_dims(&self, v: &str) -> Option<Vec<i64>> {
        self.const_tensor(v).map(|t| t.dims.clone())
    }

    /// Element type of a value, if recorded (initializer, graph input/output, value_info).
    /// Declared static dims of a graph input (None when it is not one, or a dim is symbolic).
    pub fn static_input_dims(&self, v: &str) -> Option<Vec<i64>> {
        let vi = self.graph.input.iter().find(|x| x.name == v)?;
        match &vi.type_.as_ref()?.value {
            Some(onnx_protobuf::type_proto::Value::TensorType(t)) => t
                .shape
                .as_ref()?
                .dim
                .iter()
                .map(|d| match d.value {
                    Some(onnx_protobuf::tensor_shape_proto::dimension::Value::DimValue(v)) => Some(v),
                    _ => None,
                })
                .collect(),
            _ => None,
        }
    }

    pub fn elem_type(&self, v: &str) -> Option<i32> {
        if let Some(t) = self.const_tensor(v) {
            return Some(t.data_type);
        }
        let vi = self.graph.input.iter().chain(&self.graph.output).chain(&self.graph.value_info).find(|x| x.name == v)?;
        match &vi.type_.as_ref()?.value {
            Some(onnx_protobuf::type_proto::Value::TensorType(t)) => Some(t.elem_type),
            _ => None,
        }
    }
}

fn n_is(n: &NodeProto, op: &str) -> bool {
    n.op_type == op && (n.domain.is_empty() || n.domain == "ai.onnx")
}

/// Inputs of a node, including values its subgraphs read from the outer scope.
pub fn node_inputs_with_subgraphs(n: &NodeProto) -> Vec<&str> {
    let mut v: Vec<&str> = n.input.iter().filter(|s| !s.is_empty()).map(String::as_str).collect();
    for a in &n.attribute {
        if let Some(g) = a.g.as_ref() {
            outer_refs(g, &mut v);
        }
        for g in &a.graphs {
            outer_refs(g, &mut v);
        }
    }
    v
}

fn outer_refs<'a>(g: &'a GraphProto, out: &mut Vec<&'a str>) {
    let mut local: HashSet<&str> = g.input.iter().map(|x| x.name.as_str()).collect();
    local.extend(g.initializer.iter().map(|t| t.name.as_str()));
    for n in &g.node {
        for i in node_inputs_with_subgraphs(n) {
            if !local.contains(i) {
                out.push(i);
            }
        }
        local.extend(n.output.iter().map(String::as_str));
    }
    for o in &g.output {
        if !local.contains(o.name.as_str()) {
            out.push(o.name.as_str());
        }
    }
}

/// Whether `n`'s output has the largest rank of its inputs (ONNX's broadcasting): unary and
/// elementwise arithmetic, softmax, the normalisations, and reductions that keep their axes. With
/// every other input a constant or a per-row reduction of the first, the output has the first
/// input's shape (a normalisation of token rows is rows of the same shape).
pub fn keeps_rank(n: &NodeProto) -> bool {
    const OPS: &[&str] = &[
        "Cast", "Identity", "Neg", "Sqrt", "Reciprocal", "Abs", "Exp", "Log", "Tanh", "Sigmoid", "Erf", "Relu", "Softmax",
        "LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization", "Mul", "Add", "Sub", "Div", "Pow", "Max", "Min",
        "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2",
    ];
    OPS.contains(&n.op_type.as_str()) && (!n.op_type.starts_with("Reduce") || attr_i(n, "keepdims").unwrap_or(1) == 1)
}

/// Attribute helpers.
pub fn attr_i(n: &NodeProto, name: &str) -> Option<i64> {
    n.attribute.iter().find(|a| a.name == name).map(|a| a.i)
}
pub fn attr_f(n: &NodeProto, name: &str) -> Option<f32> {
    n.attribute.iter().find(|a| a.name == name).map(|a| a.f)
}
pub fn attr_ints(n: &NodeProto, name: &str) -> Option<Vec<i64>> {
    n.attribute.iter().find(|a| a.name == name).map(|a| a.ints.clone())
}
pub fn attr_s(n: &NodeProto, name: &str) -> Option<String> {
    n.attribute.iter().find(|a| a.name == name).map(|a| String::from_utf8_lossy(&a.s).to_string())
}

/// Builds a node.
pub fn make_node(op: &str, domain: &str, name: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
    let mut n = NodeProto::new();
    n.op_type = op.into();
    n.domain = domain.into();
    n.name = name.into();
    n.input = inputs.iter().map(|s| s.to_string()).collect();
    n.output = outputs.iter().map(|s| s.to_string()).collect();
    n
}

pub fn attr_int(name: &str, v: i64) -> onnx_protobuf::AttributeProto {
    let mut a = onnx_protobuf::AttributeProto::new();
    a.name = name.into();
    a.type_ = AttributeType::INT.into();
    a.i = v;
    a
}
pub fn attr_float(name: &str, v: f32) -> onnx_protobuf::AttributeProto {
    let mut a = onnx_protobuf::AttributeProto::new();
    a.name = name.into();
    a.type_ = AttributeType::FLOAT.into();
    a.f = v;
    a
}
pub fn attr_string(name: &str, v: &str) -> onnx_protobuf::AttributeProto {
    let mut a = onnx_protobuf::AttributeProto::new();
    a.name = name.into();
    a.type_ = AttributeType::STRING.into();
    a.s = v.as_bytes().to_vec();
    a
}
pub fn attr_ints_new(name: &str, v: &[i64]) -> onnx_protobuf::AttributeProto {
    let mut a = onnx_protobuf::AttributeProto::new();
    a.name = name.into();
    a.type_ = AttributeType::INTS.into();
    a.ints = v.to_vec();
    a
}

/// Removes nodes whose outputs nobody reads (transitively), then initializers nobody reads.
/// Returns (nodes removed, initializers removed).
pub fn prune(graph: &mut GraphProto) -> (usize, usize) {
    let outputs: HashSet<String> = graph.output.iter().map(|o| o.name.clone()).collect();
    let n0 = graph.node.len();
    let mut live = vec![false; graph.node.len()];
    let mut needed: HashSet<String> = outputs.clone();
    // Walk in reverse file order repeatedly until stable (graphs are stored topologically by exporters;
    // the loop handles any order).
    loop {
        let mut changed = false;
        for i in (0..graph.node.len()).rev() {
            if live[i] {
                continue;
            }
            let n = &graph.node[i];
            if n.output.iter().any(|o| needed.contains(o)) {
                live[i] = true;
                changed = true;
                for v in node_inputs_with_subgraphs(n) {
                    needed.insert(v.to_string());
                }
            }
        }
        if !changed {
            break;
        }
    }
    let mut keep = live.into_iter();
    graph.node.retain(|_| keep.next().unwrap());
    let i0 = graph.initializer.len();
    graph.initializer.retain(|t| needed.contains(&t.name));
    graph.value_info.retain(|v| needed.contains(&v.name));
    (n0 - graph.node.len(), i0 - graph.initializer.len())
}

/// Follows `v` back through producers of the given ops (their input 0), e.g. past the Cast and
/// Identity nodes exporters put between two ops a pattern matches; at most 16 steps, so a cycle
/// in a malformed graph cannot hang the matcher.
pub fn strip<'a>(g: &GraphIndex<'a>, v: &'a str, ops: &[&str]) -> &'a str {
    let mut cur = v;
    for _ in 0..16 {
        match g.prod(cur) {
            Some((_, n)) if ops.contains(&n.op_type.as_str()) && !n.input.is_empty() => cur = &n.input[0],
            _ => break,
        }
    }
    cur
}

impl<'g> GraphIndex<'g> {
    /// Element type of a value, inferred from declarations and producers (depth-limited).
    pub fn infer_type(&self, v: &str) -> Option<i32> {
        self.infer_type_depth(v, 0)
    }

    fn infer_type_depth(&self, v: &str, depth: usize) -> Option<i32> {
        if let Some(t) = self.elem_type(v) {
            return Some(t);
        }
        if depth > 64 {
            return None;
        }
        let (_, n) = self.prod(v)?;
        let first = |s: &Self| n.input.first().and_then(|i| s.infer_type_depth(i, depth + 1));
        match n.op_type.as_str() {
            "Cast" => attr_i(n, "to").map(|t| t as i32),
            "Shape" | "Size" | "NonZero" | "ArgMax" | "ArgMin" => Some(7),
            "TopK" => {
                if n.output.get(1).map(String::as_str) == Some(v) {
                    Some(7)
                } else {
                    first(self)
                }
            }
            "Equal" | "Greater" | "Less" | "GreaterOrEqual" | "LessOrEqual" | "Not" | "And" | "Or" | "IsNaN" => Some(9),
            "ConstantOfShape" => Some(n.attribute.iter().find(|a| a.name == "value").and_then(|a| a.t.as_ref()).map(|t| t.data_type).unwrap_or(1)),
            "OneHot" => n.input.get(2).and_then(|i| self.infer_type_depth(i, depth + 1)),
            "Where" => n.input.get(1).and_then(|i| self.infer_type_depth(i, depth + 1)),
            // the scale's type, unless `output_dtype` names another
            "DequantizeLinear" => match attr_i(n, "output_dtype").filter(|&t| t != 0) {
                Some(t) => Some(t as i32),
                None => n.input.get(1).and_then(|i| self.infer_type_depth(i, depth + 1)),
            },
            _ => first(self),
        }
    }
}
