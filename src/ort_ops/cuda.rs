//! The ops on ONNX Runtime's CUDA execution provider: thin adapters over the device ops
//! (`crate::cuda::ops`). Each kernel hands the op its run-time signature, ORT's device pointers by
//! contract index, ORT's compute stream, and scratch from ORT's allocator for the inputs' device
//! (freed at the end of compute: ORT's arena is stream-ordered for its single compute stream). No
//! host synchronisation and no allocation of our own in compute, so a run can be captured into a
//! CUDA graph. The capacity input is declared a host input (one scalar the launches need).
//!
//! Bad routing indices: see `crate::cuda::checks` and docs/op-spec.md ("Execution providers").

use super::api::{KernelContext, KernelInfo, Tensor};
use super::attrs::AttrProbe;
use super::inputs::{compute_inputs, kernel_inputs, output_elem, signature, signature_before_run, to_string};
use super::op::{Kernel, OpDef};
use super::registry::{op_table, Kernels};
use crate::cuda::ops::{check_quantized_on_gpu, CapacityMaskOp, DeviceIo, DeviceOp, ParallelLinearOp, Runner, ScatterMoeOp, TopKRouterOp};
use crate::cuda::forward::PerExpert;
use crate::signature::Signature;
use crate::spec::{capacity_mask, parallel_linear, scatter_moe, topk_router, Port, PortType, SpecError};
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
    runner: Runner,
}

impl<O: DeviceOp> CudaKernel<O> {
    /// Creates the kernel after the contract's check of what ORT knows of the inputs now, and what
    /// the GPU refuses of it (a quantized weight with T = float32): before each run, the device
    /// op's check does both again on the run's signature.
    fn create(op: O, ports: &[Port], output: &Port, device_input: usize, info: &KernelInfo, check: impl FnOnce(&Signature) -> Result<(), SpecError>) -> Result<Box<dyn Kernel>, String>
    where
        O: Send + Sync + 'static,
    {
        let sig = signature_before_run(ports, &kernel_inputs(info)?);
        check(&sig).map_err(to_string)?;
        Ok(Box::new(CudaKernel { op, device_input, output_ty: output.ty, runner: Runner::default() }))
    }
}

impl<O: DeviceOp + Send + Sync> Kernel for CudaKernel<O> {
    fn compute(&self, ctx: &KernelContext) -> Result<(), String> {
        let ins = compute_inputs(ctx)?;
        let sig = signature(&ins);
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

/// What the GPU path checks of a ScatterMoE node before it runs: the contract, then the GPU's own
/// refusal (a quantized weight with T = float32).
fn check_moe(attrs: &scatter_moe::Attrs, sig: &Signature) -> Result<(), SpecError> {
    let (t, _, d) = scatter_moe::check(attrs, &sig.types, &sig.shape_refs())?;
    check_quantized_on_gpu(scatter_moe::NAME, t, &[("w_in", d.w_in), ("w_out", d.w_out)])
}

fn check_linear(attrs: &parallel_linear::Attrs, sig: &Signature) -> Result<(), SpecError> {
    let (t, _, d) = parallel_linear::check(attrs, &sig.types, &sig.shape_refs())?;
    check_quantized_on_gpu(parallel_linear::NAME, t, &[("W", d.w)])
}

fn create_moe(info: &KernelInfo) -> Result<Box<dyn Kernel>, String> {
    info.check_attr_types(scatter_moe::NAME, &scatter_moe::ATTRS)?;
    let attrs = scatter_moe::Attrs::parse(info).map_err(to_string)?;
    CudaKernel::create(ScatterMoeOp(attrs), &scatter_moe::INPUTS, &scatter_moe::OUTPUTS[0], scatter_moe::X, info, |sig| check_moe(&attrs, sig))
}

fn create_linear(info: &KernelInfo) -> Result<Box<dyn Kernel>, String> {
    info.check_attr_types(parallel_linear::NAME, &parallel_linear::ATTRS)?;
    let attrs = parallel_linear::Attrs::parse(info).map_err(to_string)?;
    CudaKernel::create(ParallelLinearOp(attrs), &parallel_linear::INPUTS, &parallel_linear::OUTPUTS[0], parallel_linear::X, info, |sig| check_linear(&attrs, sig))
}

fn create_mask(info: &KernelInfo) -> Result<Box<dyn Kernel>, String> {
    info.check_attr_types(capacity_mask::NAME, &capacity_mask::ATTRS)?;
    let attrs = capacity_mask::Attrs::parse(info).map_err(to_string)?;
    CudaKernel::create(CapacityMaskOp(attrs), &capacity_mask::INPUTS, &capacity_mask::OUTPUTS[0], capacity_mask::ROUTING_INDICES, info, |sig| {
        capacity_mask::check(&sig.types, &sig.shape_refs()).map(drop)
    })
}

/// `TopKRouter`: the contract's check, the two outputs, one launch on ORT's stream.
struct RouterCuda(TopKRouterOp);

fn create_router(info: &KernelInfo) -> Result<Box<dyn Kernel>, String> {
    info.check_attr_types(topk_router::NAME, &topk_router::ATTRS)?;
    let attrs = topk_router::Attrs::parse(info).map_err(to_string)?;
    let sig = signature_before_run(&topk_router::INPUTS, &kernel_inputs(info)?);
    topk_router::check(&attrs, &sig.types, &sig.shape_refs()).map_err(to_string)?;
    Ok(Box::new(RouterCuda(TopKRouterOp(attrs))))
}

impl Kernel for RouterCuda {
    fn compute(&self, ctx: &KernelContext) -> Result<(), String> {
        let ins = compute_inputs(ctx)?;
        let sig = signature(&ins);
        let call = self.0.check(&sig).map_err(to_string)?;
        let out = self.0.output_shape(&sig);
        let w = ctx.output(topk_router::ROUTING_WEIGHTS, &out, call.t.onnx_code())?.ok_or("output 'routing_weights' is required")?;
        let i = ctx.output(topk_router::ROUTING_INDICES, &out, 7)?.ok_or("output 'routing_indices' is required")?;
        let logits = dptr(ins[topk_router::LOGITS].as_ref().unwrap());
        // the selection bias and the expert scale: float32 (element type 1) or T, as the check established
        let per_expert = |i: usize| ins.get(i).and_then(Option::as_ref).map(|b| (dptr(b), b.elem == 1));
        let per = PerExpert { bias: per_expert(topk_router::BIAS), scale: per_expert(topk_router::EXPERT_SCALE) };
        let stream = ctx.gpu_stream()? as CUstream;
        // SAFETY: ORT's tensors have the shapes and types the check established, on its stream's device.
        unsafe { self.0.run(&call, logits, per, w as CUdeviceptr, i as CUdeviceptr, stream) }
    }
}

/// The CUDA execution provider's ops, registered like the CPU ones; the capacity input stays in host
/// memory (one scalar the launch parameters need).
pub(super) fn ops() -> Vec<OpDef> {
    op_table(Kernels { execution_provider: Some(CUDA_EP), moe: create_moe, linear: create_linear, mask: create_mask, router: create_router, capacity_on_host: true })
}

#[cfg(test)]
mod tests {
    use crate::signature::Signature;
    use crate::spec::{parallel_linear, scatter_moe};

    /// Quantized weights pass the GPU path's checks with T = float16 / bfloat16; with float32 they
    /// are refused by name (at session creation where the types are known, and before each run).
    #[test]
    fn quantized_weights_run_with_16_bit_t_and_are_refused_by_name_with_float32() {
        let attrs = scatter_moe::Attrs { gated: true, ..Default::default() };
        // X [3, 8], routing [3, 2], w_in fp8 [4, 12, 8] (per-channel scale [4, 12]), w_out in T [4, 8, 6]
        let sig = |t: i32, scale: i32| {
            Signature::at_run([
                Some((t, vec![3, 8])),
                Some((t, vec![3, 2])),
                Some((7, vec![3, 2])),
                Some((17, vec![4, 12, 8])),
                Some((t, vec![4, 8, 6])),
                None,
                None,
                None,
                Some((scale, vec![4, 12])),
            ])
        };
        for (t, scale) in [(10, 10), (10, 1), (16, 1), (16, 16)] {
            super::check_moe(&attrs, &sig(t, scale)).unwrap();
        }
        let e = super::check_moe(&attrs, &sig(1, 1)).unwrap_err().to_string();
        assert_eq!(e, "ScatterMoE: input 'w_in' is float8e4m3fn: the CUDA kernels take quantized weights with T = float16 or bfloat16, not float32 (the CPU execution provider runs float32)");
        // the contract's own errors come first (a scale of another type than T or float32)
        let e = super::check_moe(&attrs, &sig(10, 16)).unwrap_err().to_string();
        assert!(e.contains("w_in_scale"), "{e}");
        let lin = parallel_linear::Attrs { quant: crate::spec::QuantAttrs { weight_bits: 4, block_size: None }, ..Default::default() };
        let sig = |t: i32| Signature::at_run([Some((t, vec![6, 8])), Some((6, vec![6, 2])), Some((2, vec![3, 5, 4])), None, None, Some((t, vec![3, 5]))]);
        super::check_linear(&lin, &sig(16)).unwrap();
        assert!(super::check_linear(&lin, &sig(1)).unwrap_err().to_string().starts_with("ParallelLinear: input 'W' is uint8 (weight_bits = 4):"));
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
