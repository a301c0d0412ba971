//! The device ops: one struct per op (`ScatterMoeOp`, `ParallelLinearOp`, `CapacityMaskOp`)
//! implementing [`DeviceOp`] (and `TopKRouterOp`, one launch without routing checks or workspace), the only place where an op's checked signature becomes sizes,
//! workspace and launch arguments. A runtime adapter (ONNX Runtime's CUDA kernels in
//! `crate::ort_ops::cuda`, the TensorRT plugin's enqueue in plugins/tensorrt/src/plugin/) hands
//! in attributes, a [`Signature`], device pointers by contract index ([`DeviceIo`]), a workspace
//! and a stream; a [`Runner`] (one per kernel object) does the rest: the contract's check, the
//! launches on that stream, and the asynchronous checks of the routing indices (`super::checks`)
//! around them.
//! Nothing here knows either runtime.

mod capacity_mask;
mod parallel_linear;
mod scatter_moe;
mod topk_router;

pub use capacity_mask::{CapacityMaskOp, MaskCall};
pub use parallel_linear::{LinearCall, ParallelLinearOp};
pub use scatter_moe::{MoeCall, ScatterMoeOp};
pub use topk_router::{RouterCall, TopKRouterOp};

use super::checks::{CheckInfo, RunChecks};
use super::driver::{self, CuResult, Device};
use super::forward::Launched;
use crate::signature::Signature;
use crate::spec::{ElemType, Quant, SpecError};
use cudarc::driver::sys;
/// The device pointer and stream types of this interface (the CUDA driver API's), for adapters
/// outside the crate.
pub use cudarc::driver::sys::{CUdeviceptr, CUstream};
use std::sync::Mutex;

/// The device buffers of one call, by contract index.
#[derive(Debug, Clone, Default)]
pub struct DeviceIo {
    /// each input's device pointer (None: the input is absent, or, for `capacity`, held on the host)
    pub inputs: Vec<Option<CUdeviceptr>>,
    /// each output's device pointer
    pub outputs: Vec<CUdeviceptr>,
    /// the `capacity` scalar when the runtime keeps it in host memory (ONNX Runtime's CUDA EP
    /// declares it a CPU input); None: it is read from its device pointer in `inputs` (one wait for
    /// the stream, refused under CUDA graph capture)
    pub host_capacity: Option<i64>,
}

impl DeviceIo {
    fn input(&self, i: usize) -> Option<CUdeviceptr> {
        self.inputs.get(i).copied().flatten()
    }

    /// A required input's pointer (present by the contract's check).
    fn required(&self, op: &'static str, i: usize) -> CuResult<CUdeviceptr> {
        self.input(i).ok_or_else(|| format!("{op}: no device pointer for required input {i}"))
    }

    fn output(&self, op: &'static str, i: usize) -> CuResult<CUdeviceptr> {
        self.outputs.get(i).copied().ok_or_else(|| format!("{op}: no device pointer for output {i}"))
    }
}

/// One op on the device. `check` turns a run-time signature (every dimension known) into a
/// [`DeviceOp::Call`]; everything after that reads only the call and the buffers.
pub trait DeviceOp {
    /// The op name (for messages).
    const NAME: &'static str;
    /// The contract index of the `capacity` input, when the op has one.
    const CAPACITY: Option<usize>;
    /// What the contract's check established about one call: types and sizes.
    type Call: Copy + std::fmt::Debug;

    /// The contract's check of a run-time signature.
    fn check(&self, sig: &Signature) -> Result<Self::Call, SpecError>;
    /// The shape of the (only) output.
    fn output_shape(&self, call: &Self::Call, sig: &Signature) -> Vec<usize>;
    /// Whether the call has nothing to compute (no tokens): nothing is launched.
    fn is_empty(&self, call: &Self::Call) -> bool;
    /// Workspace bytes the launches need.
    fn workspace_bytes(&self, call: &Self::Call) -> usize;
    /// The capacity value's own check (the contract's message for a negative one).
    fn check_capacity(&self, value: i64) -> Result<usize, SpecError>;
    /// What the routing kernels' error words are checked against.
    fn check_info(&self, call: &Self::Call, io: &DeviceIo) -> CuResult<CheckInfo>;
    /// The launches on `stream`, with `ws` of [`workspace_bytes`](Self::workspace_bytes).
    ///
    /// # Safety
    /// The buffers of `io` must have the shapes and types of `call`, on `stream`'s context, whose
    /// [`Device`] `dev` is; `ws` must hold the workspace; `error_to` null or two mapped int32 words.
    #[allow(clippy::too_many_arguments)]
    unsafe fn launch(
        &self,
        dev: &Device,
        stream: CUstream,
        call: &Self::Call,
        io: &DeviceIo,
        capacity: Option<usize>,
        ws: CUdeviceptr,
        error_to: Option<CUdeviceptr>,
    ) -> CuResult<Launched>;
}

/// What every kernel object (an ONNX Runtime kernel, a TensorRT plugin) keeps between runs: the
/// checks of bad routing indices (a lock: a runtime may call one kernel from several threads).
#[derive(Default)]
pub struct Runner {
    checks: Mutex<RunChecks>,
}

impl Runner {
    /// Runs `op` for `call` on `stream`: the capacity read and checked, `workspace(bytes)` asked
    /// for its scratch (its guard `G` is kept until the launches are enqueued and checked), the
    /// launches made with `stream`'s context current, the routing indices checked around them.
    /// Errors name the op.
    ///
    /// # Safety
    /// `stream` must be null or live; the buffers of `io` as [`DeviceOp::launch`] needs them, and
    /// the workspace's memory usable by work enqueued on `stream` until the guard drops.
    pub unsafe fn run<O: DeviceOp, G>(
        &self,
        op: &O,
        call: &O::Call,
        io: &DeviceIo,
        stream: CUstream,
        workspace: impl FnOnce(usize) -> Result<(CUdeviceptr, G), String>,
    ) -> Result<(), String> {
        let name = O::NAME;
        let named = |e: String| if e.starts_with(name) { e } else { format!("{name}: {e}") };
        // A host scalar costs nothing to check, so even an empty call checks it (as on the CPU).
        let host_capacity = match (O::CAPACITY, io.host_capacity) {
            (Some(_), Some(v)) => Some(op.check_capacity(v).map_err(|e| e.to_string())?),
            _ => None,
        };
        if op.is_empty(call) {
            return Ok(());
        }
        let capacity = match (host_capacity, O::CAPACITY.and_then(|i| io.input(i))) {
            (Some(c), _) => Some(c),
            (None, Some(p)) => Some(op.check_capacity(read_device_i64(name, stream, p)?).map_err(|e| e.to_string())?),
            (None, None) => None,
        };
        let info = op.check_info(call, io).map_err(named)?;
        // SAFETY: the caller's stream is live for the call.
        let (dev, _current) = unsafe { driver::for_stream(stream) }.map_err(named)?;
        let capturing = unsafe { driver::is_capturing(stream) }.map_err(named)?;
        let mut checks = self.checks.lock().unwrap_or_else(|p| p.into_inner());
        let slot = checks.before(name, dev.ctx, capturing)?;
        let (ws, _guard) = workspace(op.workspace_bytes(call))?;
        let launched = unsafe { op.launch(dev, stream, call, io, capacity, ws, slot.map(|s| s.1)) }.map_err(named)?;
        // SAFETY: the launches are on `stream`; their error words live in the workspace (kept by
        // `_guard`) or the slot, and the indices are an input of this call.
        unsafe { checks.after(name, stream, capturing, slot, launched.error, &info) }
    }
}

/// Reads an int64 input held on the device: one wait for `stream` and an 8-byte copy (which CUDA
/// graph capture does not allow, so refused there).
fn read_device_i64(op: &'static str, stream: CUstream, p: CUdeviceptr) -> Result<i64, String> {
    let ctx = |e: String| format!("{op}: {e}");
    // SAFETY: the caller's stream is live for the call.
    let (_, _current) = unsafe { driver::stream_context(stream) }.map_err(ctx)?;
    if unsafe { driver::is_capturing(stream) }.map_err(ctx)? {
        return Err(format!(
            "{op}: input 'capacity' is read on the host (one wait for the stream per run), which CUDA graph capture does not allow"
        ));
    }
    let mut v = 0i64;
    // SAFETY: `p` holds one int64 (checked shape); the stream is waited for first.
    unsafe {
        driver::check(sys::cuStreamSynchronize(stream), "cuStreamSynchronize").map_err(ctx)?;
        driver::check(sys::cuMemcpyDtoH_v2((&mut v as *mut i64).cast(), p, 8), "cuMemcpyDtoH(capacity)").map_err(ctx)?;
    }
    Ok(v)
}

/// Every dimension of a run-time signature must be known (a runtime that calls with a dimension
/// left open is told so, not trusted).
fn all_known(op: &'static str, sig: &Signature) -> Result<(), SpecError> {
    match sig.shapes.iter().position(|s| s.as_ref().is_some_and(|s| s.iter().any(Option::is_none))) {
        None => Ok(()),
        Some(i) => Err(SpecError { op, message: format!("input {i} has a dimension not known at run time") }),
    }
}

/// The GPU serves quantized weights with `T` = float16 or bfloat16, the tensor cores' operand types
/// (kernels/quant_gemm.cu): float32 with a quantized weight is refused, naming the weight.
/// `weights`: (input name, how the contract's check found it stored).
pub fn check_quantized_on_gpu(op: &'static str, elem: ElemType, weights: &[(&str, Option<Quant>)]) -> Result<(), SpecError> {
    match weights.iter().find(|w| w.1.is_some()) {
        Some((name, Some(q))) if elem == ElemType::F32 => Err(SpecError {
            op,
            message: format!(
                "input '{name}' is {}: the CUDA kernels take quantized weights with T = float16 or bfloat16, not float32 (the CPU execution provider runs float32)",
                q.format.name()
            ),
        }),
        _ => Ok(()),
    }
}

/// A dimension [`all_known`] has established as known.
fn known(d: crate::spec::Dim) -> usize {
    d.map_or(0, |v| v as usize)
}

#[cfg(test)]
mod tests;
