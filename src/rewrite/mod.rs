//! The rewriter: finds the MoE subgraphs exporters write and replaces each with one
//! `ai.scattermoe::ScatterMoE` node. The router stays as ONNX ops; a match starts from its outputs
//! (routing weights and indices). A candidate is replaced only when its weights, routing and
//! activation are proven to be the MoE computation; otherwise it stays and the report says why.
//!
//! One file per family: [`hf_loop`] (per-expert loops, including Switch's capacity-masked loop),
//! [`dense`] (every expert for every token), [`capacity`] (one-hot dispatch/combine einsums),
//! [`megablocks`] (sort, gather, padded per-expert batched MatMul, un-permute), [`ort_moe`]
//! (`com.microsoft.MoE`). [`emit`] writes the node and the stacked weights.
//!
//! The driver runs every [`rule`] of the registry, keeps one candidate per replaced value, emits
//! each, and (unless turned off) [`prove`]s it numerically against the nodes it replaces before
//! anything in the graph changes: a candidate that fails its proof is a rejection, and the graph
//! keeps its original nodes for it.

pub mod batched;
pub mod canon;
pub mod capacity;
pub mod dense;
pub mod emit;
pub mod expr;
pub mod hf_loop;
pub mod jetmoe;
pub mod llama4;
pub mod matcher;
pub mod megablocks;
pub mod moa;
pub mod ort_moe;
pub mod prove;
pub mod rule;
pub mod verify;

use std::fmt::Write as _;

use anyhow::{anyhow, Context, Result};

use crate::onnx::graph::{prune, GraphIndex};
use crate::onnx::Model;
use crate::spec;
pub use emit::Target;
use emit::MoeLayer;

/// A candidate left as it was, and why.
#[derive(Debug, Clone)]
pub struct Rejection {
    pub family: &'static str,
    /// the value where the candidate ends
    pub at: String,
    pub reason: String,
}

/// One replaced layer.
#[derive(Debug, Clone)]
pub struct LayerReport {
    pub family: &'static str,
    pub output: String,
    pub node: String,
    pub experts: usize,
    pub k: Option<usize>,
    pub d: usize,
    pub f: usize,
    pub activation: &'static str,
    pub gated: bool,
    pub glu_layout: &'static str,
    pub elem_type: &'static str,
    pub capacity: Option<i64>,
    pub biases: bool,
    /// what the numeric proof compared; None when the proof was turned off
    pub proof: Option<prove::Proof>,
}

#[derive(Debug, Clone, Default)]
pub struct Report {
    pub layers: Vec<LayerReport>,
    pub rejected: Vec<Rejection>,
    pub nodes_before: usize,
    pub nodes_after: usize,
    pub initializers_before: usize,
    pub initializers_after: usize,
}

impl Report {
    pub fn text(&self) -> String {
        let mut s = String::new();
        if self.layers.is_empty() {
            let _ = writeln!(s, "no MoE layer was replaced");
        }
        for l in &self.layers {
            let _ = writeln!(
                s,
                "replaced {} layer -> {} ({}): E={} k={} d={} f={} activation={}{} {}{}{}",
                l.family,
                l.output,
                l.node,
                l.experts,
                l.k.map_or("?".to_string(), |k| k.to_string()),
                l.d,
                l.f,
                l.activation,
                if l.gated { format!(" gated ({})", l.glu_layout) } else { String::new() },
                l.elem_type,
                if l.biases { " with biases" } else { "" },
                l.capacity.map_or(String::new(), |c| format!(" capacity={c}")),
            );
            let unproven = if l.family == moa::FAMILY {
                "not proven (the numeric proof covers ScatterMoE candidates; ParallelLinear replacements are not proven yet)"
            } else {
                "not proven (proof turned off)"
            };
            let _ = writeln!(s, "  {}", l.proof.as_ref().map_or(unproven.to_string(), prove::Proof::text));
        }
        for r in &self.rejected {
            let _ = writeln!(s, "left as is: {} candidate ending at {}: {}", r.family, r.at, r.reason);
        }
        let _ = writeln!(
            s,
            "nodes {} -> {}, initializers {} -> {}",
            self.nodes_before, self.nodes_after, self.initializers_before, self.initializers_after
        );
        s
    }

    pub fn json(&self) -> String {
        let q = |v: &str| {
            let mut o = String::from("\"");
            for c in v.chars() {
                match c {
                    '"' => o.push_str("\\\""),
                    '\\' => o.push_str("\\\\"),
                    '\n' => o.push_str("\\n"),
                    c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
                    c => o.push(c),
                }
            }
            o.push('"');
            o
        };
        let opt = |v: Option<i64>| v.map_or("null".to_string(), |x| x.to_string());
        let layers: Vec<String> = self
            .layers
            .iter()
            .map(|l| {
                format!(
                    "{{\"family\":{},\"output\":{},\"node\":{},\"experts\":{},\"k\":{},\"d\":{},\"f\":{},\"activation\":{},\"gated\":{},\"glu_layout\":{},\"elem_type\":{},\"capacity\":{},\"biases\":{}}}",
                    q(l.family), q(&l.output), q(&l.node), l.experts, opt(l.k.map(|k| k as i64)), l.d, l.f, q(l.activation),
                    l.gated, q(l.glu_layout), q(l.elem_type), opt(l.capacity), l.biases
                )
            })
            .collect();
        let rejected: Vec<String> =
            self.rejected.iter().map(|r| format!("{{\"family\":{},\"at\":{},\"reason\":{}}}", q(r.family), q(&r.at), q(&r.reason))).collect();
        format!(
            "{{\"layers\":[{}],\"rejected\":[{}],\"nodes_before\":{},\"nodes_after\":{},\"initializers_before\":{},\"initializers_after\":{}}}",
            layers.join(","),
            rejected.join(","),
            self.nodes_before,
            self.nodes_after,
            self.initializers_before,
            self.initializers_after
        )
    }
}

/// k of a routing index tensor when it comes from TopK with a constant k or ArgMax.
pub(crate) fn k_of(g: &GraphIndex, idx: &str) -> Option<usize> {
    let (_, n) = g.prod(idx)?;
    match n.op_type.as_str() {
        "TopK" => g.const_i64(&n.input[1]).filter(|k| k.len() == 1).map(|k| k[0] as usize),
        "ArgMax" => Some(1),
        _ => None,
    }
}

/// How to rewrite.
#[derive(Debug, Clone, Copy)]
pub struct RewriteOptions {
    /// the runtime the nodes are written for
    pub target: Target,
    /// prove every candidate numerically in ONNX Runtime before it is written (needs ONNX
    /// Runtime and libscattermoe_ort.so; see [`prove`])
    pub prove: bool,
}

impl Default for RewriteOptions {
    fn default() -> Self {
        RewriteOptions { target: Target::OnnxRuntime, prove: true }
    }
}

/// Rewrites every recognised MoE layer of `model` in place, for ONNX Runtime, each proven.
pub fn rewrite(model: &mut Model) -> Result<Report> {
    rewrite_with(model, &RewriteOptions::default())
}

/// Rewrites every recognised MoE layer of `model` in place, writing the nodes for `target`, each proven.
pub fn rewrite_for(model: &mut Model, target: Target) -> Result<Report> {
    rewrite_with(model, &RewriteOptions { target, ..Default::default() })
}

/// Rewrites with the registry's rules.
pub fn rewrite_with(model: &mut Model, opts: &RewriteOptions) -> Result<Report> {
    rewrite_with_rules(model, opts, &rule::registry())
}

/// Rewrites with the given rules (tests give rules of their own).
pub fn rewrite_with_rules(model: &mut Model, opts: &RewriteOptions, rules: &[&dyn rule::Rule]) -> Result<Report> {
    let target = opts.target;
    if opts.prove {
        // fail early and clearly when the proof cannot run at all
        crate::ort_ops::runtime::environment().context("proving rewrites needs ONNX Runtime")?;
        crate::ort_ops::runtime::plugin_path().context("proving rewrites needs libscattermoe_ort.so")?;
    }
    let mut report = Report {
        nodes_before: model.graph().node.len(),
        initializers_before: model.graph().initializer.len(),
        ..Default::default()
    };
    let undo = canon::Undo::canonicalise(model);
    let graph = model.proto.graph.clone().unwrap_or_default();
    let mut g = GraphIndex::new(&graph, Some(&model.ext))?;
    g.opset = model.opset("").unwrap_or(17);

    let mut layers: Vec<MoeLayer> = Vec::new();
    for r in rules {
        let (found, rejected) = r.find(&g);
        // a value is replaced once
        for l in found {
            if !layers.iter().any(|x| x.output == l.output) {
                layers.push(l);
            }
        }
        report.rejected.extend(rejected);
    }

    let mut taken = Vec::new();
    let mut replace: Vec<(String, emit::Emitted)> = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let tag = format!("scattermoe_{i}");
        let emitted = emit::emit(&g, l, &tag, &mut taken, target).and_then(|e| {
            let proof = if opts.prove { Some(prove::prove(model, &g, l, &e).map_err(|err| anyhow!("not proven: {err:#}"))?) } else { None };
            Ok((e, proof))
        });
        match emitted {
            Ok((e, proof)) => {
                let m = l.mlp();
                let k = l.k.or_else(|| k_of(&g, &l.routing_indices));
                let elem = spec::ElemType::from_onnx_code(e.elem).map_or("?", |t| t.name());
                report.layers.push(LayerReport {
                    family: l.family,
                    output: l.output.clone(),
                    node: tag.clone(),
                    experts: l.experts.len(),
                    k,
                    d: m.d,
                    f: m.f,
                    activation: m.activation.name(),
                    gated: m.gated,
                    glu_layout: m.glu_layout.name(),
                    elem_type: elem,
                    capacity: l.capacity,
                    biases: m.b_in.iter().any(Option::is_some) || m.b_out.is_some(),
                    proof,
                });
                replace.push((l.output.clone(), e));
            }
            Err(err) => report.rejected.push(Rejection { family: l.family, at: l.output.clone(), reason: err.to_string() }),
        }
    }
    // JetMoE's Mixture-of-Attention projections: ParallelLinear nodes
    let (moa, moa_rejected) = moa::find(&g, &mut taken, 0);
    for r in moa {
        if replace.iter().any(|(o, _)| o == &r.output) {
            continue;
        }
        report.layers.push(r.report);
        replace.push((r.output, r.emitted));
    }
    report.rejected.extend(moa_rejected);
    drop(g);
    drop(graph);

    undo.keep_if(!replace.is_empty(), model);
    if !replace.is_empty() {
        let gm = model.proto.graph.mut_or_insert_default();
        for (output, em) in replace {
            let pos = gm.node.iter().position(|n| n.output.iter().any(|o| o == &output)).expect("producer of a matched value");
            gm.node.remove(pos);
            for (j, n) in em.nodes.into_iter().enumerate() {
                gm.node.insert(pos + j, n);
            }
            gm.initializer.extend(em.initializers);
            model.pending.extend(em.pending);
        }
        // stacked tensors are added at save time: keep their sources until then (pending tensors
        // hold their own copies of the protos), then drop what became unused
        prune(gm);
        model.ensure_opset(spec::DOMAIN, spec::OPSET_VERSION);
    }
    report.nodes_after = model.graph().node.len();
    report.initializers_after = model.graph().initializer.len() + model.pending.len();
    Ok(report)
}
