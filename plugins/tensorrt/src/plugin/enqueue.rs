//! `enqueue`: the device ops (`scattermoe::cuda::ops`) on TensorRT's stream, with the workspace
//! TensorRT hands in. This adapter only describes TensorRT's buffers to the op layer (a
//! [`Signature`] and the device pointers by contract index); the op layer checks, launches and
//! checks the routing indices. The `capacity` input stays on the device, where the op reads it
//! (one wait for the stream). Bad routing indices are reported as on ONNX Runtime's CUDA EP
//! (`scattermoe::cuda::checks`): by the next run, or by the run itself with
//! `SCATTERMOE_CUDA_SYNC_CHECKS=1`.

use super::{known, Attrs, Plugin};
use crate::bridge::TensorDesc;
use crate::codes::onnx_code;
use scattermoe::cuda::ops::{CUdeviceptr, CUstream, CapacityMaskOp, DeviceIo, DeviceOp, ParallelLinearOp, Runner, ScatterMoeOp};
use scattermoe::signature::Signature;

impl Plugin {
    /// Runs the op on `stream` (a `cudaStream_t`) with TensorRT's device pointers and workspace.
    ///
    /// # Safety
    /// The pointers must be TensorRT's device buffers for `inputs` / `outputs` (as described) and a
    /// workspace of at least [`Plugin::workspace_size`] bytes for these shapes, usable on `stream`.
    pub unsafe fn enqueue(
        &mut self,
        inputs: &[TensorDesc],
        outputs: &[TensorDesc],
        input_ptrs: &[u64],
        output_ptrs: &[u64],
        workspace: u64,
        stream: u64,
    ) -> Result<(), String> {
        let op = self.name();
        self.check_descs(inputs).map_err(|e| e.to_string())?;
        self.check_outputs(outputs.len()).map_err(|e| e.to_string())?;
        if input_ptrs.len() != inputs.len() || output_ptrs.len() != outputs.len() {
            return Err(format!(
                "{op}: {} input and {} output pointers for {} inputs and {} outputs",
                input_ptrs.len(),
                output_ptrs.len(),
                inputs.len(),
                outputs.len()
            ));
        }
        let sig = Signature {
            types: inputs.iter().map(|d| Some(onnx_code(d.data_type))).collect(),
            shapes: inputs.iter().map(|d| Some(known(&d.dims))).collect(),
        };
        // TensorRT keeps every input on the device, the capacity too (read there by the op).
        let io = DeviceIo {
            inputs: input_ptrs.iter().map(|&p| Some(p as CUdeviceptr)).collect(),
            outputs: output_ptrs.iter().map(|&p| p as CUdeviceptr).collect(),
            host_capacity: None,
        };
        let stream = stream as CUstream;
        let runner = &self.runner;
        // SAFETY: TensorRT's buffers and workspace, as the caller promises, on its live stream.
        unsafe fn run<O: DeviceOp>(
            runner: &Runner,
            op: O,
            sig: &Signature,
            io: &DeviceIo,
            stream: CUstream,
            ws: u64,
        ) -> Result<(), String> {
            let call = op.check(sig).map_err(|e| e.to_string())?;
            unsafe { runner.run(&op, &call, io, stream, |_| Ok((ws as CUdeviceptr, ()))) }
        }
        match self.attrs {
            Attrs::Moe(a) => run(runner, ScatterMoeOp(a), &sig, &io, stream, workspace),
            Attrs::Linear(a) => run(runner, ParallelLinearOp(a), &sig, &io, stream, workspace),
            Attrs::Mask(a) => run(runner, CapacityMaskOp(a), &sig, &io, stream, workspace),
        }
    }
}
