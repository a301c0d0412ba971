//! The routing kernels' error words (kernels/common.cuh) and the contract's messages for them; the
//! synchronous check that reads them back.

use super::MAX_EXPERTS;
use crate::cuda::driver::{self, CuResult};
use crate::spec::IndexType;
use cudarc::driver::sys::{self, CUdeviceptr, CUstream};

/// The routing kernels' error words (error[0] bits, error[1] smallest bad flat index).
pub const ERR_BAD_INDEX: i32 = 1;
pub const ERR_NEG_CAPACITY: i32 = 2;
pub const ERR_TOO_MANY_EXPERTS: i32 = 4;

/// The contract's message for error words `words` (None when they say all is well). `value` is
/// the offending index when the caller could read it.
pub fn error_message(op: &'static str, words: [i32; 2], k: usize, experts: usize, value: Option<i64>) -> Option<String> {
    let [flags, flat] = words;
    if flags == 0 {
        return None;
    }
    if flags & ERR_BAD_INDEX != 0 {
        let (t, j) = if flat >= 0 { (flat as usize / k, flat as usize % k) } else { (0, 0) };
        return Some(match value {
            Some(v) => crate::spec::index_out_of_range(op, "routing_indices", v, t, j, experts).to_string(),
            None => format!("{op}: input 'routing_indices' holds a value outside [0, {experts}) (the number of experts) at [{t}, {j}]"),
        });
    }
    if flags & ERR_TOO_MANY_EXPERTS != 0 {
        return Some(format!("{op}: the CUDA kernels support at most {MAX_EXPERTS} experts, got E = {experts}"));
    }
    Some(format!("{op}: input 'capacity' must be >= 0"))
}

/// Waits for `stream`, reads the error words and, on a bad index, the offending value; the
/// contract's message. Not for use under graph capture.
///
/// # Safety
/// `error` must be the [`Launched::error`] of a forward on `stream`, whose workspace and
/// `routing_indices` (of type `it`) are still allocated.
pub unsafe fn check_sync(
    stream: CUstream,
    error: CUdeviceptr,
    op: &'static str,
    it: IndexType,
    routing_indices: CUdeviceptr,
    k: usize,
    experts: usize,
) -> CuResult<Option<String>> {
    driver::check(sys::cuStreamSynchronize(stream), "cuStreamSynchronize")?;
    let mut words = [0i32; 2];
    driver::check(sys::cuMemcpyDtoH_v2(words.as_mut_ptr().cast(), error, 8), "cuMemcpyDtoH(error words)")?;
    let mut value = None;
    if words[0] & ERR_BAD_INDEX != 0 && words[1] >= 0 {
        let size = match it {
            IndexType::I32 => 4,
            IndexType::I64 => 8,
        };
        let mut raw = [0u8; 8];
        driver::check(
            sys::cuMemcpyDtoH_v2(raw.as_mut_ptr().cast(), routing_indices + (words[1] as u64) * size, size as usize),
            "cuMemcpyDtoH(routing index)",
        )?;
        value = Some(match it {
            IndexType::I32 => i32::from_le_bytes(raw[..4].try_into().unwrap()) as i64,
            IndexType::I64 => i64::from_le_bytes(raw),
        });
    }
    Ok(error_message(op, words, k, experts, value))
}
