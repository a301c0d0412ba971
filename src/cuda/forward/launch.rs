//! The launches of one forward on a given stream: the routing kernels, the grouped GEMMs (kernel
//! choice by `super::selection`, geometry from the catalogue), the combine, and the three ops'
//! sequences built from them. The only place kernel arguments are laid out.

use super::codes::{format_name, glu_code, iname, order_code, tname, work_units};
use super::decode;
use super::plan::Plan;
pub use super::ptrs::{LinearPtrs, MoePtrs, QuantW};
use super::selection::{pick_cfg, pick_quant_cfg, FULL_GRID_K};
use super::{MAX_EXPERTS, ROUTING_CHUNK};
use crate::cuda::catalogue::{act_code, GemmCfg, GROUPED_A_SUFFIX};
use crate::cuda::driver::{self, Arg, CuResult, Device};
use crate::cuda::tensor_map;
use crate::reference::{LinearSizes, MoeSizes};
use crate::spec::{capacity_mask, parallel_linear, scatter_moe, Activation, CapacityOrder, ElemType, GluLayout, IndexType, SpecError};
use cudarc::driver::sys::{self, CUdeviceptr, CUstream};

/// What a forward left on the device for its caller to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Launched {
    /// error words (int32 [2], kernels/common.cuh), or None when nothing was launched (T = 0)
    pub error: Option<CUdeviceptr>,
}

/// Limits of the kernels that the contract does not have.
pub(super) fn check_limits(op: &'static str, tokens: usize, k: usize, experts: usize) -> Result<(), String> {
    if experts > MAX_EXPERTS {
        return Err(SpecError { op, message: format!("the CUDA kernels support at most {MAX_EXPERTS} experts, got E = {experts}") }.to_string());
    }
    if tokens.checked_mul(k).is_none_or(|n| n >= i32::MAX as usize) {
        return Err(SpecError { op, message: format!("the CUDA kernels support T*k < 2^31 assignments, got T = {tokens}, k = {k}") }.to_string());
    }
    Ok(())
}

/// The routing kernels: count, scan, scatter, or the one-block `small` kernel when all assignments
/// fit one block and no capacity is given. `capacity`: the device int64 (already written).
/// `error_to`: where the kernels write their error words (every forward passes its own through):
/// None, the workspace (read back by `check_sync`); Some, a slot of `checks::AsyncChecks`, mapped
/// host memory that the next call reads without a copy on the stream. Returns the address used.
#[allow(clippy::too_many_arguments)]
unsafe fn routing(
    dev: &Device,
    stream: CUstream,
    it: IndexType,
    idx: CUdeviceptr,
    tokens: usize,
    k: usize,
    experts: usize,
    ws: CUdeviceptr,
    p: &Plan,
    capacity: Option<(CUdeviceptr, CapacityOrder)>,
    kept: Option<CUdeviceptr>,
    error_to: Option<CUdeviceptr>,
) -> CuResult<CUdeviceptr> {
    let error = error_to.unwrap_or(ws + p.error as u64);
    let n = tokens * k;
    let nb = n.div_ceil(ROUTING_CHUNK);
    let orders = if matches!(capacity, Some((_, CapacityOrder::SlotMajor))) { 2 } else { 1 };
    let (n, t, k, e) = (n as i32, tokens as i32, k as i32, experts as i32);
    let rws = ws + p.routing as u64;
    let offsets = ws + p.offsets as u64;
    let cap_ptr = capacity.map(|c| c.0);
    if nb == 1 && capacity.is_none() {
        // All assignments fit one block: count, scan and scatter in one launch.
        let name = format!("scattermoe_routing_small_{}", iname(it));
        let f = dev.func(&name)?;
        let args = [Arg::Ptr(idx), Arg::I32(n), Arg::I32(e), Arg::Ptr(offsets), Arg::Ptr(ws + p.sorted_idx as u64), Arg::Ptr(ws + p.pos as u64), Arg::opt(kept), Arg::Ptr(error)];
        driver::launch(&f, (1, 1), stream, &args, &name)?;
        return Ok(error);
    }
    if nb > 0 {
        let name = format!("scattermoe_routing_count_{}", iname(it));
        let f = dev.func(&name)?;
        driver::launch(&f, (nb as u32, orders), stream, &[Arg::Ptr(idx), Arg::I32(n), Arg::I32(t), Arg::I32(k), Arg::I32(e), Arg::Ptr(rws)], &name)?;
    }
    let f = dev.func("scattermoe_routing_scan")?;
    driver::launch(
        &f,
        (1, 1),
        stream,
        &[Arg::I32(n), Arg::I32(e), Arg::I32(nb as i32), Arg::I32(orders as i32), Arg::opt(cap_ptr), Arg::Ptr(rws), Arg::Ptr(offsets), Arg::Ptr(error)],
        "scattermoe_routing_scan",
    )?;
    if nb > 0 {
        let name = format!("scattermoe_routing_scatter_{}", iname(it));
        let f = dev.func(&name)?;
        let order = capacity.map_or(0, |c| order_code(c.1));
        driver::launch(
            &f,
            (nb as u32, orders),
            stream,
            &[
                Arg::Ptr(idx),
                Arg::I32(n),
                Arg::I32(t),
                Arg::I32(k),
                Arg::I32(e),
                Arg::Ptr(rws),
                Arg::Ptr(offsets),
                Arg::opt(cap_ptr),
                Arg::I32(order),
                Arg::Ptr(ws + p.sorted_idx as u64),
                Arg::Ptr(ws + p.pos as u64),
                Arg::opt(kept),
                Arg::Ptr(0),
                Arg::I32(0),
            ],
            &name,
        )?;
    }
    Ok(error)
}

/// Writes the capacity (an int64 the routing kernels read) with two 32-bit memsets: the value
/// travels by value, so this is safe under graph capture and needs no host buffer.
unsafe fn write_capacity(stream: CUstream, at: CUdeviceptr, c: usize) -> CuResult<()> {
    let v = c.min(i64::MAX as usize) as u64;
    driver::check(sys::cuMemsetD32Async(at, v as u32, 1, stream), "cuMemsetD32Async(capacity)")?;
    driver::check(sys::cuMemsetD32Async(at + 4, (v >> 32) as u32, 1, stream), "cuMemsetD32Async(capacity)")
}


/// One grouped GEMM (kernels/grouped_gemm.cu; kernels/quant_gemm.cu with `quant`).
pub struct Gemm {
    pub x: CUdeviceptr,
    pub w: CUdeviceptr,
    pub bias: Option<CUdeviceptr>,
    pub y: CUdeviceptr,
    pub row_scale: Option<CUdeviceptr>,
    /// W [E, n, kd]
    pub n: usize,
    pub kd: usize,
    pub grouped_in: bool,
    pub grouped_out: bool,
    pub act: Option<Activation>,
    pub gated: bool,
    pub glu_layout: GluLayout,
    pub alpha: f32,
    pub limit: f32,
    /// W quantized (`w` then points at its stored bytes)
    pub quant: Option<QuantW>,
}

/// Forces one GEMM configuration (tests); None: [`pick_cfg`]. For a quantized W, a configuration
/// without a quantized form is not forced ([`pick_quant_cfg`] chooses).
pub type CfgOverride = Option<GemmCfg>;

#[allow(clippy::too_many_arguments)]
unsafe fn gemm(dev: &Device, stream: CUstream, elem: ElemType, g: &Gemm, k: usize, n_assign: usize, experts: usize, ws: CUdeviceptr, p: &Plan, cfg: CfgOverride) -> CuResult<()> {
    if let Some(q) = &g.quant {
        return qgemm(dev, stream, elem, g, q, k, n_assign, experts, ws, p, cfg);
    }
    let cfg = match (elem, cfg) {
        (ElemType::F32, _) => GemmCfg::F32,
        (_, Some(c)) if c != GemmCfg::F32 => c,
        _ => pick_cfg(elem, n_assign, experts, g.n, g.kd, dev.arch, dev.table),
    };
    // The TMA kernels need an aligned W and a driver that encodes tensor maps (and, for pairs,
    // sizes cluster grids: `Device` leaves them out otherwise); else the cp.async form does the work.
    let mut name = cfg.kernel_name(tname(elem));
    let (cfg, f) = match dev.func(&name) {
        Ok(f) if !cfg.w_by_tma() || tensor_map::w_fits(g.w, g.kd) => (cfg, f),
        Err(e) if !cfg.w_by_tma() => return Err(e),
        _ => {
            name = GemmCfg::WgmmaWs.kernel_name(tname(elem));
            (GemmCfg::WgmmaWs, dev.func(&name)?)
        }
    };
    // Grouped input: A's rows are consecutive, so the pair kernel takes them through TMA as well
    // (wgmma_mc_ga; the producer then issues no cp.async at all).
    let ga = if cfg.has_grouped_a_form() && g.grouped_in && tensor_map::w_fits(g.x, g.kd) {
        let ga_name = format!("{name}{GROUPED_A_SUFFIX}");
        dev.func(&ga_name).ok().map(|fga| (fga, ga_name))
    } else {
        None
    };
    let grouped_a = ga.is_some();
    let (f, name) = ga.unwrap_or((f, name));
    let c = f.cluster as usize;
    let units = work_units(cfg.tile(), c, n_assign, experts, g.n, g.gated);
    let grid = if cfg.w_by_tma() && g.kd >= FULL_GRID_K {
        // One CTA (pair) per work unit: the hardware starts them in order as SMs free up, so the M
        // tiles that share a W tile run side by side and W leaves DRAM about once. A persistent grid
        // lets the CTAs drift apart (ncu: W read 1.5-2x at Mixtral 1024 tokens).
        units * c
    } else {
        (units * c).min(f.resident as usize).max(c) / c * c
    };
    let mut args = gemm_args(g, k, experts, ws, p);
    if cfg.w_by_tma() {
        args.push(Arg::Map(tensor_map::encode_w(g.w, elem, experts, g.n, g.kd, g.gated, g.glu_layout)?));
    }
    if grouped_a {
        args.push(Arg::Map(tensor_map::encode_rows(g.x, elem, n_assign, g.kd)?));
    }
    driver::launch(&f, (grid as u32, 1), stream, &args, &name)
}


/// The parameters every grouped-GEMM entry point starts with (kernels/grouped_gemm.cu's header).
fn gemm_args(g: &Gemm, k: usize, experts: usize, ws: CUdeviceptr, p: &Plan) -> Vec<Arg> {
    vec![
        Arg::Ptr(g.x),
        Arg::Ptr(g.w),
        Arg::opt(g.bias),
        Arg::Ptr(g.y),
        Arg::Ptr(ws + p.sorted_idx as u64),
        Arg::Ptr(ws + p.offsets as u64),
        Arg::opt(g.row_scale),
        Arg::I32(k as i32),
        Arg::I32(g.n as i32),
        Arg::I32(g.kd as i32),
        Arg::I32(experts as i32),
        Arg::I32(g.grouped_in as i32),
        Arg::I32(g.grouped_out as i32),
        Arg::I32(act_code(g.act)),
        Arg::I32(g.gated as i32),
        Arg::I32(glu_code(g.glu_layout)),
        Arg::F32(g.alpha),
        Arg::F32(g.limit),
    ]
}

/// One grouped GEMM with W quantized (kernels/quant_gemm.cu, the skinny kernel, wgmma_ws's forms):
/// the configuration of [`pick_quant_cfg`], a persistent grid, and the five parameters of the
/// quantized entry points after the common ones.
#[allow(clippy::too_many_arguments)]
unsafe fn qgemm(
    dev: &Device,
    stream: CUstream,
    elem: ElemType,
    g: &Gemm,
    q: &QuantW,
    k: usize,
    n_assign: usize,
    experts: usize,
    ws: CUdeviceptr,
    p: &Plan,
    cfg: CfgOverride,
) -> CuResult<()> {
    if elem == ElemType::F32 {
        // the device ops refuse this by name first (`crate::cuda::ops`)
        return Err(format!("a {} weight needs T = float16 or bfloat16 on the GPU, got float32", q.quant.format.name()));
    }
    // A block past its dimension is the whole dimension (the same blocks), and then fits int32.
    let (bo, bi) = q.quant.block(g.kd as u64);
    let clamp = |b: u64, dim: usize| b.clamp(1, dim.max(1) as u64) as i32;
    let cfg = match cfg {
        Some(c) if c.has_quant() => c,
        _ => pick_quant_cfg(n_assign, experts, g.kd, dev.arch, clamp(bi, g.kd) as usize),
    };
    let name = cfg.quant_kernel_name(tname(elem), format_name(q.quant.format)).ok_or_else(|| format!("no quantized form of {cfg:?}"))?;
    let f = dev.func(&name)?;
    let units = work_units(cfg.tile(), 1, n_assign, experts, g.n, g.gated);
    let grid = units.min(f.resident as usize).max(1);
    let mut args = gemm_args(g, k, experts, ws, p);
    args.extend([
        Arg::Ptr(q.scale),
        Arg::opt(q.zero),
        Arg::I32((q.quant.scale == ElemType::F32) as i32),
        Arg::I32(clamp(bo, g.n)),
        Arg::I32(clamp(bi, g.kd)),
    ]);
    driver::launch(&f, (grid as u32, 1), stream, &args, &name)
}

/// Y[t] = sum_j w[t,j] kept[t,j] O[pos[t*k+j]] (kernels/combine.cu).
#[allow(clippy::too_many_arguments)]
unsafe fn combine(
    dev: &Device,
    stream: CUstream,
    elem: ElemType,
    o: CUdeviceptr,
    pos: Option<CUdeviceptr>,
    w: Option<CUdeviceptr>,
    kept: Option<CUdeviceptr>,
    y: CUdeviceptr,
    tokens: usize,
    k: usize,
    d: usize,
) -> CuResult<()> {
    let v = 16 / elem.size_bytes();
    let total = tokens * d.div_ceil(v);
    if total == 0 {
        return Ok(());
    }
    let name = format!("scattermoe_combine_{}", tname(elem));
    let f = dev.func(&name)?;
    driver::launch(
        &f,
        (total.div_ceil(f.threads as usize) as u32, 1),
        stream,
        &[Arg::Ptr(o), Arg::opt(pos), Arg::opt(w), Arg::opt(kept), Arg::Ptr(y), Arg::I32(tokens as i32), Arg::I32(k as i32), Arg::I32(d as i32)],
        &name,
    )
}

/// `ScatterMoE` on `stream`: routing -> GEMM1 (grouped out, bias + activation / GLU fused) ->
/// GEMM2 (grouped in and out) -> combine with the routing weights (and the kept mask).
/// `ws` holds [`Plan::scatter_moe`] bytes; `y` is [T, d].
///
/// # Safety
/// Every pointer must be a device allocation of the size the contract gives for `s` and `elem`
/// / `it` (routing indices), usable on `stream`'s context; `dev` must be that context's Device.
#[allow(clippy::too_many_arguments)]
pub unsafe fn scatter_moe(
    dev: &Device,
    stream: CUstream,
    attrs: &scatter_moe::Attrs,
    elem: ElemType,
    it: IndexType,
    s: MoeSizes,
    capacity: Option<usize>,
    x: &MoePtrs,
    ws: CUdeviceptr,
    y: CUdeviceptr,
    cfg: (CfgOverride, CfgOverride),
    error_to: Option<CUdeviceptr>,
) -> CuResult<Launched> {
    check_limits(scatter_moe::NAME, s.tokens, s.k, s.experts)?;
    let n_assign = s.tokens * s.k;
    if n_assign == 0 || s.d == 0 {
        return Ok(Launched { error: None });
    }
    let p = Plan::scatter_moe(s, elem, capacity.is_some());
    if let (Some(c), Some(at)) = (capacity, p.capacity) {
        write_capacity(stream, ws + at as u64, c)?;
    }
    let cap = p.capacity.map(|at| (ws + at as u64, attrs.capacity_order));
    let kept = p.kept.map(|at| ws + at as u64);
    if capacity.is_none() && cfg == (None, None) {
        if let Some(f) = decode::decode_kernel(dev, elem, s, x, attrs.gated) {
            let error = error_to.unwrap_or(ws + p.error as u64);
            if decode::moe_decode(&f, stream, attrs, elem, it, s, x, ws, &p, y, error)? {
                return Ok(Launched { error: Some(error) });
            }
            // the grid could not be resident at once here: the four kernels below
        }
    }
    let error = routing(dev, stream, it, x.routing_indices, s.tokens, s.k, s.experts, ws, &p, cap, kept, error_to)?;
    let hidden = ws + p.hidden.unwrap() as u64;
    let out = ws + p.out.unwrap() as u64;
    let n = if attrs.gated { 2 * s.f } else { s.f };
    let g1 = Gemm {
        x: x.x,
        w: x.w_in,
        bias: x.b_in,
        y: hidden,
        row_scale: None,
        n,
        kd: s.d,
        grouped_in: false,
        grouped_out: true,
        act: Some(attrs.activation),
        gated: attrs.gated,
        glu_layout: attrs.glu_layout,
        alpha: attrs.alpha,
        limit: attrs.limit,
        quant: x.w_in_quant,
    };
    gemm(dev, stream, elem, &g1, s.k, n_assign, s.experts, ws, &p, cfg.0)?;
    let g2 = Gemm {
        x: hidden,
        w: x.w_out,
        bias: x.b_out,
        y: out,
        row_scale: None,
        n: s.d,
        kd: s.f,
        grouped_in: true,
        grouped_out: true,
        act: None,
        gated: false,
        glu_layout: GluLayout::GateUp,
        alpha: 0.0,
        limit: 0.0,
        quant: x.w_out_quant,
    };
    gemm(dev, stream, elem, &g2, s.k, n_assign, s.experts, ws, &p, cfg.1)?;
    combine(dev, stream, elem, out, Some(ws + p.pos as u64), Some(x.routing_weights), kept, y, s.tokens, s.k, s.d)?;
    Ok(Launched { error: Some(error) })
}

/// `ParallelLinear` on `stream`: routing, one GEMM (grouped_in / grouped_out per the attributes),
/// and the combine over k when `gates` is given. `ws` holds [`Plan::parallel_linear`] bytes;
/// `y` has the contract's output shape.
///
/// # Safety
/// As [`scatter_moe`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn parallel_linear(
    dev: &Device,
    stream: CUstream,
    attrs: &parallel_linear::Attrs,
    elem: ElemType,
    it: IndexType,
    s: LinearSizes,
    x: &LinearPtrs,
    ws: CUdeviceptr,
    y: CUdeviceptr,
    cfg: CfgOverride,
    error_to: Option<CUdeviceptr>,
) -> CuResult<Launched> {
    check_limits(parallel_linear::NAME, s.tokens, s.k, s.experts)?;
    let n_assign = s.tokens * s.k;
    if n_assign == 0 || s.d_out == 0 {
        return Ok(Launched { error: None });
    }
    let p = Plan::parallel_linear(s, elem, x.gates.is_some());
    let error = routing(dev, stream, it, x.routing_indices, s.tokens, s.k, s.experts, ws, &p, None, None, error_to)?;
    let (dst, grouped_out) = match p.out {
        Some(o) => (ws + o as u64, true),
        None => (y, attrs.grouped_out),
    };
    let g = Gemm {
        x: x.x,
        w: x.w,
        bias: x.b,
        y: dst,
        row_scale: None,
        n: s.d_out,
        kd: s.d_in,
        grouped_in: attrs.grouped_in,
        grouped_out,
        act: None,
        gated: false,
        glu_layout: GluLayout::GateUp,
        alpha: 0.0,
        limit: 0.0,
        quant: x.w_quant,
    };
    gemm(dev, stream, elem, &g, s.k, n_assign, s.experts, ws, &p, cfg)?;
    if x.gates.is_some() {
        combine(dev, stream, elem, dst, Some(ws + p.pos as u64), x.gates, None, y, s.tokens, s.k, s.d_out)?;
    }
    Ok(Launched { error: Some(error) })
}

/// `CapacityMask` on `stream`: routing with the capacity; `kept` (bool/uint8 [T*k], flat order)
/// is written directly. `ws` holds [`Plan::capacity_mask`] bytes.
///
/// # Safety
/// As [`scatter_moe`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn capacity_mask(
    dev: &Device,
    stream: CUstream,
    attrs: &capacity_mask::Attrs,
    it: IndexType,
    tokens: usize,
    k: usize,
    capacity: usize,
    routing_indices: CUdeviceptr,
    ws: CUdeviceptr,
    kept: CUdeviceptr,
    error_to: Option<CUdeviceptr>,
) -> CuResult<Launched> {
    check_limits(capacity_mask::NAME, tokens, k, attrs.num_experts)?;
    if tokens * k == 0 {
        return Ok(Launched { error: None });
    }
    let p = Plan::capacity_mask(tokens, k, attrs.num_experts);
    let at = ws + p.capacity.unwrap() as u64;
    write_capacity(stream, at, capacity)?;
    let error = routing(dev, stream, it, routing_indices, tokens, k, attrs.num_experts, ws, &p, Some((at, attrs.capacity_order)), Some(kept), error_to)?;
    Ok(Launched { error: Some(error) })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bound covers the units the kernels walk (their tile prefix: ceil(rows / BM) row tiles
    /// per expert, over groups of `cluster`, times the column tiles), for every configuration and
    /// routings from one row on one expert to skewed ones; for the skinny kernel's 8-row units
    /// too, at one token of Mixtral (2 experts x 896 column tiles of GEMM1).
    #[test]
    fn work_units_bound_the_kernels_units() {
        let mut seed = 0x2545f4914f6cdd1du64;
        let mut next = move |m: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % m as u64) as usize
        };
        for cfg in GemmCfg::ALL {
            let c = cfg.cluster() as usize;
            let (bm, bn) = cfg.tile();
            for (n_assign, experts) in [(1usize, 1usize), (2, 8), (37, 4), (300, 16), (1000, 256), (4096, 8)] {
                for (n, gated) in [(72usize, true), (200, false), (28672, true), (5, false)] {
                    for skew in [false, true] {
                        let mut rows: Vec<usize> = vec![0; experts];
                        for _ in 0..n_assign {
                            rows[if skew { next(2.min(experts)) } else { next(experts) }] += 1;
                        }
                        let (nout, bno) = if gated { (n / 2, bn / 2) } else { (n, bn) };
                        let walked: usize = rows.iter().map(|r| r.div_ceil(bm * c)).sum::<usize>() * nout.div_ceil(bno);
                        let bound = work_units((bm, bn), c, n_assign, experts, n, gated);
                        assert!(walked <= bound, "{cfg:?} {n_assign} rows over {experts} experts, n {n} gated {gated}: {walked} > {bound}");
                    }
                }
            }
        }
        assert_eq!(GemmCfg::Skinny.tile(), (8, 32));
        assert_eq!(work_units(GemmCfg::Skinny.tile(), 1, 2, 8, 28672, true), (1 + 2) * 896);
    }
}
