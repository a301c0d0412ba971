//! The device pointers of the ops' inputs, as the launches take them.

use crate::spec::Quant;
use cudarc::driver::sys::CUdeviceptr;

/// A quantized W as the kernels take it (kernels/quant_gemm.cu): how it is stored (what the
/// contract's check found, `Dims`) and the device pointers of its scale and zero point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantW {
    pub quant: Quant,
    pub scale: CUdeviceptr,
    /// None: the format's default zero point
    pub zero: Option<CUdeviceptr>,
}

/// Device pointers of `ScatterMoE`'s inputs.
#[derive(Debug, Clone, Copy, Default)]
pub struct MoePtrs {
    pub x: CUdeviceptr,
    pub routing_weights: CUdeviceptr,
    pub routing_indices: CUdeviceptr,
    pub w_in: CUdeviceptr,
    pub w_out: CUdeviceptr,
    pub b_in: Option<CUdeviceptr>,
    pub b_out: Option<CUdeviceptr>,
    /// `w_in` / `w_out` quantized (each pointer then holds the stored bytes)
    pub w_in_quant: Option<QuantW>,
    pub w_out_quant: Option<QuantW>,
}

/// Device pointers of `ParallelLinear`'s inputs.
#[derive(Debug, Clone, Copy, Default)]
pub struct LinearPtrs {
    pub x: CUdeviceptr,
    pub routing_indices: CUdeviceptr,
    pub w: CUdeviceptr,
    pub b: Option<CUdeviceptr>,
    pub gates: Option<CUdeviceptr>,
    /// `W` quantized (`w` then holds the stored bytes)
    pub w_quant: Option<QuantW>,
}
