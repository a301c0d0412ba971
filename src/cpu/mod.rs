//! The CPU kernels of the ops: what the ONNX Runtime CPU execution provider runs, and the f32
//! reference the GPU paths are compared with. Storage in `T`, arithmetic in f32, matrix products
//! through the `gemm` crate (or, for weights packed once at session creation, an AVX2 register
//! tile over panels), experts and tokens spread over the caller's thread pool. The float64 oracle
//! these kernels are tested against is apart, in `crate::reference`.

pub mod activation;
pub mod element;
mod experts;
pub mod gemm;
pub mod moe;
pub mod panels;
pub mod parallel_linear;
pub mod pool;
pub mod quant;
pub mod router;
pub mod routing;
pub mod scratch;
pub mod tile;

#[cfg(target_arch = "x86_64")]
mod avx2;

/// Other architectures have no packed path: [`panels::PackedWeights::new`] declines there.
#[cfg(not(target_arch = "x86_64"))]
mod avx2 {
    use super::tile::{Epilogue, OutBlock, MR, NR};
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
pub use quant::{QuantWeight, Scales, Weight};
pub use scratch::{Scratch, ScratchUser, SharedScratch};
pub use moe::{capacity_mask, scatter_moe, scatter_moe_with, MoeInputs, MoeSizes, PackedMoe};
pub use parallel_linear::{parallel_linear, parallel_linear_with, LinearInputs, LinearSizes};
