//! The launch of `TopKRouter` (kernels/router.cu): its arguments laid out, one launch.

use super::launch::{check_limits, tname};
use crate::cuda::driver::{self, Arg, CuResult, Device};
use crate::spec::{topk_router, ElemType, Scoring, TieBreak};
use cudarc::driver::sys::{CUdeviceptr, CUstream};

/// `TopKRouter`: one launch, a warp per token (kernels/router.cu). `logits` [tokens, E] in `t`,
/// `weights` [tokens, k] in `t`, `indices` [tokens, k] int64.
///
/// # Safety
/// The three buffers must hold those shapes and types on `stream`'s context, whose [`Device`] `dev` is.
#[allow(clippy::too_many_arguments)]
pub unsafe fn topk_router(
    dev: &Device,
    stream: CUstream,
    attrs: &topk_router::Attrs,
    t: ElemType,
    tokens: usize,
    experts: usize,
    logits: CUdeviceptr,
    weights: CUdeviceptr,
    indices: CUdeviceptr,
) -> CuResult<()> {
    check_limits(topk_router::NAME, tokens, attrs.k, experts)?;
    if tokens == 0 {
        return Ok(());
    }
    let name = format!("scattermoe_topk_router_{}", tname(t));
    let f = dev.func(&name)?;
    let scoring = match attrs.scoring {
        Scoring::Softmax => 0,
        Scoring::TopkSoftmax => 1,
        Scoring::Sigmoid => 2,
    };
    let grid = tokens.div_ceil(ROUTER_ROWS_PER_BLOCK) as u32;
    let args = [
        Arg::Ptr(logits),
        Arg::I32(tokens as i32),
        Arg::I32(experts as i32),
        Arg::I32(attrs.k as i32),
        Arg::I32(scoring),
        Arg::I32(attrs.normalize as i32),
        Arg::I32((attrs.tie_break == TieBreak::HigherIndex) as i32),
        Arg::Ptr(weights),
        Arg::Ptr(indices),
    ];
    driver::launch(&f, (grid, 1), stream, &args, &name)
}

/// Tokens per block of the router kernel (SMOE_ROUTER_WARPS: a warp per token).
const ROUTER_ROWS_PER_BLOCK: usize = 4;
