//! `CapacityMask` on the device: the routing kernels with the capacity, writing the kept mask
//! (`crate::cuda::forward::capacity_mask`).

use super::{DeviceIo, DeviceOp};
use crate::cuda::checks::CheckInfo;
use crate::cuda::driver::{CuResult, Device};
use crate::cuda::forward::{self, Launched, Plan};
use crate::signature::Signature;
use crate::spec::capacity_mask::{self, *};
use crate::spec::{IndexType, SpecError};
use cudarc::driver::sys::{CUdeviceptr, CUstream};

/// The op with its validated attributes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CapacityMaskOp(pub capacity_mask::Attrs);

/// One checked call: `tokens` x `k` routing indices over the attribute's experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaskCall {
    pub it: IndexType,
    pub tokens: usize,
    pub k: usize,
    pub experts: usize,
}

impl MaskCall {
    pub fn workspace_bytes(&self) -> usize {
        Plan::capacity_mask(self.tokens, self.k, self.experts).bytes
    }
}

impl DeviceOp for CapacityMaskOp {
    const NAME: &'static str = NAME;
    const CAPACITY: Option<usize> = Some(CAPACITY);
    type Call = MaskCall;

    fn check(&self, sig: &Signature) -> Result<MaskCall, SpecError> {
        super::all_known(NAME, sig)?;
        let it = check(&sig.types, &sig.shape_refs())?;
        let ri = sig.dims(ROUTING_INDICES);
        let k = *ri.last().expect("rank >= 2 by the check");
        Ok(MaskCall { it, tokens: ri[..ri.len() - 1].iter().product(), k, experts: self.0.num_experts })
    }

    fn output_shape(&self, _: &MaskCall, sig: &Signature) -> Vec<usize> {
        sig.dims(ROUTING_INDICES)
    }

    fn is_empty(&self, call: &MaskCall) -> bool {
        call.tokens == 0
    }

    fn workspace_bytes(&self, call: &MaskCall) -> usize {
        call.workspace_bytes()
    }

    fn check_capacity(&self, value: i64) -> Result<usize, SpecError> {
        check_capacity(value)
    }

    fn check_info(&self, call: &MaskCall, io: &DeviceIo) -> CuResult<CheckInfo> {
        Ok(CheckInfo { it: call.it, routing_indices: io.required(NAME, ROUTING_INDICES)?, k: call.k, experts: call.experts })
    }

    unsafe fn launch(
        &self,
        dev: &Device,
        stream: CUstream,
        call: &MaskCall,
        io: &DeviceIo,
        capacity: Option<usize>,
        ws: CUdeviceptr,
        error_to: Option<CUdeviceptr>,
    ) -> CuResult<Launched> {
        let idx = io.required(NAME, ROUTING_INDICES)?;
        let kept = io.output(NAME, 0)?;
        let capacity = capacity.ok_or_else(|| format!("{NAME}: input 'capacity' is required"))?;
        // SAFETY: `kept` holds one bool (one byte) per assignment.
        unsafe { forward::capacity_mask(dev, stream, &self.0, call.it, call.tokens, call.k, capacity, idx, ws, kept, error_to) }
    }
}
