//! `TopKRouter` on the device: one launch (`crate::cuda::forward::topk_router`). It reads no
//! routing indices and needs no workspace, so it has none of the other ops' run checks: a
//! runtime adapter calls [`TopKRouterOp::check`] and [`TopKRouterOp::run`] directly.

use crate::cuda::driver;
use crate::cuda::forward;
use crate::signature::Signature;
use crate::spec::topk_router::{self, *};
use crate::spec::{ElemType, SpecError};
use cudarc::driver::sys::{CUdeviceptr, CUstream};

/// The op with its validated attributes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TopKRouterOp(pub topk_router::Attrs);

/// One checked call: `tokens` rows of `experts` logits in `t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouterCall {
    pub t: ElemType,
    pub tokens: usize,
    pub experts: usize,
}

impl TopKRouterOp {
    pub const NAME: &'static str = NAME;

    /// The contract's check of a run-time signature.
    pub fn check(&self, sig: &Signature) -> Result<RouterCall, SpecError> {
        super::all_known(NAME, sig)?;
        let (t, dims) = check(&self.0, &sig.types, &sig.shape_refs())?;
        Ok(RouterCall { t, tokens: super::known(dims.tokens), experts: super::known(dims.experts) })
    }

    /// Both outputs' shape.
    pub fn output_shape(&self, sig: &Signature) -> Vec<usize> {
        output_shape(&self.0, &sig.dims(LOGITS), |k| k)
    }

    /// The launch on `stream`, with its context made current. Errors name the op.
    ///
    /// # Safety
    /// `stream` must be null or live; `logits` must hold the call's [tokens, E] in `t`, `per`'s
    /// inputs (if any) E values each in float32 (its flag true) or `t`, `weights` [tokens, k] in `t` and `indices`
    /// [tokens, k] int64, on `stream`'s device.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn run(
        &self,
        call: &RouterCall,
        logits: CUdeviceptr,
        per: forward::PerExpert,
        weights: CUdeviceptr,
        indices: CUdeviceptr,
        stream: CUstream,
    ) -> Result<(), String> {
        let named = |e: String| if e.starts_with(NAME) { e } else { format!("{NAME}: {e}") };
        if call.tokens == 0 {
            return Ok(());
        }
        // SAFETY: the caller's stream is live for the call.
        let (dev, _current) = unsafe { driver::for_stream(stream) }.map_err(named)?;
        unsafe { forward::topk_router(dev, stream, &self.0, call.t, call.tokens, call.experts, logits, per, weights, indices) }.map_err(named)
    }
}
