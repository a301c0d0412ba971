//! The TMA tensor map through which the Hopper GEMMs `wgmma_tma` and `wgmma_mc`
//! (kernels/gemm_hopper_ws.cuh) read expert weights W [E, N, K].
//!
//! One TMA box is one half of a 256-row W tile: 128 rows of 64 K-elements (128 bytes, the 128-byte
//! swizzle wgmma reads). wgmma_tma loads both halves; in wgmma_mc each CTA of a pair loads one,
//! multicast to both. The map is 4-D, innermost
//! first: (K, row, half, expert), box (64, 128, 1, 1) or, for the interleaved GLU layout,
//! (K, half, row, expert) with box (64, 1, 128, 1); the kernel addresses it as follows.
//! - plain (`gated = 0`): dims (K, N, 1, E); half `h` of column tile `nt` is rows nt*256 + h*128.
//! - gated, gate_up / up_gate: dims (K, f, 2, E), f = N/2: half 0 holds the gate rows, half 1 the
//!   up rows of the GLU (W rows i and f + i, or swapped for up_gate: the kernel picks the half).
//! - gated, interleaved (gate 2i, up 2i+1): dims (K, 2, f, E), rows 2K elements apart.
//!
//! Rows past N (or f) and columns past K read as zeros (TMA out-of-bounds fill), as the other
//! kernels' masked loads do.
//!
//! `wgmma_mc_ga` (grouped input) also reads A through a map: X [rows, K] as a W of one expert, dims
//! (K, rows, 1, 1), the same (64, 128, 1, 1) box, one box per A tile.
//!
//! A map is plain host data (cuTensorMapEncodeTiled touches no device state), so encoding it per
//! call is safe under CUDA graph capture; it travels as a 128-byte `__grid_constant__` kernel
//! parameter.

use super::driver::{check, CuResult};
use crate::spec::{ElemType, GluLayout};
use cudarc::driver::sys::{self, CUdeviceptr};

/// Rows and K-elements of one TMA box (one CTA's half of a W tile).
pub const BOX_ROWS: u32 = 128;
pub const BOX_K: u32 = 64;

pub use super::driver::MapBytes;

/// Whether W can be read through TMA: 16-byte aligned base and 16-byte multiple row stride (K % 8
/// == 0 for 16-bit elements). Otherwise the host uses the cp.async kernel.
pub fn w_fits(w: CUdeviceptr, kd: usize) -> bool {
    w % 16 == 0 && kd % 8 == 0 && kd > 0
}

/// Encodes the W map (see the module comment). `n` is W's row count per expert (2f when gated).
pub fn encode_w(w: CUdeviceptr, elem: ElemType, experts: usize, n: usize, kd: usize, gated: bool, layout: GluLayout) -> CuResult<MapBytes> {
    let dtype = map_type(elem)?;
    if !w_fits(w, kd) {
        return Err(format!("W at {w:#x} with K = {kd} cannot be read through TMA (needs 16-byte alignment, K % 8 == 0)"));
    }
    let row = (kd * 2) as u64; // bytes per W row
    let f = (n / 2) as u64;
    let (dims, strides, boxd): ([u64; 4], [u64; 3], [u32; 4]) = if !gated {
        ([kd as u64, n as u64, 1, experts as u64], [row, row * n as u64, row * n as u64], [BOX_K, BOX_ROWS, 1, 1])
    } else if layout == GluLayout::Interleaved {
        ([kd as u64, 2, f, experts as u64], [row, 2 * row, row * n as u64], [BOX_K, 1, BOX_ROWS, 1])
    } else {
        ([kd as u64, f, 2, experts as u64], [row, row * f, row * n as u64], [BOX_K, BOX_ROWS, 1, 1])
    };
    encode(w, dtype, dims, strides, boxd, &format!("W: E {experts}, N {n}, K {kd}, gated {gated}, {layout:?}"))
}

/// Encodes the map of X [rows, K] for `wgmma_mc_ga` (see the module comment); same needs as W.
pub fn encode_rows(x: CUdeviceptr, elem: ElemType, rows: usize, kd: usize) -> CuResult<MapBytes> {
    let dtype = map_type(elem)?;
    if !w_fits(x, kd) || rows == 0 {
        return Err(format!("X at {x:#x} with {rows} rows of K = {kd} cannot be read through TMA (needs 16-byte alignment, K % 8 == 0)"));
    }
    let row = (kd * 2) as u64;
    let all = row * rows as u64;
    encode(x, dtype, [kd as u64, rows as u64, 1, 1], [row, all, all], [BOX_K, BOX_ROWS, 1, 1], &format!("X: {rows} rows, K {kd}"))
}

fn map_type(elem: ElemType) -> CuResult<sys::CUtensorMapDataType> {
    match elem {
        ElemType::F16 => Ok(sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16),
        ElemType::BF16 => Ok(sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16),
        ElemType::F32 => Err("TMA maps are for 16-bit tensors only".into()),
    }
}

fn encode(ptr: CUdeviceptr, dtype: sys::CUtensorMapDataType, dims: [u64; 4], strides: [u64; 3], boxd: [u32; 4], what: &str) -> CuResult<MapBytes> {
    let elem_strides = [1u32; 4];
    let mut map = sys::CUtensorMap { opaque: [0; 16] };
    // SAFETY: every array has the rank's length; the map is written by the driver only.
    check(
        unsafe {
            sys::cuTensorMapEncodeTiled(
                &mut map,
                dtype,
                4,
                ptr as *mut std::ffi::c_void,
                dims.as_ptr(),
                strides.as_ptr(),
                boxd.as_ptr(),
                elem_strides.as_ptr(),
                sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
                sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
        },
        &format!("cuTensorMapEncodeTiled({what})"),
    )?;
    Ok(map.opaque)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// TMA needs a 16-byte aligned base and row stride; anything else takes the cp.async kernel.
    #[test]
    fn only_aligned_weights_take_the_tma_path() {
        assert!(w_fits(0x1000, 4096));
        assert!(w_fits(0x1010, 8));
        assert!(!w_fits(0x1008, 4096)); // base not 16-byte aligned
        assert!(!w_fits(0x1000, 100)); // row of 200 bytes
        assert!(!w_fits(0x1000, 0));
    }
}
