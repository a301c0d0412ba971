//! Numeric proof of a candidate before it is written: the region the rewrite removes and its
//! replacement (the emitted node with its extra nodes and stacked weights) are cut out as two
//! small models with the same inputs ([`region`]), run in ONNX Runtime (CPU, the replacement
//! with libscattermoe_ort.so) on random and adversarial inputs at several token counts, and
//! compared. The matchers prove structure; this proves that the structure they accepted computes
//! what the region computed, whatever they overlooked. It is independent of the family.
//!
//! Routing indices at the boundary are drawn as a router could produce them (distinct experts
//! per row), including all tokens on one expert, experts with no token, every expert hit, and
//! ties in the routing weights. Where the region reads router logits instead (com.microsoft.MoE),
//! the logits are skewed so that one expert or a few take every token.

mod checks;
pub use checks::contradicted_shapes;
mod compare;
mod files;
mod inputs;
pub mod region;
pub mod router;
pub mod shape;
mod twin;
pub use twin::ROUNDING_GAP;

use std::collections::HashSet;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use onnx_protobuf::{NodeProto, TensorProto, ValueInfoProto};
use ort::session::Session;

use super::emit::{Emitted, MoeLayer};
use crate::onnx::graph::{node_inputs_with_subgraphs, GraphIndex};
use crate::onnx::Model;
use crate::spec;
use files::{initializers_for, link_external, materialise, scratch, value_info, write_side};
use inputs::{slots, Feed, Role};
use shape::Dim;

/// Token counts every candidate is run at: 1 (where traced exports fail), a prime, the fixtures'
/// traced length, and a larger prime.
pub const TOKENS: [usize; 4] = [1, 7, 16, 61];

/// What a proof compared.
#[derive(Debug, Clone)]
pub struct Proof {
    /// token counts at which the two models were compared
    pub tokens: Vec<usize>,
    /// input cases compared (token count x routing pattern)
    pub cases: usize,
    /// max |replacement - region| / max |region| over every case
    pub max_rel_err: f64,
    pub tolerance: f64,
    pub millis: f64,
    /// what the replacement was compared with
    pub reference: Reference,
}

/// What the replacement was compared with (`prove/twin.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reference {
    /// the region, as the graph computes it
    Region,
    /// the region with its 16-bit com.microsoft.MoE node computed in float32 on the same values
    /// (ONNX Runtime's CPU kernel for it is missing or defective)
    NodeFloat32,
    /// the region's float32 twin: the region cannot run in its 16-bit type on ONNX Runtime's CPU
    /// provider, so its nodes were computed in float32 on the same values, rounding where the
    /// graph casts to 16 bits, at the tolerance widened by the original's own rounding
    RegionFloat32,
}

impl Reference {
    /// Whether something was computed in float32 instead of the graph's 16-bit type.
    pub fn float32(self) -> bool {
        self != Reference::Region
    }

    /// The name the JSON report gives it.
    pub fn name(self) -> &'static str {
        match self {
            Reference::Region => "region",
            Reference::NodeFloat32 => "node_float32",
            Reference::RegionFloat32 => "region_float32",
        }
    }
}

impl Proof {
    pub fn text(&self) -> String {
        let t: Vec<String> = self.tokens.iter().map(usize::to_string).collect();
        format!(
            "proven on {} cases at tokens {} (max relative error {:.1e}, tolerance {:.1e}, {:.0} ms{})",
            self.cases,
            t.join(","),
            self.max_rel_err,
            self.tolerance,
            self.millis,
            match self.reference {
                Reference::Region => "",
                Reference::NodeFloat32 => "; against the region's node computed in float32 on the same 16-bit values",
                Reference::RegionFloat32 => "; against the region computed in float32 on the same 16-bit values, rounding where it casts to 16 bits",
            }
        )
    }
}

/// Relative tolerance of an element type (the project's: f32 1e-4, f16 1e-2, bf16 3e-2).
pub fn tolerance(elem: i32) -> f64 {
    match spec::ElemType::from_onnx_code(elem) {
        Some(spec::ElemType::F16) => 1e-2,
        Some(spec::ElemType::BF16) => 3e-2,
        _ => 1e-4,
    }
}

/// Values of the graph the replacement's nodes read (not initializers, not its own values).
fn replacement_reads(g: &GraphIndex, em: &Emitted) -> Vec<String> {
    let made: HashSet<&str> =
        em.nodes.iter().flat_map(|n| n.output.iter().map(String::as_str)).chain(em.initializers.iter().map(|t| t.name.as_str())).collect();
    let pending: HashSet<&str> = em.pending.iter().map(|p| p.name.as_str()).collect();
    let mut out: Vec<String> = Vec::new();
    for n in &em.nodes {
        for v in node_inputs_with_subgraphs(n) {
            if made.contains(v) || pending.contains(v) || (g.const_tensor(v).is_some() && g.prod(v).is_none()) {
                continue;
            }
            if !out.iter().any(|o| o == v) {
                out.push(v.to_string());
            }
        }
    }
    out
}

/// The values the op's routing indices `idx` are computed from: `idx` itself, or the values the
/// emitted nodes read to make it (a Reshape of flattened indices).
fn index_sources<'e>(em: &'e Emitted, idx: &'e str) -> HashSet<&'e str> {
    let mut out = HashSet::new();
    let mut stack = vec![idx];
    while let Some(v) = stack.pop() {
        if !out.insert(v) {
            continue;
        }
        if let Some(n) = em.nodes.iter().find(|n| n.output.iter().any(|o| o == v)) {
            stack.extend(n.input.iter().map(String::as_str).filter(|i| !i.is_empty()));
        }
    }
    out
}

/// The indices come from TopK's second output (through casts), which never repeats an expert in a row.
fn routed_by_topk(g: &GraphIndex, v: &str) -> bool {
    let mut v = v;
    for _ in 0..8 {
        let Some((_, n)) = g.prod(v) else {
            return false;
        };
        match n.op_type.as_str() {
            "TopK" => return n.output.get(1).map(String::as_str) == Some(v),
            "ArgMax" | "ArgMin" => return true,
            "Cast" | "Identity" => v = &n.input[0],
            _ => return false,
        }
    }
    false
}

/// What the proof needs to know of a candidate, whatever op replaces it: the value it replaces
/// and what the values its replacement reads mean (so that they are drawn as the router could
/// make them).
#[derive(Debug, Clone)]
pub struct Subject {
    /// the value the replacement computes instead of the region
    pub output: String,
    /// the rows the op reads
    pub x: String,
    /// their shape where the graph does not tell it: [rows, width] with rows `x_rows` times T
    /// (one per token: 1; one per assignment: k)
    pub x_rows: i64,
    pub x_width: usize,
    /// the element type the op computes in (its rows'), where known
    pub x_elem: Option<i32>,
    /// the indices the op reads (or the emitted value it reads them through)
    pub routing_indices: String,
    /// the routing weights the op reads as gates, where it reads any
    pub routing_weights: Option<String>,
    pub experts: usize,
    pub k: Option<usize>,
}

impl Subject {
    /// A ScatterMoE candidate.
    pub fn of_layer(g: &GraphIndex, layer: &MoeLayer) -> Subject {
        Subject {
            output: layer.output.clone(),
            x: layer.x.clone(),
            x_rows: 1,
            x_width: layer.mlp().d,
            x_elem: layer.value_type(g, &layer.x),
            routing_indices: layer.routing_indices.clone(),
            routing_weights: Some(layer.routing_weights.clone()),
            experts: layer.experts.len(),
            k: layer.k,
        }
    }
}

/// The graph value the op's routing indices are made from: the candidate's own, or the one the
/// replacement's nodes reshape into them (a trailing axis of one slot, one row per assignment).
fn routing_source<'a>(subject: &'a Subject, em: &'a Emitted) -> &'a str {
    let mut v = subject.routing_indices.as_str();
    for _ in 0..8 {
        match em.nodes.iter().find(|n| n.output.iter().any(|o| o == v)) {
            Some(n) if n.domain.is_empty() && matches!(n.op_type.as_str(), "Reshape" | "Unsqueeze" | "Squeeze" | "Cast" | "Identity") => v = &n.input[0],
            _ => break,
        }
    }
    v
}

/// Proves that `em` (emitted for `layer` from the graph `g` of `model`) computes what the nodes it
/// replaces computed. An `Err` is the reason the candidate must be left as it is.
pub fn prove(model: &Model, g: &GraphIndex, layer: &MoeLayer, em: &Emitted) -> Result<Proof> {
    prove_subject(model, g, &Subject::of_layer(g, layer), em)
}

/// [`prove`] for any candidate: a ScatterMoE layer ([`Subject::of_layer`]) or a ParallelLinear
/// projection.
pub fn prove_subject(model: &Model, g: &GraphIndex, layer: &Subject, em: &Emitted) -> Result<Proof> {
    prove_or_measure(model, g, layer, em, None)
}

/// How far the float32 twin of a region (every removed node in float32, as a proof takes it where
/// the region cannot run in its 16-bit type) is from the same region with every 16-bit node result
/// rounded to `emulate` (float16 or bfloat16: a backend that stores each node's result in 16 bits),
/// on the proof's inputs: in the returned `max_rel_err` (max |rounded - twin| / max |twin| over
/// every case), `tokens` and `cases`; `tolerance` is the gap allowed ([`ROUNDING_GAP`]). It measures
/// the original's own rounding, which the twin does not reproduce.
pub fn twin_gap(model: &Model, g: &GraphIndex, layer: &Subject, em: &Emitted, emulate: i32) -> Result<Proof> {
    prove_or_measure(model, g, layer, em, Some(emulate))
}

fn prove_or_measure(model: &Model, g: &GraphIndex, layer: &Subject, em: &Emitted, measure_twin: Option<i32>) -> Result<Proof> {
    let start = Instant::now();
    let reads = replacement_reads(g, em);
    let routing = routing_source(layer, em);
    // indices from a router other than TopK/ArgMax (e.g. PhiMoE's masked second ArgMax) carry
    // guarantees random indices would not: both models compute them with the router's own nodes.
    // So are the graph's integer values the emitted nodes regroup into the op's indices (a
    // clipped, flattened index), whatever router made them (router logits the emitted nodes
    // route themselves, com.microsoft.MoE's, stay inputs).
    let sources = index_sources(em, &layer.routing_indices);
    let index = |v: &str| sources.contains(v) && matches!(g.infer_type(v), Some(6 | 7));
    // Indices drawn at random are drawn at the shape the graph tells, or else at the op's own
    // [T, k]: that assumes the router makes one row per token row, which a router whose shape
    // chain cannot be told (a group mask expanded to a computed shape) need not do. So TopK
    // indices of a shape not told are computed by both models with the router's own nodes too.
    let drawn = |v: &str| routed_by_topk(g, v) && shape::shape_of(g, v).is_some();
    // Shape vectors the emitted nodes read (a reshape of the op's rows to the graph's leading
    // axes) are computed by both models from their inputs too: drawn at random they mean nothing.
    let shape_value = |v: &str| *v != *layer.routing_indices && *v != *routing && !sources.contains(v) && g.infer_type(v) == Some(7) && g.prod(v).is_some();
    let derive: Vec<String> =
        reads.iter().filter(|v| ((**v == layer.routing_indices || **v == routing || index(v)) && !drawn(v)) || shape_value(v)).cloned().collect();
    // Routing weights whose shape the graph does not tell are computed by both models from their
    // producers, not fed in the op's [T, k]: fed so, they would hide a graph in which they have
    // another shape (a broadcast against a weight, a rank more), which the whole model then shows.
    // (Where they are too far from the replacement's inputs to compute, they take the op's shape.)
    let derive_weights = layer.routing_weights.as_ref().filter(|w| reads.contains(w) && !derive.contains(w) && shape::shape_of(g, w).is_none());
    checks::static_contract(g, layer, em)?;
    let region = match derive_weights {
        Some(w) => region::extract(g, &layer.output, &reads, &[derive.clone(), vec![w.clone()]].concat())
            .or_else(|_| region::extract(g, &layer.output, &reads, &derive))?,
        None => region::extract(g, &layer.output, &reads, &derive)?,
    };
    let out_elem = g.infer_type(&layer.output).ok_or_else(|| anyhow!("cannot tell the element type of '{}'", layer.output))?;
    // the op computes in the rows' type: a float16 layer summed into a float32 value is compared
    // at float16's tolerance
    let tol = layer.x_elem.map_or(0.0, tolerance).max(tolerance(out_elem));

    // the boundary inputs, their shapes, and what they mean
    let mut feeds = Vec::new();
    let k = layer.k.or_else(|| super::k_of(g, &layer.routing_indices));
    for v in &region.inputs {
        let elem = g.infer_type(v).ok_or_else(|| anyhow!("cannot tell the element type of boundary value '{v}'"))?;
        let shape = shape::shape_of(g, v)
            .or_else(|| {
                // the op's own contract for its inputs when the producers do not tell
                let rows_of = |r: &str| *r == layer.x || region.row_sources.iter().any(|(s, x)| s == r && *x == layer.x);
                if rows_of(v) {
                    Some(vec![Dim { t: 1, c: layer.x_rows }, Dim::fixed(layer.x_width as i64)])
                } else if layer.routing_weights.as_ref() == Some(v) || v == routing {
                    k.map(|k| vec![Dim::TOKENS, Dim::fixed(k as i64)])
                } else {
                    None
                }
            })
            .ok_or_else(|| anyhow!("cannot tell the shape of boundary value '{v}'"))?;
        if shape.iter().filter(|d| d.t == 1).count() > 1 {
            bail!("boundary value '{v}' has more than one token axis");
        }
        let experts = layer.experts as i64;
        // the router's indices, or a router's column the emitted nodes join into them (top-2
        // capacity: Concat of two ArgMax outputs), are drawn as routing, not as data
        let role = if (v == routing || index(v)) && matches!(elem, 6 | 7) {
            Role::RoutingIndices
        } else if layer.routing_weights.as_ref() == Some(v) {
            Role::RoutingWeights
        } else if *v != layer.x && matches!(elem, 1 | 10 | 16 | 11) && shape.len() >= 2 && shape.last() == Some(&Dim::fixed(experts)) && experts > 1 {
            Role::Logits
        } else {
            Role::Data
        };
        let distinct = role == Role::RoutingIndices && routed_by_topk(g, v);
        feeds.push(Feed { name: v.clone(), elem, shape, role, distinct });
    }
    if let Some(f) = feeds.iter().find(|f| f.role == Role::RoutingIndices) {
        let kk = slots(&f.shape);
        if kk > layer.experts {
            bail!("routing indices '{}' have k = {kk} of {} experts", f.name, layer.experts);
        }
    }

    // the two models
    let dir = scratch()?;
    let shared: Vec<NodeProto> = region.shared.iter().map(|&i| g.node(i).clone()).collect();
    let mut orig_nodes = shared.clone();
    orig_nodes.extend(region.removed.iter().map(|&i| g.node(i).clone()));
    for n in orig_nodes.iter() {
        if let Some(why) = checks::aborts_onnx_runtime(n) {
            bail!("node '{}' ({}) {why}: ONNX Runtime aborts the process on it", n.name, n.op_type);
        }
    }
    let mut repl_nodes = shared;
    repl_nodes.extend(em.nodes.iter().cloned());
    let inputs: Vec<ValueInfoProto> = feeds.iter().map(|f| value_info(&f.name, f.elem, Some(&f.shape))).collect();
    let output = value_info(&layer.output, out_elem, None);

    let orig_inits: Vec<TensorProto> = initializers_for(g, &orig_nodes).into_iter().cloned().collect();
    let mut repl_inits = initializers_for(g, &repl_nodes);
    let emitted: HashSet<&str> = em.initializers.iter().map(|t| t.name.as_str()).chain(em.pending.iter().map(|p| p.name.as_str())).collect();
    repl_inits.retain(|t| !emitted.contains(t.name.as_str()));
    link_external(&dir.0, &model.ext, &orig_inits.iter().collect::<Vec<_>>())?;
    link_external(&dir.0, &model.ext, &repl_inits)?;
    let mut repl_all: Vec<TensorProto> = repl_inits.into_iter().cloned().collect();
    repl_all.extend(em.initializers.iter().cloned());
    repl_all.extend(materialise(&dir.0, &model.ext, &em.pending)?);
    let repl_side = write_side(&dir.0, "replacement.onnx", &model.proto, repl_nodes.clone(), repl_all.clone(), &inputs, output.clone(), true)?;
    let n_shared = region.shared.len();
    let shared: Vec<bool> = (0..orig_nodes.len()).map(|i| i < n_shared).collect();
    let removed: Vec<bool> = shared.iter().map(|s| !s).collect();
    // the region's float32 twin (twin.rs); its output is float32
    let twin_session = |plan: &twin::Plan, file: &str| -> Result<Session> {
        let nodes = twin::float32_twin(g, &orig_nodes, plan)?;
        let side = write_side(&dir.0, file, &model.proto, nodes, orig_inits.clone(), &inputs, value_info(&layer.output, 1, None), false)?;
        super::verify::capped_session(&side.path).context("the region's float32 twin")
    };
    let experts = layer.experts;
    if let Some(emulate) = measure_twin {
        if !twin::touches_16bit(g, &orig_nodes, &removed) {
            bail!("the region computes nothing in 16 bits");
        }
        let mut st = twin_session(&twin::Plan { chosen: &removed, rounded: &[], round_to: None }, "region_f32.onnx")?;
        let mut sr = twin_session(&twin::Plan { chosen: &removed, rounded: &removed, round_to: Some(emulate) }, "region_f32_rounded.onnx")?;
        let c = compare::compare(&mut st, &mut sr, &feeds, experts, f64::INFINITY)?.ran()?;
        let millis = start.elapsed().as_secs_f64() * 1e3;
        let tolerance = twin::ROUNDING_GAP[(emulate == 16) as usize];
        return Ok(Proof { tokens: c.tokens, cases: c.cases, max_rel_err: c.worst, tolerance, millis, reference: Reference::RegionFloat32 });
    }

    let (reference, tol, c) = if let Some(at) = twin::untrusted_node(g, &orig_nodes, &layer.output) {
        // a 16-bit com.microsoft.MoE: its ONNX Runtime kernel is missing or defective, so that
        // node is computed in float32 on the same values
        let chosen: Vec<bool> = (0..orig_nodes.len()).map(|i| i == at).collect();
        let mut so = twin_session(&twin::Plan { chosen: &chosen, rounded: &[], round_to: None }, "region_f32.onnx")?;
        let mut sr = super::verify::capped_session(&repl_side.path).context("the replacement")?;
        (Reference::NodeFloat32, tol, compare::compare(&mut so, &mut sr, &feeds, experts, tol)?)
    } else {
        let orig_side = write_side(&dir.0, "region.onnx", &model.proto, orig_nodes.clone(), orig_inits.clone(), &inputs, output, false)?;
        let native = super::verify::capped_session(&orig_side.path).context("the region cut out of the graph");
        let mut sr = super::verify::capped_session(&repl_side.path).context("the replacement");
        let native = match (native, sr.as_mut()) {
            (Ok(mut so), Ok(sr)) => compare::compare(&mut so, sr, &feeds, experts, tol)?.ran().map_err(|e| anyhow!("{e}")),
            (Ok(_), Err(e)) => bail!("{e:#}"),
            (Err(e), _) => Err(e),
        };
        match native {
            Ok(c) => (Reference::Region, tol, c),
            Err(e) if !twin::touches_16bit(g, &orig_nodes, &vec![true; orig_nodes.len()]) => return Err(e),
            Err(e) => {
                // the region cannot run in its 16-bit type (a kernel ONNX Runtime's CPU provider
                // lacks): its float32 twin, at the tolerance widened by the original's own
                // rounding. The nodes both models compute are computed in float32 too where they
                // are 16-bit (a bfloat16 router the proof derives), in both models alike, their
                // results rounded to 16 bits: the two see one routing.
                let all = vec![true; orig_nodes.len()];
                let plan = twin::Plan { chosen: &all, rounded: &shared, round_to: None };
                let mut so = twin_session(&plan, "region_f32.onnx").map_err(|t| anyhow!("{e:#}; its float32 twin: {t:#}"))?;
                let mut sr = if twin::touches_16bit(g, &orig_nodes, &shared) {
                    let in_repl: Vec<bool> = (0..repl_nodes.len()).map(|i| i < n_shared).collect();
                    let nodes = twin::float32_twin(g, &repl_nodes, &twin::Plan { chosen: &in_repl, rounded: &in_repl, round_to: None })?;
                    let side = write_side(
                        &dir.0,
                        "replacement_f32_shared.onnx",
                        &model.proto,
                        nodes,
                        repl_all,
                        &inputs,
                        value_info(&layer.output, out_elem, None),
                        true,
                    )?;
                    super::verify::capped_session(&side.path).context("the replacement")?
                } else {
                    sr?
                };
                let tol = tol + twin::rounding_gap(g, &orig_nodes, &all);
                let c = compare::compare(&mut so, &mut sr, &feeds, experts, tol)?;
                (Reference::RegionFloat32, tol, c.ran().map_err(|t| anyhow!("{e:#}; its float32 twin: {t}"))?)
            }
        }
    };
    let c = c.ran()?;
    Ok(Proof { tokens: c.tokens, cases: c.cases, max_rel_err: c.worst, tolerance: tol, millis: start.elapsed().as_secs_f64() * 1e3, reference })
}
