//! The proof's inputs: what each boundary value means (routing indices, routing weights, router
//! logits, data) and how it is filled for one token count and routing pattern, reproducibly and
//! without a dependency (random routing, all tokens on one expert, experts with no token, every
//! expert hit, ties, repeated experts where the router allows them).

use anyhow::{anyhow, bail, Result};
use ort::value::{DynValue, Tensor};

use super::shape::Shape;
use crate::spec;

/// One boundary input and how to fill it.
pub(super) struct Feed {
    pub(super) name: String,
    pub(super) elem: i32,
    pub(super) shape: Shape,
    pub(super) role: Role,
    /// routing indices from TopK: distinct experts within a row
    pub(super) distinct: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    RoutingIndices,
    RoutingWeights,
    /// router logits over the experts (last axis = E) read by a region that routes itself
    Logits,
    Data,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Pattern {
    Random,
    OneExpert,
    FewExperts,
    EveryExpert,
    Ties,
    /// one expert in every slot of a row (only where the router need not give distinct experts)
    Repeated,
    /// exactly m experts get tokens (a random m of them, taken in turn, distinct within a row; m
    /// at least k): a loop the exporter unrolled over the m experts its traced input hit runs
    /// only on such routing (Ernie-4.5's, at every token count with m = k)
    Exactly(usize),
}

impl Pattern {
    /// A number of its own, for seeding.
    fn code(self) -> u64 {
        match self {
            Pattern::Random => 0,
            Pattern::OneExpert => 1,
            Pattern::FewExperts => 2,
            Pattern::EveryExpert => 3,
            Pattern::Ties => 4,
            Pattern::Repeated => 5,
            Pattern::Exactly(m) => 6 + m as u64,
        }
    }
}

pub(super) const PATTERNS: [Pattern; 6] = [Pattern::Random, Pattern::OneExpert, Pattern::FewExperts, Pattern::EveryExpert, Pattern::Ties, Pattern::Repeated];

/// xorshift64*: reproducible inputs without a dependency.
pub(super) struct Rng(u64);
impl Rng {
    pub(super) fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub(super) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub(super) fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub(super) fn normal(&mut self) -> f32 {
        let (u, v) = (self.unit().max(1e-12), self.unit());
        ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
    }
    pub(super) fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Routing index rows [rows, k] over `e` experts for a pattern: distinct within a row when the
/// router guarantees it (TopK), otherwise also with repeats.
pub(super) fn routing_rows(rng: &mut Rng, rows: usize, k: usize, e: usize, p: Pattern, distinct: bool) -> Vec<i64> {
    let mut out = Vec::with_capacity(rows * k);
    let chosen = match p {
        Pattern::Exactly(m) => draw(rng, (0..e).collect(), m.max(k)),
        _ => Vec::new(),
    };
    for t in 0..rows {
        let pool: Vec<usize> = match p {
            Pattern::Repeated => vec![rng.below(e); k],
            Pattern::Random if !distinct => (0..k).map(|_| rng.below(e)).collect(),
            // expert 0 in every row, the rest drawn from the others
            Pattern::OneExpert => std::iter::once(0).chain(draw(rng, (1..e).collect(), k.saturating_sub(1))).collect(),
            // only the last k+1 experts ever chosen: the others get no token
            Pattern::FewExperts => draw(rng, (e.saturating_sub(k + 1)..e).collect(), k),
            // consecutive experts round the table: every expert hit once rows * k >= e
            Pattern::EveryExpert => (0..k).map(|j| (t * k + j) % e).collect(),
            // the chosen experts in turn: all of them hit once rows * k >= m
            Pattern::Exactly(_) => (0..k).map(|j| chosen[(t * k + j) % chosen.len()]).collect(),
            Pattern::Random | Pattern::Ties => draw(rng, (0..e).collect(), k),
        };
        out.extend(pool.iter().map(|&x| x as i64));
    }
    out
}

pub(super) fn draw(rng: &mut Rng, mut pool: Vec<usize>, k: usize) -> Vec<usize> {
    let k = k.min(pool.len());
    for i in 0..k {
        let j = i + rng.below(pool.len() - i);
        pool.swap(i, j);
    }
    pool.truncate(k);
    pool
}

/// k of routing indices: the last axis of [.., T, k]; 1 for [T].
pub(super) fn slots(s: &Shape) -> usize {
    match s.last() {
        Some(d) if s.len() >= 2 && d.t == 0 => d.c.max(1) as usize,
        _ => 1,
    }
}

/// Most elements of one proof input (a layer's token rows at the largest token count are far fewer).
const MAX_FEED: usize = 1 << 26;

pub(super) fn fill(feeds: &[Feed], tokens: usize, p: Pattern, seed: u64, experts: usize) -> Result<Vec<(String, DynValue)>> {
    let mut rng = Rng::new(seed ^ ((tokens as u64) << 20) ^ (p.code() << 40));
    let mut out = Vec::new();
    for f in feeds {
        // the sizes come from the graph's declarations: a negative or absurd one is an error, not
        // an allocation
        let shape: Vec<usize> = f
            .shape
            .iter()
            .map(|d| usize::try_from(d.c).ok()?.checked_mul(if d.t == 1 { tokens } else { 1 }))
            .collect::<Option<_>>()
            .ok_or_else(|| anyhow!("boundary value '{}' has a negative or oversized dimension", f.name))?;
        let n = shape
            .iter()
            .try_fold(1usize, |a, &b| a.checked_mul(b))
            .filter(|&n| n <= MAX_FEED)
            .ok_or_else(|| anyhow!("boundary value '{}' would hold more than {MAX_FEED} elements at {tokens} tokens", f.name))?;
        let last = shape.last().copied().unwrap_or(1).max(1);
        let vals: Vec<f64> = match f.role {
            Role::RoutingIndices => {
                let k = slots(&f.shape);
                routing_rows(&mut rng, n / k, k, experts, p, f.distinct).into_iter().map(|x| x as f64).collect()
            }
            Role::RoutingWeights if p == Pattern::Ties => vec![1.0 / last as f64; n],
            Role::RoutingWeights => (0..n).map(|_| 0.05 + 0.95 * rng.unit()).collect(),
            Role::Logits => {
                let mut v: Vec<f64> = (0..n).map(|_| rng.normal() as f64).collect();
                let e = last;
                for (i, x) in v.iter_mut().enumerate() {
                    let col = i % e;
                    *x += match p {
                        Pattern::OneExpert if col == 0 => 12.0,
                        Pattern::FewExperts if col + 3 >= e => 12.0,
                        _ => 0.0,
                    };
                }
                v
            }
            Role::Data => (0..n).map(|_| rng.normal() as f64).collect(),
        };
        let v: DynValue = match f.elem {
            1 => Tensor::from_array((shape, vals.iter().map(|&x| x as f32).collect::<Vec<f32>>()))?.into_dyn(),
            11 => Tensor::from_array((shape, vals))?.into_dyn(),
            10 => Tensor::from_array((shape, vals.iter().map(|&x| half::f16::from_f64(x)).collect::<Vec<_>>()))?.into_dyn(),
            16 => Tensor::from_array((shape, vals.iter().map(|&x| half::bf16::from_f64(x)).collect::<Vec<_>>()))?.into_dyn(),
            7 if f.role == Role::RoutingIndices => Tensor::from_array((shape, vals.iter().map(|&x| x as i64).collect::<Vec<i64>>()))?.into_dyn(),
            6 if f.role == Role::RoutingIndices => Tensor::from_array((shape, vals.iter().map(|&x| x as i32).collect::<Vec<i32>>()))?.into_dyn(),
            7 => Tensor::from_array((shape, vec![0i64; n]))?.into_dyn(),
            6 => Tensor::from_array((shape, vec![0i32; n]))?.into_dyn(),
            9 => Tensor::from_array((shape, vec![false; n]))?.into_dyn(),
            other => bail!("boundary value '{}' has element type {}, which the proof cannot fill", f.name, spec::onnx_type_name(other)),
        };
        out.push((f.name.clone(), v));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn routing_rows_are_distinct_and_follow_the_pattern() {
        let mut rng = Rng::new(3);
        for p in PATTERNS.into_iter().chain([Pattern::Exactly(2), Pattern::Exactly(4)]) {
            for (k, e) in [(1, 4), (2, 8), (4, 4), (3, 5)] {
                if p == Pattern::Repeated {
                    let r = routing_rows(&mut rng, 23, k, e, p, false);
                    assert!(r.chunks(k).all(|row| row.iter().all(|&x| x == row[0])));
                    continue;
                }
                let r = routing_rows(&mut rng, 23, k, e, p, true);
                assert_eq!(r.len(), 23 * k);
                for row in r.chunks(k) {
                    let s: HashSet<i64> = row.iter().copied().collect();
                    assert_eq!(s.len(), k, "{p:?} k={k} e={e}: {row:?}");
                    assert!(row.iter().all(|&x| (0..e as i64).contains(&x)));
                }
                let used: HashSet<i64> = r.iter().copied().collect();
                match p {
                    Pattern::OneExpert => assert!(r.chunks(k).all(|row| row.contains(&0))),
                    Pattern::FewExperts => assert!(used.len() <= k + 1),
                    Pattern::EveryExpert => assert_eq!(used.len(), e),
                    Pattern::Exactly(m) => assert_eq!(used.len(), m.max(k).min(e)),
                    _ => {}
                }
            }
        }
    }
}
