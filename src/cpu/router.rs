//! `TopKRouter` on the CPU (docs/op-spec.md, "TopKRouter"): per token, the scores in float32, the
//! k best by the tie rule, the weights rounded to `T` once. The CUDA kernel
//! (`kernels/router.cu`) computes the same formulas in the same order of operations where it
//! matters for the choice (every score of a row from the same max and sum).

use super::element::Element;
use super::experts::SharedOut;
use super::pool::Pool;
use crate::spec::topk_router::Attrs;
use crate::spec::{Scoring, TieBreak};

/// Whether score `a` of expert `ia` ranks before score `b` of expert `ib`: the larger score, NaN
/// below every number, equal scores by the tie rule.
#[inline]
pub fn ranks_before(a: f32, ia: usize, b: f32, ib: usize, tie: TieBreak) -> bool {
    match (a.is_nan(), b.is_nan()) {
        (false, true) => return true,
        (true, false) => return false,
        (false, false) if a != b => return a > b,
        _ => {}
    }
    match tie {
        TieBreak::LowerIndex => ia < ib,
        TieBreak::HigherIndex => ia > ib,
    }
}

/// Buffers of one task, reused from token to token.
#[derive(Default)]
pub struct RowScratch {
    scores: Vec<f32>,
    taken: Vec<bool>,
    chosen: Vec<f32>,
}

/// One token: `logits` (E values) to `weights` and `indices` (k each), best first.
pub fn route_token<E: Element>(attrs: &Attrs, logits: &[E], weights: &mut [E], indices: &mut [i64], r: &mut RowScratch) {
    let k = attrs.k;
    let scores = &mut r.scores;
    scores.clear();
    scores.extend(logits.iter().map(|v| v.to_f32()));
    match attrs.scoring {
        Scoring::Softmax => {
            let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0f32;
            for s in scores.iter_mut() {
                *s = (*s - m).exp();
                sum += *s;
            }
            scores.iter_mut().for_each(|s| *s /= sum);
        }
        Scoring::Sigmoid => scores.iter_mut().for_each(|s| *s = 1.0 / (1.0 + (-*s).exp())),
        Scoring::TopkSoftmax => {}
    }
    // k rounds of a best-of-the-rest scan: k is small beside E, and the order is the tie rule's
    r.taken.clear();
    r.taken.resize(scores.len(), false);
    r.chosen.clear();
    for slot in indices.iter_mut().take(k) {
        let mut best = usize::MAX;
        for (i, &s) in scores.iter().enumerate() {
            if !r.taken[i] && (best == usize::MAX || ranks_before(s, i, scores[best], best, attrs.tie_break)) {
                best = i;
            }
        }
        r.taken[best] = true;
        *slot = best as i64;
        r.chosen.push(scores[best]);
    }
    let chosen = &mut r.chosen;
    if attrs.scoring == Scoring::TopkSoftmax {
        let m = chosen[0]; // the largest (NaN ranks last, so a NaN here means the row is all NaN)
        let mut sum = 0.0f32;
        for c in chosen.iter_mut() {
            *c = (*c - m).exp();
            sum += *c;
        }
        chosen.iter_mut().for_each(|c| *c /= sum);
    }
    if attrs.normalize {
        let sum: f32 = chosen.iter().sum();
        chosen.iter_mut().for_each(|c| *c /= sum);
    }
    for (w, &c) in weights.iter_mut().zip(chosen.iter()) {
        *w = E::from_f32(c);
    }
}

/// Every token of `logits` ([T, E], row-major) into `weights` and `indices` ([T, k]).
pub fn topk_router<E: Element>(pool: &dyn Pool, attrs: &Attrs, experts: usize, logits: &[E], weights: &mut [E], indices: &mut [i64]) {
    let k = attrs.k;
    if experts == 0 {
        return;
    }
    let tokens = logits.len() / experts;
    // tokens in chunks, each chunk's rows written by one task
    const ROWS: usize = 64;
    let chunks = tokens.div_ceil(ROWS);
    let (w_out, i_out) = (SharedOut::new(weights), SharedOut::new(indices));
    pool.for_each(chunks, &|c| {
        let mut scratch = RowScratch::default();
        for t in c * ROWS..((c + 1) * ROWS).min(tokens) {
            // SAFETY: row t of the outputs belongs to this chunk's task alone.
            let (w, i) = unsafe { (w_out.row(t, k), i_out.row(t, k)) };
            route_token(attrs, &logits[t * experts..(t + 1) * experts], w, i, &mut scratch);
        }
    });
}
