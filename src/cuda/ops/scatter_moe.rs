//! `ScatterMoE` on the device: routing, GEMM1 with the activation fused, GEMM2, combine
//! (`crate::cuda::forward::scatter_moe`).

use super::{known, DeviceIo, DeviceOp};
use crate::cuda::checks::CheckInfo;
use crate::cuda::driver::{CuResult, Device};
use crate::cuda::forward::{self, Launched, MoePtrs, Plan, QuantW};
use crate::reference::MoeSizes;
use crate::signature::Signature;
use crate::spec::scatter_moe::{self, *};
use crate::spec::{ElemType, IndexType, Quant, SpecError};
use cudarc::driver::sys::{CUdeviceptr, CUstream};

/// The op with its validated attributes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScatterMoeOp(pub scatter_moe::Attrs);

/// One checked call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoeCall {
    pub elem: ElemType,
    pub it: IndexType,
    pub sizes: MoeSizes,
    /// whether the `capacity` input is given
    pub capacity: bool,
    /// how `w_in` and `w_out` are stored when quantized (their scales and zero points are inputs
    /// W_IN_SCALE.. of the call)
    pub w_in: Option<Quant>,
    pub w_out: Option<Quant>,
}

impl MoeCall {
    pub fn workspace_bytes(&self) -> usize {
        Plan::scatter_moe(self.sizes, self.elem, self.capacity).bytes
    }
}

impl DeviceOp for ScatterMoeOp {
    const NAME: &'static str = NAME;
    const CAPACITY: Option<usize> = Some(CAPACITY);
    type Call = MoeCall;

    fn check(&self, sig: &Signature) -> Result<MoeCall, SpecError> {
        super::all_known(NAME, sig)?;
        let (elem, it, d) = check(&self.0, &sig.types, &sig.shape_refs())?;
        super::check_quantized_on_gpu(NAME, elem, &[("w_in", d.w_in), ("w_out", d.w_out)])?;
        let sizes = MoeSizes { tokens: known(d.tokens), k: known(d.k), experts: known(d.experts), d: known(d.d), f: known(d.f) };
        Ok(MoeCall { elem, it, sizes, capacity: sig.has(CAPACITY), w_in: d.w_in, w_out: d.w_out })
    }

    fn output_shape(&self, _: &MoeCall, sig: &Signature) -> Vec<usize> {
        output_shape(&sig.dims(X))
    }

    fn is_empty(&self, call: &MoeCall) -> bool {
        call.sizes.tokens == 0
    }

    fn workspace_bytes(&self, call: &MoeCall) -> usize {
        call.workspace_bytes()
    }

    fn check_capacity(&self, value: i64) -> Result<usize, SpecError> {
        check_capacity(value)
    }

    fn check_info(&self, call: &MoeCall, io: &DeviceIo) -> CuResult<CheckInfo> {
        let s = call.sizes;
        Ok(CheckInfo { it: call.it, routing_indices: io.required(NAME, ROUTING_INDICES)?, k: s.k, experts: s.experts })
    }

    unsafe fn launch(
        &self,
        dev: &Device,
        stream: CUstream,
        call: &MoeCall,
        io: &DeviceIo,
        capacity: Option<usize>,
        ws: CUdeviceptr,
        error_to: Option<CUdeviceptr>,
    ) -> CuResult<Launched> {
        // a quantized weight's scale is present (the contract's check), its zero point optional
        let quant = |q: Option<Quant>, scale: usize, zero: usize| -> CuResult<Option<QuantW>> {
            q.map(|quant| Ok(QuantW { quant, scale: io.required(NAME, scale)?, zero: io.input(zero) })).transpose()
        };
        let ptrs = MoePtrs {
            x: io.required(NAME, X)?,
            routing_weights: io.required(NAME, ROUTING_WEIGHTS)?,
            routing_indices: io.required(NAME, ROUTING_INDICES)?,
            w_in: io.required(NAME, W_IN)?,
            w_out: io.required(NAME, W_OUT)?,
            b_in: io.input(B_IN),
            b_out: io.input(B_OUT),
            w_in_quant: quant(call.w_in, W_IN_SCALE, W_IN_ZERO_POINT)?,
            w_out_quant: quant(call.w_out, W_OUT_SCALE, W_OUT_ZERO_POINT)?,
        };
        let y = io.output(NAME, Y)?;
        // SAFETY: the caller's buffers have the call's shapes and types.
        unsafe { forward::scatter_moe(dev, stream, &self.0, call.elem, call.it, call.sizes, capacity, &ptrs, ws, y, (None, None), error_to) }
    }
}
