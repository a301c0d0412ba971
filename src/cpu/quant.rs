//! Expert weights as the CPU products read them: in `T`, or quantized (docs/op-spec.md,
//! "Quantized expert weights"). A product asks for the rows of one expert it multiplies next
//! ([`Weight::rows_f32`]) and gets them as f32: a weight in f32 as stored, any other dequantized
//! into a buffer of those rows only. No dequantized copy of a whole weight is ever made; each
//! parallel task dequantizes the block of rows it multiplies (at most `experts::BLOCK_COLS` rows).

use super::element::{as_f32, Element};
use crate::spec::{Quant, QuantFormat, ScaleLayout};
use std::borrow::Cow;
use std::ops::Range;

/// A quantized weight's scales, in `T` or float32 (the contract allows either).
#[derive(Clone, Copy)]
pub enum Scales<'a, E> {
    F32(&'a [f32]),
    T(&'a [E]),
}

/// A quantized weight: its codes as stored (`[E, out, in]` bytes, `[E, out, ceil(in / 2)]` for
/// 4-bit), its scales and optional zero points (the shape `quant.scale_shape` gives), and the
/// contract's description of them.
#[derive(Clone, Copy)]
pub struct QuantWeight<'a, E> {
    pub quant: Quant,
    pub codes: &'a [u8],
    pub scales: Scales<'a, E>,
    pub zero_points: Option<&'a [u8]>,
}

/// One weight input of an op (`w_in`, `w_out`, `W`).
#[derive(Clone, Copy)]
pub enum Weight<'a, E> {
    /// In `T`, `[E, out, in]`.
    Plain(&'a [E]),
    Quant(QuantWeight<'a, E>),
}

impl<'a, E> From<&'a [E]> for Weight<'a, E> {
    fn from(w: &'a [E]) -> Self {
        Weight::Plain(w)
    }
}

impl<'a, E> From<&'a Vec<E>> for Weight<'a, E> {
    fn from(w: &'a Vec<E>) -> Self {
        Weight::Plain(w)
    }
}

impl<'a, E: Element> Weight<'a, E> {
    /// The weight in `T`, or None when it is quantized.
    pub fn plain(&self) -> Option<&'a [E]> {
        match self {
            Weight::Plain(w) => Some(w),
            Weight::Quant(_) => None,
        }
    }

    /// Panics unless the buffers hold a weight of logical shape `[experts, out, in_]` (the
    /// contract's check established it; this guards the slicing below).
    pub fn assert_shape(&self, what: &str, experts: usize, out: usize, in_: usize) {
        match self {
            Weight::Plain(w) => assert_eq!(w.len(), experts * out * in_, "{what}: weight size"),
            Weight::Quant(q) => {
                let stored = q.quant.format.stored_in(in_ as u64) as usize;
                assert_eq!(q.codes.len(), experts * out * stored, "{what}: quantized weight size");
                let scales: usize = q.quant.scale_shape(experts as u64, out as u64, in_ as u64).iter().product::<u64>() as usize;
                let len = match q.scales {
                    Scales::F32(s) => s.len(),
                    Scales::T(s) => s.len(),
                };
                assert_eq!(len, scales, "{what}: scale size");
                assert!(q.zero_points.is_none_or(|z| z.len() == scales), "{what}: zero-point size");
                assert_eq!(q.zero_points.is_some(), q.quant.zero_point, "{what}: zero points given and described differently");
            }
        }
    }

    /// Rows `rows` of expert `e`'s `[out, in_]` matrix as f32 (`rows.len() * in_` values): borrowed
    /// from an f32 weight, converted from a half-precision one, dequantized from a quantized one.
    pub fn rows_f32(&self, e: usize, rows: Range<usize>, out: usize, in_: usize) -> Cow<'a, [f32]> {
        match self {
            Weight::Plain(w) => as_f32(&w[(e * out + rows.start) * in_..(e * out + rows.end) * in_]),
            Weight::Quant(q) => {
                let mut dst = vec![0f32; rows.len() * in_];
                for (o, d) in rows.zip(dst.chunks_exact_mut(in_.max(1))) {
                    q.dequantize_row(e, o, out, in_, d);
                }
                Cow::Owned(dst)
            }
        }
    }
}

impl<E: Element> QuantWeight<'_, E> {
    fn scale(&self, i: usize) -> f32 {
        match self.scales {
            Scales::F32(s) => s[i],
            Scales::T(s) => s[i].to_f32(),
        }
    }

    /// `dst[i] = (q[e, o, i] - z) * s` for the `in_` values of row `o` of expert `e`, in f32, the
    /// scale and zero point of each value's block.
    fn dequantize_row(&self, e: usize, o: usize, out: usize, in_: usize, dst: &mut [f32]) {
        let format = self.quant.format;
        let stored = format.stored_in(in_ as u64) as usize;
        let row = &self.codes[(e * out + o) * stored..(e * out + o + 1) * stored];
        let (block_in, groups, first) = match self.quant.layout {
            ScaleLayout::PerChannel => (in_.max(1), 1, e * out + o),
            ScaleLayout::Blocks { block_out, block_in } => {
                let (bo, bi) = (block_out as usize, block_in as usize);
                let groups = in_.div_ceil(bi);
                (bi, groups, (e * out.div_ceil(bo) + o / bo) * groups)
            }
        };
        let default_z = format.default_zero_point().unwrap_or(0);
        for g in 0..groups {
            let s = self.scale(first + g);
            let z = self.zero_points.map_or(default_z, |zp| zp[first + g]) as f32;
            let cols = g * block_in..((g + 1) * block_in).min(in_);
            match format {
                QuantFormat::Fp8E4M3Fn => {
                    for (v, &c) in dst[cols.clone()].iter_mut().zip(&row[cols]) {
                        *v = FP8_E4M3FN[c as usize] * s;
                    }
                }
                QuantFormat::Int8 => {
                    for (v, &c) in dst[cols.clone()].iter_mut().zip(&row[cols]) {
                        *v = (c as f32 - z) * s;
                    }
                }
                QuantFormat::Int4 => {
                    // the group's 16 values, each (c - z) * s as the formula computes it, then one
                    // lookup a code, a byte (two codes) at a time
                    let lut: [f32; 16] = std::array::from_fn(|c| (c as f32 - z) * s);
                    let (mut i, end) = (cols.start, cols.end);
                    if i % 2 == 1 {
                        dst[i] = lut[(row[i / 2] >> 4) as usize];
                        i += 1;
                    }
                    let pairs = (end - i) / 2;
                    for (o, &b) in dst[i..i + 2 * pairs].chunks_exact_mut(2).zip(&row[i / 2..i / 2 + pairs]) {
                        o[0] = lut[(b & 0xf) as usize];
                        o[1] = lut[(b >> 4) as usize];
                    }
                    i += 2 * pairs;
                    if i < end {
                        dst[i] = lut[(row[i / 2] & 0xf) as usize];
                    }
                }
            }
        }
    }
}

/// The value of every float8e4m3fn code: sign bit 7, exponent bits 3-6 (bias 7), mantissa bits
/// 0-2; exponent 0 is subnormal (`m * 2^-9`), 0x7f and 0xff are NaN, there are no infinities.
pub static FP8_E4M3FN: [f32; 256] = fp8_table();

const fn fp8_table() -> [f32; 256] {
    let mut t = [0f32; 256];
    let mut b = 0;
    while b < 256 {
        let sign = ((b as u32) >> 7) << 31;
        let (e, m) = (((b as u32) >> 3) & 0xf, (b as u32) & 7);
        let magnitude = if e == 15 && m == 7 {
            f32::NAN.to_bits()
        } else if e == 0 {
            // m * 2^-9, exact: m in 1..8 has its leading bit at 2^0..2^2
            (m as f32 / 512.0).to_bits()
        } else {
            // rebias the exponent from 7 to 127, the 3 mantissa bits at the top of f32's 23
            ((e + 120) << 23) | (m << 20)
        };
        t[b] = f32::from_bits(sign | magnitude);
        b += 1;
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::ElemType;

    #[test]
    fn fp8_table_holds_the_named_values() {
        assert_eq!(FP8_E4M3FN[0x00], 0.0);
        assert!(FP8_E4M3FN[0x80] == 0.0 && FP8_E4M3FN[0x80].is_sign_negative());
        assert_eq!(FP8_E4M3FN[0x38], 1.0);
        assert_eq!(FP8_E4M3FN[0x7e], 448.0); // the largest finite value
        assert_eq!(FP8_E4M3FN[0xfe], -448.0);
        assert_eq!(FP8_E4M3FN[0x01], 2f32.powi(-9)); // the smallest subnormal
        assert_eq!(FP8_E4M3FN[0x08], 2f32.powi(-6)); // the smallest normal
        assert!(FP8_E4M3FN[0x7f].is_nan() && FP8_E4M3FN[0xff].is_nan());
    }

    #[test]
    fn rows_of_a_blocked_4_bit_weight() {
        // one expert, 3 rows of in = 5 (3 bytes a row, the last high nibble padding), blocks [2, 2]
        let quant = Quant { format: QuantFormat::Int4, layout: ScaleLayout::Blocks { block_out: 2, block_in: 2 }, scale: ElemType::F32, zero_point: true };
        let codes = [0x21, 0x43, 0xf5, 0x87, 0xa9, 0xfb, 0x0f, 0x0f, 0x0f];
        // scales [1, 2, 3] x 3 groups; zero points
        let scales = [1.0, 2.0, 4.0, 0.5, 0.25, 0.125];
        let zp = [0, 1, 2, 3, 4, 5];
        let w = Weight::Quant(QuantWeight::<f32> { quant, codes: &codes, scales: Scales::F32(&scales), zero_points: Some(&zp) });
        w.assert_shape("test", 1, 3, 5);
        let got = w.rows_f32(0, 0..3, 3, 5);
        // row 0 codes 1 2 3 4 5; row 1 codes 7 8 9 10 11 (block row 0); row 2 codes 15 0 15 0 15 (block row 1)
        let want = [
            1.0,
            2.0,
            (3.0 - 1.0) * 2.0,
            (4.0 - 1.0) * 2.0,
            (5.0 - 2.0) * 4.0,
            7.0,
            8.0,
            (9.0 - 1.0) * 2.0,
            (10.0 - 1.0) * 2.0,
            (11.0 - 2.0) * 4.0,
            (15.0 - 3.0) * 0.5,
            (0.0 - 3.0) * 0.5,
            (15.0 - 4.0) * 0.25,
            (0.0 - 4.0) * 0.25,
            (15.0 - 5.0) * 0.125,
        ];
        assert_eq!(&*got, &want);
        assert_eq!(&*w.rows_f32(0, 2..3, 3, 5), &want[10..]);
    }
}
