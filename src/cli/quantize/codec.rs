//! How `scattermoe quantize` turns float weights into the contract's quantized forms
//! (docs/op-spec.md, "Quantized expert weights"; the method is written down in docs/quantize.md).
//!
//! One block (one scale, one zero point) at a time, its scale from the block's range:
//! - fp8 e4m3fn: `s = max|w| / 448`; the code is `w / s` rounded to the nearest e4m3fn value
//!   (ties to even), saturated to +-448;
//! - integers, asymmetric (zero point given): `lo = min(w, 0)`, `hi = max(w, 0)`,
//!   `s = (hi - lo) / (2^b - 1)`, `z = round(-lo / s)`; symmetric (no zero point, the default
//!   `z = 2^(b-1)`): `s = max|w| / (2^(b-1) - 1)`; the code is `round(w / s) + z` saturated to
//!   `[0, 2^b - 1]`, rounding to nearest even.
//!
//! A block of zeros gets `s = 1` (every code then means 0). `w / s` is computed in f32, scales are
//! float32. Everything is deterministic: the save quantizes each expert again, expert by expert,
//! and gets the bytes the error report ran on.

use crate::spec::{Quant, QuantFormat, ScaleLayout};

/// The largest finite float8e4m3fn value.
const FP8_MAX: f32 = 448.0;

/// One expert's `[out, in_]` matrix quantized: codes as stored (`[out, in_]` bytes, or
/// `[out, ceil(in_ / 2)]` for 4-bit), scales and zero points in the contract's block order.
pub struct Quantized {
    pub codes: Vec<u8>,
    pub scales: Vec<f32>,
    pub zero_points: Vec<u8>,
}

/// Quantizes one expert's matrix `w` (`[out, in_]`, row-major) as `q` describes (its `scale`
/// field is ignored: scales are float32). `zero_points` is empty unless `q.zero_point`.
pub fn quantize_matrix(q: &Quant, w: &[f32], out: usize, in_: usize) -> Quantized {
    assert_eq!(w.len(), out * in_, "quantize_matrix: size");
    let (bo, bi) = match q.layout {
        ScaleLayout::PerChannel => (1, in_.max(1)),
        ScaleLayout::Blocks { block_out, block_in } => (block_out as usize, block_in as usize),
    };
    let (rows, cols) = (out.div_ceil(bo), in_.div_ceil(bi));
    let stored = q.format.stored_in(in_ as u64) as usize;
    let mut codes = vec![0u8; out * stored];
    let mut scales = Vec::with_capacity(rows * cols);
    let mut zero_points = Vec::new();
    for br in 0..rows {
        for bc in 0..cols {
            let (rs, cs) = (br * bo..((br + 1) * bo).min(out), bc * bi..((bc + 1) * bi).min(in_));
            let block = || rs.clone().flat_map(|o| w[o * in_ + cs.start..o * in_ + cs.end].iter().copied());
            let (s, z) = block_scale(q, block());
            scales.push(s);
            if q.zero_point {
                zero_points.push(z);
            }
            for o in rs.clone() {
                for i in cs.clone() {
                    let c = encode(q.format, w[o * in_ + i], s, z);
                    match q.format {
                        QuantFormat::Int4 => codes[o * stored + i / 2] |= c << (4 * (i & 1)),
                        _ => codes[o * stored + i] = c,
                    }
                }
            }
        }
    }
    Quantized { codes, scales, zero_points }
}

/// A block's scale and zero point (the format's default when the weight takes none).
fn block_scale(q: &Quant, values: impl Iterator<Item = f32>) -> (f32, u8) {
    let (mut lo, mut hi) = (0f32, 0f32);
    for v in values {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    let amax = hi.max(-lo);
    let default_z = q.format.default_zero_point().unwrap_or(0);
    let nonzero = |s: f32| if s > 0.0 && s.is_finite() { s } else { 1.0 };
    match q.format {
        QuantFormat::Fp8E4M3Fn => (nonzero(amax / FP8_MAX), 0),
        QuantFormat::Int8 | QuantFormat::Int4 => {
            let levels = ((1u32 << q.format.bits()) - 1) as f32;
            if q.zero_point {
                let s = nonzero((hi - lo) / levels);
                (s, (-lo / s).round_ties_even().clamp(0.0, levels) as u8)
            } else {
                (nonzero(amax / (default_z as f32 - 1.0)), default_z)
            }
        }
    }
}

/// The code of `v` in a block of scale `s` and zero point `z`.
fn encode(format: QuantFormat, v: f32, s: f32, z: u8) -> u8 {
    let x = v / s;
    match format {
        QuantFormat::Fp8E4M3Fn => fp8_e4m3fn(x),
        QuantFormat::Int8 | QuantFormat::Int4 => {
            let levels = ((1u32 << format.bits()) - 1) as f32;
            (x.round_ties_even() + z as f32).clamp(0.0, levels) as u8
        }
    }
}

/// `x` rounded to the nearest float8e4m3fn value, ties to even, saturated to +-448 (NaN: 0x7f).
pub fn fp8_e4m3fn(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7f;
    }
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs();
    if a >= FP8_MAX {
        return sign | 0x7e;
    }
    // The spacing of e4m3fn values around `a`: 2^(e - 3) in the binade [2^e, 2^(e+1)), e >= -6;
    // 2^-9 below 2^-6 (subnormals). Dividing by a power of two is exact, so the rounding of
    // `a / step` to an integer is the only one.
    let e = if a < 2f32.powi(-6) { -6 } else { a.log2().floor() as i32 };
    // log2 of an f32 near a power of two may land on the wrong side: fix the binade exactly
    let e = (if a < 2f32.powi(e) {
        e - 1
    } else if a >= 2f32.powi(e + 1) {
        e + 1
    } else {
        e
    })
    .max(-6);
    let step = 2f32.powi(e - 3);
    let m = (a / step).round_ties_even(); // 8..=16 in a normal binade, 0..=8 below 2^-6
    let v = m * step;
    if v == 0.0 {
        return sign;
    }
    // v is representable: encode it from its binade (a carry to 16 moves it to the next one)
    let (e, m) = if m >= 16.0 { (e + 1, 8.0) } else { (e, m) };
    if m < 8.0 {
        return sign | m as u8; // subnormal: exponent field 0
    }
    let field = (e + 7) as u8;
    sign | (field << 3) | (m as u8 - 8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::quant::FP8_E4M3FN;
    use crate::spec::ElemType;

    #[test]
    fn fp8_rounds_to_nearest_even_and_saturates() {
        // every finite code encodes to itself
        for c in 0..=255u8 {
            let v = FP8_E4M3FN[c as usize];
            if v.is_nan() {
                continue;
            }
            let got = fp8_e4m3fn(v);
            assert_eq!(FP8_E4M3FN[got as usize], v, "code {c:#04x} ({v}) came back as {got:#04x}");
        }
        // halfway between two neighbours: to the one with an even mantissa
        let (a, b) = (FP8_E4M3FN[0x39], FP8_E4M3FN[0x3a]); // 1.125, 1.25
        assert_eq!(fp8_e4m3fn((a + b) / 2.0), 0x3a);
        let (a, b) = (FP8_E4M3FN[0x38], FP8_E4M3FN[0x39]); // 1.0, 1.125
        assert_eq!(fp8_e4m3fn((a + b) / 2.0), 0x38);
        // subnormal halfway, and the binade carry: 1.9375 -> 2.0
        assert_eq!(fp8_e4m3fn(1.5 * 2f32.powi(-9)), 0x02);
        assert_eq!(FP8_E4M3FN[fp8_e4m3fn(1.97) as usize], 2.0);
        // saturation, and the nearest value otherwise (every input against a search of the table)
        assert_eq!((fp8_e4m3fn(1e6), fp8_e4m3fn(-500.0), fp8_e4m3fn(f32::INFINITY)), (0x7e, 0xfe, 0x7e));
        let mut x = -460f32;
        while x < 460.0 {
            let got = FP8_E4M3FN[fp8_e4m3fn(x) as usize];
            let best =
                (0..=255u8).map(|c| FP8_E4M3FN[c as usize]).filter(|v| !v.is_nan()).map(|v| (v - x.clamp(-448.0, 448.0)).abs()).fold(f32::INFINITY, f32::min);
            assert_eq!((got - x.clamp(-448.0, 448.0)).abs(), best, "x = {x}: got {got}");
            x += 0.0371;
        }
    }

    fn q(format: QuantFormat, layout: ScaleLayout, zero_point: bool) -> Quant {
        Quant { format, layout, scale: ElemType::F32, zero_point }
    }

    /// Dequantizes with the CPU kernels' reader (a different code path) for the round trip.
    fn round_trip(q: &Quant, w: &[f32], out: usize, in_: usize) -> Vec<f32> {
        let r = quantize_matrix(q, w, out, in_);
        let weight = crate::cpu::Weight::Quant(crate::cpu::QuantWeight::<f32> {
            quant: *q,
            codes: &r.codes,
            scales: crate::cpu::Scales::F32(&r.scales),
            zero_points: q.zero_point.then_some(&r.zero_points[..]),
        });
        weight.assert_shape("round trip", 1, out, in_);
        weight.rows_f32(0, 0..out, out, in_).into_owned()
    }

    #[test]
    fn integers_round_trip_within_half_a_step() {
        let (out, in_) = (5, 37);
        let w: Vec<f32> = (0..out * in_).map(|i| ((i * 7919) % 101) as f32 / 50.0 - 0.7).collect();
        for format in [QuantFormat::Int8, QuantFormat::Int4] {
            for layout in [ScaleLayout::PerChannel, ScaleLayout::Blocks { block_out: 2, block_in: 8 }] {
                for zp in [true, false] {
                    let quant = q(format, layout, zp);
                    let r = quantize_matrix(&quant, &w, out, in_);
                    let back = round_trip(&quant, &w, out, in_);
                    // each value within half a step of its block's scale (saturation cannot bite:
                    // the scale covers the block's range)
                    let (bo, bi) = quant.block(in_ as u64);
                    let cols = (in_ as u64).div_ceil(bi) as usize;
                    for o in 0..out {
                        for i in 0..in_ {
                            let s = r.scales[(o / bo as usize) * cols + i / bi as usize];
                            let err = (back[o * in_ + i] - w[o * in_ + i]).abs();
                            assert!(err <= 0.5 * s * (1.0 + 1e-5), "{format:?} {layout:?} zp={zp} ({o}, {i}): err {err} step {s}");
                        }
                    }
                }
            }
        }
        // a block of zeros: scale 1, every value back to 0
        let zeros = vec![0f32; 16];
        for format in QuantFormat::ALL {
            let quant = q(format, ScaleLayout::PerChannel, format != QuantFormat::Fp8E4M3Fn);
            assert_eq!(round_trip(&quant, &zeros, 2, 8), zeros);
        }
    }

    #[test]
    fn fp8_blocks_round_trip_within_the_format_precision() {
        let (out, in_) = (9, 20);
        let w: Vec<f32> = (0..out * in_).map(|i| ((i as f32) * 0.37).sin() * (1.0 + (i % 7) as f32)).collect();
        let quant = q(QuantFormat::Fp8E4M3Fn, ScaleLayout::Blocks { block_out: 4, block_in: 8 }, false);
        let back = round_trip(&quant, &w, out, in_);
        let r = quantize_matrix(&quant, &w, out, in_);
        for (i, (&b, &v)) in back.iter().zip(&w).enumerate() {
            // relative precision 2^-4 of a normal value, absolute 2^-10 of the scale below
            let s = r.scales[(i / in_ / 4) * 3 + (i % in_) / 8];
            assert!((b - v).abs() <= (v.abs() / 16.0).max(s * 2f32.powi(-10)) * 1.0001, "{i}: {v} -> {b}");
        }
        // the block maximum maps to 448 exactly
        assert!(r.codes.iter().any(|&c| c & 0x7f == 0x7e));
    }
}
