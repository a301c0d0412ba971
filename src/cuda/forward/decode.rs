//! The decode kernel's choice and launch: the whole `ScatterMoE` in one cooperative launch
//! (kernels/moe_decode.cu) where the op would run its four kernels at decode sizes.

use super::codes::{format_name, glu_code, tname, work_units};
use super::ptrs::{MoePtrs, QuantW};
use super::plan::Plan;
use super::selection::{pick_cfg, pick_quant_cfg};
use super::MAX_EXPERTS;
use crate::cuda::arch::{Arch, Table};
use crate::cuda::catalogue::{act_code, GemmCfg};
use crate::cuda::driver::{self, Arg, CuResult, Device};
use crate::reference::MoeSizes;
use crate::spec::{scatter_moe, ElemType, IndexType};
use cudarc::driver::sys::{CUdeviceptr, CUstream};

/// The most assignments (T * k) the decode kernel takes (kernels/moe_decode.cu, DECODE_MAX_N).
pub const DECODE_MAX_N: usize = 512;

/// At one row per expert, the decode kernel takes a GEMM that has left the skinny kernel for its
/// length (over 100 MiB of the hit experts' W) up to this many bytes of it. Measured on an H100
/// (bench/results/decode/README.md, "The decode kernel"): GPT-OSS-20B at one token (W1 of its 4
/// hit experts 133 MB) 0.89-0.91x of the four kernels' time with the decode kernel forced, at 4
/// tokens (531 MB) 1.08x; Mixtral's one-token W (470 MB), DeepSeek-V3's (470 MB) and DBRX's (1 GB)
/// stay with the four kernels, as the skinny kernel alone was up to 1.21x slower there.
pub const DECODE_ONE_ROW_BYTES: u128 = 150 << 20;

/// `SCATTERMOE_CUDA_DECODE_KERNEL=0` turns the decode kernel off (the four kernels then run at every
/// size), for A/B runs.
pub const DECODE_KERNEL_ENV: &str = "SCATTERMOE_CUDA_DECODE_KERNEL";

/// The decode kernel, where it takes the op: 16-bit activations, W in 16 bits or both W quantized
/// in one format, 1 <= T * k <= DECODE_MAX_N, no capacity, no forced configuration (the caller
/// checks those two), each GEMM on the skinny kernel's units where the four kernels would run it
/// there too (16-bit W at one row per expert: up to DECODE_ONE_ROW_BYTES of hit W), and a driver
/// that launches cooperatively.
pub(super) fn decode_kernel(dev: &Device, elem: ElemType, s: MoeSizes, x: &MoePtrs, gated: bool) -> Option<driver::Func> {
    let q = match (x.w_in_quant, x.w_out_quant) {
        (None, None) => None,
        (Some(a), Some(b)) if a.quant.format == b.quant.format => Some((a, b)),
        _ => return None,
    };
    if !decode_applies(elem, s, gated, q.is_some(), dev.arch, dev.table) {
        return None;
    }
    // quantized: the skinny kernel is the choice for the quantized GEMMs (pick_quant_cfg)
    if let Some((a, b)) = q {
        let n_assign = s.tokens * s.k;
        let block_in = |q: &QuantW, kd: usize| q.quant.block(kd as u64).1.clamp(1, kd.max(1) as u64) as usize;
        let skinny = |q: &QuantW, kd: usize| pick_quant_cfg(n_assign, s.experts, kd, dev.arch, block_in(q, kd)) == GemmCfg::Skinny;
        if !skinny(&a, s.d) || !skinny(&b, s.f) {
            return None;
        }
    }
    if std::env::var(DECODE_KERNEL_ENV).is_ok_and(|v| v.trim() == "0") || !driver::cooperative_supported() {
        return None;
    }
    let form = q.map_or(String::new(), |(a, _)| format!("_{}", format_name(a.quant.format)));
    dev.func(&format!("scattermoe_moe_decode_{}{form}", tname(elem))).ok()
}

/// Whether [`scatter_moe`] runs the decode kernel for these sizes on `dev` (with no capacity and no
/// forced configuration): for tests and benchmarks that label or compare its runs.
pub fn decode_kernel_runs(dev: &Device, elem: ElemType, s: MoeSizes, gated: bool, quantized: bool) -> bool {
    let x = MoePtrs { w_in_quant: None, w_out_quant: None, ..Default::default() };
    !quantized && decode_kernel(dev, elem, s, &x, gated).is_some()
}

/// The sizes and kinds the decode kernel takes (see [`decode_kernel`]): the device aside, and for
/// quantized W the choice of its GEMMs, which [`decode_kernel`] checks.
fn decode_applies(elem: ElemType, s: MoeSizes, gated: bool, quantized: bool, arch: Arch, table: Table) -> bool {
    let n_assign = s.tokens * s.k;
    if elem == ElemType::F32 || n_assign == 0 || n_assign > DECODE_MAX_N || s.experts > MAX_EXPERTS {
        return false;
    }
    if quantized {
        return true;
    }
    let n = if gated { 2 * s.f } else { s.f };
    // one row per expert (every assignment its own expert) and the hit experts' W within the cap
    let one_row = |n: usize, kd: usize| n_assign <= s.experts && (n_assign as u128) * (n as u128) * (kd as u128) * 2 <= DECODE_ONE_ROW_BYTES;
    let takes = |n: usize, kd: usize| pick_cfg(elem, n_assign, s.experts, n, kd, arch, table) == GemmCfg::Skinny || one_row(n, kd);
    takes(n, s.d) && takes(s.d, s.f)
}

/// The whole op in one cooperative launch (kernels/moe_decode.cu): its own routing in
/// each CTA, GEMM1, GEMM2 and the combine behind grid barriers, H and O in the op's workspace. The
/// grid: the most work units of its phases, at most the CTAs resident at once. False: the driver
/// refused the grid as too large to be resident (nothing launched).
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn moe_decode(
    f: &driver::Func,
    stream: CUstream,
    attrs: &scatter_moe::Attrs,
    elem: ElemType,
    it: IndexType,
    s: MoeSizes,
    x: &MoePtrs,
    ws: CUdeviceptr,
    p: &Plan,
    y: CUdeviceptr,
    error: CUdeviceptr,
) -> CuResult<bool> {
    let n_assign = s.tokens * s.k;
    let n = if attrs.gated { 2 * s.f } else { s.f };
    let tile = GemmCfg::Skinny.tile();
    let v = 16 / elem.size_bytes();
    let combine_ctas = (s.tokens * s.d.div_ceil(v)).div_ceil(f.threads as usize);
    let units = work_units(tile, 1, n_assign, s.experts, n, attrs.gated).max(work_units(tile, 1, n_assign, s.experts, s.d, false)).max(combine_ctas);
    let grid = units.min(f.resident as usize).max(1) as u32;
    let mut args = vec![
        Arg::Ptr(x.x),
        Arg::Ptr(x.w_in),
        Arg::opt(x.b_in),
        Arg::Ptr(x.w_out),
        Arg::opt(x.b_out),
        Arg::Ptr(x.routing_weights),
        Arg::Ptr(x.routing_indices),
        Arg::I32(it.size_bytes() as i32),
        Arg::I32(s.tokens as i32),
        Arg::I32(s.k as i32),
        Arg::I32(s.d as i32),
        Arg::I32(s.f as i32),
        Arg::I32(s.experts as i32),
        Arg::I32(act_code(Some(attrs.activation))),
        Arg::I32(attrs.gated as i32),
        Arg::I32(glu_code(attrs.glu_layout)),
        Arg::F32(attrs.alpha),
        Arg::F32(attrs.limit),
        Arg::Ptr(ws + p.hidden.unwrap() as u64),
        Arg::Ptr(ws + p.out.unwrap() as u64),
        Arg::Ptr(y),
        Arg::Ptr(error),
    ];
    // quantized W: each one's scale, zero point, scale type and blocks (a block past its dimension
    // is the whole dimension), as the quantized GEMMs take them
    for (q, rows, kd) in [(x.w_in_quant, n, s.d), (x.w_out_quant, s.d, s.f)] {
        if let Some(q) = q {
            let (bo, bi) = q.quant.block(kd as u64);
            let clamp = |b: u64, dim: usize| b.clamp(1, dim.max(1) as u64) as i32;
            args.extend([Arg::Ptr(q.scale), Arg::opt(q.zero), Arg::I32((q.quant.scale == ElemType::F32) as i32), Arg::I32(clamp(bo, rows)), Arg::I32(clamp(bi, kd))]);
        }
    }
    driver::launch_cooperative(f, grid, stream, &args, "scattermoe_moe_decode")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The decode kernel takes 16-bit layers of at most DECODE_MAX_N assignments whose two GEMMs
    /// would both run on the skinny kernel or, at one row per expert, have at most
    /// DECODE_ONE_ROW_BYTES of hit W (quantized W: the sizes alone here), and nothing else.
    #[test]
    fn decode_kernel_takes_what_it_should() {
        let sizes = |tokens, d, f, experts, k| MoeSizes { tokens, d, f, experts, k };
        let applies = |elem, s, quantized| decode_applies(elem, s, true, quantized, Arch::Sm90a, Table::H100);
        // fine-grained (1024, 512, 64, 8) at 1 to 16 tokens; Qwen3-30B-A3B (2048, 768, 128, 8) at
        // one token, not at 4 (32 hit experts' W1, 201 MB, leave the skinny kernel: K > 1024)
        for t in [1, 4, 16] {
            assert!(applies(ElemType::BF16, sizes(t, 1024, 512, 64, 8), false));
        }
        assert!(applies(ElemType::F16, sizes(1, 2048, 768, 128, 8), false));
        assert!(!applies(ElemType::F16, sizes(4, 2048, 768, 128, 8), false));
        // GPT-OSS-20B (2880, 2880, 32, 4) at one token (W1 of 4 experts: 133 MB, past the skinny
        // kernel's 100 MiB, within DECODE_ONE_ROW_BYTES), not at 2 (265 MB) or 4 tokens
        assert!(applies(ElemType::BF16, sizes(1, 2880, 2880, 32, 4), false));
        assert!(!applies(ElemType::BF16, sizes(2, 2880, 2880, 32, 4), false));
        assert!(!applies(ElemType::BF16, sizes(4, 2880, 2880, 32, 4), false));
        // quantized W at decode sizes (whose GEMMs decode_kernel checks), even where 16-bit W would
        // be too long for the skinny kernel
        assert!(applies(ElemType::BF16, sizes(1, 1024, 512, 64, 8), true));
        assert!(applies(ElemType::BF16, sizes(1, 4096, 14336, 8, 2), true));
        // not: float32, no token, more than 512 assignments, more than 1024 experts
        assert!(!applies(ElemType::F32, sizes(1, 1024, 512, 64, 8), false));
        assert!(!applies(ElemType::F32, sizes(1, 1024, 512, 64, 8), true));
        assert!(!applies(ElemType::BF16, sizes(0, 1024, 512, 64, 8), false));
        assert!(!applies(ElemType::BF16, sizes(65, 64, 32, 8, 8), false));
        assert!(!applies(ElemType::BF16, sizes(1, 64, 32, 2048, 2), false));
        // not where a GEMM leaves the skinny kernel and its hit W is long: Mixtral (470 MB),
        // DeepSeek-V3 (7168, 2048, 256, 8: 470 MB) and PhiMoE (4096, 6400, 16, 2: 210 MB) at one token
        assert!(!applies(ElemType::BF16, sizes(1, 4096, 14336, 8, 2), false));
        assert!(!applies(ElemType::BF16, sizes(1, 7168, 2048, 256, 8), false));
        assert!(!applies(ElemType::BF16, sizes(1, 4096, 6400, 16, 2), false));
        // the boundary on assignments: 64 tokens x 8 is 512
        let at = |t| decode_applies(ElemType::BF16, sizes(t, 64, 32, 512, 8), true, false, Arch::Sm90a, Table::H100);
        assert!(at(64) && !at(65));
    }
}
