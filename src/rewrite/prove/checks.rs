//! Checks made before a proof runs anything: the op's shape rules over what the graph tells, a
//! graph that contradicts its own declared shapes, and nodes on which ONNX Runtime's loader
//! aborts the process rather than refusing them.

use std::collections::HashSet;

use anyhow::{bail, Result};
use onnx_protobuf::NodeProto;

use super::shape::{self, Dim, Shape};
use super::Subject;
use crate::onnx::graph::GraphIndex;
use crate::rewrite::emit::Emitted;
use crate::spec;

/// The op's shape rules (docs/op-spec.md) over what the graph tells of the shapes of the inputs
/// the emitted node reads straight from the graph: routing weights and indices of one shape of
/// rank 2 or more, token rows `[..., d]` holding as many tokens as the routing's leading axes.
/// The cut-out models are fed the shapes the boundary values have in the graph, or the op's own
/// where the graph does not tell, so a contradiction the graph shows must be found here.
pub(super) fn static_contract(g: &GraphIndex, layer: &Subject, em: &Emitted) -> Result<()> {
    let Some(op) = em.nodes.iter().find(|n| n.domain == spec::DOMAIN && n.op_type == spec::scatter_moe::NAME) else {
        return Ok(());
    };
    let made: HashSet<&str> = em.nodes.iter().flat_map(|n| n.output.iter().map(String::as_str)).collect();
    let told = |i: usize| -> Option<(&str, Shape)> {
        let v = op.input.get(i).map(String::as_str).filter(|v| !v.is_empty() && !made.contains(v))?;
        Some((v, shape::shape_of(g, v)?))
    };
    let (x, w, idx) = (told(0), told(1), told(2));
    for (what, t) in [("routing weights", &w), ("routing indices", &idx)] {
        if let Some((v, s)) = t {
            if s.len() < 2 {
                bail!("{what} '{v}' have shape {}: the op needs [..., k]", shape::text(s));
            }
        }
    }
    if let (Some((wv, ws)), Some((iv, is))) = (&w, &idx) {
        if ws != is {
            bail!("routing weights '{wv}' have shape {} and routing indices '{iv}' {}: the op needs one shape", shape::text(ws), shape::text(is));
        }
    }
    if let Some((xv, xs)) = &x {
        let d = layer.x_width as i64;
        if xs.len() < 2 || xs.last() != Some(&Dim::fixed(d)) {
            bail!("token rows '{xv}' have shape {}: the op needs [..., {d}]", shape::text(xs));
        }
        if let Some((rv, rs)) = idx.as_ref().or(w.as_ref()) {
            if let (Some(a), Some(b)) = (tokens_of(xs), tokens_of(rs)) {
                if a != b {
                    bail!("token rows '{xv}' have shape {} and the routing '{rv}' {}: they hold different token counts", shape::text(xs), shape::text(rs));
                }
            }
        }
    }
    Ok(())
}

/// The product of the leading axes (all but the last), where it is a multiple of T at most once.
fn tokens_of(s: &Shape) -> Option<Dim> {
    let mut t = Dim::fixed(1);
    for d in &s[..s.len().saturating_sub(1)] {
        t = Dim { t: t.t.checked_add(d.t).filter(|&x| x <= 1)?, c: t.c.checked_mul(d.c)? };
    }
    Some(t)
}

/// The first place where the graph contradicts its own declared shapes: a declared shape its
/// producer does not compute ([`shape::stale_declaration`]) or a broadcast no token count but one
/// can make ([`shape::impossible_broadcast`]). Such a graph (a hand edit that left declarations
/// behind) runs in ONNX Runtime only where its buffer plan happens to fit, and any change to it,
/// a rewrite included, can move that; so no candidate of it is proven. Checked once per graph.
pub fn contradicted_shapes(g: &GraphIndex) -> Option<String> {
    for n in &g.graph.node {
        if !n.output.iter().any(|o| g.declared.contains_key(o.as_str())) {
            continue;
        }
        if let Some(s) = shape::impossible_broadcast(g, n) {
            let s: Vec<String> = s.iter().map(shape::text).collect();
            return Some(format!(
                "node '{}' ({}) broadcasts {} at no token count but one, while the graph declares its output",
                n.name,
                n.op_type,
                s.join(" and ")
            ));
        }
        for o in n.output.iter().filter(|o| !o.is_empty()) {
            if let Some((d, c)) = shape::stale_declaration(g, o) {
                return Some(format!(
                    "the graph declares '{o}' as {} but its producer computes {}: its declared shapes are stale",
                    shape::text(&d),
                    shape::text(&c)
                ));
            }
        }
    }
    None
}

/// What makes ONNX Runtime's own loader abort rather than refuse (found by fuzzing; its builds
/// assert on these): a Split whose `num_outputs` or `split` sizes disagree with its outputs.
pub(super) fn aborts_onnx_runtime(n: &NodeProto) -> Option<String> {
    if n.op_type == "Split" && n.domain.is_empty() {
        let outs = n.output.len() as i64;
        if let Some(k) = crate::onnx::graph::attr_i(n, "num_outputs").filter(|&k| k != outs) {
            return Some(format!("has num_outputs = {k} but {outs} outputs"));
        }
        if let Some(s) = crate::onnx::graph::attr_ints(n, "split").filter(|s| s.len() as i64 != outs) {
            return Some(format!("has {} split sizes but {outs} outputs", s.len()));
        }
    }
    None
}

