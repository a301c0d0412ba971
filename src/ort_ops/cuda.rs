//! The ops on ONNX Runtime's CUDA execution provider: contract checks from `spec` (host-side,
//! from shapes, as on the CPU EP), launches from `crate::cuda::forward` on ORT's compute stream
//! with device pointers, scratch from ORT's allocator for the inputs' device (freed at the end of
//! compute: ORT's arena is stream-ordered for its single compute stream). No host synchronisation
//! and no allocation of our own in compute, so a run can be captured into a CUDA graph.
//!
//! Bad routing indices: see `crate::cuda::checks` and docs/op-spec.md ("Execution providers").

use super::api::{KernelContext, KernelInfo, Tensor};
use super::cpu::{compute_inputs, kernel_inputs, known, op_table, to_string, Kernels, Signature};
use super::op::{Kernel, OpDef};
use crate::cuda::checks::{CheckInfo, RunChecks};
use crate::cuda::driver::{self, CuResult, Device};
use crate::cuda::forward::{self, Launched, LinearPtrs, MoePtrs, Plan};
use crate::reference::{LinearSizes, MoeSizes};
use crate::spec::{capacity_mask, parallel_linear, scatter_moe};
use cudarc::driver::sys::{CUdeviceptr, CUstream};
use std::sync::Mutex;

/// ONNX Runtime's name for its CUDA execution provider.
pub const CUDA_EP: &std::ffi::CStr = c"CUDAExecutionProvider";

fn dptr(t: &Tensor) -> CUdeviceptr {
    t.data as CUdeviceptr
}

/// What every CUDA kernel object keeps between runs: its error checks (ORT may call compute from
/// several threads, hence the lock).
#[derive(Default)]
struct DeviceState {
    checks: Mutex<RunChecks>,
}

impl DeviceState {
    /// Runs `launch` on ORT's compute stream with `bytes` of scratch from ORT's allocator for the
    /// device of input `device_input`, with the error checks of `crate::cuda::checks` around it.
    fn run(
        &self,
        ctx: &KernelContext,
        op: &'static str,
        device_input: usize,
        bytes: usize,
        info: CheckInfo,
        launch: impl FnOnce(&Device, CUstream, CUdeviceptr, Option<CUdeviceptr>) -> CuResult<Launched>,
    ) -> Result<(), String> {
        let stream = ctx.gpu_stream()? as CUstream;
        // SAFETY: ORT's compute stream is live for the call.
        let (dev, _current) = unsafe { driver::for_stream(stream) }.map_err(|e| format!("{op}: {e}"))?;
        let capturing = unsafe { driver::is_capturing(stream) }.map_err(|e| format!("{op}: {e}"))?;
        let mut checks = self.checks.lock().unwrap_or_else(|p| p.into_inner());
        let slot = checks.before(op, dev.ctx, capturing)?;
        let id = ctx.input_device_id(device_input)?.unwrap_or(0);
        let allocator = ctx.allocator(c"Cuda", id)?;
        let scratch = allocator.alloc(bytes)?;
        let launched = launch(dev, stream, scratch.ptr as CUdeviceptr, slot.map(|s| s.1)).map_err(|e| if e.starts_with(op) { e } else { format!("{op}: {e}") })?;
        // SAFETY: the launches are on `stream`; their error words live in `scratch` or the slot, and
        // the indices are an input of this call.
        unsafe { checks.after(op, stream, capturing, slot, launched.error, &info) }
        // `scratch` is freed here: ORT's arena hands it out again only to work ordered after ours
        // on the same stream.
    }
}

// ---------------------------------------------------------------------------------------------
// ScatterMoE
// ---------------------------------------------------------------------------------------------

struct MoeCuda {
    attrs: scatter_moe::Attrs,
    state: DeviceState,
}

fn create_moe(info: &KernelInfo) -> Result<Box<dyn Kernel>, String> {
    let attrs = scatter_moe::Attrs::parse(info).map_err(to_string)?;
    let sig = Signature::from_type_shapes(&scatter_moe::INPUTS, &kernel_inputs(info)?);
    scatter_moe::check(&attrs, &sig.types, &sig.shape_refs()).map_err(to_string)?;
    Ok(Box::new(MoeCuda { attrs, state: DeviceState::default() }))
}

impl Kernel for MoeCuda {
    fn compute(&self, ctx: &KernelContext) -> Result<(), String> {
        use scatter_moe::*;
        let ins = compute_inputs(ctx)?;
        let sig = Signature::from_tensors(&ins);
        let (t, it, dims) = check(&self.attrs, &sig.types, &sig.shape_refs()).map_err(to_string)?;
        let s = MoeSizes { tokens: known(dims.tokens), k: known(dims.k), experts: known(dims.experts), d: known(dims.d), f: known(dims.f) };
        let get = |i: usize| ins.get(i).and_then(Option::as_ref);
        let capacity = match get(CAPACITY) {
            // SAFETY: checked int64 with one element; declared a host input (OrtMemTypeCPUInput).
            Some(c) => Some(check_capacity(unsafe { c.slice::<i64>() }[0]).map_err(to_string)?),
            None => None,
        };
        let x = get(X).unwrap();
        let y = ctx.output(Y, &x.dims)?.ok_or("output 'Y' is required")?;
        if s.tokens == 0 {
            return Ok(());
        }
        let ptrs = MoePtrs {
            x: dptr(x),
            routing_weights: dptr(get(ROUTING_WEIGHTS).unwrap()),
            routing_indices: dptr(get(ROUTING_INDICES).unwrap()),
            w_in: dptr(get(W_IN).unwrap()),
            w_out: dptr(get(W_OUT).unwrap()),
            b_in: get(B_IN).map(dptr),
            b_out: get(B_OUT).map(dptr),
        };
        let bytes = Plan::scatter_moe(s, t, capacity.is_some()).bytes;
        let info = CheckInfo { it, routing_indices: ptrs.routing_indices, k: s.k, experts: s.experts };
        let attrs = self.attrs;
        self.state.run(ctx, NAME, X, bytes, info, |dev, stream, ws, error_to| unsafe {
            // SAFETY: ORT's tensors have the shapes and types the contract check established.
            forward::scatter_moe(dev, stream, &attrs, t, it, s, capacity, &ptrs, ws, y as CUdeviceptr, (None, None), error_to)
        })
    }
}

// ---------------------------------------------------------------------------------------------
// ParallelLinear
// ---------------------------------------------------------------------------------------------

struct LinearCuda {
    attrs: parallel_linear::Attrs,
    state: DeviceState,
}

fn create_linear(info: &KernelInfo) -> Result<Box<dyn Kernel>, String> {
    let attrs = parallel_linear::Attrs::parse(info).map_err(to_string)?;
    let sig = Signature::from_type_shapes(&parallel_linear::INPUTS, &kernel_inputs(info)?);
    parallel_linear::check(&attrs, &sig.types, &sig.shape_refs()).map_err(to_string)?;
    Ok(Box::new(LinearCuda { attrs, state: DeviceState::default() }))
}

impl Kernel for LinearCuda {
    fn compute(&self, ctx: &KernelContext) -> Result<(), String> {
        use parallel_linear::*;
        let ins = compute_inputs(ctx)?;
        let sig = Signature::from_tensors(&ins);
        let refs = sig.shape_refs();
        let (t, it, dims) = check(&self.attrs, &sig.types, &refs).map_err(to_string)?;
        let s = LinearSizes {
            tokens: known(dims.tokens),
            k: known(dims.k),
            experts: known(dims.experts),
            d_in: known(dims.d_in),
            d_out: known(dims.d_out),
        };
        let routing = refs[ROUTING_INDICES].unwrap();
        let out: Vec<usize> =
            output_shape(&self.attrs, routing, dims.d_out, dims.has_gates, grouped_rows).into_iter().map(known).collect();
        let y = ctx.output(0, &out)?.ok_or("output 'Y' is required")?;
        if s.tokens == 0 {
            return Ok(());
        }
        let get = |i: usize| ins.get(i).and_then(Option::as_ref);
        let ptrs = LinearPtrs {
            x: dptr(get(X).unwrap()),
            routing_indices: dptr(get(ROUTING_INDICES).unwrap()),
            w: dptr(get(W).unwrap()),
            b: get(B).map(dptr),
            gates: get(GATES).map(dptr),
        };
        let bytes = Plan::parallel_linear(s, t, dims.has_gates).bytes;
        let info = CheckInfo { it, routing_indices: ptrs.routing_indices, k: s.k, experts: s.experts };
        let attrs = self.attrs;
        self.state.run(ctx, NAME, X, bytes, info, |dev, stream, ws, error_to| unsafe {
            // SAFETY: as for ScatterMoE.
            forward::parallel_linear(dev, stream, &attrs, t, it, s, &ptrs, ws, y as CUdeviceptr, None, error_to)
        })
    }
}

// ---------------------------------------------------------------------------------------------
// CapacityMask
// ---------------------------------------------------------------------------------------------

struct MaskCuda {
    attrs: capacity_mask::Attrs,
    state: DeviceState,
}

fn create_mask(info: &KernelInfo) -> Result<Box<dyn Kernel>, String> {
    let attrs = capacity_mask::Attrs::parse(info).map_err(to_string)?;
    let sig = Signature::from_type_shapes(&capacity_mask::INPUTS, &kernel_inputs(info)?);
    capacity_mask::check(&sig.types, &sig.shape_refs()).map_err(to_string)?;
    Ok(Box::new(MaskCuda { attrs, state: DeviceState::default() }))
}

impl Kernel for MaskCuda {
    fn compute(&self, ctx: &KernelContext) -> Result<(), String> {
        use capacity_mask::*;
        let ins = compute_inputs(ctx)?;
        let sig = Signature::from_tensors(&ins);
        let it = check(&sig.types, &sig.shape_refs()).map_err(to_string)?;
        let routing = ins[ROUTING_INDICES].as_ref().unwrap();
        // SAFETY: checked int64 with one element; declared a host input.
        let capacity = check_capacity(unsafe { ins[CAPACITY].as_ref().unwrap().slice::<i64>() }[0]).map_err(to_string)?;
        let k = *routing.dims.last().unwrap();
        let tokens = routing.len() / k;
        let out = ctx.output(0, &routing.dims)?.ok_or("output 'kept' is required")?;
        if tokens == 0 {
            return Ok(());
        }
        let bytes = Plan::capacity_mask(tokens, k, self.attrs.num_experts).bytes;
        let idx = dptr(routing);
        let info = CheckInfo { it, routing_indices: idx, k, experts: self.attrs.num_experts };
        let attrs = self.attrs;
        self.state.run(ctx, NAME, ROUTING_INDICES, bytes, info, |dev, stream, ws, error_to| unsafe {
            // SAFETY: `out` holds one bool (one byte) per assignment.
            forward::capacity_mask(dev, stream, &attrs, it, tokens, k, capacity, idx, ws, out as CUdeviceptr, error_to)
        })
    }
}

/// The CUDA execution provider's ops, registered like the CPU ones; the capacity input stays in host
/// memory (one scalar the launch parameters need).
pub fn ops() -> Vec<OpDef> {
    op_table(Kernels { execution_provider: Some(CUDA_EP), moe: create_moe, linear: create_linear, mask: create_mask, capacity_on_host: true })
}

#[cfg(test)]
mod tests {
    #[test]
    fn cuda_ops_mirror_the_cpu_ops() {
        let (cpu, cuda) = (super::super::cpu::ops(), super::ops());
        assert_eq!(cpu.len(), cuda.len());
        for (a, b) in cpu.iter().zip(&cuda) {
            assert_eq!(a.name, b.name);
            assert_eq!(a.output_type, b.output_type);
            assert_eq!(b.execution_provider, Some(super::CUDA_EP));
        }
        // the capacity travels in host memory
        assert_eq!(cuda[0].host_inputs, &[crate::spec::scatter_moe::CAPACITY]);
        assert_eq!(cuda.last().unwrap().host_inputs, &[crate::spec::capacity_mask::CAPACITY]);
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
