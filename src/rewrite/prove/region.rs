//! The region a candidate replaces, and the boundary both sides of the proof read.
//!
//! The region is exactly what the rewrite removes: the nodes that computed the candidate's output
//! and that nothing else needs once the replacement produces it. Its boundary is every value those
//! nodes read from outside. Both proof models must be functions of the same boundary, so values
//! the region reads that the replacement does not (shape chains such as `Shape(X) -> Gather`,
//! constants, small computations on the replacement's own inputs) are pulled in as nodes both
//! models compute; the remaining boundary values (the replacement's inputs, graph inputs, and
//! values that cannot be derived from them nearby) become the proof models' inputs.

use std::collections::{BTreeSet, HashSet};

use anyhow::{bail, Result};

use crate::onnx::graph::{keeps_rank, node_inputs_with_subgraphs, GraphIndex};

/// Most nodes pulled in beside the region (a shape chain is a handful; more means the boundary
/// value comes from far away, and it is fed as an input instead).
const PULL_BUDGET: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    /// nodes the rewrite removes, in topological order
    pub removed: Vec<usize>,
    /// live nodes both proof models compute, in topological order
    pub shared: Vec<usize>,
    /// values both proof models read as inputs, sorted
    pub inputs: Vec<String>,
    /// (source, rows): an input read in place of the replacement's rows `rows`, which both
    /// models compute from it row by row (see [`common_source`]): it has the rows' shape
    pub row_sources: Vec<(String, String)>,
}

fn is_float(t: Option<i32>) -> bool {
    matches!(t, Some(1) | Some(10) | Some(16) | Some(11))
}

/// `replacement_reads`: values of the graph (not initializers) the replacement's nodes read.
/// `derive`: those of them both models must compute from the others instead of reading them
/// (routing indices whose router guarantees something random indices would not).
pub fn extract(g: &GraphIndex, output: &str, replacement_reads: &[String], derive: &[String]) -> Result<Region> {
    let Some(&out_node) = g.producer.get(output) else { bail!("no node produces '{output}'") };
    // nodes still needed once `output` comes from the replacement
    let mut live = vec![false; g.graph.node.len()];
    let mut stack: Vec<&str> = g.graph.output.iter().map(|o| o.name.as_str()).collect();
    let mut seen: HashSet<String> = HashSet::new();
    while let Some(v) = stack.pop() {
        if !seen.insert(v.to_string()) {
            continue;
        }
        if v == output {
            stack.extend(replacement_reads.iter().map(String::as_str));
            continue;
        }
        if let Some(&p) = g.producer.get(v) {
            if !live[p] {
                live[p] = true;
                stack.extend(node_inputs_with_subgraphs(g.node(p)));
            }
        }
    }
    if live[out_node] {
        bail!("the node producing '{output}' is still needed for its other outputs");
    }
    // the cone of `output` minus what stays live
    let mut removed = BTreeSet::new();
    let mut stack = vec![out_node];
    while let Some(i) = stack.pop() {
        if live[i] || !removed.insert(i) {
            continue;
        }
        for v in node_inputs_with_subgraphs(g.node(i)) {
            if let Some(&p) = g.producer.get(v) {
                stack.push(p);
            }
        }
    }

    let mut anchors: HashSet<&str> = replacement_reads.iter().map(String::as_str).filter(|v| !derive.iter().any(|d| d == v)).collect();
    let mut shared = BTreeSet::new();
    let mut inputs = BTreeSet::new();
    let mut work: Vec<usize> = removed.iter().copied().collect();
    let mut done_values: HashSet<String> = HashSet::new();
    // the nodes that compute the derived values from the anchors or the graph's inputs: both
    // models compute them (a router that reads the graph's input rather than the token rows the
    // replacement reads is computed from that input, so the proof sees the routings it makes)
    let mut derive_nodes = HashSet::new();
    let mut derived: Vec<&str> = derive.iter().map(String::as_str).collect();
    let mut row_sources = Vec::new();
    let mut i = 0;
    while i < derived.len() {
        let v = derived[i];
        i += 1;
        let Some(&p) = g.producer.get(v) else { bail!("'{v}' has no producer to compute it from") };
        let nodes = match derived_from(g, v, &anchors, true) {
            Some(nodes) => nodes,
            None => {
                // A router that reads another value than the token rows (Gemma 4's reads the
                // residual, its experts the residual normalised again): both are computed from the
                // nearest value they share, which the proof models read instead of the rows.
                let Some((source, rows, nodes)) = common_source(g, v, &anchors) else {
                    bail!("'{v}' is not computed from the replacement's other inputs and the graph's inputs within {PULL_BUDGET} nodes");
                };
                anchors.remove(rows);
                anchors.insert(source);
                derived.push(rows);
                row_sources.push((source.to_string(), rows.to_string()));
                nodes
            }
        };
        derive_nodes.extend(nodes);
        if !removed.contains(&p) && shared.insert(p) {
            work.push(p);
        }
    }
    while let Some(i) = work.pop() {
        for v in node_inputs_with_subgraphs(g.node(i)) {
            if !done_values.insert(v.to_string()) || g.const_tensor(v).is_some() && g.prod(v).is_none() {
                continue;
            }
            let Some(&p) = g.producer.get(v) else {
                // a graph input (an initializer that is also a graph input can be overridden)
                inputs.insert(v.to_string());
                continue;
            };
            if removed.contains(&p) || shared.contains(&p) {
                continue;
            }
            if anchors.contains(v) {
                inputs.insert(v.to_string());
                continue;
            }
            let pull = g.node(p).op_type == "Constant"
                || !is_float(g.infer_type(v))
                || derive_nodes.contains(&p)
                || derived_from(g, v, &anchors, false).is_some_and(|n| n.len() + shared.len() <= PULL_BUDGET);
            if pull {
                if shared.len() >= PULL_BUDGET {
                    bail!("the region reads '{v}', whose computation is more than {PULL_BUDGET} nodes away from the replacement's inputs");
                }
                shared.insert(p);
                work.push(p);
            } else {
                inputs.insert(v.to_string());
            }
        }
    }
    let order = |s: BTreeSet<usize>| {
        let mut v: Vec<usize> = s.into_iter().collect();
        v.sort_by_key(|&i| g.topo_pos[i]);
        v
    };
    Ok(Region { removed: order(removed), shared: order(shared), inputs: inputs.into_iter().collect(), row_sources })
}

/// The value nearest to an anchor (the token rows) from which both `v` and that anchor are computed
/// (with the other anchors, constants and the graph's inputs, each within the budget), the rows
/// from it by row-wise ops only (`keeps_rank`, or Constant nodes: so it has the rows' shape, in
/// which the proof draws it): (that value, the anchor, the nodes of `v` from it). Anchors are
/// tried in name order, their ancestors nearest first.
fn common_source<'a>(g: &'a GraphIndex, v: &str, anchors: &HashSet<&'a str>) -> Option<(&'a str, &'a str, HashSet<usize>)> {
    let row_wise = |nodes: &HashSet<usize>| nodes.iter().all(|&i| g.node(i).op_type == "Constant" || keeps_rank(g.node(i)));
    let mut sorted: Vec<&'a str> = anchors.iter().copied().filter(|a| g.producer.contains_key(*a) && is_float(g.infer_type(a))).collect();
    sorted.sort_unstable();
    for a in sorted {
        // the anchor's ancestors, breadth first
        let mut queue = std::collections::VecDeque::from([a]);
        let mut seen: HashSet<&'a str> = HashSet::from([a]);
        let mut nodes = 0;
        while let Some(x) = queue.pop_front() {
            let Some(&p) = g.producer.get(x) else { continue };
            nodes += 1;
            if nodes > PULL_BUDGET {
                break;
            }
            for c in node_inputs_with_subgraphs(g.node(p)) {
                if !seen.insert(c) || (g.const_tensor(c).is_some() && g.prod(c).is_none()) || !is_float(g.infer_type(c)) {
                    continue;
                }
                let mut trial = anchors.clone();
                trial.remove(a);
                trial.insert(c);
                if let Some(nodes) = derived_from(g, v, &trial, true) {
                    if derived_from(g, a, &trial, true).is_some_and(|n| row_wise(&n)) {
                        return Some((c, a, nodes));
                    }
                }
                queue.push_back(c);
            }
        }
    }
    None
}

/// The nodes of `v`'s computation when it depends only on `anchors` and constants (and, with
/// `graph_inputs`, the graph's inputs) within the budget, so that both proof models can compute
/// it from their inputs; None otherwise.
fn derived_from(g: &GraphIndex, v: &str, anchors: &HashSet<&str>, graph_inputs: bool) -> Option<HashSet<usize>> {
    let mut seen = HashSet::new();
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        if anchors.contains(v) || (g.const_tensor(v).is_some() && g.prod(v).is_none()) || (graph_inputs && g.graph_inputs.contains(v)) {
            continue;
        }
        let &p = g.producer.get(v)?;
        if seen.insert(p) {
            if seen.len() > PULL_BUDGET {
                return None;
            }
            // the shape of a graph input (the dynamo exporter sizes buffers from the input's
            // shape, not the token rows'): the input joins the proof's inputs, only its shape read
            let n = g.node(p);
            if n.op_type == "Shape" && !g.producer.contains_key(n.input[0].as_str()) && g.graph.input.iter().any(|i| i.name == n.input[0]) {
                continue;
            }
            stack.extend(node_inputs_with_subgraphs(n));
        }
    }
    Some(seen)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::graph::make_node;
    use onnx_protobuf::{GraphProto, ValueInfoProto};

    fn vi(name: &str) -> ValueInfoProto {
        let mut v = ValueInfoProto::new();
        v.name = name.into();
        v
    }

    /// h -> Reshape -> x; router x -> logits -> TopK -> (rw, idx); the MoE region reads x, rw,
    /// idx and Shape(h); the result is reshaped back with Shape(h), which stays live.
    fn graph() -> GraphProto {
        let mut g = GraphProto::new();
        g.input.push(vi("h"));
        g.output.push(vi("y"));
        for t in [
            crate::onnx::tensor::make_i64("shape", &[2], &[-1, 4]),
            crate::onnx::tensor::make_i64("k", &[1], &[2]),
            crate::onnx::tensor::make_i64("zero", &[1], &[0]),
        ] {
            g.initializer.push(t);
        }
        let mut wr = crate::onnx::tensor::make_i64("wr", &[4, 3], &[0; 12]);
        wr.data_type = 1;
        wr.int64_data.clear();
        wr.raw_data = vec![0; 48];
        g.initializer.push(wr);
        let n = |op: &str, name: &str, i: &[&str], o: &[&str]| make_node(op, "", name, i, o);
        g.node.push(n("Reshape", "reshape", &["h", "shape"], &["x"]));
        g.node.push(n("MatMul", "router", &["x", "wr"], &["logits"]));
        g.node.push(n("TopK", "topk", &["logits", "k"], &["rw", "idx"]));
        g.node.push(n("Shape", "shape_h", &["h"], &["hs"]));
        g.node.push(n("Gather", "tokens", &["hs", "zero"], &["t"]));
        g.node.push(n("Mul", "scale", &["rw", "rw"], &["rw2"]));
        g.node.push(n("Expand", "region_a", &["x", "t"], &["a"]));
        g.node.push(n("Mul", "region_b", &["a", "rw2"], &["b"]));
        g.node.push(n("Add", "region_out", &["b", "idx"], &["moe"]));
        g.node.push(n("Reshape", "back", &["moe", "hs"], &["y"]));
        g
    }

    #[test]
    fn removed_nodes_shared_shape_chain_and_boundary() {
        let g = graph();
        let gi = GraphIndex::new(&g, None).unwrap();
        let reads: Vec<String> = ["x", "rw", "idx"].iter().map(|s| s.to_string()).collect();
        let r = extract(&gi, "moe", &reads, &[]).unwrap();
        let names = |v: &[usize]| v.iter().map(|&i| g.node[i].name.clone()).collect::<Vec<_>>();
        // rw2 is computed from rw only: removed with the region (nothing else reads it)
        assert_eq!(names(&r.removed), ["tokens", "scale", "region_a", "region_b", "region_out"]);
        // Shape(h) stays live (the reshape back reads it) and is a shape chain: both models compute it
        assert_eq!(names(&r.shared), ["shape_h"]);
        assert_eq!(r.inputs, ["h", "idx", "rw", "x"]);
    }

    #[test]
    fn a_value_the_replacement_reads_is_never_pulled_in() {
        let g = graph();
        let gi = GraphIndex::new(&g, None).unwrap();
        // if the replacement read the logits, the router would stay live and TopK's outputs would
        // be region inputs computed elsewhere: rw and idx are derived from the logits, so pulled in
        let reads: Vec<String> = ["x", "logits"].iter().map(|s| s.to_string()).collect();
        let r = extract(&gi, "moe", &reads, &[]).unwrap();
        let names = |v: &[usize]| v.iter().map(|&i| g.node[i].name.clone()).collect::<Vec<_>>();
        assert!(names(&r.removed).contains(&"topk".to_string()), "{:?}", names(&r.removed));
        assert_eq!(r.inputs, ["h", "logits", "x"]);
    }

    #[test]
    fn the_producer_kept_for_another_output_is_an_error() {
        let mut g = graph();
        g.output.push(vi("a"));
        let gi = GraphIndex::new(&g, None).unwrap();
        let reads: Vec<String> = ["x", "rw", "idx"].iter().map(|s| s.to_string()).collect();
        // region_a stays live for the graph output 'a', so only region_b and region_out go
        let r = extract(&gi, "moe", &reads, &[]).unwrap();
        assert!(r.inputs.contains(&"a".to_string()) || r.shared.iter().any(|&i| g.node[i].name == "region_a"));
        let mut g2 = graph();
        g2.output.push(vi("moe"));
        let gi2 = GraphIndex::new(&g2, None).unwrap();
        // 'moe' itself a graph output is fine: its producer is removed and replaced
        assert!(extract(&gi2, "moe", &reads, &[]).is_ok());
    }

    #[test]
    fn derived_routing_brings_the_router_into_both_models() {
        let g = graph();
        let gi = GraphIndex::new(&g, None).unwrap();
        let reads: Vec<String> = ["x", "rw", "idx"].iter().map(|s| s.to_string()).collect();
        let r = extract(&gi, "moe", &reads, &["idx".to_string()]).unwrap();
        let names = |v: &[usize]| v.iter().map(|&i| g.node[i].name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&r.shared), ["router", "topk", "shape_h"]);
        // rw comes from the router's TopK now, computed in both models
        assert_eq!(r.inputs, ["h", "x"]);
    }

    /// Zeros the region adds into, sized from a graph input's shape (the dynamo exporter sizes
    /// JetMoE's `index_add` buffers from `input_ids`, not from the token rows): both models
    /// compute them, the graph input joins the inputs for its shape. Fed as an input, the zeros
    /// would be drawn as random data that the replacement never adds, and a right candidate
    /// (JetMoE's MoE inside its whole LM) would differ from its region.
    #[test]
    fn zeros_sized_from_a_graph_input_are_computed_in_both_models() {
        let mut g = GraphProto::new();
        for v in ["ids", "x", "idx"] {
            g.input.push(vi(v));
        }
        g.output.push(vi("y"));
        g.initializer.push(crate::onnx::tensor::make_i64("width", &[1], &[4]));
        let mut zero = crate::onnx::tensor::make_i64("zero", &[], &[0]);
        zero.data_type = 1;
        zero.int64_data.clear();
        zero.raw_data = vec![0; 4];
        g.initializer.push(zero);
        let n = |op: &str, name: &str, i: &[&str], o: &[&str]| make_node(op, "", name, i, o);
        let mut shape = n("Shape", "shape_ids", &["ids"], &["s"]);
        shape.attribute.push(crate::onnx::graph::attr_int("start", 1));
        g.node.push(shape);
        g.node.push(n("Concat", "zeros_shape", &["s", "width"], &["zs"]));
        g.node.push(n("Expand", "zeros", &["zero", "zs"], &["z"]));
        g.node.push(n("ScatterND", "index_add", &["z", "idx", "x"], &["moe"]));
        g.node.push(n("Identity", "out", &["moe"], &["y"]));
        let gi = GraphIndex::new(&g, None).unwrap();
        let reads: Vec<String> = ["x", "idx"].iter().map(|s| s.to_string()).collect();
        let r = extract(&gi, "moe", &reads, &[]).unwrap();
        let names = |v: &[usize]| v.iter().map(|&i| g.node[i].name.clone()).collect::<Vec<_>>();
        // nothing else reads the zeros: they go with the region, computed from the input's shape
        assert_eq!(names(&r.removed), ["shape_ids", "zeros_shape", "zeros", "index_add"]);
        assert_eq!(r.inputs, ["ids", "idx", "x"]);
        // read elsewhere too, they stay live and both models compute them
        g.output.push(vi("z"));
        let gi = GraphIndex::new(&g, None).unwrap();
        // float data: pulled in only because it is derivable, never for being an integer
        assert_eq!(gi.infer_type("z"), Some(1));
        let r = extract(&gi, "moe", &reads, &[]).unwrap();
        assert_eq!(names(&r.shared), ["shape_ids", "zeros_shape", "zeros"]);
        assert_eq!(r.inputs, ["ids", "idx", "x"]);
    }

    /// Indices derived from a router that reads the graph's input rather than the rows the
    /// replacement reads: the router is computed from that input in both models.
    #[test]
    fn derived_routing_may_start_at_a_graph_input() {
        let g = graph();
        let gi = GraphIndex::new(&g, None).unwrap();
        let reads: Vec<String> = ["rw", "idx"].iter().map(|s| s.to_string()).collect();
        let r = extract(&gi, "moe", &reads, &["idx".to_string()]).unwrap();
        let names = |v: &[usize]| v.iter().map(|&i| g.node[i].name.clone()).collect::<Vec<_>>();
        assert!(["reshape", "router", "topk"].iter().all(|n| names(&r.shared).contains(&n.to_string())), "{:?}", names(&r.shared));
        // rw comes from the router's TopK too, which both models now compute
        assert_eq!(r.inputs, ["h"]);
        // a value computed from no input at all is still refused
        let mut g2 = graph();
        g2.input.clear();
        let gi2 = GraphIndex::new(&g2, None).unwrap();
        assert!(extract(&gi2, "moe", &reads, &["idx".to_string()]).is_err());
    }

    /// Gemma 4's layer: the router reads the residual r, the experts a normalisation of it, and r
    /// lies far from the graph's input. The indices are computed in both models from r, drawn in
    /// the rows' shape, and so are the rows (row_sources); where the rows come from r by an op
    /// that is not row-wise, nothing is shared and the proof cannot be built.
    #[test]
    fn a_router_on_another_value_than_the_rows_is_computed_from_their_common_source() {
        let build = |norm_op: &str| {
            let mut g = GraphProto::new();
            g.input.push(vi("h"));
            g.output.push(vi("y"));
            g.initializer.push(crate::onnx::tensor::make_i64("k", &[1], &[2]));
            for (name, dims) in [("wr", vec![4i64, 3]), ("gamma", vec![4])] {
                let mut t = crate::onnx::tensor::make_i64(name, &dims, &vec![0; dims.iter().product::<i64>() as usize]);
                t.data_type = 1;
                t.int64_data.clear();
                t.raw_data = vec![0; 4 * dims.iter().product::<i64>() as usize];
                g.initializer.push(t);
            }
            let n = |op: &str, name: &str, i: &[&str], o: &[&str]| make_node(op, "", name, i, o);
            // the residual, more than the budget of nodes away from the graph's input
            let mut prev = "h".to_string();
            for i in 0..=PULL_BUDGET {
                let next = format!("r{i}");
                g.node.push(n("Identity", &format!("far{i}"), &[&prev], &[&next]));
                prev = next;
            }
            // (a Cast tells the residual's type without walking the chain)
            let mut cast = n("Cast", "residual", &[&prev], &["r"]);
            cast.attribute.push(crate::onnx::graph::attr_int("to", 1));
            g.node.push(cast);
            let r = "r".to_string();
            g.node.push(n("MatMul", "router", &[&r, "wr"], &["logits"]));
            g.node.push(n("TopK", "topk", &["logits", "k"], &["rw", "idx"]));
            g.node.push(n(norm_op, "norm", &[&r, "gamma"], &["x"]));
            g.node.push(n("Mul", "region_a", &["x", "rw"], &["a"]));
            g.node.push(n("Add", "region_out", &["a", "idx"], &["moe"]));
            g.node.push(n("Identity", "out", &["moe"], &["y"]));
            (g, r)
        };
        let reads: Vec<String> = ["x", "rw", "idx"].iter().map(|s| s.to_string()).collect();
        let (g, r) = build("Mul");
        let gi = GraphIndex::new(&g, None).unwrap();
        let region = extract(&gi, "moe", &reads, &["idx".to_string()]).unwrap();
        let names = |v: &[usize]| v.iter().map(|&i| g.node[i].name.clone()).collect::<Vec<_>>();
        assert_eq!(region.inputs, [r.clone()]);
        assert_eq!(region.row_sources, [(r.clone(), "x".to_string())]);
        assert_eq!(names(&region.shared), ["router", "topk", "norm"]);
        // the rows a MatMul of the residual: not row-wise, so no common source
        let (g, _) = build("MatMul");
        let gi = GraphIndex::new(&g, None).unwrap();
        let e = extract(&gi, "moe", &reads, &["idx".to_string()]).unwrap_err().to_string();
        assert!(e.contains("is not computed from the replacement's other inputs"), "{e}");
    }
}
