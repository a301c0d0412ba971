//! "Looks like MoE, not proven": a region that no rule covered but that has what every MoE layer
//! has, so that a user knows what was left. Nothing here changes the graph.
//!
//! The anchors: a **router**, TopK or ArgMax over the output of a MatMul/Gemm with a constant
//! weight of E > 1 columns (through the Softmax/Sigmoid/Cast/bias/scale/reshape steps routers
//! take), and **per-expert weights** near it: a constant stacked [E, ...] tensor (or [E - 1, ...]:
//! a router class without weights, Zaya's skip class) read by a node of the region (Gather of one
//! expert, batched MatMul, Einsum), or E or more constant MatMul/Gemm
//! weights of one shape and E or more of its transpose (E similar MLP chains, up and down). The
//! region is what the router's outputs and its token rows reach within [`DEPTH`] nodes.
//!
//! A router is covered when a candidate of some rule (replaced or not: a candidate a rule matched
//! and the proof rejected has its own reason) routes by it. An uncovered router with per-expert
//! weights is reported with its anchors, unless a rule looked at its region and left it with a
//! reason of its own (a rejection at a value inside the region): that rejection already tells
//! the user what was left and why, and inspect lists it once.

use std::collections::{BTreeMap, HashSet, VecDeque};

use serde::Serialize;

use super::emit::MoeLayer;
use super::Rejection;
use crate::onnx::graph::{attr_i, GraphIndex};
use onnx_protobuf::NodeProto;

/// How far (in nodes) from the router's outputs and token rows the experts are looked for: a
/// loop iteration's MLP is about 15 nodes from the router, a capacity layer's about 10.
const DEPTH: usize = 40;
/// At most this many nodes in one region (a whole LM's remaining layers are not walked).
const MAX_NODES: usize = 4000;
/// The families the registry runs, named in the reason.
const RULES: &str = "per-expert loop, dense, capacity, Megablocks, com.microsoft.MoE, JetMoE, Llama-4 and batched_mm rules";

/// A region that looks like MoE and that no rule covered.
#[derive(Debug, Clone, Serialize)]
pub struct LooksLike {
    /// the router's routing indices (TopK's indices, ArgMax's output)
    pub at: String,
    /// the router's TopK/ArgMax node
    pub router: String,
    pub experts: usize,
    pub k: Option<usize>,
    /// what was found: the router and each per-expert weight anchor
    pub anchors: Vec<String>,
    /// why it is left: no rule matched it
    pub reason: String,
}

impl LooksLike {
    pub fn text(&self) -> String {
        format!("looks like MoE, not proven: {}; {}", self.anchors.join("; "), self.reason)
    }
}

struct Router {
    node: usize,
    matmul: usize,
    experts: i64,
    k: Option<usize>,
    x: String,
}

fn node_name(g: &GraphIndex, i: usize) -> String {
    let n = g.node(i);
    if n.name.is_empty() {
        n.output.first().cloned().unwrap_or_default()
    } else {
        n.name.clone()
    }
}

/// The router behind a TopK/ArgMax node, if its input is a MatMul/Gemm with a constant weight.
fn router(g: &GraphIndex, i: usize) -> Option<Router> {
    let n = g.node(i);
    if !n.domain.is_empty() || !matches!(n.op_type.as_str(), "TopK" | "ArgMax") {
        return None;
    }
    let k = match n.op_type.as_str() {
        "ArgMax" => Some(1),
        _ => n.input.get(1).and_then(|v| g.const_i64(v)).filter(|k| k.len() == 1 && k[0] > 0).map(|k| k[0] as usize),
    };
    let mut v = n.input.first()?.as_str();
    for _ in 0..8 {
        let (j, p) = g.prod(v)?;
        if !p.domain.is_empty() {
            return None;
        }
        match p.op_type.as_str() {
            "MatMul" | "Gemm" => {
                let w = super::dequant::weight_dims(g, p.input.get(1)?)?;
                let cols = if p.op_type == "Gemm" && attr_i(p, "transB") == Some(1) { *w.first()? } else { *w.last()? };
                return (w.len() == 2 && cols > 1).then(|| Router { node: i, matmul: j, experts: cols, k, x: p.input[0].clone() });
            }
            "Softmax" | "LogSoftmax" | "Sigmoid" | "Cast" | "Identity" | "Reshape" | "Squeeze" | "Unsqueeze" | "Flatten" | "Add" | "Sub" | "Mul" | "Div" => {
                // the non-constant operand (a bias, a scale or a shape is constant)
                v = p.input.iter().find(|x| !x.is_empty() && g.const_tensor(x).is_none())?;
            }
            _ => return None,
        }
    }
    None
}

/// The routers candidates route by: walking back from their routing values (through the nodes a
/// candidate adds) to the first TopK/ArgMax, not past a MatMul (which would reach the token rows
/// and every earlier layer). `more` are routing values of other replacements (JetMoE's attention
/// projections).
fn covered(g: &GraphIndex, layers: &[MoeLayer], more: &[String]) -> HashSet<usize> {
    let mut starts: Vec<(Vec<&str>, &[NodeProto])> =
        layers.iter().map(|l| (vec![l.routing_indices.as_str(), l.routing_weights.as_str()], l.extra_nodes.as_slice())).collect();
    starts.push((more.iter().map(String::as_str).collect(), &[]));
    let mut out = HashSet::new();
    for (mut stack, extra) in starts {
        let mut seen = HashSet::new();
        while let Some(v) = stack.pop() {
            let Some((j, p)) = g.prod(v) else {
                // a value the candidate's own nodes make (the capacity rule's Unsqueeze of the choice)
                if let Some(e) = extra.iter().find(|n| n.output.iter().any(|o| o == v)) {
                    stack.extend(e.input.iter().filter(|x| !x.is_empty()).map(String::as_str));
                }
                continue;
            };
            if !seen.insert(j) || seen.len() > 256 {
                continue;
            }
            match p.op_type.as_str() {
                "TopK" | "ArgMax" => {
                    out.insert(j);
                }
                "MatMul" | "Gemm" | "Einsum" => {}
                _ => stack.extend(p.input.iter().filter(|x| !x.is_empty()).map(String::as_str)),
            }
        }
    }
    out
}

/// Whether the router's outputs reach a covered router within a few nodes: a group selection
/// (DeepSeek-V3's TopK over expert groups) or a bias-corrected choice feeding the router a rule
/// covered is part of that router.
fn feeds_covered(g: &GraphIndex, r: &Router, covered: &HashSet<usize>) -> bool {
    let mut seen = HashSet::new();
    let mut queue: VecDeque<(usize, usize)> = VecDeque::from([(r.node, 0)]);
    while let Some((i, d)) = queue.pop_front() {
        if d > 12 || !seen.insert(i) {
            continue;
        }
        if i != r.node && covered.contains(&i) {
            return true;
        }
        for o in &g.node(i).output {
            queue.extend(g.cons(o).iter().map(|&c| (c, d + 1)));
        }
    }
    false
}

/// Nodes reached from the router's outputs and from the other readers of its token rows.
fn region(g: &GraphIndex, r: &Router, stops: &HashSet<usize>) -> Vec<usize> {
    let mut seen: HashSet<usize> = HashSet::new();
    let mut order = Vec::new();
    let mut queue: VecDeque<(usize, usize)> = VecDeque::new();
    for &c in g.cons(&r.x) {
        if c != r.matmul {
            queue.push_back((c, 0));
        }
    }
    queue.push_back((r.node, 0));
    while let Some((i, d)) = queue.pop_front() {
        if d > DEPTH || order.len() >= MAX_NODES || (stops.contains(&i) && i != r.node) || !seen.insert(i) {
            continue;
        }
        order.push(i);
        for o in &g.node(i).output {
            queue.extend(g.cons(o).iter().map(|&c| (c, d + 1)));
        }
    }
    order
}

/// A constant the node reads (an initializer, or DequantizeLinear of initializers), through one
/// Cast/Transpose/Unsqueeze of it: (name, dims).
fn constant_read(g: &GraphIndex, v: &str) -> Option<(String, Vec<i64>)> {
    if let Some(d) = g.const_dims(v).or_else(|| super::dequant::weight_dims(g, v)) {
        return Some((v.to_string(), d));
    }
    let (_, p) = g.prod(v)?;
    if !matches!(p.op_type.as_str(), "Cast" | "Transpose" | "Unsqueeze" | "Identity") {
        return None;
    }
    let src = p.input.first()?;
    let d = g.const_dims(src).or_else(|| super::dequant::weight_dims(g, src))?;
    Some((src.clone(), d))
}

/// The per-expert weight anchors of a region for E experts.
fn expert_weights(g: &GraphIndex, nodes: &[usize], e: i64, router_w: &str) -> Vec<String> {
    let mut stacked: Vec<String> = Vec::new();
    let mut seen = HashSet::new();
    let mut by_shape: BTreeMap<(i64, i64), HashSet<String>> = BTreeMap::new();
    for &i in nodes {
        let n = g.node(i);
        for v in n.input.iter().filter(|v| !v.is_empty()) {
            let Some((name, dims)) = constant_read(g, v) else { continue };
            if name == router_w {
                continue;
            }
            // E stacked experts, or E - 1 where one router class has no weights (a skip class)
            let lead = dims.first().copied().unwrap_or(0);
            if dims.len() >= 3
                && (lead == e || (lead == e - 1 && lead > 1))
                && matches!(n.op_type.as_str(), "Gather" | "GatherND" | "MatMul" | "Einsum" | "Gemm" | "Slice" | "Split")
            {
                if seen.insert(name.clone()) {
                    let skip = if lead == e { "" } else { " (one router column fewer: a class without weights)" };
                    stacked.push(format!("stacked {dims:?} '{name}' read by {}{skip}", n.op_type));
                }
            } else if dims.len() == 2 && matches!(n.op_type.as_str(), "MatMul" | "Gemm") {
                by_shape.entry((dims[0], dims[1])).or_default().insert(name);
            }
        }
    }
    let mut chains = Vec::new();
    for (&(a, b), names) in &by_shape {
        let back = by_shape.get(&(b, a)).map_or(0, HashSet::len);
        if a <= b && names.len() as i64 >= e && back as i64 >= e {
            chains.push(format!("{e} similar MLP chains: {} constant weights [{a}, {b}] and {back} [{b}, {a}] read by MatMul/Gemm", names.len()));
        }
    }
    stacked.extend(chains);
    stacked
}

/// Regions that look like MoE and that none of `layers` (the rules' candidates) covers, nor the
/// routing values `more` of other replacements, nor a rule's rejection (`rejected`) inside.
pub fn find(g: &GraphIndex, layers: &[MoeLayer], more: &[String], rejected: &[Rejection]) -> Vec<LooksLike> {
    let routers: Vec<Router> = (0..g.graph.node.len()).filter_map(|i| router(g, i)).collect();
    let covered = covered(g, layers, more);
    let stops: HashSet<usize> = routers.iter().map(|r| r.matmul).collect();
    let mut out = Vec::new();
    for r in routers.iter().filter(|r| !covered.contains(&r.node) && !feeds_covered(g, r, &covered)) {
        let nodes = region(g, r, &stops);
        let router_w = g.node(r.matmul).input[1].clone();
        let weights = expert_weights(g, &nodes, r.experts, &router_w);
        if weights.is_empty() {
            continue;
        }
        let n = g.node(r.node);
        let mut anchors = vec![format!(
            "router {} '{}' (k={}) over the E={} columns of {} '{}'",
            n.op_type,
            node_name(g, r.node),
            r.k.map_or("?".to_string(), |k| k.to_string()),
            r.experts,
            g.node(r.matmul).op_type,
            node_name(g, r.matmul)
        )];
        anchors.extend(weights);
        // a rule that looked at the region and left it has said why in its own rejection
        let values: HashSet<&str> = nodes.iter().flat_map(|&i| g.node(i).output.iter().map(String::as_str)).collect();
        if rejected.iter().any(|x| values.contains(x.at.as_str())) {
            continue;
        }
        let reason = format!("no rule matched it ({} found no candidate here)", RULES);
        let at = n.output.get(if n.op_type == "TopK" { 1 } else { 0 }).cloned().unwrap_or_default();
        out.push(LooksLike { at, router: node_name(g, r.node), experts: r.experts as usize, k: r.k, anchors, reason });
    }
    out
}

#[cfg(test)]
mod tests {
    use crate::onnx::graph::{attr_string, GraphIndex};
    use crate::onnx::Model;
    use crate::rewrite::matcher::testing::fixture;
    use crate::rewrite::{rewrite_with, Report, RewriteOptions, Target};

    /// The rules' matching alone (no numeric proof: these tests need no ONNX Runtime).
    fn report(m: &mut Model) -> Report {
        rewrite_with(m, &RewriteOptions { target: Target::OnnxRuntime, prove: false, fuse_router: true }).unwrap()
    }

    /// Every node of `op` whose first output contains `tag`, changed by `f`.
    fn mutate(m: &mut Model, op: &str, tag: &str, f: impl Fn(&mut onnx_protobuf::NodeProto)) {
        let g = m.proto.graph.mut_or_insert_default();
        let mut hit = 0;
        for n in g.node.iter_mut().filter(|n| n.op_type == op && n.output[0].contains(tag)) {
            f(n);
            hit += 1;
        }
        assert!(hit > 0, "no {op} node {tag}");
    }

    #[test]
    fn covered_layers_are_not_reported() {
        for name in ["dense_einsum", "mixtral", "loop_where", "capacity_einsum", "megablocks", "mixtral_bmm"] {
            let mut m = fixture(name);
            let rep = report(&mut m);
            assert_eq!(rep.layers.len(), 1, "{name}: {:?}", rep.rejected);
            assert!(rep.looks_like_moe.is_empty(), "{name}: {:?}", rep.looks_like_moe);
        }
    }

    #[test]
    fn a_dense_layer_whose_combine_no_rule_reads_looks_like_moe() {
        // the combine sums over the tokens as well: no family computes that
        let mut m = fixture("dense_einsum");
        mutate(&mut m, "Einsum", "output", |n| {
            n.attribute.retain(|a| a.name != "equation");
            n.attribute.push(attr_string("equation", "bse,bsed->bd"));
        });
        let rep = report(&mut m);
        assert!(rep.layers.is_empty());
        assert_eq!(rep.looks_like_moe.len(), 1, "{:?}", rep.rejected);
        let l = &rep.looks_like_moe[0];
        assert_eq!((l.at.as_str(), l.experts, l.k), ("/m/router/TopK_output_1", 4, Some(2)));
        assert!(l.anchors[0].starts_with("router TopK"), "{:?}", l.anchors);
        for w in ["m.w_gate", "m.w_up", "m.w_down"] {
            assert!(l.anchors.iter().any(|a| a.contains(&format!("'{w}' read by Einsum"))), "{w}: {:?}", l.anchors);
        }
        assert!(rep.text().contains("looks like MoE, not proven: router TopK"), "{}", rep.text());
        let c = rep.candidates();
        assert!(c.iter().any(|c| c.family == "looks_like_moe" && !c.rewrite && c.text(false).contains("E=4 k=2")), "{c:?}");
        let v: serde_json::Value = serde_json::from_str(&rep.json()).unwrap();
        assert_eq!(v["looks_like_moe"][0]["experts"], 4);
    }

    #[test]
    fn loops_whose_scatter_multiplies_look_like_moe() {
        // index_add turned into an index-multiply: stacked experts (Mixtral) and E separate MLP
        // chains (a hand-written loop) keep their anchors
        for (name, anchor) in [("mixtral", "stacked [8, 128, 32] 'm.experts.gate_up_proj' read by Gather"), ("loop_where", "4 similar MLP chains")] {
            let mut m = fixture(name);
            mutate(&mut m, "ScatterElements", "ScatterElements", |n| n.attribute.push(attr_string("reduction", "mul")));
            let rep = report(&mut m);
            assert!(rep.layers.is_empty() && rep.rejected.is_empty(), "{name}: {:?}", rep.rejected);
            assert_eq!(rep.looks_like_moe.len(), 1, "{name}");
            let l = &rep.looks_like_moe[0];
            assert!(l.anchors.iter().any(|a| a.contains(anchor)), "{name}: {:?}", l.anchors);
            assert!(l.reason.starts_with("no rule matched it (per-expert loop, dense"), "{name}: {}", l.reason);
        }
    }

    #[test]
    fn a_region_a_rule_left_with_its_reason_is_not_reported_twice() {
        // Zaya's eager loop: the loop rule says why it leaves it; the anchors (a router of E + 1
        // classes, 4 stacked experts) are found, a class without weights included
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/families/zaya_moe.onnx");
        let mut m = crate::onnx::load(&p).unwrap();
        let rep = report(&mut m);
        assert!(rep.layers.is_empty() && rep.looks_like_moe.is_empty(), "{:?}", rep.looks_like_moe);
        assert!(rep.rejected.iter().any(|r| r.family == "hf_loop"), "{:?}", rep.rejected);
        // the anchors themselves, without the rule's rejection
        let g = GraphIndex::new(m.graph(), Some(&m.ext)).unwrap();
        let found = super::find(&g, &[], &[], &[]);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].experts, 5);
        assert!(found[0].anchors.iter().any(|a| a.contains("'m.experts.gate_up_proj'") && a.contains("a class without weights")), "{:?}", found[0].anchors);
    }

    #[test]
    fn a_router_without_expert_weights_is_not_reported() {
        // the experts' weights made non-constant: a TopK over a MatMul alone is not an MoE
        let mut m = fixture("dense_einsum");
        mutate(&mut m, "Einsum", "output", |n| {
            n.attribute.retain(|a| a.name != "equation");
            n.attribute.push(attr_string("equation", "bse,bsed->bd"));
        });
        let g = m.proto.graph.mut_or_insert_default();
        let stacks: Vec<onnx_protobuf::TensorProto> = g.initializer.iter().filter(|t| t.dims.len() == 3).cloned().collect();
        g.initializer.retain(|t| t.dims.len() != 3);
        for t in stacks {
            let mut vi = onnx_protobuf::ValueInfoProto::new();
            vi.name = t.name.clone();
            g.input.push(vi);
        }
        let rep = report(&mut m);
        assert!(rep.looks_like_moe.is_empty(), "{:?}", rep.looks_like_moe);
    }
}
