//! Matrix products for the CPU path: `out = a · wᵀ` with `w` in torch.nn.Linear's layout.
//!
//! Products with many rows go through the `gemm` crate (f32 kernels for AVX2/AVX-512/NEON, chosen
//! at run time). Products with few rows — an expert that got a handful of tokens, the common case
//! in decoding — are memory-bound: the `gemm` crate would first repack the weight block, reading
//! it twice, so they take a direct loop that streams each weight row once against all rows of `a`.
//! Callers split the work into blocks and run the blocks in parallel; a product itself runs on the
//! calling thread.

use gemm::Parallelism;

/// Up to this many rows, a product streams the weights once instead of packing them.
pub const STREAM_MAX_ROWS: usize = 8;


/// A row-major f32 matrix view with a row stride (so blocks of wider buffers can be addressed).
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub stride: usize,
}

impl<'a> MatRef<'a> {
    pub fn new(data: &'a [f32], rows: usize, cols: usize, stride: usize) -> Self {
        assert!(rows == 0 || data.len() >= (rows - 1) * stride + cols, "MatRef: buffer too small");
        MatRef { data, rows, cols, stride }
    }

    fn row(&self, i: usize) -> &'a [f32] {
        &self.data[i * self.stride..i * self.stride + self.cols]
    }
}

/// A mutable row-major f32 block: `rows` x `cols` at `ptr`, row stride `stride`.
///
/// Blocks of one buffer handed to different threads must not overlap; [`super::experts`] makes
/// them, one per (expert, column block).
pub struct MatMut {
    pub ptr: *mut f32,
    pub rows: usize,
    pub cols: usize,
    pub stride: usize,
}

/// `out[i, j] = sum_l a[i, l] * w[j, l]` (+ `out[i, j]` when `accumulate`); `w` is `n` x `a.cols`.
///
/// # Safety
/// `out` must describe writable memory that no other thread touches during the call.
pub unsafe fn matmul_nt(a: MatRef, w: MatRef, out: &MatMut, accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, w.rows);
    assert_eq!(w.cols, k, "matmul_nt: inner dimensions differ");
    assert!(out.rows == m && out.cols == n, "matmul_nt: output block has the wrong shape");
    if m == 0 || n == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if m <= STREAM_MAX_ROWS && std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        return stream_nt_avx2_fma(a, w, out, accumulate);
    }

    if m <= STREAM_MAX_ROWS {
        return stream_nt(a, w, out, accumulate);
    }
    gemm::gemm(
        m, n, k,
        out.ptr, 1, out.stride as isize,
        accumulate,
        a.data.as_ptr(), 1, a.stride as isize,
        w.data.as_ptr(), w.stride as isize, 1,
        1.0, 1.0,
        false, false, false,
        Parallelism::None,
    );
}

/// The streamed product, portable form (machines without AVX2): each weight row is read once, and
/// each piece of it is multiplied into all rows of `a` while it sits in registers.
#[inline(always)]
unsafe fn stream_nt(a: MatRef, w: MatRef, out: &MatMut, accumulate: bool) {
    macro_rules! rows {
        ($($m:literal)*) => {
            match a.rows {
                $($m => stream_rows::<$m>(a, w, out, accumulate),)*
                _ => unreachable!("streamed products have 1..={STREAM_MAX_ROWS} rows"),
            }
        };
    }
    rows!(1 2 3 4 5 6 7 8)
}

#[inline(always)]
unsafe fn stream_rows<const M: usize>(a: MatRef, w: MatRef, out: &MatMut, accumulate: bool) {
    const L: usize = 8; // one AVX register of f32
    let k = a.cols;
    let rows: [&[f32]; M] = std::array::from_fn(|i| a.row(i));
    for j in 0..w.rows {
        let wj = w.row(j);
        let mut acc = [[0f32; L]; M];
        let mut c = 0;
        while c + L <= k {
            let wv: &[f32; L] = wj[c..c + L].try_into().unwrap();
            for i in 0..M {
                let av: &[f32; L] = rows[i][c..c + L].try_into().unwrap();
                for l in 0..L {
                    acc[i][l] += av[l] * wv[l];
                }
            }
            c += L;
        }
        for i in 0..M {
            let mut v: f32 = acc[i].iter().sum();
            for l in c..k {
                v += rows[i][l] * wj[l];
            }
            let o = out.ptr.add(i * out.stride + j);
            *o = if accumulate { *o + v } else { v };
        }
    }
}

/// [`stream_nt`] with AVX2 fused multiply-adds (chosen at run time): each 8-float piece of a weight
/// row is loaded once and multiplied into every row of `a`, `M` accumulators kept in registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn stream_nt_avx2_fma(a: MatRef, w: MatRef, out: &MatMut, accumulate: bool) {
    // U independent accumulator sets hide the FMA latency when there are few rows.
    match a.rows {
        1 => stream_rows_avx2::<1, 4>(a, w, out, accumulate),
        2 => stream_rows_avx2::<2, 4>(a, w, out, accumulate),
        3 => stream_rows_avx2::<3, 2>(a, w, out, accumulate),
        4 => stream_rows_avx2::<4, 2>(a, w, out, accumulate),
        5 => stream_rows_avx2::<5, 1>(a, w, out, accumulate),
        6 => stream_rows_avx2::<6, 1>(a, w, out, accumulate),
        7 => stream_rows_avx2::<7, 1>(a, w, out, accumulate),
        8 => stream_rows_avx2::<8, 1>(a, w, out, accumulate),
        _ => unreachable!("streamed products have 1..={STREAM_MAX_ROWS} rows"),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn stream_rows_avx2<const M: usize, const U: usize>(a: MatRef, w: MatRef, out: &MatMut, accumulate: bool) {
    use std::arch::x86_64::*;
    let k = a.cols;
    let rows: [*const f32; M] = std::array::from_fn(|i| a.row(i).as_ptr());
    for j in 0..w.rows {
        let wj = w.row(j);
        let wp = wj.as_ptr();
        let mut accs = [[_mm256_setzero_ps(); M]; U];
        let mut c = 0;
        while c + 8 * U <= k {
            for (u, acc) in accs.iter_mut().enumerate() {
                let wv = _mm256_loadu_ps(wp.add(c + 8 * u));
                for i in 0..M {
                    acc[i] = _mm256_fmadd_ps(_mm256_loadu_ps(rows[i].add(c + 8 * u)), wv, acc[i]);
                }
            }
            c += 8 * U;
        }
        while c + 8 <= k {
            let wv = _mm256_loadu_ps(wp.add(c));
            for i in 0..M {
                accs[0][i] = _mm256_fmadd_ps(_mm256_loadu_ps(rows[i].add(c)), wv, accs[0][i]);
            }
            c += 8;
        }
        let mut acc = accs[0];
        for more in &accs[1..] {
            for i in 0..M {
                acc[i] = _mm256_add_ps(acc[i], more[i]);
            }
        }
        for i in 0..M {
            // horizontal sum of the 8 lanes
            let hi = _mm256_extractf128_ps(acc[i], 1);
            let lo = _mm256_castps256_ps128(acc[i]);
            let s4 = _mm_add_ps(hi, lo);
            let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
            let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
            let mut v = _mm_cvtss_f32(s1);
            for l in c..k {
                v += *rows[i].add(l) * wj[l];
            }
            let o = out.ptr.add(i * out.stride + j);
            *o = if accumulate { *o + v } else { v };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(m: usize, n: usize, k: usize) {
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect();
        // write into the middle columns of a wider buffer, accumulating onto 1.0
        let stride = n + 3;
        let mut out = vec![1.0f32; m * stride];
        let block = MatMut { ptr: unsafe { out.as_mut_ptr().add(2) }, rows: m, cols: n, stride };
        unsafe { matmul_nt(MatRef::new(&a, m, k, k), MatRef::new(&w, n, k, k), &block, true) };
        for i in 0..m {
            assert_eq!(out[i * stride], 1.0);
            assert_eq!(out[i * stride + 1], 1.0);
            for j in 0..n {
                let want: f32 = 1.0 + (0..k).map(|l| a[i * k + l] * w[j * k + l]).sum::<f32>();
                let got = out[i * stride + 2 + j];
                assert!((got - want).abs() < 1e-4 * want.abs().max(1.0), "m={m} ({i},{j}): {got} vs {want}");
            }
        }
    }

    #[test]
    fn portable_streamed_product_matches_naive() {
        // machines without AVX2 take this path; run it here too
        let (m, n, k) = (5, 6, 21);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut out = vec![0f32; m * n];
        let block = MatMut { ptr: out.as_mut_ptr(), rows: m, cols: n, stride: n };
        unsafe { stream_nt(MatRef::new(&a, m, k, k), MatRef::new(&w, n, k, k), &block, false) };
        for i in 0..m {
            for j in 0..n {
                let want: f32 = (0..k).map(|l| a[i * k + l] * w[j * k + l]).sum();
                assert!((out[i * n + j] - want).abs() < 1e-4, "({i},{j})");
            }
        }
    }

    #[test]
    fn streamed_and_packed_products_match_naive() {
        check(1, 7, 33); // streamed, odd k
        check(8, 5, 16); // streamed, the largest m
        check(9, 7, 40); // gemm crate
        check(37, 19, 3);
    }
}
