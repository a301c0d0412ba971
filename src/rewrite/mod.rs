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
pub mod dequant;
pub mod emit;
pub mod expr;
pub mod hf_loop;
pub mod jetmoe;
pub mod llama4;
pub mod looks_like;
pub mod matcher;
pub mod megablocks;
pub mod moa;
pub mod ort_moe;
pub mod prove;
pub mod quant;
pub mod report;
pub mod router_fusion;
pub mod routing;
pub mod rule;
pub mod slots;
pub mod verify;

use anyhow::{anyhow, bail, Context, Result};

use crate::onnx::graph::{prune, GraphIndex};
use crate::onnx::Model;
use crate::progress::{Progress, Silent, Unit};
use crate::spec;
use emit::MoeLayer;
pub use emit::Target;
pub use report::{Found, LayerReport, Rejection, Report, RouterReport};

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
    /// replace each rewritten layer's ONNX router by one TopKRouter node where it computes exactly
    /// that op ([`router_fusion`]; ONNX Runtime target only)
    pub fuse_router: bool,
}

impl Default for RewriteOptions {
    fn default() -> Self {
        RewriteOptions { target: Target::OnnxRuntime, prove: true, fuse_router: true }
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
    rewrite_with_progress(model, opts, &Silent)
}

/// [`rewrite_with`], reporting the rules run (step "match") and the candidates emitted and
/// proven (step "prove", or "emit" without the proof).
pub fn rewrite_with_progress(model: &mut Model, opts: &RewriteOptions, progress: &dyn Progress) -> Result<Report> {
    rewrite_with_rules_progress(model, opts, &rule::registry(), progress)
}

/// Rewrites with the given rules (tests give rules of their own).
pub fn rewrite_with_rules(model: &mut Model, opts: &RewriteOptions, rules: &[&dyn rule::Rule]) -> Result<Report> {
    rewrite_with_rules_progress(model, opts, rules, &Silent)
}

fn rewrite_with_rules_progress(model: &mut Model, opts: &RewriteOptions, rules: &[&dyn rule::Rule], progress: &dyn Progress) -> Result<Report> {
    let target = opts.target;
    if opts.prove {
        // fail early and clearly when the proof cannot run at all
        crate::ort_ops::runtime::environment().context("proving rewrites needs ONNX Runtime")?;
        crate::ort_ops::runtime::plugin_path().context("proving rewrites needs libscattermoe_ort.so")?;
    }
    let mut report = Report { nodes_before: model.graph().node.len(), initializers_before: model.graph().initializer.len(), ..Default::default() };
    let undo = canon::Undo::canonicalise(model);
    let graph = model.proto.graph.clone().unwrap_or_default();
    let mut g = GraphIndex::new(&graph, Some(&model.ext))?;
    g.opset = model.opset("").unwrap_or(17);

    let mut layers: Vec<MoeLayer> = Vec::new();
    progress.begin("match", Some(rules.len() as u64), Unit::Items("rules"));
    for r in rules {
        progress.note(r.name());
        let (found, rejected) = r.find(&g);
        progress.advance(1);
        // a value is replaced once
        for l in found {
            if !layers.iter().any(|x| x.output == l.output) {
                layers.push(l);
            }
        }
        report.rejected.extend(rejected);
    }

    progress.end();

    let mut taken = Vec::new();
    let mut replace: Vec<(String, emit::Emitted)> = Vec::new();
    let contradicted = if opts.prove { prove::contradicted_shapes(&g) } else { None };
    progress.begin(if opts.prove { "prove" } else { "emit" }, Some(layers.len() as u64), Unit::Items("candidates"));
    for (i, l) in layers.iter().enumerate() {
        let tag = format!("scattermoe_{i}");
        progress.note(&l.output);
        let (m, k) = (l.mlp(), l.k.or_else(|| k_of(&g, &l.routing_indices)));
        let elem = g.infer_type(&l.x).or_else(|| g.infer_type(&l.routing_weights)).and_then(spec::ElemType::from_onnx_code).map_or("?", |t| t.name());
        report.found.push(Found { family: l.family, at: l.output.clone(), experts: l.experts.len(), k, d: m.d, f: m.f, elem_type: elem });
        let emitted = emit::emit(&g, l, &tag, &mut taken, target).and_then(|e| {
            if let Some(why) = &contradicted {
                bail!("not proven: {why}");
            }
            let proof = if opts.prove { Some(prove::prove(model, &g, l, &e).map_err(|err| anyhow!("not proven: {err:#}"))?) } else { None };
            Ok((e, proof))
        });
        match emitted {
            Ok((e, proof)) => {
                // the op's T (the type its experts compute in), which the report names
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
                    quantized: e.quantized.clone(),
                    proof,
                    router: None,
                });
                replace.push((l.output.clone(), e));
            }
            Err(err) => report.rejected.push(Rejection { family: l.family, at: l.output.clone(), reason: err.to_string() }),
        }
        progress.advance(1);
    }
    progress.end();
    // JetMoE's Mixture-of-Attention projections: ParallelLinear nodes
    let (moa, moa_rejected) = moa::find(&g, &mut taken, 0, target);
    // what looks like MoE and no rule covered, with the rules' reasons (the graph is not changed)
    let moa_routing: Vec<String> = moa.iter().flat_map(|r| r.emitted.nodes.iter().flat_map(|n| n.input.iter().cloned())).filter(|v| matches!(g.infer_type(v), Some(6 | 7))).collect();
    report.looks_like_moe = looks_like::find(&g, &layers, &moa_routing, &report.rejected);
    for mut r in moa {
        if replace.iter().any(|(o, _)| o == &r.output) {
            continue;
        }
        if opts.prove {
            let proven = match &contradicted {
                Some(why) => Err(anyhow!("{why}")),
                None => prove::prove_subject(model, &g, &r.subject, &r.emitted),
            };
            match proven {
                Ok(p) => r.report.proof = Some(p),
                Err(err) => {
                    report.rejected.push(Rejection { family: moa::FAMILY, at: r.output, reason: format!("not proven: {err:#}") });
                    continue;
                }
            }
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
        if target == Target::OnnxRuntime && opts.fuse_router {
            // com.microsoft.MoE's router is the rewrite's own, in front of 16-bit logits the node took as they were
            let given = report.layers.iter().filter(|l| l.family == "ort_moe").map(|l| l.node.clone()).collect();
            for (node, outcome) in router_fusion::fuse(model, opts.prove, &given)? {
                if let Some(l) = report.layers.iter_mut().find(|l| l.node == node) {
                    l.router = Some(match outcome {
                        Ok(how) => RouterReport { fused: true, detail: how },
                        Err(why) => RouterReport { fused: false, detail: why },
                    });
                }
            }
        }
        let gm = model.proto.graph.mut_or_insert_default();
        // stacked tensors are added at save time: keep their sources until then (pending tensors
        // hold their own copies of the protos), then drop what became unused
        prune(gm);
        model.ensure_opset(spec::DOMAIN, spec::OPSET_VERSION);
    }
    report.nodes_after = model.graph().node.len();
    report.initializers_after = model.graph().initializer.len() + model.pending.len();
    Ok(report)
}
