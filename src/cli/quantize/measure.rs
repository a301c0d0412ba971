//! The error `scattermoe quantize` reports for each node: the node run through the CPU kernels
//! with its original weights and with the quantized ones, on the same random inputs, at a few
//! token counts; the error is max |quantized - original| / max |original| over the output.

use super::codec::Quantized;
use crate::cpu::{self, Element, Indices, LinearInputs, LinearSizes, MoeInputs, MoeSizes, QuantWeight, Rayon, Scales, Weight};
use crate::spec::{parallel_linear, scatter_moe, Quant};

/// One weight of a node: its original values (in `T`, as `E`), and quantized.
pub struct Both<'a, E> {
    pub plain: &'a [E],
    pub quant: Quant,
    pub q: &'a Quantized,
}

impl<'a, E: Element> Both<'a, E> {
    fn quantized(&self) -> Weight<'a, E> {
        Weight::Quant(QuantWeight {
            quant: self.quant,
            codes: &self.q.codes,
            scales: Scales::F32(&self.q.scales),
            zero_points: self.quant.zero_point.then_some(&self.q.zero_points[..]),
        })
    }
}

/// The node's relative error at `tokens` tokens, `k` experts a token; inputs drawn from `seed`.
pub enum Node<'a, E> {
    Moe { attrs: scatter_moe::Attrs, experts: usize, d: usize, f: usize, w_in: Both<'a, E>, w_out: Both<'a, E>, b_in: Option<&'a [E]>, b_out: Option<&'a [E]> },
    Linear { attrs: parallel_linear::Attrs, experts: usize, d_in: usize, d_out: usize, w: Both<'a, E>, b: Option<&'a [E]> },
}

/// max |got - want| / max |want| (0 when both are all zero).
pub fn rel_err<E: Element>(got: &[E], want: &[E]) -> f64 {
    let diff = got.iter().zip(want).map(|(g, w)| (g.to_f32() as f64 - w.to_f32() as f64).abs()).fold(0.0, f64::max);
    let scale = want.iter().map(|w| (w.to_f32() as f64).abs()).fold(0.0, f64::max);
    if diff == 0.0 {
        0.0
    } else if scale == 0.0 || !diff.is_finite() {
        f64::INFINITY
    } else {
        diff / scale
    }
}

/// xorshift64*: reproducible inputs without a dependency (as the rewriter's proof draws them).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in (0, 1].
    fn unit(&mut self) -> f64 {
        ((self.next() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// `k` distinct experts a token where `k <= experts` (independent draws otherwise), and routing
/// weights that sum to one (a softmax of normal logits, as routers make them).
fn routing(rng: &mut Rng, tokens: usize, k: usize, experts: usize) -> (Vec<i64>, Vec<f32>) {
    let mut ri = Vec::with_capacity(tokens * k);
    let mut rw = Vec::with_capacity(tokens * k);
    for _ in 0..tokens {
        let mut chosen: Vec<i64> = Vec::with_capacity(k);
        while chosen.len() < k {
            let e = rng.below(experts) as i64;
            if k > experts || !chosen.contains(&e) {
                chosen.push(e);
            }
        }
        let logits: Vec<f32> = (0..k).map(|_| normal(rng)).collect();
        let sum: f32 = logits.iter().map(|l| l.exp()).sum();
        rw.extend(logits.iter().map(|l| l.exp() / sum));
        ri.extend(chosen);
    }
    (ri, rw)
}

/// A standard normal draw (Box-Muller).
fn normal(rng: &mut Rng) -> f32 {
    let (u, v) = (rng.unit(), rng.unit());
    ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
}

impl<E: Element> Node<'_, E> {
    pub fn error(&self, tokens: usize, k: usize, seed: u64) -> Result<f64, crate::spec::SpecError> {
        let mut rng = Rng::new(seed);
        match self {
            Node::Moe { attrs, experts, d, f, w_in, w_out, b_in, b_out } => {
                let (experts, d, f) = (*experts, *d, *f);
                let x: Vec<E> = (0..tokens * d).map(|_| E::from_f32(normal(&mut rng))).collect();
                let (ri, rw) = routing(&mut rng, tokens, k, experts);
                let rw: Vec<E> = rw.into_iter().map(E::from_f32).collect();
                let s = MoeSizes { tokens, k, experts, d, f };
                let run = |w_in: Weight<E>, w_out: Weight<E>| {
                    let inp =
                        MoeInputs { x: &x, routing_weights: &rw, routing_indices: Indices::I64(&ri), w_in, w_out, b_in: *b_in, b_out: *b_out, capacity: None };
                    let mut y = vec![E::from_f32(0.0); tokens * d];
                    cpu::scatter_moe(&Rayon, attrs, s, &inp, &mut y).map(|_| y)
                };
                let want = run(Weight::Plain(w_in.plain), Weight::Plain(w_out.plain))?;
                let got = run(w_in.quantized(), w_out.quantized())?;
                Ok(rel_err(&got, &want))
            }
            Node::Linear { attrs, experts, d_in, d_out, w, b } => {
                let (experts, d_in, d_out) = (*experts, *d_in, *d_out);
                let rows = if attrs.grouped_in { tokens * k } else { tokens };
                let x: Vec<E> = (0..rows * d_in).map(|_| E::from_f32(normal(&mut rng))).collect();
                let (ri, g) = routing(&mut rng, tokens, k, experts);
                let g: Vec<E> = g.into_iter().map(E::from_f32).collect();
                // combined over k with routing weights when the output is in token order, as a
                // ScatterMoE's second projection is; each assignment's row otherwise
                let gates = (!attrs.grouped_out).then_some(&g[..]);
                let s = LinearSizes { tokens, k, experts, d_in, d_out };
                let run = |w: Weight<E>| {
                    let inp = LinearInputs { x: &x, routing_indices: Indices::I64(&ri), w, b: *b, gates };
                    let mut y = vec![E::from_f32(0.0); if gates.is_some() { tokens } else { tokens * k } * d_out];
                    cpu::parallel_linear(&Rayon, attrs, s, &inp, &mut y).map(|_| y)
                };
                let want = run(Weight::Plain(w.plain))?;
                let got = run(w.quantized())?;
                Ok(rel_err(&got, &want))
            }
        }
    }
}
