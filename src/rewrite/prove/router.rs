//! The proof of a fused router ([`crate::rewrite::router_fusion`]): the old router (every node
//! between the logits the TopKRouter node reads and the weights and indices the ScatterMoE node
//! read) and its replacement, cut out as two models with the logits as their one input, run in
//! ONNX Runtime on the same logits at every token count of [`super::TOKENS`]: random ones, large
//! ones, rows with exact ties (the tie rule), rows one expert dominates and, for a group-limited
//! router, rows that make each choice of groups win. The indices must be equal, the weights within
//! the weights' type's tolerance; where the graph's TopK leaves its k unsorted, each token's
//! (index, weight) pairs are compared in the order of the indices.

use std::collections::HashSet;

use anyhow::{anyhow, bail, Context, Result};
use onnx_protobuf::NodeProto;
use ort::session::Session;
use ort::value::{DynValue, Tensor};

use super::files::{initializers_for, link_external, scratch, value_info, write_side_outputs};
use super::inputs::Rng;
use super::shape::{last_width, shape_of, Dim};
use super::{tolerance, TOKENS};
use crate::onnx::graph::{node_inputs_with_subgraphs, GraphIndex};
use crate::rewrite::matcher::rank_of;
use crate::onnx::Model;
use crate::spec::{topk_router as tr, Scoring};

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

/// The logits' shape where the graph does not tell it (a whole LM traced by TorchScript declares
/// its batch and sequence axes as two symbols, so no axis is the token axis): `[1, .., 1, T, E]`
/// at the logits' rank, E the router projection's width. The router is the same function of each
/// row of E logits however the rows are laid out, and both cuts read the same rows.
fn shape_by_rank(g: &GraphIndex, logits: &str) -> Option<Vec<Dim>> {
    let r = rank_of(g, logits).filter(|&r| r >= 2)?;
    let e = last_width(g, logits)?;
    let mut s = vec![Dim::fixed(1); r - 2];
    s.extend([Dim::TOKENS, Dim::fixed(e)]);
    Some(s)
}

#[derive(Clone, Copy, Debug)]
enum Logits {
    Random,
    Large,
    /// entries from {-1, 0, 0.5, 1} (many equal in a row), every third row all equal
    Ties,
    /// expert 0 far ahead
    OneExpert,
    /// (n_group, topk_group): row r lifts the r-th choice of topk_group groups (every choice in
    /// turn, as far as the rows go) above the rest
    Groups(usize, usize),
}

/// The number of choices of `k` of `n`, up to a million (binomials up to n = 1024 would overflow).
fn choices(n: usize, k: usize) -> Option<usize> {
    let k = k.min(n - k.min(n));
    let mut c: usize = 1;
    for i in 0..k {
        c = c.checked_mul(n - i)? / (i + 1);
    }
    (c <= 1 << 20).then_some(c)
}

/// The `r`-th (mod their number, in lexicographic order) choice of `k` of `n` groups; `None` past
/// a million choices (then rows take random ones).
fn nth_choice(n: usize, k: usize, r: usize) -> Option<Vec<usize>> {
    let total = choices(n, k)?;
    let mut r = r % total;
    let mut out = Vec::with_capacity(k);
    let mut next = 0;
    for left in (1..=k).rev() {
        loop {
            let rest = choices(n - next - 1, left - 1)?;
            if r < rest {
                out.push(next);
                next += 1;
                break;
            }
            r -= rest;
            next += 1;
        }
    }
    Some(out)
}

fn draw(rng: &mut Rng, rows: usize, e: usize, p: Logits) -> Vec<f32> {
    let mut lifted = Vec::new();
    (0..rows * e)
        .map(|i| {
            let (row, col) = (i / e, i % e);
            match p {
                Logits::Random => rng.normal(),
                Logits::Large => 8.0 * rng.normal(),
                Logits::Ties if row % 3 == 0 => 0.25,
                Logits::Ties => [-1.0, 0.0, 0.5, 1.0][rng.below(4)],
                Logits::OneExpert => rng.normal() + if col == 0 { 12.0 } else { 0.0 },
                Logits::Groups(n, k) => {
                    if col == 0 {
                        lifted = nth_choice(n, k, row).unwrap_or_else(|| (0..k).map(|_| rng.below(n)).collect());
                    }
                    rng.normal() + if lifted.contains(&(col / (e / n))) { 3.0 } else { 0.0 }
                }
            }
        })
        .collect()
}

/// How far a weight may move because the graph's float32 Softmax or Sigmoid is accurate to a few
/// units of float32's last place of 1 (ONNX Runtime's CPU kernels approximate exp: its Sigmoid of
/// -14 is 6.3e-7, not 6.7e-7), not to a few of the score's own: nothing where the scores are of
/// order one, but where a bias chooses experts whose scores are tiny, normalising them divides that
/// error by their sum. `x`: the row's logits; `chosen`: the graph's experts for it.
fn score_slack(attrs: &tr::Attrs, x: &[f32], chosen: &[i64]) -> f64 {
    const SCORE_ERR: f64 = 8.0 / (1u64 << 24) as f64;
    let scale = (attrs.scale as f64).abs();
    if !attrs.normalize {
        return SCORE_ERR * scale;
    }
    // the softmax's max and sum, once for the row
    let m = x.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    let total = if attrs.scoring == Scoring::Softmax { x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>() } else { 1.0 };
    let score = |i: usize| -> f64 {
        let xi = x[i] as f64;
        match attrs.scoring {
            Scoring::Sigmoid => 1.0 / (1.0 + (-xi).exp()),
            Scoring::Softmax => (xi - m).exp() / total,
            Scoring::TopkSoftmax | Scoring::Identity => 1.0,
        }
    };
    let sum: f64 = chosen.iter().filter(|&&i| i >= 0 && (i as usize) < x.len()).map(|&i| score(i as usize)).sum();
    if sum.is_finite() && sum > 0.0 {
        SCORE_ERR * scale / sum
    } else {
        0.0
    }
}

/// Each row's k (index, weight) pairs in the order of the indices.
fn by_index(w: &mut [f64], i: &mut [i64], k: usize) {
    for (wr, ir) in w.chunks_mut(k).zip(i.chunks_mut(k)) {
        let mut pairs: Vec<(i64, f64)> = ir.iter().copied().zip(wr.iter().copied()).collect();
        pairs.sort_by_key(|p| p.0);
        for (j, (x, y)) in pairs.into_iter().enumerate() {
            ir[j] = x;
            wr[j] = y;
        }
    }
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
/// `old_out` (routing weights, routing indices) from `logits`. `unsorted`: the graph's k are in
/// the runtime's order. `scored_by`: where the node reads scores the graph computed (`identity`),
/// the op computing them; the logits drawn are passed through it (scores as the graph makes them:
/// never negative, so a normalising sum does not cancel).
#[allow(clippy::too_many_arguments)]
pub fn prove(
    model: &Model,
    g: &GraphIndex,
    logits: &str,
    new: &[NodeProto],
    old_out: [&str; 2],
    new_out: [&str; 2],
    unsorted: bool,
    scored_by: Option<Scoring>,
    attrs: &tr::Attrs,
) -> Result<()> {
    let groups = attrs.groups.map(|gr| (gr.n_group, gr.topk_group));
    let old = cut(g, logits, &old_out)?;
    let elem = g.infer_type(logits).ok_or_else(|| anyhow!("cannot tell the logits' type"))?;
    let w_elem = g.infer_type(old_out[0]).ok_or_else(|| anyhow!("cannot tell the routing weights' type"))?;
    let shape = shape_of(g, logits).or_else(|| shape_by_rank(g, logits)).ok_or_else(|| anyhow!("cannot tell the logits' shape"))?;
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
    // a group-limited router also runs once with a row for every choice of groups (up to 4096)
    let every_choice = groups.map(|(n, k)| choices(n, k).unwrap_or(4096).min(4096)).filter(|&c| c > TOKENS[TOKENS.len() - 1]);
    for tokens in TOKENS.into_iter().chain(every_choice) {
        let mut patterns = vec![Logits::Random, Logits::Large, Logits::Ties, Logits::OneExpert];
        patterns.extend(groups.map(|(n, k)| Logits::Groups(n, k)));
        for (pi, p) in patterns.into_iter().enumerate() {
            let dims: Vec<usize> = shape.iter().map(|d| d.at(tokens)).collect();
            let rows = dims.iter().product::<usize>() / e;
            let mut rng = Rng::new(0x5eed ^ ((tokens as u64) << 8) ^ pi as u64);
            let mut v = draw(&mut rng, rows, e, p);
            if let Some(op) = scored_by {
                v.chunks_mut(e).for_each(|row| crate::cpu::router::score_row(op, row));
            }
            let mut ra = run(&mut sa, logits, feed(elem, dims.clone(), &v)?).map_err(|err| anyhow!("the router fails at {tokens} tokens: {err}"))?;
            let mut rb = run(&mut sb, logits, feed(elem, dims, &v)?).map_err(|err| anyhow!("the fused router fails at {tokens} tokens: {err}"))?;
            if ra.1 != rb.1 || ra.2.len() != rb.2.len() {
                bail!("at {tokens} tokens ({p:?} logits) the fused router's weights have shape {:?}, the router's {:?}", rb.1, ra.1);
            }
            let k = ra.1.last().copied().unwrap_or(1).max(1) as usize;
            if unsorted {
                by_index(&mut ra.0, &mut ra.2, k);
                by_index(&mut rb.0, &mut rb.2, k);
            }
            if let Some(j) = (0..ra.2.len()).find(|&j| ra.2[j] != rb.2[j]) {
                bail!("at {tokens} tokens ({p:?} logits) the fused router chooses expert {} where the router chooses {} (slot {j})", rb.2[j], ra.2[j]);
            }
            let den = ra.0.iter().filter(|x| x.is_finite()).fold(0f64, |m, x| m.max(x.abs()));
            for (j, (x, y)) in ra.0.iter().zip(&rb.0).enumerate() {
                let row = j / k;
                let bad = if x.is_finite() && y.is_finite() {
                    // the slack (a pass over the row) only where the plain tolerance is exceeded
                    let d = (x - y).abs() - tol * den.max(f64::MIN_POSITIVE);
                    d > 0.0 && d > score_slack(attrs, &v[row * e..(row + 1) * e], &ra.2[row * k..(row + 1) * k])
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
