//! The work shared by both ops: run something per expert over that expert's rows of a grouped
//! buffer, in parallel, and one expert's linear layer on gathered rows.

use super::element::{as_f32, Element};
use super::gemm::matmul_nt;
use super::routing::Routing;
use rayon::prelude::*;
use std::ops::Range;

/// Splits `out` (grouped rows of `width` values) by expert and calls `f(e, rows, chunk)` for every
/// expert with rows, in parallel. Each chunk is written by one task only.
pub fn for_each_expert<F>(routing: &Routing, width: usize, out: &mut [f32], f: F)
where
    F: Fn(usize, Range<usize>, &mut [f32]) + Sync,
{
    let experts = routing.offsets.len() - 1;
    let mut chunks = Vec::with_capacity(experts);
    let mut rest = out;
    for e in 0..experts {
        let rows = routing.offsets[e]..routing.offsets[e + 1];
        let (chunk, tail) = rest.split_at_mut(rows.len() * width);
        rest = tail;
        if !rows.is_empty() {
            chunks.push((e, rows, chunk));
        }
    }
    chunks.into_par_iter().for_each(|(e, rows, chunk)| f(e, rows, chunk));
}

/// `out[m, n] = a[m, k] · w^T + b` for one expert's weight `w` [n, k] and bias `b` [n].
pub fn linear<E: Element>(m: usize, n: usize, k: usize, a: &[f32], w: &[E], b: Option<&[E]>, out: &mut [f32]) {
    let w = as_f32(w);
    matmul_nt(m, n, k, a, &w, out, false);
    if let Some(b) = b {
        let b = as_f32(b);
        for row in out.chunks_exact_mut(n) {
            for (o, bi) in row.iter_mut().zip(b.iter()) {
                *o += bi;
            }
        }
    }
}

/// Gathers rows of `src` (width `k`) as f32: row `i` of the result is `src[row_of(i)]`.
pub fn gather_rows<E: Element>(src: &[E], k: usize, rows: usize, row_of: impl Fn(usize) -> usize) -> Vec<f32> {
    let mut a = Vec::with_capacity(rows * k);
    for i in 0..rows {
        let r = row_of(i);
        a.extend(src[r * k..(r + 1) * k].iter().map(|v| v.to_f32()));
    }
    a
}
