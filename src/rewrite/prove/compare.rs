//! Running the two proof models on the same inputs at every token count and routing pattern, and
//! comparing their outputs (relative to the reference's largest |value|).

use anyhow::{anyhow, bail, Result};
use ort::session::Session;
use ort::value::DynValue;

use super::inputs::{fill, slots, Feed, Pattern, Role, PATTERNS};
use super::TOKENS;

/// What a comparison saw.
pub(super) struct Compared {
    /// the token counts at which something was compared
    pub tokens: Vec<usize>,
    pub cases: usize,
    /// max |other - reference| / max |reference|
    pub worst: f64,
    /// where the reference failed (the first few), when it ran nowhere this is why
    pub reference_failures: Vec<String>,
}

impl Compared {
    /// Itself, or why nothing was compared: the reference ran at no token count.
    pub fn ran(self) -> Result<Compared> {
        if self.tokens.is_empty() {
            bail!(
                "the region cut out of the graph ran at none of the token counts {:?}, so nothing was compared (first error: {})",
                TOKENS,
                self.reference_failures.first().map(String::as_str).unwrap_or("none")
            );
        }
        Ok(self)
    }
}

fn to_f64(v: &DynValue) -> Result<Vec<f64>> {
    if let Ok((_, d)) = v.try_extract_tensor::<f32>() {
        return Ok(d.iter().map(|&x| x as f64).collect());
    }
    if let Ok((_, d)) = v.try_extract_tensor::<f64>() {
        return Ok(d.to_vec());
    }
    if let Ok((_, d)) = v.try_extract_tensor::<half::f16>() {
        return Ok(d.iter().map(|x| x.to_f64()).collect());
    }
    if let Ok((_, d)) = v.try_extract_tensor::<half::bf16>() {
        return Ok(d.iter().map(|x| x.to_f64()).collect());
    }
    bail!("the output has an element type the proof cannot read")
}

fn run(s: &mut Session, inputs: Vec<(String, DynValue)>) -> Result<(Vec<i64>, Vec<f64>)> {
    let outs = s.run(inputs)?;
    let v = &outs[0];
    let shape = v.shape().to_vec();
    Ok((shape, to_f64(v)?))
}

pub(super) fn first_line(e: &dyn std::fmt::Display) -> String {
    let s = e.to_string();
    let s = s.lines().next().unwrap_or("").to_string();
    if s.len() > 200 {
        format!("{}...", &s[..200])
    } else {
        s
    }
}

/// Most `Exactly(m)` patterns tried at a count where no other pattern ran the reference.
const MOST_EXACT_TRIES: usize = 64;

/// Runs `reference` (the region, or its float32 twin) and `other` (the replacement) on the same
/// inputs at each token count, under each routing pattern, and compares them at `tol`. Where the
/// reference fails the case is skipped (traced loops fail at 1 token, and whenever an expert gets
/// no token); `other` failing where it runs, a shape difference, a NaN on one side only, an
/// infinite value that differs or an error beyond `tol` is an `Err`, the reason.
///
/// Besides [`PATTERNS`], routing with exactly k experts hit (k the routing's slots); and where
/// nothing ran the reference at a count, exactly m experts for m = k + 1, k + 2, ... up to what
/// the count can hit (the first that runs): a loop unrolled over the m experts its traced input
/// hit runs only then.
pub(super) fn compare(reference: &mut Session, other: &mut Session, feeds: &[Feed], experts: usize, tol: f64) -> Result<Compared> {
    let mut c = Compared { tokens: Vec::new(), cases: 0, worst: 0.0, reference_failures: Vec::new() };
    let k = feeds.iter().find(|f| f.role == Role::RoutingIndices).map(|f| slots(&f.shape));
    let mut patterns = PATTERNS.to_vec();
    patterns.extend(k.map(Pattern::Exactly));
    for &tokens in &TOKENS {
        let mut at_count = false;
        for &p in &patterns {
            if p == Pattern::Repeated && !feeds.iter().any(|f| f.role == Role::RoutingIndices && !f.distinct && slots(&f.shape) > 1) {
                continue;
            }
            // a traced region can need every expert hit: random patterns get a few draws
            let seeds = if matches!(p, Pattern::Random | Pattern::Ties) { 3 } else { 1 };
            at_count |= case(reference, other, feeds, experts, tol, tokens, p, seeds, &mut c)?;
        }
        if let (false, Some(k)) = (at_count, k) {
            for m in (k + 1..=experts.min(tokens * k)).take(MOST_EXACT_TRIES) {
                if case(reference, other, feeds, experts, tol, tokens, Pattern::Exactly(m), 1, &mut c)? {
                    at_count = true;
                    break;
                }
            }
        }
        if at_count {
            c.tokens.push(tokens);
        }
    }
    Ok(c)
}

/// One routing pattern at one token count: up to `seeds` draws until the reference runs, then the
/// comparison. Whether something was compared.
#[allow(clippy::too_many_arguments)]
fn case(
    reference: &mut Session,
    other: &mut Session,
    feeds: &[Feed],
    experts: usize,
    tol: f64,
    tokens: usize,
    p: Pattern,
    seeds: u64,
    c: &mut Compared,
) -> Result<bool> {
    for seed in 0..seeds {
        let a = match run(reference, fill(feeds, tokens, p, seed, experts)?) {
            Ok(a) => a,
            Err(e) => {
                c.reference_failures.push(format!("tokens {tokens} {p:?}: {}", first_line(&e)));
                continue;
            }
        };
        let b = run(other, fill(feeds, tokens, p, seed, experts)?)
            .map_err(|e| anyhow!("at {tokens} tokens ({p:?} routing) the replacement fails where the region runs: {}", first_line(&e)))?;
        if a.0 != b.0 {
            bail!("at {tokens} tokens ({p:?} routing) the replacement's output has shape {:?}, the region's {:?}", b.0, a.0);
        }
        let mut num = 0f64;
        let mut den = 0f64;
        for (x, y) in b.1.iter().zip(&a.1) {
            if x.is_nan() != y.is_nan() {
                bail!("at {tokens} tokens ({p:?} routing) one side gives NaN where the other gives a number");
            }
            if x.is_finite() && y.is_finite() {
                num = num.max((x - y).abs());
                den = den.max(y.abs());
            } else if x != y && !(x.is_nan() && y.is_nan()) {
                bail!("at {tokens} tokens ({p:?} routing) the outputs differ in an infinite value");
            }
        }
        let rel = if den > 0.0 { num / den } else { num };
        if rel > tol {
            bail!("at {tokens} tokens ({p:?} routing) the replacement differs from the region: max relative error {rel:.3e} > {tol:.1e}");
        }
        c.worst = c.worst.max(rel);
        c.cases += 1;
        return Ok(true);
    }
    Ok(false)
}
