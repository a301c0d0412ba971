//! The CPU implementation of the ops: the oracle every other path is tested against, and the
//! kernel the ONNX Runtime CPU execution provider runs. Storage in `T`, arithmetic in f32,
//! matrix products through the `gemm` crate (or, for weights packed once at session creation,
//! an AVX2 register tile over panels), experts and tokens spread over the caller's thread pool.

pub mod activation;
pub mod element;
mod experts;
pub mod gemm;
pub mod moe;
pub mod panels;
pub mod parallel_linear;
pub mod pool;
pub mod routing;
pub mod scratch;
#[cfg(test)]
mod oracle64;

#[cfg(target_arch = "x86_64")]
mod avx2;

/// Other architectures have no packed path: [`panels::PackedWeights::new`] declines there.
#[cfg(not(target_arch = "x86_64"))]
mod avx2 {
    use super::panels::{Epilogue, OutBlock};
    pub const NR: usize = 16;
    pub const MR: usize = 6;
    pub fn available() -> bool {
        false
    }
    pub unsafe fn tile(_: usize, _: usize, _: *const f32, _: *const f32, _: &mut [[f32; NR]; MR], _: bool, _: bool) {
        unreachable!("no packed weights without AVX2")
    }
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn finish_tile(_: Epilogue, _: &mut [[f32; NR]; MR], _: usize, _: Option<&[f32; NR]>, _: usize, _: &OutBlock, _: usize, _: usize) {
        unreachable!("no packed weights without AVX2")
    }
}

pub use element::{Element, Indices};
pub use pool::{Pool, Rayon, Serial};
pub use scratch::{Scratch, ScratchUser, SharedScratch};
pub use moe::{capacity_mask, scatter_moe, scatter_moe_with, MoeInputs, MoeSizes, PackedMoe};
pub use parallel_linear::{parallel_linear, parallel_linear_with, LinearInputs, LinearSizes};
