//! The AVX2/FMA arithmetic of the packed path (x86_64, chosen at run time): the register tile that
//! multiplies up to [`MR`] token rows into one [`NR`]-column weight panel, and the epilogue that
//! turns a tile row into output values (bias, activation, GLU), with a vectorised sigmoid so the
//! activation does not cost more than the products around it.

use super::activation;
use super::tile::{Epilogue, OutBlock, MR, NR};
use crate::spec::Activation;
use std::arch::x86_64::*;


/// Whether this machine runs the packed path.
pub fn available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

/// `acc[i] (+)= sum_{l < k} a[l * MR + i] * b[l * NR .. (l + 1) * NR]` for the first `m` rows of a
/// tile of token rows stored column by column (`MR` values per column, see `panels::RowTiles`):
/// onto `acc`'s values when `accumulate` (a later block of the inner dimension), else from zero.
///
/// With `prefetch`, the tile also asks for the lines [`PREFETCH_LINES`] ahead of the one it reads
/// (running on past the end of `b` into the panel that follows in memory): the first tile over a
/// panel reads it from memory, and the hardware prefetcher alone stops at every 4 KiB page.
///
/// # Safety
/// AVX2 and FMA must be available; `a` must hold `k` columns of `MR` values (the first `m` of
/// each are read), `b` `k` lines of `NR` values, 32-byte aligned.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn tile(m: usize, k: usize, a: *const f32, b: *const f32, acc: &mut [[f32; NR]; MR], accumulate: bool, prefetch: bool) {
    // Few rows leave few independent accumulators, and each FMA waits on the previous one into
    // the same register (4-5 cycles): U interleaved sets of accumulators over k hide that latency.
    macro_rules! go {
        ($m:literal, $u:literal) => {
            if prefetch {
                tile_m::<$m, $u, true>(k, a, b, acc, accumulate)
            } else {
                tile_m::<$m, $u, false>(k, a, b, acc, accumulate)
            }
        };
    }
    match m {
        1 => go!(1, 4),
        2 => go!(2, 2),
        3 => go!(3, 2),
        4 => go!(4, 1),
        5 => go!(5, 1),
        6 => go!(6, 1),
        _ => unreachable!("a register tile has 1..={MR} rows"),
    }
}

/// How far ahead a prefetching tile asks for panel lines (64 bytes each).
pub const PREFETCH_LINES: usize = 24;

/// Inner steps per loop iteration: with the steps' offsets fixed, every load of the iteration
/// addresses off two pointers, and the loop costs two additions and a branch per four steps.
const UNROLL: usize = 4;

#[target_feature(enable = "avx2,fma")]
unsafe fn tile_m<const M: usize, const U: usize, const PREFETCH: bool>(
    k: usize,
    a: *const f32,
    b: *const f32,
    out: &mut [[f32; NR]; MR],
    accumulate: bool,
) {
    let mut acc = [[[_mm256_setzero_ps(); 2]; M]; U];
    if accumulate {
        for i in 0..M {
            acc[0][i] = [_mm256_loadu_ps(out[i].as_ptr()), _mm256_loadu_ps(out[i].as_ptr().add(8))];
        }
    }
    // One inner step `u` of the current iteration, into accumulator set `set`.
    macro_rules! step {
        ($ap:expr, $bp:expr, $u:expr, $set:expr) => {{
            let line = $bp.add($u * NR);
            if PREFETCH {
                // wrapping: the address may lie past the allocation; a prefetch never faults
                _mm_prefetch::<_MM_HINT_T0>(line.wrapping_add(PREFETCH_LINES * NR).cast::<i8>());
            }
            let b0 = _mm256_load_ps(line);
            let b1 = _mm256_load_ps(line.add(8));
            let set = &mut acc[$set];
            for i in 0..M {
                let av = _mm256_broadcast_ss(&*$ap.add($u * MR + i));
                set[i][0] = _mm256_fmadd_ps(av, b0, set[i][0]);
                set[i][1] = _mm256_fmadd_ps(av, b1, set[i][1]);
            }
        }};
    }
    let (mut ap, mut bp) = (a, b);
    for _ in 0..k / UNROLL {
        for u in 0..UNROLL {
            step!(ap, bp, u, u % U);
        }
        ap = ap.add(UNROLL * MR);
        bp = bp.add(UNROLL * NR);
    }
    for u in 0..k % UNROLL {
        step!(ap, bp, u, 0);
    }
    for i in 0..M {
        let (mut lo, mut hi) = (acc[0][i][0], acc[0][i][1]);
        for set in &acc[1..] {
            lo = _mm256_add_ps(lo, set[i][0]);
            hi = _mm256_add_ps(hi, set[i][1]);
        }
        _mm256_storeu_ps(out[i].as_mut_ptr(), lo);
        _mm256_storeu_ps(out[i].as_mut_ptr().add(8), hi);
    }
}

/// e^x for 8 lanes: Cephes' expf (range reduction by ln 2 in two parts, degree-5 polynomial),
/// within a few ulp of the correctly rounded value on [-87, 87]; inputs are clamped to that range,
/// which only matters where the sigmoid has long saturated.
#[target_feature(enable = "avx2,fma")]
unsafe fn exp8(x: __m256) -> __m256 {
    let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0)), _mm256_set1_ps(87.0));
    // n = round(x / ln 2); r = x - n ln 2, with ln 2 split so n * C1 is exact
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(355.0 / 512.0), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm256_set1_ps(1.987_569_1e-4);
    for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let r2 = _mm256_mul_ps(r, r);
    let e = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0));
    // 2^n from the exponent bits
    let pow2n = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127))));
    _mm256_mul_ps(e, pow2n)
}

/// 1 / (1 + e^-x) for 8 lanes.
#[target_feature(enable = "avx2,fma")]
unsafe fn sigmoid8(x: __m256) -> __m256 {
    let one = _mm256_set1_ps(1.0);
    let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
    _mm256_div_ps(one, _mm256_add_ps(one, e))
}

/// silu for 8 lanes.
#[target_feature(enable = "avx2,fma")]
unsafe fn silu8(x: __m256) -> __m256 {
    _mm256_mul_ps(x, sigmoid8(x))
}

/// Turns the sums of a row tile into output values and writes them: adds the bias, applies
/// `epi` to each of the first `mr` rows, and writes the first `valid` values of each row to row
/// `i0 + i`, columns `col0..col0 + valid` of `out` (`i0` a multiple of [`MR`]).
///
/// # Safety
/// AVX2 and FMA must be available; `out` must be writable at those places.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn finish_tile(epi: Epilogue, acc: &mut [[f32; NR]; MR], mr: usize, bias: Option<&[f32; NR]>, valid: usize, out: &OutBlock, i0: usize, col0: usize) {
    let zero = [0f32; NR];
    let b = bias.unwrap_or(&zero);
    let (b_lo, b_hi) = (_mm256_loadu_ps(b.as_ptr()), _mm256_loadu_ps(b.as_ptr().add(8)));
    // Every row of the tile, used or not (unused rows hold stale sums, never written out): a
    // fixed count lets the rows' sigmoids interleave instead of waiting on one another.
    let lo: [__m256; MR] = std::array::from_fn(|i| _mm256_add_ps(_mm256_loadu_ps(acc[i].as_ptr()), b_lo));
    let hi: [__m256; MR] = std::array::from_fn(|i| _mm256_add_ps(_mm256_loadu_ps(acc[i].as_ptr().add(8)), b_hi));
    let set = |acc: &mut [[f32; NR]; MR], i: usize, l: __m256, h: __m256| {
        _mm256_storeu_ps(acc[i].as_mut_ptr(), l);
        _mm256_storeu_ps(acc[i].as_mut_ptr().add(8), h);
    };
    match epi {
        Epilogue::Linear => (0..MR).for_each(|i| set(acc, i, lo[i], hi[i])),
        Epilogue::Act(attrs) if attrs.activation == Activation::Silu => (0..MR).for_each(|i| set(acc, i, silu8(lo[i]), silu8(hi[i]))),
        Epilogue::Glu(attrs) if attrs.activation == Activation::Silu => (0..MR).for_each(|i| set(acc, i, _mm256_mul_ps(silu8(lo[i]), hi[i]), hi[i])),
        Epilogue::Glu(attrs) if attrs.activation == Activation::SwigluOai => {
            // as activation::glu: g = min(gate, limit), u = clamp(up, -limit, limit)
            let lim = _mm256_set1_ps(attrs.limit);
            for i in 0..MR {
                let g = _mm256_min_ps(lo[i], lim);
                let u = _mm256_max_ps(_mm256_min_ps(hi[i], lim), _mm256_sub_ps(_mm256_setzero_ps(), lim));
                let s = sigmoid8(_mm256_mul_ps(_mm256_set1_ps(attrs.alpha), g));
                set(acc, i, _mm256_mul_ps(_mm256_add_ps(u, _mm256_set1_ps(1.0)), _mm256_mul_ps(g, s)), hi[i]);
            }
        }
        Epilogue::Glu(attrs) if attrs.activation == Activation::SwigluLimit => {
            // as activation::glu: the same clamps, no offset on up
            let lim = _mm256_set1_ps(attrs.limit);
            for i in 0..MR {
                let g = _mm256_min_ps(lo[i], lim);
                let u = _mm256_max_ps(_mm256_min_ps(hi[i], lim), _mm256_sub_ps(_mm256_setzero_ps(), lim));
                let s = sigmoid8(_mm256_mul_ps(_mm256_set1_ps(attrs.alpha), g));
                set(acc, i, _mm256_mul_ps(u, _mm256_mul_ps(g, s)), hi[i]);
            }
        }
        // the other activations lane by lane, as the unpacked path computes them
        Epilogue::Act(attrs) => {
            for i in 0..MR {
                set(acc, i, lo[i], hi[i]);
                acc[i].iter_mut().for_each(|x| *x = activation::apply(attrs.activation, *x));
            }
        }
        Epilogue::Glu(attrs) => {
            for (i, row) in acc.iter_mut().enumerate().take(mr) {
                _mm256_storeu_ps(row.as_mut_ptr(), lo[i]);
                _mm256_storeu_ps(row.as_mut_ptr().add(8), hi[i]);
                for j in 0..NR / 2 {
                    row[j] = activation::glu(attrs, row[j], row[NR / 2 + j]);
                }
            }
        }
    }
    let base = out.row_ptr(i0).add(col0 * out.col);
    if out.col == 1 {
        for (i, row) in acc.iter().enumerate().take(mr) {
            let dst = base.add(i * out.row);
            if valid == NR {
                _mm256_storeu_ps(dst, _mm256_loadu_ps(row.as_ptr()));
                _mm256_storeu_ps(dst.add(8), _mm256_loadu_ps(row.as_ptr().add(8)));
            } else {
                std::ptr::copy_nonoverlapping(row.as_ptr(), dst, valid);
            }
        }
    } else {
        // column-major destination (the next product's row tiles): written in address order
        for j in 0..valid {
            for (i, row) in acc.iter().enumerate().take(mr) {
                *base.add(i * out.row + j * out.col) = row[j];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vector_sigmoid_matches_f64() {
        if !available() {
            eprintln!("skipped: no AVX2/FMA");
            return;
        }
        let mut worst = 0f64;
        let mut x = -100f32;
        while x < 100.0 {
            let xs: [f32; 8] = std::array::from_fn(|i| x + i as f32 * 0.0137);
            let mut got = [0f32; 8];
            unsafe { _mm256_storeu_ps(got.as_mut_ptr(), sigmoid8(_mm256_loadu_ps(xs.as_ptr()))) };
            for (g, &xv) in got.iter().zip(&xs) {
                let want = 1.0 / (1.0 + (-(xv as f64)).exp());
                worst = worst.max((*g as f64 - want).abs() / want.max(1e-30));
            }
            x += 0.093;
        }
        // relative to the value: f32 rounding is 6e-8; the polynomial adds a few ulp
        assert!(worst < 1e-6, "worst relative error {worst}");
    }

    #[test]
    fn tile_matches_f64_for_every_row_count() {
        if !available() {
            eprintln!("skipped: no AVX2/FMA");
            return;
        }
        #[repr(align(32))]
        struct Panel([f32; 39 * NR]);
        let k = 39; // not a multiple of the unrolling nor of the accumulator sets
        let mut b = Panel([0.0; 39 * NR]);
        b.0.iter_mut().enumerate().for_each(|(i, v)| *v = (i as f32 * 0.71).sin());
        let a: Vec<f32> = (0..MR * k).map(|i| (i as f32 * 0.29).cos()).collect();
        for m in 1..=MR {
            for accumulate in [false, true] {
                let mut acc = [[0.5f32; NR]; MR];
                unsafe { tile(m, k, a.as_ptr(), b.0.as_ptr(), &mut acc, accumulate, m % 2 == 0) };
                for (i, row) in acc.iter().enumerate().take(m) {
                    for (j, &got) in row.iter().enumerate() {
                        let start = if accumulate { 0.5 } else { 0.0 };
                        let want: f64 = start + (0..k).map(|l| a[l * MR + i] as f64 * b.0[l * NR + j] as f64).sum::<f64>();
                        assert!((got as f64 - want).abs() < 1e-5, "m={m} ({i},{j}): {got} vs {want}");
                    }
                }
            }
        }
    }
}
