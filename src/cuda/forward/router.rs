//! The launch of `TopKRouter` (kernels/router.cu): its arguments laid out, one launch.

use super::codes::tname;
use super::launch::check_limits;
use crate::cuda::driver::{self, Arg, CuResult, Device};
use crate::spec::{topk_router, ElemType, GroupScore, Scoring, TieBreak, WeightsFrom};
use cudarc::driver::sys::{CUdeviceptr, CUstream};

/// `TopKRouter`: one launch, a warp per token (kernels/router.cu). `logits` [tokens, E] in `t`,
/// `weights` [tokens, k] in `t`, `indices` [tokens, k] int64; `per`: the selection bias and the
/// per-expert weight scale (E values each, float32 or `t`), if any.
///
/// # Safety
/// The buffers must hold those shapes and types on `stream`'s context, whose [`Device`] `dev` is.
#[allow(clippy::too_many_arguments)]
pub unsafe fn topk_router(
    dev: &Device,
    stream: CUstream,
    attrs: &topk_router::Attrs,
    t: ElemType,
    tokens: usize,
    experts: usize,
    logits: CUdeviceptr,
    per: PerExpert,
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
        // the kernel leaves scores other than 0 and 2 as the logits; only 1 takes a softmax of the k
        Scoring::Identity => 3,
    };
    // n_group 0: no group limit (the kernel's reading of `groups: None`)
    let (n_group, topk_group, group_max, fill) = match attrs.groups {
        Some(g) => (g.n_group as i32, g.topk_group as i32, (g.score == GroupScore::Max) as i32, g.fill),
        None => (0, 0, 0, f32::NEG_INFINITY),
    };
    let grid = tokens.div_ceil(ROUTER_ROWS_PER_BLOCK) as u32;
    let args = [
        Arg::Ptr(logits),
        Arg::opt(per.bias.map(|b| b.0)),
        Arg::I32(per.bias.is_some_and(|b| b.1) as i32),
        Arg::opt(per.scale.map(|b| b.0)),
        Arg::I32(per.scale.is_some_and(|b| b.1) as i32),
        Arg::I32(tokens as i32),
        Arg::I32(experts as i32),
        Arg::I32(attrs.k as i32),
        Arg::I32(scoring),
        Arg::I32(attrs.normalize as i32),
        Arg::I32((attrs.tie_break == TieBreak::HigherIndex) as i32),
        Arg::I32(n_group),
        Arg::I32(topk_group),
        Arg::I32(group_max),
        Arg::F32(fill),
        Arg::I32((attrs.weights_from == WeightsFrom::Choice) as i32),
        Arg::F32(attrs.normalize_eps),
        Arg::F32(attrs.normalize_min),
        Arg::F32(attrs.scale),
        Arg::Ptr(weights),
        Arg::Ptr(indices),
    ];
    driver::launch(&f, (grid, 1), stream, &args, &name)
}

/// A router's per-expert inputs on the device: E values each and whether they are float32 (else
/// the logits' type), if any.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PerExpert {
    /// the selection bias
    pub bias: Option<(CUdeviceptr, bool)>,
    /// each chosen expert's weight scale
    pub scale: Option<(CUdeviceptr, bool)>,
}

/// Tokens per block of the router kernel (SMOE_ROUTER_WARPS: a warp per token).
const ROUTER_ROWS_PER_BLOCK: usize = 4;
