//! What the implementations are checked against.
//!
//! - [`oracle64`]: the ops evaluated in float64 straight from docs/op-spec.md, one assignment at a
//!   time; the CPU kernels are tested against it here (the `*_tests` files).
//! - The simple reference: [`scatter_moe`], [`parallel_linear`] and [`capacity_mask`] run the f32
//!   CPU kernels of [`crate::cpu`] on a thread pool of the caller's choice ([`Rayon`], [`Serial`]);
//!   the GPU, ONNX Runtime and TensorRT tests compare against them.
//!
//! The kernels themselves live in [`crate::cpu`]. The module re-exports below keep the paths code
//! used before the kernels moved there (`reference::panels`, `reference::Element`, ...); new code
//! names `crate::cpu`.

pub mod oracle64;
#[cfg(test)]
mod parallel_linear_tests;
#[cfg(test)]
mod quant_tests;
#[cfg(test)]
mod scatter_moe_tests;

pub use crate::cpu::{activation, element, gemm, moe, panels, parallel_linear, pool, routing, scratch};
pub use crate::cpu::{
    capacity_mask, parallel_linear_with, scatter_moe, scatter_moe_with, Element, Indices, LinearInputs, LinearSizes, MoeInputs,
    MoeSizes, PackedMoe, Pool, Rayon, Scratch, ScratchUser, Serial, SharedScratch,
};
