//! The CPU implementation of the ops: the oracle every other path is tested against, and the
//! kernel the ONNX Runtime CPU execution provider runs. Storage in `T`, arithmetic in f32,
//! matrix products through the `gemm` crate, experts and tokens spread over rayon's threads.

pub mod activation;
pub mod element;
mod experts;
pub mod gemm;
pub mod moe;
pub mod parallel_linear;
pub mod pool;
pub mod routing;

pub use element::{Element, Indices};
pub use pool::{Pool, Rayon, Serial};
pub use moe::{capacity_mask, scatter_moe, MoeInputs, MoeSizes};
pub use parallel_linear::{parallel_linear, LinearInputs, LinearSizes};
