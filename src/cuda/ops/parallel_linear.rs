//! `ParallelLinear` on the device: routing, one grouped GEMM, and the combine over k when gates
//! are given (`crate::cuda::forward::parallel_linear`).

use super::{known, DeviceIo, DeviceOp};
use crate::cuda::checks::CheckInfo;
use crate::cuda::driver::{CuResult, Device};
use crate::cuda::forward::{self, Launched, LinearPtrs, Plan, QuantW};
use crate::reference::LinearSizes;
use crate::signature::Signature;
use crate::spec::parallel_linear::{self, *};
use crate::spec::{ElemType, IndexType, Quant, SpecError};
use cudarc::driver::sys::{CUdeviceptr, CUstream};

/// The op with its validated attributes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ParallelLinearOp(pub parallel_linear::Attrs);

/// One checked call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearCall {
    pub elem: ElemType,
    pub it: IndexType,
    pub sizes: LinearSizes,
    /// whether the `gates` input is given (the outputs are then combined over k)
    pub gates: bool,
    /// how `W` is stored when quantized (its scale and zero point: inputs W_SCALE, W_ZERO_POINT)
    pub w: Option<Quant>,
}

impl LinearCall {
    pub fn workspace_bytes(&self) -> usize {
        Plan::parallel_linear(self.sizes, self.elem, self.gates).bytes
    }
}

impl DeviceOp for ParallelLinearOp {
    const NAME: &'static str = NAME;
    const CAPACITY: Option<usize> = None;
    type Call = LinearCall;

    fn check(&self, sig: &Signature) -> Result<LinearCall, SpecError> {
        super::all_known(NAME, sig)?;
        let (elem, it, d) = check(&self.0, &sig.types, &sig.shape_refs())?;
        super::check_quantized_on_gpu(NAME, elem, &[("W", d.w)])?;
        let sizes = LinearSizes { tokens: known(d.tokens), k: known(d.k), experts: known(d.experts), d_in: known(d.d_in), d_out: known(d.d_out) };
        Ok(LinearCall { elem, it, sizes, gates: d.has_gates, w: d.w })
    }

    fn output_shape(&self, call: &LinearCall, sig: &Signature) -> Vec<usize> {
        let rows = |r: &[usize]| r.iter().product();
        output_shape(&self.0, &sig.dims(ROUTING_INDICES), call.sizes.d_out, call.gates, rows)
    }

    fn is_empty(&self, call: &LinearCall) -> bool {
        call.sizes.tokens == 0
    }

    fn workspace_bytes(&self, call: &LinearCall) -> usize {
        call.workspace_bytes()
    }

    fn check_capacity(&self, value: i64) -> Result<usize, SpecError> {
        Ok(value.max(0) as usize) // (no capacity input)
    }

    fn check_info(&self, call: &LinearCall, io: &DeviceIo) -> CuResult<CheckInfo> {
        let s = call.sizes;
        Ok(CheckInfo { it: call.it, routing_indices: io.required(NAME, ROUTING_INDICES)?, k: s.k, experts: s.experts })
    }

    unsafe fn launch(
        &self,
        dev: &Device,
        stream: CUstream,
        call: &LinearCall,
        io: &DeviceIo,
        _capacity: Option<usize>,
        ws: CUdeviceptr,
        error_to: Option<CUdeviceptr>,
    ) -> CuResult<Launched> {
        let ptrs = LinearPtrs {
            x: io.required(NAME, X)?,
            routing_indices: io.required(NAME, ROUTING_INDICES)?,
            w: io.required(NAME, W)?,
            b: io.input(B),
            gates: io.input(GATES),
            w_quant: call.w.map(|quant| Ok::<_, String>(QuantW { quant, scale: io.required(NAME, W_SCALE)?, zero: io.input(W_ZERO_POINT) })).transpose()?,
        };
        let y = io.output(NAME, 0)?;
        // SAFETY: the caller's buffers have the call's shapes and types.
        unsafe { forward::parallel_linear(dev, stream, &self.0, call.elem, call.it, call.sizes, &ptrs, ws, y, None, error_to) }
    }
}
