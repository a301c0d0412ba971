//! Where the CPU code's parallel loops run. Inside ONNX Runtime the ops use ORT's intra-op
//! thread pool (a second pool beside it would fight it for the same cores); elsewhere rayon's.

use rayon::prelude::*;

/// Runs `f(i)` for every `i` in `0..n`, in parallel where it can, and returns when all are done.
pub trait Pool: Sync {
    fn for_each(&self, n: usize, f: &(dyn Fn(usize) + Sync));
}

/// rayon's global pool.
pub struct Rayon;

impl Pool for Rayon {
    fn for_each(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        (0..n).into_par_iter().for_each(f);
    }
}

/// The calling thread only.
pub struct Serial;

impl Pool for Serial {
    fn for_each(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        (0..n).for_each(f);
    }
}
