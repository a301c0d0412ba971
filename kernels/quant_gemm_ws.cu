// kernels/quant_gemm_ws.cu -- wgmma_ws with quantized W (sm_90a): the entry points
// scattermoe_qgemm_{f16,bf16}_{fp8,u8,u4}_wgmma_ws.
//
// Their contract is kernels/quant_gemm.cu's (parameter list, formats, scales) with wgmma_ws's
// geometry; the kernel template is gemm_hopper_ws.cuh ("Quantized W"). A module of their own for
// the build, as grouped_gemm_ws.cu says. Below sm_90a they compile to a trap.

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

// wgmma_ws with W quantized (the [[gemm]] table's `quant`; gemm_hopper_ws.cuh, "Quantized W"):
// F = WqFp8, WqU8 or WqU4, kernels/quant_gemm.cu's parameter list (SMOE_QGEMM_PARAMS), the smem of
// the 16-bit form (the codes travel through registers).
#define SMOE_WSQ_ENTRY(NAME, T, F, ST, BM, BN, NTHREADS, DSMEM)                                         \
    SMOE_WS_CHECK(NAME, ST, BM, BN, NTHREADS, DSMEM)                                                    \
    extern "C" __global__ void __launch_bounds__(384, 1) NAME(SMOE_QGEMM_PARAMS(T)) {                   \
        pdl_begin();                                                                                    \
        ws_gemm<T, ST, WS_CP_ASYNC, WS_A_GATHER, F>(X, W, bias, Y, sorted_idx, expert_offsets, row_scale, k, N, K, E, \
                                                    grouped_in, grouped_out, act, gated, glu_layout, alpha, limit,  \
                                                    nullptr, nullptr,                                          \
                                                    WsQuant{w_scale, w_zero, scale_f32, block_out, block_in}); \
    }

// The invocations, one per entry point: generated from kernels/manifest.toml (kernels/generated/).
#include "quant_gemm_ws_entries.cuh"
