//! The proof of a fused router ([`crate::rewrite::router_fusion`]): the old router (every node
//! between the logits the TopKRouter node reads and the weights and indices the ScatterMoE node
//! read) and its replacement, cut out as two models with the logits as their one input, run in
//! ONNX Runtime on the same logits at every token count of [`super::TOKENS`]: random ones, large
//! ones, rows with exact ties (the tie rule), rows one expert dominates. The indices must be
//! equal, the weights within the weights' type's tolerance.

use std::collections::HashSet;

use anyhow::{anyhow, bail, Context, Result};
use onnx_protobuf::NodeProto;
use ort::session::Session;
use ort::value::{DynValue, Tensor};

use super::files::{initializers_for, link_external, scratch, value_info, write_side_outputs};
use super::inputs::Rng;
use super::shape::{shape_of, Dim};
use super::{tolerance, TOKENS};
use crate::onnx::graph::{node_inputs_with_subgraphs, GraphIndex};
use crate::onnx::Model;

/// Most nodes a router cut out of the graph may have (a router is a handful).
const MOST_NODES: usize = 64;

/// The nodes computing `outputs` from `input` (and constants), in graph order.
fn cut(g: &GraphIndex, input: &str, outputs: &[&str]) -> Result<Vec<NodeProto>> {
    let mut take: HashSet<usize> = HashSet::new();
    let mut stack: Vec<String> = outputs.iter().map(|s| s.to_string()).collect();
    let mut seen: HashSet<String> = HashSet::new();
    while let Some(v) = stack.pop() {
        if v.is_empty() || v == input || !seen.insert(v.clone()) || (g.const_tensor(&v).is_some() && g.prod(&v).is_none()) {
            continue;
        }
        let (i, n) = g.prod(&v).ok_or_else(|| anyhow!("the router reads '{v}', which is neither its logits nor a constant"))?;
        if take.insert(i) && take.len() > MOST_NODES {
            bail!("the router has more than {MOST_NODES} nodes");
        }
        stack.extend(node_inputs_with_subgraphs(n).into_iter().map(str::to_string));
    }
    let mut idx: Vec<usize> = take.into_iter().collect();
    idx.sort_by_key(|&i| g.topo_pos[i]);
    Ok(idx.into_iter().map(|i| g.node(i).clone()).collect())
}

#[derive(Clone, Copy, Debug)]
enum Logits {
    Random,
    Large,
    /// entries from {-1, 0, 0.5, 1} (many equal in a row), every third row all equal
    Ties,
    /// expert 0 far ahead
    OneExpert,
}

fn draw(rng: &mut Rng, rows: usize, e: usize, p: Logits) -> Vec<f32> {
    (0..rows * e)
        .map(|i| {
            let (row, col) = (i / e, i % e);
            match p {
                Logits::Random => rng.normal(),
                Logits::Large => 8.0 * rng.normal(),
                Logits::Ties if row % 3 == 0 => 0.25,
                Logits::Ties => [-1.0, 0.0, 0.5, 1.0][rng.below(4)],
                Logits::OneExpert => rng.normal() + if col == 0 { 12.0 } else { 0.0 },
            }
        })
        .collect()
}

fn feed(elem: i32, shape: Vec<usize>, v: &[f32]) -> Result<DynValue> {
    Ok(match elem {
        1 => Tensor::from_array((shape, v.to_vec()))?.into_dyn(),
        10 => Tensor::from_array((shape, v.iter().map(|&x| half::f16::from_f32(x)).collect::<Vec<_>>()))?.into_dyn(),
        16 => Tensor::from_array((shape, v.iter().map(|&x| half::bf16::from_f32(x)).collect::<Vec<_>>()))?.into_dyn(),
        t => bail!("logits of element type {t}"),
    })
}

/// (weights, their shape, indices)
fn run(s: &mut Session, name: &str, v: DynValue) -> Result<(Vec<f64>, Vec<i64>, Vec<i64>)> {
    let out = s.run(vec![(name.to_string(), v)])?;
    let w = crate::rewrite::verify::to_f64(&out[0]).context("the routing weights")?;
    let shape = out[0].shape().to_vec();
    let (_, i) = out[1].try_extract_tensor::<i64>().map_err(|e| anyhow!("routing indices: {e}"))?;
    Ok((w, shape, i.to_vec()))
}

/// Proves that `new` (reading `logits`, writing `new_out`) computes what the graph computes into
/// `old_out` (routing weights, routing indices) from `logits`.
pub fn prove(model: &Model, g: &GraphIndex, logits: &str, new: &[NodeProto], old_out: [&str; 2], new_out: [&str; 2]) -> Result<()> {
    let old = cut(g, logits, &old_out)?;
    let elem = g.infer_type(logits).ok_or_else(|| anyhow!("cannot tell the logits' type"))?;
    let w_elem = g.infer_type(old_out[0]).ok_or_else(|| anyhow!("cannot tell the routing weights' type"))?;
    let shape = shape_of(g, logits).ok_or_else(|| anyhow!("cannot tell the logits' shape"))?;
    let e = match shape.last() {
        Some(&Dim { t: 0, c }) if c >= 1 => c as usize,
        _ => bail!("cannot tell the number of experts the logits have"),
    };
    if shape.iter().filter(|d| d.t == 1).count() > 1 {
        bail!("the logits have more than one token axis");
    }

    let dir = scratch()?;
    let inits: Vec<_> = initializers_for(g, &old);
    link_external(&dir.0, &model.ext, &inits)?;
    let inits: Vec<_> = inits.into_iter().cloned().collect();
    let input = [value_info(logits, elem, Some(&shape))];
    let outs = |names: [&str; 2]| vec![value_info(names[0], w_elem, None), value_info(names[1], 7, None)];
    let a = write_side_outputs(&dir.0, "router.onnx", &model.proto, old, inits.clone(), &input, outs(old_out), false)?;
    let b = write_side_outputs(&dir.0, "router_fused.onnx", &model.proto, new.to_vec(), inits, &input, outs(new_out), true)?;
    let mut sa = super::super::verify::capped_session(&a.path).context("the router cut out of the graph")?;
    let mut sb = super::super::verify::capped_session(&b.path).context("the fused router")?;
    let tol = tolerance(w_elem);
    for &tokens in &TOKENS {
        for (pi, p) in [Logits::Random, Logits::Large, Logits::Ties, Logits::OneExpert].into_iter().enumerate() {
            let dims: Vec<usize> = shape.iter().map(|d| d.at(tokens)).collect();
            let rows = dims.iter().product::<usize>() / e;
            let mut rng = Rng::new(0x5eed ^ ((tokens as u64) << 8) ^ pi as u64);
            let v = draw(&mut rng, rows, e, p);
            let ra = run(&mut sa, logits, feed(elem, dims.clone(), &v)?).map_err(|err| anyhow!("the router fails at {tokens} tokens: {err}"))?;
            let rb = run(&mut sb, logits, feed(elem, dims, &v)?).map_err(|err| anyhow!("the fused router fails at {tokens} tokens: {err}"))?;
            if ra.1 != rb.1 || ra.2.len() != rb.2.len() {
                bail!("at {tokens} tokens ({p:?} logits) the fused router's weights have shape {:?}, the router's {:?}", rb.1, ra.1);
            }
            if let Some(j) = (0..ra.2.len()).find(|&j| ra.2[j] != rb.2[j]) {
                bail!("at {tokens} tokens ({p:?} logits) the fused router chooses expert {} where the router chooses {} (slot {j})", rb.2[j], ra.2[j]);
            }
            let den = ra.0.iter().filter(|x| x.is_finite()).fold(0f64, |m, x| m.max(x.abs()));
            for (x, y) in ra.0.iter().zip(&rb.0) {
                let bad = if x.is_finite() && y.is_finite() {
                    (x - y).abs() > tol * den.max(f64::MIN_POSITIVE)
                } else {
                    x.is_nan() != y.is_nan() || (!x.is_nan() && x != y)
                };
                if bad {
                    bail!("at {tokens} tokens ({p:?} logits) the fused router's weight {y} differs from the router's {x} (tolerance {tol:.0e})");
                }
            }
        }
    }
    Ok(())
}
