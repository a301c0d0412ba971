// kernels/grouped_gemm_ws.cu -- the Hopper (sm_90a) warp-specialised wgmma entry points of the
// grouped GEMM with 16-bit W: wgmma_ws, wgmma_tma, wgmma_mc and wgmma_mc_ga (their quantized forms:
// quant_gemm_ws.cu).
//
// Their contract is kernels/grouped_gemm.cu's (the header comment there: what is computed, the
// parameter lists, grid and alignment); the kernel template is gemm_hopper_ws.cuh. They sit in a
// module of their own only for the build: nvcc compiles each kernel file as one job, and the wgmma
// forms took most of the whole build's time when they shared grouped_gemm.cu; apart, the jobs
// share the cores. Below sm_90a the entry points compile to a trap (ws_gemm's body needs wgmma).

#include "common.cuh"
#include "dequant.cuh"
#include "tc_tile.cuh"

namespace {

using namespace smoe;

#include "gemm_hopper_ws.cuh"

}  // namespace

// ---------------------------------------------------------------- entry points
// One macro per form; kernels/manifest.toml lists the entry points and build.rs generates the
// invocations, included at the end of this file. Each macro first checks the manifest's geometry
// (the numbers the host launches with) against the template's own constants (SMOE_WS_CHECK).

// wgmma_ws: W by cp.async like A.
#define SMOE_WS_ENTRY(NAME, T, ST, BM, BN, NTHREADS, DSMEM)                                             \
    SMOE_WS_CHECK(NAME, ST, BM, BN, NTHREADS, DSMEM)                                                    \
    extern "C" __global__ void __launch_bounds__(384, 1) NAME(SMOE_GEMM_PARAMS(T)) {                    \
        pdl_begin();                                                                                    \
        ws_gemm<T, ST, WS_CP_ASYNC, WS_A_GATHER>(SMOE_GEMM_ARGS, nullptr, nullptr);                      \
    }

// The TMA forms take one extra parameter, the W tensor map (128 bytes, src/cuda/tensor_map.rs).
// WLOAD: WS_TMA (wgmma_tma, one CTA per tile) or WS_TMA_PAIR (wgmma_mc: clusters of two CTAs
// sharing W through a multicast TMA load, CLUSTER = SMOE_CLUSTER_PAIR; the grid must be even).
#define SMOE_WS_TMA_ENTRY(NAME, T, ST, WLOAD, CLUSTER, BM, BN, NTHREADS, DSMEM)                         \
    SMOE_WS_CHECK(NAME, ST, BM, BN, NTHREADS, DSMEM)                                                    \
    extern "C" __global__ void CLUSTER __launch_bounds__(384, 1)                                        \
        NAME(SMOE_GEMM_PARAMS(T), const __grid_constant__ TmaMap w_map) {                               \
        pdl_begin();                                                                                    \
        ws_gemm<T, ST, WLOAD, WS_A_GATHER>(SMOE_GEMM_ARGS, &w_map, nullptr);                             \
    }

// The `_ga` form for grouped input (grouped_in = 1) with A by TMA as well. Two extra parameters,
// the W map and the map of X as rows of K (src/cuda/tensor_map.rs). Only the pair kernel has this
// form: with one CTA per tile (wgmma_tma) it was 7-11% slower where experts have few rows or K is
// short (a box always brings 128 rows; tests/gpu/RESULTS.md, fifth round).
#define SMOE_WS_GA_ENTRY(NAME, T, ST, WLOAD, CLUSTER, BM, BN, NTHREADS, DSMEM)                          \
    SMOE_WS_CHECK(NAME, ST, BM, BN, NTHREADS, DSMEM)                                                    \
    extern "C" __global__ void CLUSTER __launch_bounds__(384, 1)                                        \
        NAME(SMOE_GEMM_PARAMS(T), const __grid_constant__ TmaMap w_map, const __grid_constant__ TmaMap a_map) { \
        pdl_begin();                                                                                    \
        ws_gemm<T, ST, WLOAD, WS_A_TMA>(SMOE_GEMM_ARGS, &w_map, &a_map);                                 \
    }

// The invocations, one per entry point: generated from kernels/manifest.toml (kernels/generated/).
#include "grouped_gemm_ws_entries.cuh"
