//! The forward passes on the GPU: workspace plans, kernel choice and launches for `ScatterMoE`,
//! `ParallelLinear`, `CapacityMask` and `TopKRouter`, all on one given stream with device pointers. Nothing here
//! allocates, synchronises or reads device memory on the host: a caller (the device ops of
//! `super::ops`, the GPU tests) hands in one workspace of [`Plan::bytes`] and checks the error
//! words ([`Launched::error`]) its own way.
//!
//! One file per concern: `plan` (workspace), `selection` (kernel choice), `launch` (arguments and
//! launches), `decode` (the whole op in one launch at decode sizes), `codes` (kernel parameter
//! codes, work-unit bounds), `ptrs` (the ops' device pointers), `router` (TopKRouter's launch),
//! `errors` (error words). The kernel catalogue is `super::catalogue`.
//! Launch sequence and contracts: kernels/common.cuh, routing.cu, grouped_gemm.cu, combine.cu;
//! tests/gpu/smoe_cuda.py is the reference host (same choices, in Python).

mod codes;
mod decode;
mod errors;
mod launch;
mod plan;
mod ptrs;
mod router;
pub mod selection;

pub use super::arch::Table;
pub use super::catalogue::{GemmCfg, GROUPED_A_SUFFIX};
pub use errors::{check_sync, error_message, ERR_BAD_INDEX, ERR_NEG_CAPACITY, ERR_TOO_MANY_EXPERTS};
pub use decode::{decode_kernel_runs, DECODE_KERNEL_ENV, DECODE_MAX_N};
pub use codes::format_name;
pub use launch::{capacity_mask, parallel_linear, scatter_moe, CfgOverride, Gemm, Launched, LinearPtrs, MoePtrs, QuantW};
pub use plan::{routing_workspace_bytes, Plan};
pub use router::{topk_router, PerExpert};
pub use selection::{
    pick_cfg, pick_quant_cfg, quant_wgmma_fits, FULL_GRID_K, HOPPER_MC_DEEP_K, HOPPER_MC_DEEP_ROWS, HOPPER_MC_ROWS, HOPPER_SMALL_ROWS, HOPPER_TMA_K, HOPPER_TMA_ROWS, HOPPER_TMA_ROWS_H100,
    QUANT_SKINNY_ROWS, QUANT_WGMMA_ROWS, SKINNY_ROWS, SMALL_ROWS,
};

/// Assignments per routing block (SMOE_ROUTING_CHUNK).
pub const ROUTING_CHUNK: usize = 4096;
/// The most experts the kernels accept (SMOE_ROUTING_MAX_E).
pub const MAX_EXPERTS: usize = 1024;
/// Alignment of every workspace section.
pub const ALIGN: usize = 256;
