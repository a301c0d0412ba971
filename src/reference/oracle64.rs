//! The ops evaluated in f64 straight from docs/op-spec.md, one assignment at a time, for tests:
//! it shares no code with the f32 paths but the capacity rule (tested on its own in `cpu::routing`).

use crate::cpu::routing::capacity_keep;
use crate::spec::{scatter_moe::Attrs, Activation, Quant, QuantFormat, ScaleLayout};

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn act(a: Activation, x: f64) -> f64 {
    match a {
        Activation::Silu => x * sigmoid(x),
        Activation::Gelu => 0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2)),
        Activation::GeluTanh => 0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh()),
        Activation::Relu => x.max(0.0),
        Activation::Relu2 => x.max(0.0).powi(2),
        Activation::SwigluOai | Activation::SwigluLimit => unreachable!("gated only"),
    }
}

/// `w[e] · x + b[e]` for a `[rows, cols]` matrix per expert.
fn linear(w: &[f64], b: Option<&[f64]>, e: usize, rows: usize, cols: usize, x: &[f64]) -> Vec<f64> {
    (0..rows)
        .map(|r| {
            let row = &w[(e * rows + r) * cols..(e * rows + r + 1) * cols];
            row.iter().zip(x).map(|(w, x)| w * x).sum::<f64>() + b.map_or(0.0, |b| b[e * rows + r])
        })
        .collect()
}

/// The inputs of a ScatterMoE call, as f64.
pub struct Moe<'a> {
    pub x: &'a [f64],
    pub rw: &'a [f64],
    pub ri: &'a [i64],
    pub w_in: &'a [f64],
    pub w_out: &'a [f64],
    pub b_in: Option<&'a [f64]>,
    pub b_out: Option<&'a [f64]>,
    pub capacity: Option<usize>,
}

/// `Y` of ScatterMoE for `tokens` tokens of width `d`, `k` slots, `experts` experts of width `f`.
pub fn scatter_moe(attrs: &Attrs, tokens: usize, k: usize, experts: usize, d: usize, f: usize, m: &Moe) -> Vec<f64> {
    let n = if attrs.gated { 2 * f } else { f };
    let expert: Vec<u32> = m.ri.iter().map(|&e| e as u32).collect();
    let keep = m.capacity.map(|c| capacity_keep(&expert, k, experts, c, attrs.capacity_order));
    let mut y = vec![0f64; tokens * d];
    for t in 0..tokens {
        for j in 0..k {
            if keep.as_ref().is_some_and(|keep| !keep[t * k + j]) {
                continue;
            }
            let e = m.ri[t * k + j] as usize;
            let a = linear(m.w_in, m.b_in, e, n, d, &m.x[t * d..(t + 1) * d]);
            let h: Vec<f64> = (0..f)
                .map(|i| {
                    if !attrs.gated {
                        return act(attrs.activation, a[i]);
                    }
                    let (g, u) = attrs.glu_layout.rows(i, f);
                    let (g, u) = (a[g], a[u]);
                    match attrs.activation {
                        Activation::SwigluOai => {
                            let lim = attrs.limit as f64;
                            let g = g.min(lim);
                            (u.clamp(-lim, lim) + 1.0) * g * sigmoid(attrs.alpha as f64 * g)
                        }
                        Activation::SwigluLimit => {
                            let lim = attrs.limit as f64;
                            let g = g.min(lim);
                            u.clamp(-lim, lim) * g * sigmoid(attrs.alpha as f64 * g)
                        }
                        other => act(other, g) * u,
                    }
                })
                .collect();
            let o = linear(m.w_out, m.b_out, e, d, f, &h);
            for (yv, ov) in y[t * d..(t + 1) * d].iter_mut().zip(o) {
                *yv += m.rw[t * k + j] * ov;
            }
        }
    }
    y
}

/// `z(t, j) = W[e] · x + b[e]` of ParallelLinear for every assignment, flat index `t * k + j`,
/// with `x` one row per token.
pub fn parallel_linear(x: &[f64], ri: &[i64], w: &[f64], b: Option<&[f64]>, k: usize, d_in: usize, d_out: usize) -> Vec<Vec<f64>> {
    ri.iter()
        .enumerate()
        .map(|(i, &e)| linear(w, b, e as usize, d_out, d_in, &x[(i / k) * d_in..(i / k + 1) * d_in]))
        .collect()
}

/// A float8e4m3fn code's value from its fields: `(-1)^s 2^(e - 7) (1 + m / 8)`, subnormal
/// `(-1)^s 2^-6 (m / 8)` for `e = 0`, NaN for `e = 15, m = 7`.
pub fn fp8_e4m3fn(code: u8) -> f64 {
    let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
    let (e, m) = (((code >> 3) & 0xf) as i32, (code & 7) as f64);
    match (e, m as u8) {
        (15, 7) => f64::NAN,
        (0, _) => sign * 2f64.powi(-6) * (m / 8.0),
        _ => sign * 2f64.powi(e - 7) * (1.0 + m / 8.0),
    }
}

/// A quantized weight's logical values `[experts, out, in_]` in f64, from docs/op-spec.md's
/// formula `(q - z) * s` with the scale and zero point of the block holding each `(o, i)`:
/// `scales` and `zero_points` (`None`: the format's default) laid out as the contract's scale
/// shape for `quant.layout`. Element by element, from the definition.
pub fn dequantize(quant: &Quant, codes: &[u8], scales: &[f64], zero_points: Option<&[u8]>, experts: usize, out: usize, in_: usize) -> Vec<f64> {
    let mut w = Vec::with_capacity(experts * out * in_);
    let stored = if quant.format == QuantFormat::Int4 { in_.div_ceil(2) } else { in_ };
    for e in 0..experts {
        for o in 0..out {
            for i in 0..in_ {
                let byte = codes[(e * out + o) * stored + if quant.format == QuantFormat::Int4 { i / 2 } else { i }];
                // the scale's index: [e, o] per channel, [e, o / bo, i / bi] for blocks
                let at = match quant.layout {
                    ScaleLayout::PerChannel => e * out + o,
                    ScaleLayout::Blocks { block_out, block_in } => {
                        let (bo, bi) = (block_out as usize, block_in as usize);
                        let (rows, cols) = (out.div_ceil(bo), in_.div_ceil(bi));
                        (e * rows + o / bo) * cols + i / bi
                    }
                };
                let (q, z) = match quant.format {
                    QuantFormat::Fp8E4M3Fn => (fp8_e4m3fn(byte), 0.0),
                    QuantFormat::Int8 => (byte as f64, zero_points.map_or(128.0, |z| z[at] as f64)),
                    QuantFormat::Int4 => {
                        let nibble = if i % 2 == 0 { byte & 0xf } else { byte >> 4 };
                        (nibble as f64, zero_points.map_or(8.0, |z| z[at] as f64))
                    }
                };
                w.push((q - z) * scales[at]);
            }
        }
    }
    w
}

/// max |got - want| / max |want|, the tests' error measure.
pub fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let diff = got.iter().zip(want).map(|(g, w)| (*g as f64 - w).abs()).fold(0.0, f64::max);
    let scale = want.iter().map(|w| w.abs()).fold(0.0, f64::max);
    if diff.is_nan() || got.iter().any(|g| !g.is_finite()) {
        return f64::INFINITY;
    }
    diff / scale.max(f64::MIN_POSITIVE)
}
