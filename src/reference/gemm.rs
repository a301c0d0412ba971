//! Matrix products for the CPU path, through the `gemm` crate (f32 kernels for AVX2/AVX-512/NEON).

use gemm::Parallelism;

/// Below this many multiply-adds a product runs on the calling thread: splitting it costs more
/// than it saves, and the experts themselves are already spread over threads.
const PARALLEL_MIN_FLOPS: usize = 1 << 20;

/// `out[m, n] = a[m, k] · w[n, k]^T` (+ `out` when `accumulate`), all row-major f32.
/// `w` has torch.nn.Linear's layout: one row per output feature.
pub fn matmul_nt(m: usize, n: usize, k: usize, a: &[f32], w: &[f32], out: &mut [f32], accumulate: bool) {
    assert!(a.len() >= m * k && w.len() >= n * k && out.len() >= m * n, "matmul_nt: buffer too small");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            out[..m * n].fill(0.0);
        }
        return;
    }
    let par = if m * n * k >= PARALLEL_MIN_FLOPS { Parallelism::Rayon(0) } else { Parallelism::None };
    // SAFETY: the strides describe buffers whose sizes were checked above; dst does not alias
    // the operands (distinct borrows).
    unsafe {
        gemm::gemm(
            m, n, k,
            out.as_mut_ptr(), 1, n as isize,
            accumulate,
            a.as_ptr(), 1, k as isize,
            w.as_ptr(), k as isize, 1,
            1.0, 1.0,
            false, false, false,
            par,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_naive_product() {
        let (m, n, k) = (5, 7, 9);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut out = vec![1.0f32; m * n];
        matmul_nt(m, n, k, &a, &w, &mut out, true);
        for i in 0..m {
            for j in 0..n {
                let want: f32 = 1.0 + (0..k).map(|l| a[i * k + l] * w[j * k + l]).sum::<f32>();
                assert!((out[i * n + j] - want).abs() < 1e-5);
            }
        }
    }
}
