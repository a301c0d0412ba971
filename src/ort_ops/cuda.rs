//! The ops on ONNX Runtime's CUDA execution provider: thin adapters over the device ops
//! (`crate::cuda::ops`). Each kernel hands the op its run-time signature, ORT's device pointers by
//! contract index, ORT's compute stream, and scratch from ORT's allocator for the inputs' device
//! (freed at the end of compute: ORT's arena is stream-ordered for its single compute stream). No
//! host synchronisation and no allocation of our own in compute, so a run can be captured into a
//! CUDA graph. The capacity input is declared a host input (one scalar the launches need).
//!
//! Bad routing indices: see `crate::cuda::checks` and docs/op-spec.md ("Execution providers").

use super::api::{AttrProbe, KernelContext, KernelInfo, Tensor};
use super::inputs::{compute_inputs, kernel_inputs, output_elem, signature, signature_before_run, to_string};
use super::op::{Kernel, OpDef};
use super::registry::{op_table, Kernels};
use crate::cuda::ops::{CapacityMaskOp, DeviceIo, DeviceOp, ParallelLinearOp, Runner, ScatterMoeOp};
use crate::signature::Signature;
use crate::spec::{capacity_mask, parallel_linear, scatter_moe, ElemType, Port, PortType, SpecError};
use cudarc::driver::sys::{CUdeviceptr, CUstream};

/// ONNX Runtime's name for its CUDA execution provider.
pub const CUDA_EP: &std::ffi::CStr = c"CUDAExecutionProvider";

/// One node's kernel: the device op (its attributes) and its runner (the checks between runs).
struct CudaKernel<O> {
    op: O,
    /// the input whose device the scratch is allocated on (the float input `X`, or the routing
    /// indices for CapacityMask)
    device_input: usize,
    /// the contract's type of the op's output (`T`, or bool for CapacityMask)
    output_ty: PortType,
    /// the contract's check of the inputs before each run: what the device path refuses
    /// (quantized weights, not served on the GPU yet) before the device op sees the call
    refuse: fn(&Signature) -> Result<(), SpecError>,
    runner: Runner,
}

impl<O: DeviceOp> CudaKernel<O> {
    /// Creates the kernel after the contract's check of what ORT knows of the inputs now.
    /// `refuse` runs at creation and before every run.
    fn create(op: O, ports: &[Port], output: &Port, device_input: usize, info: &KernelInfo, refuse: fn(&Signature) -> Result<(), SpecError>, check: impl FnOnce(&Signature) -> Result<(), SpecError>) -> Result<Box<dyn Kernel>, String>
    where
        O: Send + Sync + 'static,
    {
        let sig = signature_before_run(ports, &kernel_inputs(info)?);
        check(&sig).and_then(|_| refuse(&sig)).map_err(to_string)?;
        Ok(Box::new(CudaKernel { op, device_input, output_ty: output.ty, refuse, runner: Runner::default() }))
    }
}

impl<O: DeviceOp + Send + Sync> Kernel for CudaKernel<O> {
    fn compute(&self, ctx: &KernelContext) -> Result<(), String> {
        let ins = compute_inputs(ctx)?;
        let sig = signature(&ins);
        (self.refuse)(&sig).map_err(to_string)?;
        let call = self.op.check(&sig).map_err(to_string)?;
        let elem = output_elem(self.output_ty, sig.types.get(self.device_input).copied().flatten());
        let y = ctx.output(0, &self.op.output_shape(&call, &sig), elem)?.ok_or("output 0 is required")?;
        let capacity = O::CAPACITY.and_then(|i| ins.get(i)?.as_ref());
        let io = DeviceIo {
            // the capacity is in host memory: it travels as a value, not a pointer
            inputs: ins.iter().enumerate().map(|(i, t)| t.as_ref().filter(|_| Some(i) != O::CAPACITY).map(dptr)).collect(),
            outputs: vec![y as CUdeviceptr],
            // SAFETY: checked int64 with one element; declared a host input (OrtMemTypeCPUInput).
            host_capacity: capacity.map(|c| unsafe { c.slice::<i64>() }[0]),
        };
        let stream = ctx.gpu_stream()? as CUstream;
        let scratch = |bytes: usize| {
            let id = ctx.input_device_id(self.device_input)?.unwrap_or(0);
            let block = ctx.allocator(c"Cuda", id)?.alloc(bytes)?;
            Ok((block.ptr as CUdeviceptr, block))
        };
        // SAFETY: ORT's tensors have the shapes and types the check established, on its stream's
        // device; the scratch block is freed after the launches are enqueued (ORT's arena hands it
        // out again only to work ordered after ours on the same stream).
        unsafe { self.runner.run(&self.op, &call, &io, stream, scratch) }
    }
}

fn dptr(t: &Tensor) -> CUdeviceptr {
    t.data as CUdeviceptr
}

/// A quantized weight (docs/op-spec.md, "Quantized expert weights") has no CUDA path yet: refused
/// by name, where the weight's element type is known, before anything is launched.
fn no_quantized_weights(op: &'static str, ports: &[Port], sig: &Signature) -> Result<(), SpecError> {
    for (p, ty) in ports.iter().zip(&sig.types) {
        if let (PortType::Weight, Some(code)) = (p.ty, *ty) {
            if ElemType::from_onnx_code(code).is_none() {
                return Err(SpecError {
                    op,
                    message: format!(
                        "input '{}' is {}: quantized weights are not supported on the CUDA execution provider yet (the CPU execution provider runs them)",
                        p.name,
                        crate::spec::onnx_type_name(code)
                    ),
                });
            }
        }
    }
    Ok(())
}

fn moe_refuse(sig: &Signature) -> Result<(), SpecError> {
    no_quantized_weights(scatter_moe::NAME, &scatter_moe::INPUTS, sig)
}

fn linear_refuse(sig: &Signature) -> Result<(), SpecError> {
    no_quantized_weights(parallel_linear::NAME, &parallel_linear::INPUTS, sig)
}

fn create_moe(info: &KernelInfo) -> Result<Box<dyn Kernel>, String> {
    info.check_attr_types(scatter_moe::NAME, &scatter_moe::ATTRS)?;
    let attrs = scatter_moe::Attrs::parse(info).map_err(to_string)?;
    CudaKernel::create(ScatterMoeOp(attrs), &scatter_moe::INPUTS, &scatter_moe::OUTPUTS[0], scatter_moe::X, info, moe_refuse, |sig| {
        scatter_moe::check(&attrs, &sig.types, &sig.shape_refs()).map(drop)
    })
}

fn create_linear(info: &KernelInfo) -> Result<Box<dyn Kernel>, String> {
    info.check_attr_types(parallel_linear::NAME, &parallel_linear::ATTRS)?;
    let attrs = parallel_linear::Attrs::parse(info).map_err(to_string)?;
    CudaKernel::create(ParallelLinearOp(attrs), &parallel_linear::INPUTS, &parallel_linear::OUTPUTS[0], parallel_linear::X, info, linear_refuse, |sig| {
        parallel_linear::check(&attrs, &sig.types, &sig.shape_refs()).map(drop)
    })
}

fn create_mask(info: &KernelInfo) -> Result<Box<dyn Kernel>, String> {
    info.check_attr_types(capacity_mask::NAME, &capacity_mask::ATTRS)?;
    let attrs = capacity_mask::Attrs::parse(info).map_err(to_string)?;
    CudaKernel::create(CapacityMaskOp(attrs), &capacity_mask::INPUTS, &capacity_mask::OUTPUTS[0], capacity_mask::ROUTING_INDICES, info, |_| Ok(()), |sig| {
        capacity_mask::check(&sig.types, &sig.shape_refs()).map(drop)
    })
}

/// The CUDA execution provider's ops, registered like the CPU ones; the capacity input stays in host
/// memory (one scalar the launch parameters need).
pub(super) fn ops() -> Vec<OpDef> {
    op_table(Kernels { execution_provider: Some(CUDA_EP), moe: create_moe, linear: create_linear, mask: create_mask, capacity_on_host: true })
}

#[cfg(test)]
mod tests {
    use crate::signature::Signature;
    use crate::spec::scatter_moe;

    #[test]
    fn quantized_weights_are_refused_by_name() {
        let mut types = vec![Some(1), Some(1), Some(7), Some(17), Some(1), None, None, None, Some(1)];
        let sig = Signature { types: types.clone(), shapes: vec![None; types.len()] };
        let e = super::moe_refuse(&sig).unwrap_err().to_string();
        assert_eq!(e, "ScatterMoE: input 'w_in' is float8e4m3fn: quantized weights are not supported on the CUDA execution provider yet (the CPU execution provider runs them)");
        types[scatter_moe::W_IN] = Some(1);
        assert!(super::moe_refuse(&Signature { types, shapes: vec![] }).is_ok());
        let sig = Signature { types: vec![Some(10), Some(7), Some(2)], shapes: vec![] };
        assert!(super::linear_refuse(&sig).unwrap_err().to_string().starts_with("ParallelLinear: input 'W' is uint8:"));
    }

    /// Creating the CUDA ops and asking for the driver must not panic without a GPU.
    #[test]
    fn no_driver_is_an_error_not_a_panic() {
        let n = crate::cuda::driver::device_count();
        if n == 0 {
            assert!(crate::cuda::driver::driver().is_err() || n == 0);
        }
    }
}
