//! The forward passes on the GPU: workspace plans, kernel choice and launches for `ScatterMoE`,
//! `ParallelLinear` and `CapacityMask`, all on one given stream with device pointers. Nothing here
//! allocates, synchronises or reads device memory on the host: a caller (the ORT CUDA kernels,
//! the GPU tests) hands in one workspace of [`Plan::bytes`] and checks the error words
//! ([`Launched::error`]) its own way.
//!
//! Launch sequence and contracts: kernels/common.cuh, routing.cu, grouped_gemm.cu, combine.cu;
//! tests/gpu/smoe_cuda.py is the reference host (same choices, in Python).

use super::tensor_map;
use super::driver::{self, Arg, CuResult, Device};
use crate::reference::{LinearSizes, MoeSizes};
use crate::spec::{capacity_mask, parallel_linear, scatter_moe, Activation, CapacityOrder, ElemType, GluLayout, IndexType, SpecError};
use cudarc::driver::sys::{self, CUdeviceptr, CUstream};

/// Assignments per routing block (SMOE_ROUTING_CHUNK).
pub const ROUTING_CHUNK: usize = 4096;
/// The most experts the kernels accept (SMOE_ROUTING_MAX_E).
pub const MAX_EXPERTS: usize = 1024;
/// Alignment of every workspace section.
pub const ALIGN: usize = 256;

// ---------------------------------------------------------------------------------------------
// Kernel configurations of grouped_gemm.cu
// ---------------------------------------------------------------------------------------------

/// One grouped-GEMM kernel configuration (the suffix of its entry point).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmCfg {
    /// mma.sync 128x128 tiles, 4 stages
    T128x128,
    /// mma.sync 32x64 tiles
    T32x64,
    /// 32x64 with 6 stages
    T32x64s6,
    /// mma.sync 32x32 tiles
    T32x32,
    /// Hopper warp-specialised wgmma (cp.async producer warpgroup, 2 consumer warpgroups),
    /// 128x256x64, sm_90a only (kernels/gemm_hopper_ws.cuh)
    WgmmaWs,
    /// WgmmaWs with W loaded by TMA (two boxes per stage, one thread) and only the A rows by
    /// cp.async, sm_90a only; needs a TMA-readable W (tensor_map::w_fits)
    WgmmaTma,
    /// WgmmaTma in clusters of two CTAs that share each W tile through a multicast TMA load
    /// (two M tiles per cluster), sm_90a only; needs a TMA-readable W (tensor_map::w_fits)
    WgmmaMc,
    /// SIMT f32, 64x64
    F32,
}

impl GemmCfg {
    /// The tensor-core (f16/bf16) configurations.
    pub const TENSOR_CORE: [GemmCfg; 7] = [
        GemmCfg::T128x128,
        GemmCfg::T32x64,
        GemmCfg::T32x64s6,
        GemmCfg::T32x32,
        GemmCfg::WgmmaWs,
        GemmCfg::WgmmaTma,
        GemmCfg::WgmmaMc,
    ];

    pub const fn suffix(self) -> &'static str {
        match self {
            GemmCfg::T128x128 => "128x128",
            GemmCfg::T32x64 => "32x64",
            GemmCfg::T32x64s6 => "32x64s6",
            GemmCfg::T32x32 => "32x32",
            GemmCfg::WgmmaWs => "wgmma_ws",
            GemmCfg::WgmmaTma => "wgmma_tma",
            GemmCfg::WgmmaMc => "wgmma_mc",
            GemmCfg::F32 => "f32",
        }
    }

    pub fn from_suffix(s: &str) -> Option<GemmCfg> {
        Self::TENSOR_CORE.into_iter().find(|c| c.suffix() == s)
    }

    /// (BM, BN): rows and W rows of one tile.
    pub const fn tile(self) -> (usize, usize) {
        match self {
            GemmCfg::T128x128 => (128, 128),
            GemmCfg::WgmmaWs | GemmCfg::WgmmaTma | GemmCfg::WgmmaMc => (128, 256),
            GemmCfg::T32x64 | GemmCfg::T32x64s6 => (32, 64),
            GemmCfg::T32x32 => (32, 32),
            GemmCfg::F32 => (64, 64),
        }
    }

    pub const fn threads(self) -> u32 {
        match self {
            GemmCfg::T128x128 | GemmCfg::F32 => 256,
            GemmCfg::WgmmaWs | GemmCfg::WgmmaTma | GemmCfg::WgmmaMc => 384,
            GemmCfg::T32x64 | GemmCfg::T32x64s6 | GemmCfg::T32x32 => 128,
        }
    }

    /// Dynamic shared memory bytes.
    pub const fn smem(self) -> u32 {
        match self {
            GemmCfg::T128x128 => 65536,
            GemmCfg::T32x64 => 49152,
            GemmCfg::T32x64s6 => 73728,
            GemmCfg::T32x32 => 32768,
            GemmCfg::WgmmaWs | GemmCfg::WgmmaTma | GemmCfg::WgmmaMc => 4 * 49152 + 1024,
            GemmCfg::F32 => 0,
        }
    }

    /// Whether the kernel exists only as sm_90a code (wgmma; its body traps elsewhere).
    pub const fn sm90a_only(self) -> bool {
        matches!(self, GemmCfg::WgmmaWs | GemmCfg::WgmmaTma | GemmCfg::WgmmaMc)
    }

    /// Whether the kernel reads W through a TMA tensor map (an extra kernel parameter).
    pub const fn w_by_tma(self) -> bool {
        matches!(self, GemmCfg::WgmmaTma | GemmCfg::WgmmaMc)
    }

    /// Whether the kernel has a `_ga` form ([`GROUPED_A_SUFFIX`]) for grouped input, with A by TMA as
    /// well as W: wgmma_mc, 2-4% faster on Mixtral's GEMM2 at 4096 tokens (H200). The same form of
    /// wgmma_tma was 7-11% slower where experts have few rows or K is short, because a TMA box always
    /// brings 128 rows (tests/gpu/RESULTS.md, fifth and seventh rounds).
    pub const fn has_grouped_a_form(self) -> bool {
        matches!(self, GemmCfg::WgmmaMc)
    }

    /// CTAs per cluster of this configuration's kernels.
    pub const fn cluster(self) -> u32 {
        match self {
            GemmCfg::WgmmaMc => 2,
            _ => 1,
        }
    }

    /// The entry point for element type suffix `t` (f32, f16, bf16).
    pub fn kernel_name(self, t: &str) -> String {
        match self {
            GemmCfg::F32 => "scattermoe_gemm_f32".into(),
            c => format!("scattermoe_gemm_{t}_{}", c.suffix()),
        }
    }
}

/// Rows per active expert at or below which the small-tile kernels win (measured on H200).
pub const SMALL_ROWS: f64 = 128.0;
/// On sm_90a, rows per active expert above which the warp-specialised wgmma kernel wins
/// (H200, bf16, tests/gpu/RESULTS.md): at 16 rows 32x64 is ahead, from 32 rows wgmma_ws.
pub const HOPPER_SMALL_ROWS: f64 = 16.0;
/// On sm_90a above HOPPER_SMALL_ROWS, from the per-GEMM timings of the three Hopper kernels and the
/// whole-layer benchmark (H200, bf16, tests/gpu/RESULTS.md, "Fourth round"):
/// - the CTA pair (wgmma_mc) for a deep reduction (K >= HOPPER_MC_DEEP_K: Mixtral's GEMM2, K =
///   14336) above HOPPER_MC_DEEP_ROWS rows per expert (1.05-1.15x wgmma_tma from 128 rows on), and
///   for K >= HOPPER_TMA_K from HOPPER_MC_ROWS rows (Mixtral's GEMM1 at 4096 and 16384 tokens: the
///   whole layer, back to back, was 4-5% slower with wgmma_tma there, which moves more bytes from
///   L2 per FLOP on a card that runs at its power limit);
/// - wgmma_tma for K >= HOPPER_TMA_K (Mixtral's GEMM1 below that: 1.03-1.1x the others per GEMM;
///   1.15 against 1.24 ms at 1024 tokens) or from HOPPER_TMA_ROWS rows per expert (Qwen3 and
///   fine-grained from 256 rows: 1.0-1.1x);
/// - wgmma_ws otherwise (short K and few rows: its cp.async W loads are 1.0-1.1x faster there).
pub const HOPPER_MC_DEEP_K: usize = 8192;
pub const HOPPER_MC_DEEP_ROWS: f64 = 64.0;
pub const HOPPER_MC_ROWS: f64 = 1024.0;
pub const HOPPER_TMA_K: usize = 4096;
pub const HOPPER_TMA_ROWS: f64 = 256.0;
/// From this reduction depth the TMA kernels get a full grid (one CTA or pair per work unit) instead
/// of a persistent one (H200, Mixtral at 1024 tokens: GEMM1 1.21 -> 1.01 ms, GEMM2 0.60 -> 0.55;
/// neutral at 4096 tokens; Qwen3's K = 2048 / 768 was 3-8% slower with it: tests/gpu/RESULTS.md).
pub const FULL_GRID_K: usize = 4096;

/// The kernel choice of kernels/grouped_gemm.cu's header (tests/gpu/smoe_cuda.py `pick_cfg`):
/// `n_assign` rows over `experts` experts, reduction depth `k_depth`. f32 has one kernel.
pub fn pick_cfg(elem: ElemType, n_assign: usize, experts: usize, k_depth: usize, wgmma: bool) -> GemmCfg {
    if elem == ElemType::F32 {
        return GemmCfg::F32;
    }
    let r = n_assign as f64 / experts.min(n_assign).max(1) as f64;
    if r <= 1.0 && k_depth <= 2048 {
        return GemmCfg::T32x32;
    }
    let small = if wgmma { HOPPER_SMALL_ROWS } else { SMALL_ROWS };
    if r <= small {
        return if k_depth >= 8192 { GemmCfg::T32x64s6 } else { GemmCfg::T32x64 };
    }
    if wgmma {
        return if (k_depth >= HOPPER_MC_DEEP_K && r > HOPPER_MC_DEEP_ROWS) || (k_depth >= HOPPER_TMA_K && r >= HOPPER_MC_ROWS) {
            GemmCfg::WgmmaMc
        } else if k_depth >= HOPPER_TMA_K || r >= HOPPER_TMA_ROWS {
            GemmCfg::WgmmaTma
        } else {
            GemmCfg::WgmmaWs
        };
    }
    if k_depth < 1024 && r <= 512.0 {
        return GemmCfg::T32x64;
    }
    GemmCfg::T128x128
}

fn tname(t: ElemType) -> &'static str {
    match t {
        ElemType::F32 => "f32",
        ElemType::F16 => "f16",
        ElemType::BF16 => "bf16",
    }
}

fn iname(i: IndexType) -> &'static str {
    match i {
        IndexType::I32 => "i32",
        IndexType::I64 => "i64",
    }
}

fn act_code(a: Option<Activation>) -> i32 {
    match a {
        None => 0,
        Some(Activation::Silu) => 1,
        Some(Activation::Gelu) => 2,
        Some(Activation::GeluTanh) => 3,
        Some(Activation::Relu) => 4,
        Some(Activation::SwigluOai) => 5,
    }
}

fn glu_code(l: GluLayout) -> i32 {
    match l {
        GluLayout::GateUp => 0,
        GluLayout::UpGate => 1,
        GluLayout::Interleaved => 2,
    }
}

fn order_code(o: CapacityOrder) -> i32 {
    match o {
        CapacityOrder::SlotMajor => 0,
        CapacityOrder::TokenMajor => 1,
    }
}

// ---------------------------------------------------------------------------------------------
// Workspace
// ---------------------------------------------------------------------------------------------

fn align(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

/// Byte offsets of the workspace sections (each 256-byte aligned) and the total size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Plan {
    /// routing counts, scattermoe_routing_workspace_bytes(T, k, E)
    pub routing: usize,
    /// expert_offsets, int32 [E + 1]
    pub offsets: usize,
    /// sorted_idx, int32 [N]
    pub sorted_idx: usize,
    /// pos, int32 [N]
    pub pos: usize,
    /// error words, int32 [2]
    pub error: usize,
    /// capacity, int64 [1] (when given)
    pub capacity: Option<usize>,
    /// kept mask, uint8 [N] (ScatterMoE with capacity)
    pub kept: Option<usize>,
    /// hidden activations H, T [N, f] (ScatterMoE)
    pub hidden: Option<usize>,
    /// expert outputs O, T [N, d] (ScatterMoE; ParallelLinear with gates)
    pub out: Option<usize>,
    pub bytes: usize,
}

/// The routing workspace of kernels/common.cuh: 4 * (2 * nb * E + nb + 64) bytes.
pub fn routing_workspace_bytes(tokens: usize, k: usize, experts: usize) -> usize {
    let nb = (tokens * k).div_ceil(ROUTING_CHUNK);
    4 * (2 * nb * experts + nb + 64)
}

struct Layout {
    at: usize,
}

impl Layout {
    fn take(&mut self, bytes: usize) -> usize {
        let o = self.at;
        self.at += align(bytes.max(1));
        o
    }
}

fn routing_plan(tokens: usize, k: usize, experts: usize, capacity: bool) -> (Plan, Layout) {
    let n = tokens * k;
    let mut l = Layout { at: 0 };
    let plan = Plan {
        routing: l.take(routing_workspace_bytes(tokens, k, experts)),
        offsets: l.take(4 * (experts + 1)),
        sorted_idx: l.take(4 * n),
        pos: l.take(4 * n),
        error: l.take(8),
        capacity: capacity.then(|| l.take(8)),
        ..Plan::default()
    };
    (plan, l)
}

impl Plan {
    /// `ScatterMoE`: routing, H [N, f] and O [N, d] in `elem`, the kept mask with a capacity.
    pub fn scatter_moe(s: MoeSizes, elem: ElemType, capacity: bool) -> Plan {
        let n = s.tokens * s.k;
        let (mut p, mut l) = routing_plan(s.tokens, s.k, s.experts, capacity);
        p.kept = capacity.then(|| l.take(n));
        p.hidden = Some(l.take(n * s.f * elem.size_bytes()));
        p.out = Some(l.take(n * s.d * elem.size_bytes()));
        p.bytes = l.at;
        p
    }

    /// `ParallelLinear`: routing, and O [N, d_out] when gates combine over k.
    pub fn parallel_linear(s: LinearSizes, elem: ElemType, gates: bool) -> Plan {
        let n = s.tokens * s.k;
        let (mut p, mut l) = routing_plan(s.tokens, s.k, s.experts, false);
        p.out = gates.then(|| l.take(n * s.d_out * elem.size_bytes()));
        p.bytes = l.at;
        p
    }

    /// `CapacityMask`: routing with the capacity; the kept mask is the op's output.
    pub fn capacity_mask(tokens: usize, k: usize, experts: usize) -> Plan {
        let (mut p, l) = routing_plan(tokens, k, experts, true);
        p.bytes = l.at;
        p
    }
}

// ---------------------------------------------------------------------------------------------
// Launches
// ---------------------------------------------------------------------------------------------

/// What a forward left on the device for its caller to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Launched {
    /// error words (int32 [2], kernels/common.cuh), or None when nothing was launched (T = 0)
    pub error: Option<CUdeviceptr>,
}

/// Limits of the kernels that the contract does not have.
fn check_limits(op: &'static str, tokens: usize, k: usize, experts: usize) -> Result<(), String> {
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

/// One grouped GEMM (kernels/grouped_gemm.cu).
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
}

/// The name suffix of the form of a kernel for grouped input that reads A through TMA too (see
/// [`GemmCfg::has_grouped_a_form`]).
pub const GROUPED_A_SUFFIX: &str = "_ga";

/// Forces one GEMM configuration (tests); None: [`pick_cfg`].
pub type CfgOverride = Option<GemmCfg>;

#[allow(clippy::too_many_arguments)]
unsafe fn gemm(dev: &Device, stream: CUstream, elem: ElemType, g: &Gemm, k: usize, n_assign: usize, experts: usize, ws: CUdeviceptr, p: &Plan, cfg: CfgOverride) -> CuResult<()> {
    let cfg = match (elem, cfg) {
        (ElemType::F32, _) => GemmCfg::F32,
        (_, Some(c)) if c != GemmCfg::F32 => c,
        _ => pick_cfg(elem, n_assign, experts, g.kd, dev.has_wgmma()),
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
    let (bm, bn) = cfg.tile();
    let nout = if g.gated { g.n / 2 } else { g.n };
    let bno = if g.gated { bn / 2 } else { bn };
    // Work units: tiles, or (clusters) groups of `cluster` M tiles of one expert.
    let c = f.cluster as usize;
    let units = (n_assign.div_ceil(bm * c) + experts.min(n_assign)) * nout.div_ceil(bno);
    let grid = if cfg.w_by_tma() && g.kd >= FULL_GRID_K {
        // One CTA (pair) per work unit: the hardware starts them in order as SMs free up, so the M
        // tiles that share a W tile run side by side and W leaves DRAM about once. A persistent grid
        // lets the CTAs drift apart (ncu: W read 1.5-2x at Mixtral 1024 tokens).
        units * c
    } else {
        (units * c).min(f.resident as usize).max(c) / c * c
    };
    let mut args = vec![
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
    ];
    if cfg.w_by_tma() {
        args.push(Arg::Map(tensor_map::encode_w(g.w, elem, experts, g.n, g.kd, g.gated, g.glu_layout)?));
    }
    if grouped_a {
        args.push(Arg::Map(tensor_map::encode_rows(g.x, elem, n_assign, g.kd)?));
    }
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
        (total.div_ceil(256) as u32, 1),
        stream,
        &[Arg::Ptr(o), Arg::opt(pos), Arg::opt(w), Arg::opt(kept), Arg::Ptr(y), Arg::I32(tokens as i32), Arg::I32(k as i32), Arg::I32(d as i32)],
        &name,
    )
}

/// Device pointers of `ScatterMoE`'s inputs.
#[derive(Debug, Clone, Copy)]
pub struct MoePtrs {
    pub x: CUdeviceptr,
    pub routing_weights: CUdeviceptr,
    pub routing_indices: CUdeviceptr,
    pub w_in: CUdeviceptr,
    pub w_out: CUdeviceptr,
    pub b_in: Option<CUdeviceptr>,
    pub b_out: Option<CUdeviceptr>,
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
    };
    gemm(dev, stream, elem, &g2, s.k, n_assign, s.experts, ws, &p, cfg.1)?;
    combine(dev, stream, elem, out, Some(ws + p.pos as u64), Some(x.routing_weights), kept, y, s.tokens, s.k, s.d)?;
    Ok(Launched { error: Some(error) })
}

/// Device pointers of `ParallelLinear`'s inputs.
#[derive(Debug, Clone, Copy)]
pub struct LinearPtrs {
    pub x: CUdeviceptr,
    pub routing_indices: CUdeviceptr,
    pub w: CUdeviceptr,
    pub b: Option<CUdeviceptr>,
    pub gates: Option<CUdeviceptr>,
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

// ---------------------------------------------------------------------------------------------
// Error words
// ---------------------------------------------------------------------------------------------

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

#[cfg(test)]
mod tests {
    use super::*;

    /// The decision table of kernels/grouped_gemm.cu's header, case by case.
    #[test]
    fn kernel_choice_follows_the_measured_thresholds() {
        let bf = ElemType::BF16;
        assert_eq!(pick_cfg(ElemType::F32, 32768, 8, 4096, true), GemmCfg::F32);
        // one row per expert, short K: the smallest tile
        assert_eq!(pick_cfg(bf, 8, 8, 1024, true), GemmCfg::T32x32);
        // 16 rows per expert: small tiles everywhere; the deep-K variant from K = 8192
        assert_eq!(pick_cfg(bf, 128, 8, 4096, true), GemmCfg::T32x64);
        assert_eq!(pick_cfg(bf, 128, 8, 14336, true), GemmCfg::T32x64s6);
        // 32 rows per expert: the warp-specialised kernels on sm_90a, small tiles elsewhere
        assert_eq!(pick_cfg(bf, 256, 8, 4096, true), GemmCfg::WgmmaTma);
        assert_eq!(pick_cfg(bf, 256, 8, 14336, true), GemmCfg::WgmmaTma);
        assert_eq!(pick_cfg(bf, 256, 8, 1024, true), GemmCfg::WgmmaWs);
        assert_eq!(pick_cfg(bf, 256, 8, 4096, false), GemmCfg::T32x64);
        // deep K: CTA pairs above 64 rows per expert
        assert_eq!(pick_cfg(bf, 512, 8, 14336, true), GemmCfg::WgmmaTma);
        assert_eq!(pick_cfg(bf, 1024, 8, 14336, true), GemmCfg::WgmmaMc);
        assert_eq!(pick_cfg(bf, 32768, 8, 14336, true), GemmCfg::WgmmaMc);
        // K = 4096: W by TMA, CTA pairs from 1024 rows per expert
        assert_eq!(pick_cfg(bf, 2048, 8, 4096, true), GemmCfg::WgmmaTma);
        assert_eq!(pick_cfg(bf, 4096, 8, 4096, true), GemmCfg::WgmmaTma);
        assert_eq!(pick_cfg(bf, 8192, 8, 4096, true), GemmCfg::WgmmaMc);
        assert_eq!(pick_cfg(bf, 32768, 8, 4096, true), GemmCfg::WgmmaMc);
        // short K: cp.async below 256 rows per expert, TMA from there
        assert_eq!(pick_cfg(bf, 8192, 128, 2048, true), GemmCfg::WgmmaWs);
        assert_eq!(pick_cfg(bf, 32768, 128, 768, true), GemmCfg::WgmmaTma);
        assert_eq!(pick_cfg(bf, 8192, 64, 512, true), GemmCfg::WgmmaWs);
        assert_eq!(pick_cfg(bf, 32768, 64, 1024, true), GemmCfg::WgmmaTma);
        // elsewhere: 128x128 unless K is short and rows few
        assert_eq!(pick_cfg(bf, 32768, 8, 4096, false), GemmCfg::T128x128);
        assert_eq!(pick_cfg(bf, 8192, 32, 768, false), GemmCfg::T32x64);
        assert_eq!(pick_cfg(bf, 131072, 128, 768, false), GemmCfg::T128x128);
    }

    /// Launch geometry of the Hopper kernel as kernels/grouped_gemm.cu's header states it.
    #[test]
    fn hopper_kernel_geometry_matches_the_kernels() {
        assert_eq!((GemmCfg::WgmmaWs.tile(), GemmCfg::WgmmaWs.threads(), GemmCfg::WgmmaWs.smem()), ((128, 256), 384, 197632));
        // static (~7.3 KB) + dynamic shared memory must fit the 227 KB a block may have on sm_90
        assert!(GemmCfg::WgmmaWs.smem() as usize + 7296 <= 227 * 1024);
        assert_eq!(GemmCfg::from_suffix("wgmma_ws"), Some(GemmCfg::WgmmaWs));
        // the multicast form: same tile and block, in clusters of two (kernels say __cluster_dims__(2, 1, 1))
        assert_eq!((GemmCfg::WgmmaMc.tile(), GemmCfg::WgmmaMc.threads(), GemmCfg::WgmmaMc.smem()), ((128, 256), 384, 197632));
        assert_eq!(GemmCfg::WgmmaMc.cluster(), 2);
        assert!(GemmCfg::TENSOR_CORE.iter().filter(|&&c| c != GemmCfg::WgmmaMc).all(|c| c.cluster() == 1));
        // the TMA form without clusters: same tile and block; both TMA kernels take the map
        assert_eq!((GemmCfg::WgmmaTma.tile(), GemmCfg::WgmmaTma.threads(), GemmCfg::WgmmaTma.smem()), ((128, 256), 384, 197632));
        let tma: Vec<_> = GemmCfg::TENSOR_CORE.into_iter().filter(|c| c.w_by_tma()).collect();
        assert_eq!(tma, [GemmCfg::WgmmaTma, GemmCfg::WgmmaMc]);
        assert_eq!(GemmCfg::from_suffix("wgmma_tma"), Some(GemmCfg::WgmmaTma));
        assert_eq!(GemmCfg::F32.cluster(), 1);
        // only the pair kernel has a form with A by TMA for grouped input (driver.rs loads it)
        let ga: Vec<_> = GemmCfg::TENSOR_CORE.into_iter().filter(|c| c.has_grouped_a_form()).collect();
        assert_eq!(ga, [GemmCfg::WgmmaMc]);
        // every sm_90a-only kernel is a wgmma one, as their names say
        assert!(GemmCfg::TENSOR_CORE.iter().all(|c| c.sm90a_only() == c.suffix().starts_with("wgmma")));
    }
}
