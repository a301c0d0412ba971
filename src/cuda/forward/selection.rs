//! Which grouped-GEMM configuration runs a GEMM: a decision over rows per active expert, the
//! reduction depth and the device's [`Arch`], with the thresholds of kernels/manifest.toml
//! (`[selection]`), where tests/gpu/kernel_table.py reads them too.

use crate::cuda::arch::{Arch, Table};
use crate::cuda::catalogue::{thresholds, GemmCfg};
use crate::spec::ElemType;

/// Rows per active expert at or below which the skinny kernel (kernels/skinny_gemm.cu: W streamed
/// into registers, 8 rows of X a unit) runs a 16-bit W whatever K and size: 0, never. Measured on an
/// H100 (`bash tests/gpu/run_skinny.sh`, GEMM1 and GEMM2 alone, L2 flushed:
/// bench/results/skinny/h100-skinny.md), at Mixtral and DeepSeek-V3 the mma.sync tiles' time over
/// its 16-bit form's was 0.74-0.94 at 16 tokens and 0.84-1.03 at one token: there the tiles stream a
/// long W at 80-92% of the bandwidth. Where it does win, [`skinny_16bit`] says.
pub const SKINNY_ROWS: f64 = thresholds::SKINNY_ROWS;
/// A 16-bit W also takes the skinny kernel at K up to SKINNY_SHORT_K and R up to
/// SKINNY_SHORT_K_ROWS, or at R <= 1 when the hit experts' W is at most SKINNY_ONE_ROW_BYTES
/// ([`skinny_16bit`]).
pub const SKINNY_SHORT_K: usize = thresholds::SKINNY_SHORT_K;
pub const SKINNY_SHORT_K_ROWS: f64 = thresholds::SKINNY_SHORT_K_ROWS;
pub const SKINNY_ONE_ROW_BYTES: usize = thresholds::SKINNY_ONE_ROW_BYTES;
/// The same for a quantized W, where the mma.sync kernels convert W in shared memory behind a
/// barrier per k-block: the skinny kernel was 2.0-6.1x faster at 1 to 16 tokens (fp8 and int4 with
/// group 128, Mixtral, Qwen3, DeepSeek-V3), 1.8-2.3x at 8 rows per expert (Qwen3, 128 tokens) and
/// 0.97-1.43x at 32 (Mixtral, 128 tokens: fp8 GEMM1 the one tie), same file. Up to 8 rows a unit
/// reads W once; above, each 8 more rows of an expert read it again, from L2 mostly.
pub const QUANT_SKINNY_ROWS: f64 = thresholds::QUANT_SKINNY_ROWS;
/// On sm_90a, rows per active expert above which a quantized W takes wgmma_ws's quantized form
/// (gemm_hopper_ws.cuh, "Quantized W": the producer warpgroup converts the codes on their way to
/// shared memory, the consumers run bf16/f16 wgmma), where its packed path applies
/// ([`quant_wgmma_fits`]); the mma.sync forms otherwise. Measured on an H100 (GEMM1 and GEMM2 alone,
/// fp8 per channel and int4 group 128, bench/results/quant/h100-qgemm-ac46704.json): at 32 rows
/// (Mixtral, 128 tokens) the skinny kernel was 1.04-1.24x ahead of it; at 64 rows (Qwen3, 1024
/// tokens) it was 1.6-1.8x the 32x64 form, and 1.15-2.6x the mma.sync choice from there up.
pub const QUANT_WGMMA_ROWS: f64 = thresholds::QUANT_WGMMA_ROWS;
/// Rows per active expert at or below which the small-tile kernels win (measured on H200).
pub const SMALL_ROWS: f64 = thresholds::SMALL_ROWS;
/// On sm_90a, rows per active expert above which the warp-specialised wgmma kernel wins
/// (H200, bf16, tests/gpu/RESULTS.md): at 16 rows 32x64 is ahead, from 32 rows wgmma_ws.
pub const HOPPER_SMALL_ROWS: f64 = thresholds::HOPPER_SMALL_ROWS;
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
pub const HOPPER_MC_DEEP_K: usize = thresholds::HOPPER_MC_DEEP_K;
pub const HOPPER_MC_DEEP_ROWS: f64 = thresholds::HOPPER_MC_DEEP_ROWS;
pub const HOPPER_MC_ROWS: f64 = thresholds::HOPPER_MC_ROWS;
pub const HOPPER_TMA_K: usize = thresholds::HOPPER_TMA_K;
pub const HOPPER_TMA_ROWS: f64 = thresholds::HOPPER_TMA_ROWS;
/// HOPPER_TMA_ROWS on an H100 ([`Table::H100`]): wgmma_tma from above HOPPER_SMALL_ROWS. Measured
/// there (tests/gpu/bench_forward.py, each GEMM with every configuration forced, whole forwards in
/// CUDA graphs; bench/results/decode/README.md, "Between 16 and 256 rows"): at 32 to 128 rows per
/// expert wgmma_tma took 0.91-1.0x wgmma_ws's time in 27 of 28 GEMMs (fine-grained, Granite, Qwen3,
/// OLMoE and GPT-OSS-20B layers at 128 to 1024 tokens; the other, OLMoE's GEMM1 at 1024 tokens,
/// 1.02x), where the H200's measurement gave wgmma_ws the lead; the whole layer, this choice against
/// the default table's in one call: 0.95-1.0x (seven layers, 256 to 2048 tokens).
pub const HOPPER_TMA_ROWS_H100: f64 = thresholds::HOPPER_TMA_ROWS_H100;

/// HOPPER_TMA_ROWS of a card's table.
fn hopper_tma_rows(table: Table) -> f64 {
    match table {
        Table::Default => HOPPER_TMA_ROWS,
        Table::H100 => HOPPER_TMA_ROWS_H100,
    }
}

/// From this reduction depth the TMA kernels get a full grid (one CTA or pair per work unit) instead
/// of a persistent one (H200, Mixtral at 1024 tokens: GEMM1 1.21 -> 1.01 ms, GEMM2 0.60 -> 0.55;
/// neutral at 4096 tokens; Qwen3's K = 2048 / 768 was 3-8% slower with it: tests/gpu/RESULTS.md).
pub const FULL_GRID_K: usize = thresholds::FULL_GRID_K;

/// The kernel choice of kernels/grouped_gemm.cu's header (mirrored by tests/gpu/choice.py `pick_cfg`, which
/// python/tests/test_gpu_choice.py holds to the cases pinned below):
/// `n_assign` rows over `experts` experts, W [E, n, k_depth] (n: W's rows, a GLU's gate and up both),
/// on `arch` with the device's `table`. f32 has one kernel.
pub fn pick_cfg(elem: ElemType, n_assign: usize, experts: usize, n: usize, k_depth: usize, arch: Arch, table: Table) -> GemmCfg {
    if elem == ElemType::F32 {
        return GemmCfg::F32;
    }
    if skinny_16bit(n_assign, experts, n, k_depth) {
        return GemmCfg::Skinny;
    }
    choose(n_assign, experts, k_depth, arch.has_wgmma().then_some(table))
}

/// Whether the skinny kernel runs a 16-bit W. It reaches its bandwidth sooner than the mma.sync
/// tiles (no shared-memory pipeline to fill, W straight into registers) but streams a long W a
/// little slower, so it wins where a GEMM is short: a short reduction, or little W in all.
/// Measured on an H100, whole forwards in CUDA graphs over four input sets with each GEMM's small
/// configurations forced in turn (tests/gpu/bench_forward.py; bench/results/decode/README.md): 11
/// layer shapes at 1 to 64 tokens, 106 GEMMs. At K <= 1024 and up to 8 rows per expert (30 GEMMs:
/// fine-grained and Granite layers, the GEMM2 of Qwen3 and OLMoE) it took 0.68-1.004x the time of
/// the previous choice (a later sweep found Qwen3's GEMM2 at 8 rows per expert at 1.05x). At one
/// row per expert it took 0.85-0.97x up to 100 MiB of the hit experts' W (9 GEMMs), 1.02-1.03x at
/// 127 MiB, 0.94-1.08x between 170 and 400 MiB and up to 1.21x above.
pub fn skinny_16bit(n_assign: usize, experts: usize, n: usize, k_depth: usize) -> bool {
    let r = rows_per_expert(n_assign, experts);
    if r <= SKINNY_ROWS || (k_depth <= SKINNY_SHORT_K && r <= SKINNY_SHORT_K_ROWS) {
        return true;
    }
    let bytes = (experts.min(n_assign) as u128) * (n as u128) * (k_depth as u128) * 2;
    r <= 1.0 && bytes <= SKINNY_ONE_ROW_BYTES as u128
}

/// The choice for a quantized W (the skinny kernel, the mma.sync configurations and wgmma_ws have
/// quantized forms): the skinny kernel up to QUANT_SKINNY_ROWS rows per expert; on sm_90a above
/// QUANT_WGMMA_ROWS, wgmma_ws's form where its packed path takes the W ([`quant_wgmma_fits`];
/// `block_in`: the scale block along K, K itself for one block per row); else the mma.sync kernels,
/// with the thresholds used where there is no wgmma.
pub fn pick_quant_cfg(n_assign: usize, experts: usize, k_depth: usize, arch: Arch, block_in: usize) -> GemmCfg {
    let r = rows_per_expert(n_assign, experts);
    if r <= QUANT_SKINNY_ROWS {
        return GemmCfg::Skinny;
    }
    if arch.has_wgmma() && r > QUANT_WGMMA_ROWS && quant_wgmma_fits(k_depth, block_in) {
        return GemmCfg::WgmmaWs;
    }
    choose(n_assign, experts, k_depth, None)
}

/// Whether wgmma_ws's quantized form converts this W on its packed path: whole 16-element pieces
/// of a row (K % 16 == 0) and one scale block per 64-element stage (a block a multiple of 64, or one
/// block across K). Other W run correctly there too, element by element, slowly: not chosen.
pub fn quant_wgmma_fits(k_depth: usize, block_in: usize) -> bool {
    k_depth % 16 == 0 && (block_in % 64 == 0 || block_in >= k_depth)
}

/// R: rows per active expert, taking every expert that can have a row as active.
fn rows_per_expert(n_assign: usize, experts: usize) -> f64 {
    n_assign as f64 / experts.min(n_assign).max(1) as f64
}

/// The mma.sync and wgmma choice, above the skinny kernel's rows.
/// `wgmma`: the device's table where the wgmma kernels run, None elsewhere.
fn choose(n_assign: usize, experts: usize, k_depth: usize, wgmma: Option<Table>) -> GemmCfg {
    let r = rows_per_expert(n_assign, experts);
    if r <= 1.0 && k_depth <= 2048 {
        return GemmCfg::T32x32;
    }
    let small = if wgmma.is_some() { HOPPER_SMALL_ROWS } else { SMALL_ROWS };
    if r <= small {
        return if k_depth >= 8192 { GemmCfg::T32x64s6 } else { GemmCfg::T32x64 };
    }
    if let Some(table) = wgmma {
        return if (k_depth >= HOPPER_MC_DEEP_K && r > HOPPER_MC_DEEP_ROWS) || (k_depth >= HOPPER_TMA_K && r >= HOPPER_MC_ROWS) {
            GemmCfg::WgmmaMc
        } else if k_depth >= HOPPER_TMA_K || r >= hopper_tma_rows(table) {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The skinny kernel below its thresholds, on every arch and for every K; the tables below above
    /// them. The cut-offs are the manifest's, whatever their values.
    #[test]
    fn few_rows_per_expert_take_the_skinny_kernel() {
        let bf = ElemType::BF16;
        for arch in [Arch::Sm80, Arch::Sm89, Arch::Sm90a] {
            for k in [5, 768, 1024, 2048, 2880, 4096, 14336] {
                for (n, e) in [(1, 8), (2, 8), (8, 128), (16, 8), (64, 8), (65, 8), (128, 128), (1024, 128), (1025, 128)] {
                    for wn in [64, 1536, 7168, 28672] {
                        let r = rows_per_expert(n, e);
                        let bytes = e.min(n) * wn * k * 2;
                        let short = k <= SKINNY_SHORT_K && r <= SKINNY_SHORT_K_ROWS;
                        let one_row = r <= 1.0 && bytes <= SKINNY_ONE_ROW_BYTES;
                        let want = if r <= SKINNY_ROWS || short || one_row { GemmCfg::Skinny } else { choose(n, e, k, arch.has_wgmma().then_some(Table::Default)) };
                        assert_eq!(pick_cfg(bf, n, e, wn, k, arch, Table::Default), want, "{n} rows over {e} experts, W {wn} x {k}");
                        assert_eq!(pick_cfg(ElemType::F16, n, e, wn, k, arch, Table::Default), want);
                    }
                }
                // quantized W: its own threshold
                let qat = (8.0 * QUANT_SKINNY_ROWS) as usize;
                assert_eq!(pick_quant_cfg(2, 8, k, arch, k), GemmCfg::Skinny);
                assert_eq!(pick_quant_cfg(qat, 8, k, arch, k), GemmCfg::Skinny, "{qat} rows over 8 experts");
                if !arch.has_wgmma() {
                    assert_eq!(pick_quant_cfg(qat + 1, 8, k, arch, k), choose(qat + 1, 8, k, None));
                }
            }
        }
        // the measured cases (`skinny_16bit`): rows, experts, W's rows and K, the choice
        let measured = [
            // one token of GPT-OSS (4 rows over 128 experts): GEMM2 (63 MiB of W), not GEMM1 (127 MiB)
            (4, 128, 2880, 2880, GemmCfg::Skinny),
            (4, 128, 5760, 2880, GemmCfg::T32x64),
            // one token of Mixtral (GEMM2's W 224 MiB): neither GEMM
            (2, 8, 4096, 14336, GemmCfg::T32x64s6),
            (2, 8, 28672, 4096, GemmCfg::T32x64),
            // Qwen3 (d 2048, f 768, E 128, k 8): one token both GEMMs; 16 tokens GEMM2 only (K 768);
            // 64 tokens (4 rows per expert) GEMM2 but not GEMM1
            (8, 128, 1536, 2048, GemmCfg::Skinny),
            (8, 128, 2048, 768, GemmCfg::Skinny),
            (128, 128, 1536, 2048, GemmCfg::T32x32),
            (512, 128, 2048, 768, GemmCfg::Skinny),
            (512, 128, 1536, 2048, GemmCfg::T32x64),
            // fine-grained (d 1024, f 512): up to 8 rows per expert; 16 rows not
            (512, 64, 1024, 1024, GemmCfg::Skinny),
            (1024, 64, 1024, 1024, GemmCfg::T32x64),
            // DeepSeek-V3's GEMM2 (7168 x 2048) at one token (8 rows over 256 experts, 224 MiB): no
            (8, 256, 7168, 2048, GemmCfg::T32x32),
        ];
        for (n, e, wn, k, want) in measured {
            assert_eq!(pick_cfg(bf, n, e, wn, k, Arch::Sm90a, Table::Default), want, "{n} rows over {e} experts, W {wn} x {k}");
        }
        assert_eq!(pick_quant_cfg(256, 8, 4096, Arch::Sm90a, 4096), GemmCfg::Skinny);
        assert_eq!(pick_quant_cfg(264, 8, 4096, Arch::Sm80, 4096), GemmCfg::T32x64);
        // f32 has one kernel at every row count
        assert_eq!(pick_cfg(ElemType::F32, 2, 8, 64, 4096, Arch::Sm90a, Table::Default), GemmCfg::F32);
        // R counts the experts that can have a row: 128 tokens of Qwen3 (1024 rows over 128
        // experts) is eight rows per expert
        assert_eq!(pick_quant_cfg(1024, 128, 2048, Arch::Sm90a, 128), GemmCfg::Skinny);
        // no rows: nothing runs, and the choice is still one that exists
        assert_eq!(pick_cfg(bf, 0, 8, 4096, 4096, Arch::Sm80, Table::Default), GemmCfg::Skinny);
    }

    /// The decision table of kernels/grouped_gemm.cu's header above the skinny kernel's rows, case by
    /// case (`choose`: what `pick_cfg` and `pick_quant_cfg` take there).
    #[test]
    fn kernel_choice_follows_the_measured_thresholds() {
        let bf = ElemType::BF16;
        // a W too large for the skinny kernel's one-row rule
        const WIDE: usize = 1 << 20;
        let hopper = |n, e, k| choose(n, e, k, Some(Table::Default));
        let sm80 = |n, e, k| choose(n, e, k, None);
        assert_eq!(pick_cfg(ElemType::F32, 32768, 8, WIDE, 4096, Arch::Sm90a, Table::Default), GemmCfg::F32);
        // one row per expert, short K: the smallest tile (when the skinny kernel does not take it)
        assert_eq!(hopper(8, 8, 1024), GemmCfg::T32x32);
        assert_eq!(sm80(8, 8, 1024), GemmCfg::T32x32);
        // 16 rows per expert: small tiles everywhere; the deep-K variant from K = 8192
        assert_eq!(pick_cfg(bf, 128, 8, WIDE, 4096, Arch::Sm90a, Table::Default), GemmCfg::T32x64);
        assert_eq!(pick_cfg(bf, 128, 8, WIDE, 14336, Arch::Sm90a, Table::Default), GemmCfg::T32x64s6);
        assert_eq!(hopper(2, 8, 4096), GemmCfg::T32x64);
        // 32 rows per expert: the warp-specialised kernels on sm_90a, small tiles elsewhere
        assert_eq!(pick_cfg(bf, 256, 8, WIDE, 4096, Arch::Sm90a, Table::Default), GemmCfg::WgmmaTma);
        assert_eq!(pick_cfg(bf, 256, 8, WIDE, 14336, Arch::Sm90a, Table::Default), GemmCfg::WgmmaTma);
        assert_eq!(pick_cfg(bf, 256, 8, WIDE, 1024, Arch::Sm90a, Table::Default), GemmCfg::WgmmaWs);
        assert_eq!(pick_cfg(bf, 256, 8, WIDE, 4096, Arch::Sm80, Table::Default), GemmCfg::T32x64);
        // deep K: CTA pairs above 64 rows per expert
        assert_eq!(pick_cfg(bf, 512, 8, WIDE, 14336, Arch::Sm90a, Table::Default), GemmCfg::WgmmaTma);
        assert_eq!(pick_cfg(bf, 1024, 8, WIDE, 14336, Arch::Sm90a, Table::Default), GemmCfg::WgmmaMc);
        assert_eq!(pick_cfg(bf, 32768, 8, WIDE, 14336, Arch::Sm90a, Table::Default), GemmCfg::WgmmaMc);
        // K = 4096: W by TMA, CTA pairs from 1024 rows per expert
        assert_eq!(pick_cfg(bf, 2048, 8, WIDE, 4096, Arch::Sm90a, Table::Default), GemmCfg::WgmmaTma);
        assert_eq!(pick_cfg(bf, 4096, 8, WIDE, 4096, Arch::Sm90a, Table::Default), GemmCfg::WgmmaTma);
        assert_eq!(pick_cfg(bf, 8192, 8, WIDE, 4096, Arch::Sm90a, Table::Default), GemmCfg::WgmmaMc);
        assert_eq!(pick_cfg(bf, 32768, 8, WIDE, 4096, Arch::Sm90a, Table::Default), GemmCfg::WgmmaMc);
        // short K: cp.async below 256 rows per expert, TMA from there
        assert_eq!(pick_cfg(bf, 8192, 128, WIDE, 2048, Arch::Sm90a, Table::Default), GemmCfg::WgmmaWs);
        assert_eq!(pick_cfg(bf, 32768, 128, WIDE, 768, Arch::Sm90a, Table::Default), GemmCfg::WgmmaTma);
        assert_eq!(pick_cfg(bf, 8192, 64, WIDE, 512, Arch::Sm90a, Table::Default), GemmCfg::WgmmaWs);
        assert_eq!(pick_cfg(bf, 32768, 64, WIDE, 1024, Arch::Sm90a, Table::Default), GemmCfg::WgmmaTma);
        // elsewhere: 128x128 unless K is short and rows few
        assert_eq!(pick_cfg(bf, 32768, 8, WIDE, 4096, Arch::Sm80, Table::Default), GemmCfg::T128x128);
        assert_eq!(pick_cfg(bf, 8192, 32, WIDE, 768, Arch::Sm80, Table::Default), GemmCfg::T32x64);
        assert_eq!(pick_cfg(bf, 131072, 128, WIDE, 768, Arch::Sm80, Table::Default), GemmCfg::T128x128);
    }

    /// The H100's table: wgmma_tma from above 16 rows per expert where W is TMA-readable (the
    /// default table keeps wgmma_ws below 256 rows at short K); everything else as the default.
    #[test]
    fn the_h100_takes_wgmma_tma_from_the_small_tiles_up() {
        let bf = ElemType::BF16;
        assert_eq!(Table::for_device("NVIDIA H100 80GB HBM3"), Table::H100);
        assert_eq!(Table::for_device("NVIDIA H200"), Table::Default);
        assert_eq!(Table::for_device("NVIDIA A100-SXM4-80GB"), Table::Default);
        for (n, e, wn, k) in [(8192, 128, 1536, 2048), (8192, 64, 1024, 1024), (2048, 64, 1024, 1024), (4096, 32, 5760, 2880), (32768, 256, 7168, 2048)] {
            assert_eq!(pick_cfg(bf, n, e, wn, k, Arch::Sm90a, Table::Default), GemmCfg::WgmmaWs, "{n} {e} {k}");
            assert_eq!(pick_cfg(bf, n, e, wn, k, Arch::Sm90a, Table::H100), GemmCfg::WgmmaTma, "{n} {e} {k}");
        }
        // at or below the small tiles' rows, from 256 rows, at K >= 4096, and without wgmma: the same
        for (n, e, wn, k) in [(2048, 128, 1536, 2048), (32768, 128, 1536, 2048), (2048, 8, 28672, 4096), (1024, 8, 4096, 14336), (8192, 128, 1536, 2048)] {
            for arch in [Arch::Sm80, Arch::Sm89, Arch::Sm90a] {
                let same = arch != Arch::Sm90a || n / e.min(n) <= 16 || n / e.min(n) >= 256 || k >= 4096;
                if same {
                    assert_eq!(pick_cfg(bf, n, e, wn, k, arch, Table::H100), pick_cfg(bf, n, e, wn, k, arch, Table::Default), "{n} {e} {k} {arch:?}");
                }
            }
        }
    }

    /// Quantized W: above the skinny kernel's rows, wgmma_ws's quantized form on sm_90a where its
    /// packed path takes the W, else the mma.sync choices of the archs without wgmma; every choice
    /// has a quantized form.
    #[test]
    fn quantized_weights_take_the_wgmma_form_on_hopper_and_mma_sync_elsewhere() {
        for (n, e, k) in [(8, 8, 1024), (2, 8, 4096), (128, 8, 4096), (128, 8, 14336), (256, 8, 4096), (8192, 32, 768), (32768, 8, 4096), (32768, 8, 14336)] {
            for block_in in [k, 128, 64, 32] {
                for arch in [Arch::Sm80, Arch::Sm89, Arch::Sm90a] {
                    let q = pick_quant_cfg(n, e, k, arch, block_in);
                    let r = rows_per_expert(n, e);
                    if r <= QUANT_SKINNY_ROWS {
                        assert_eq!(q, GemmCfg::Skinny);
                    } else if arch == Arch::Sm90a && r > QUANT_WGMMA_ROWS && block_in != 32 {
                        assert_eq!(q, GemmCfg::WgmmaWs, "{n} {e} {k} {block_in}");
                    } else {
                        assert_eq!(q, choose(n, e, k, None), "{n} {e} {k} {block_in} {arch:?}");
                    }
                    assert!(q.has_quant() && q.runs_on(arch), "{q:?}");
                }
            }
        }
        // the packed path's conditions
        assert!(quant_wgmma_fits(4096, 4096) && quant_wgmma_fits(4096, 128) && quant_wgmma_fits(2880, 2880) && quant_wgmma_fits(768, 64));
        assert!(!quant_wgmma_fits(4096, 32) && !quant_wgmma_fits(4104, 4104) && !quant_wgmma_fits(200, 100));
        assert!(quant_wgmma_fits(4000, 8192), "one block across K, whatever its size");
        assert_eq!(pick_quant_cfg(2, 8, 4096, Arch::Sm90a, 128), GemmCfg::Skinny);
        assert_eq!(pick_quant_cfg(8, 8, 1024, Arch::Sm90a, 128), GemmCfg::Skinny);
        assert_eq!(pick_quant_cfg(128, 8, 14336, Arch::Sm90a, 128), GemmCfg::Skinny);
        assert_eq!(pick_quant_cfg(512, 8, 14336, Arch::Sm80, 128), GemmCfg::T32x64s6);
        assert_eq!(pick_quant_cfg(512, 8, 14336, Arch::Sm90a, 128), GemmCfg::WgmmaWs);
        assert_eq!(pick_quant_cfg(512, 8, 14336, Arch::Sm90a, 32), GemmCfg::T32x64s6);
        assert_eq!(pick_quant_cfg(32768, 8, 4096, Arch::Sm89, 4096), GemmCfg::T128x128);
        assert_eq!(pick_quant_cfg(32768, 8, 4096, Arch::Sm90a, 4096), GemmCfg::WgmmaWs);
        // the contract's formats are the kernels' formats, one to one
        let names: Vec<&str> = crate::spec::QuantFormat::ALL.iter().map(|&f| super::super::format_name(f)).collect();
        assert_eq!(names, crate::cuda::catalogue::QUANT_FORMATS);
    }
}
