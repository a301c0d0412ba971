//! `TopKRouter` on the CPU (docs/op-spec.md, "TopKRouter"): per token, the scores in float32, the
//! k best by the tie rule, the weights rounded to `T` once. The CUDA kernel
//! (`kernels/router.cu`) computes the same formulas in the same order of operations where it
//! matters for the choice (every score of a row from the same max and sum).

use super::element::Element;
use super::experts::SharedOut;
use super::pool::Pool;
use crate::spec::topk_router::{Attrs, Groups};
use crate::spec::{GroupScore, Scoring, TieBreak, WeightsFrom};

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
    choice: Vec<f32>,
    taken: Vec<bool>,
    chosen: Vec<f32>,
    group_scores: Vec<f32>,
    kept: Vec<bool>,
}

/// The `k` best of `values` by the contract's order, best first, into `out` (`taken` marks them).
fn best_k(values: &[f32], k: usize, tie: TieBreak, taken: &mut Vec<bool>, mut out: impl FnMut(usize)) {
    // k rounds of a best-of-the-rest scan: k is small beside E, and the order is the tie rule's
    taken.clear();
    taken.resize(values.len(), false);
    for _ in 0..k {
        let mut best = usize::MAX;
        for (i, &s) in values.iter().enumerate() {
            if !taken[i] && (best == usize::MAX || ranks_before(s, i, values[best], best, tie)) {
                best = i;
            }
        }
        taken[best] = true;
        out(best);
    }
}

/// The choice scores of a group-limited router: every expert outside the `topk_group` best groups
/// gets `fill`.
fn limit_to_groups(choice: &mut [f32], g: &Groups, tie: TieBreak, r: &mut RowScratch) {
    let size = choice.len() / g.n_group;
    r.group_scores.clear();
    let n = match g.score {
        GroupScore::Top2Sum => 2,
        GroupScore::Max => 1,
    };
    for grp in choice.chunks(size) {
        // the group's best (two) by the contract's order, as TopK over the group ranks them
        let mut top = [0usize; 2];
        let mut j = 0;
        best_k(grp, n, tie, &mut r.taken, |i| {
            top[j] = i;
            j += 1;
        });
        let score = match g.score {
            GroupScore::Top2Sum => grp[top[0]] + grp[top[1]],
            GroupScore::Max => grp[top[0]],
        };
        r.group_scores.push(score);
    }
    let keep = &mut r.kept;
    keep.clear();
    keep.resize(g.n_group, false);
    best_k(&r.group_scores, g.topk_group, tie, &mut r.taken, |i| keep[i] = true);
    for (grp, &kept) in choice.chunks_mut(size).zip(keep.iter()) {
        if !kept {
            grp.iter_mut().for_each(|c| *c = g.fill);
        }
    }
}

/// One token's scores from its logits, in place, in float32: softmax over the row, sigmoid, or the
/// logits themselves (`topk_softmax` takes its softmax over the k chosen; `identity`).
pub fn score_row(scoring: Scoring, s: &mut [f32]) {
    match scoring {
        Scoring::Softmax => {
            let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0f32;
            for x in s.iter_mut() {
                *x = (*x - m).exp();
                sum += *x;
            }
            s.iter_mut().for_each(|x| *x /= sum);
        }
        Scoring::Sigmoid => s.iter_mut().for_each(|x| *x = 1.0 / (1.0 + (-*x).exp())),
        Scoring::TopkSoftmax | Scoring::Identity => {}
    }
}

/// A router's per-expert inputs, E float32 values each, if any.
#[derive(Debug, Clone, Copy, Default)]
pub struct PerExpert<'a> {
    /// the selection bias, added to the scores for the choice
    pub bias: Option<&'a [f32]>,
    /// each chosen expert's weight is multiplied by its value (Gemma 4's `per_expert_scale`)
    pub scale: Option<&'a [f32]>,
}

/// One token: `logits` (E values) to `weights` and `indices` (k each), best first.
pub fn route_token<E: Element>(attrs: &Attrs, logits: &[E], per: PerExpert, weights: &mut [E], indices: &mut [i64], r: &mut RowScratch) {
    let k = attrs.k;
    let scores = &mut r.scores;
    scores.clear();
    scores.extend(logits.iter().map(|v| v.to_f32()));
    score_row(attrs.scoring, scores);
    // the choice scores: the scores, plus the bias, limited to the best groups
    let mut choice = std::mem::take(&mut r.choice);
    choice.clear();
    match per.bias {
        Some(b) => choice.extend(scores.iter().zip(b).map(|(s, b)| s + b)),
        None => choice.extend_from_slice(scores),
    }
    if let Some(g) = &attrs.groups {
        limit_to_groups(&mut choice, g, attrs.tie_break, r);
    }
    let mut chosen = std::mem::take(&mut r.chosen);
    chosen.clear();
    let mut slots = indices.iter_mut();
    let from = match attrs.weights_from {
        WeightsFrom::Scores => &r.scores,
        WeightsFrom::Choice => &choice,
    };
    best_k(&choice, k, attrs.tie_break, &mut r.taken, |i| {
        *slots.next().unwrap() = i as i64;
        chosen.push(from[i]);
    });
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
        let mut sum: f32 = chosen.iter().sum::<f32>() + attrs.normalize_eps;
        // the floor as torch's clamp(min=) takes it (0: none, so a negative sum of choice scores
        // stays what it is); a NaN sum stays NaN
        if attrs.normalize_min > 0.0 && sum < attrs.normalize_min {
            sum = attrs.normalize_min;
        }
        chosen.iter_mut().for_each(|c| *c /= sum);
    }
    if let Some(es) = per.scale {
        for (c, &i) in chosen.iter_mut().zip(indices.iter()) {
            *c *= es[i as usize];
        }
    }
    for (w, &c) in weights.iter_mut().zip(chosen.iter()) {
        *w = E::from_f32(c * attrs.scale);
    }
    r.choice = choice;
    r.chosen = chosen;
}

/// Every token of `logits` ([T, E], row-major) into `weights` and `indices` ([T, k]).
pub fn topk_router<E: Element>(pool: &dyn Pool, attrs: &Attrs, experts: usize, logits: &[E], per: PerExpert, weights: &mut [E], indices: &mut [i64]) {
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
            route_token(attrs, &logits[t * experts..(t + 1) * experts], per, w, i, &mut scratch);
        }
    });
}
