// kernels/skinny_gemm.cu -- the grouped GEMM for few rows per expert (decode): W streamed from
// global memory straight into registers, at bandwidth, for 16-bit and quantized W alike.
//
// Same computation, parameters, epilogues and alignment rules as tc_gemm (kernels/grouped_gemm.cu's
// header: scattered / grouped rows, bias, activation or GLU in every glu_layout, row scale, alpha and
// limit) and, for W quantized, as tcq_gemm (kernels/quant_gemm.cu's header: fp8 e4m3fn, 8-bit and
// packed 4-bit codes, scales per channel, per group or per 2-D block, in T or float32, zero points),
// with the same entry-point parameter lists:
//   16-bit W   the 18 parameters of kernels/grouped_gemm.cu's entry points;
//   quantized  the same and w_scale, w_zero, scale_f32, block_out, block_in (kernels/quant_gemm.cu).
// W quantized is converted in registers, never in memory (kernels/dequant.cuh), two ways:
//   - one scale over a whole k-step of a row (per output channel; blocks along K a multiple of the
//     k-step, 64 elements for 8-bit codes and 128 for 4-bit: groups of 128, 128 x 128 blocks): the
//     codes less the zero point (decode8, exact in T) go into the MMAs, and the step's partial sums
//     take the row's scale after (one FFMA per accumulator), instead of each element's product with
//     its scale (with float32 scales: widen, multiply, round back: most of the work per element).
//     This is the formula's W x without W's rounding to T, which the contract allows (docs/op-spec.md,
//     "Arithmetic": implementations may round W to T); with one nonzero x it gives the same value as
//     the rounded W, bit for bit (the exact tests rely on it);
//   - other blocks: dequant8 per 8 elements (the contract's value rounded to T, as tcq_gemm's).
//
// Why: at decode an expert has 1 to ~16 rows, and the layer's floor is the bytes of the hit experts'
// W. The mma.sync tiles of tc_gemm / tcq_gemm (32 rows of X per tile) waste most of their work there,
// and tcq_gemm converts each stage of W smem-to-smem behind a barrier; neither streams W at the
// memory's bandwidth. Here:
//   - A unit of work is (expert, BM = 8 rows of that expert, BN = 32 rows of W): the tile
//     scheduler of tc_tile.cuh (tile_prefix / find_tile) with BM = 8, so experts with no rows have
//     no units and units = min(E, N_assign) x row tiles is the host's bound, as for tc_gemm. An
//     expert with more than 8 rows has several units over the same W rows (correct for any routing,
//     only slower when skewed); they are consecutive unit indices (the row tiles of one W block come
//     first), so they run together and the repeats of W come from L2.
//   - The CTA's 4 warps split K: warp w takes k-steps w, w + 4, ... (interleaved, so the 4 warps
//     read neighbouring bytes of every W row at the same time), and one shared-memory reduction per
//     unit sums their partial tiles in a fixed order (deterministic).
//   - A k-step of a warp: each of its 32 rows of W (two m16 tiles) is read as 4 lanes x 16 bytes =
//     64 consecutive stored bytes (whole 32-byte sectors), i.e. 32 elements of 16-bit W, 64 of 8-bit,
//     128 of 4-bit. Lane (g = lane / 4, t = lane % 4) holds rows g, g + 8, g + 16, g + 24 and the
//     16-byte chunk t of the step. UNROLL k-steps are loaded (every load issued) before any of them is
//     used: UNROLL x 4 16-byte W loads in flight per lane (16-bit: 4 x 4 = 256 bytes; the quantized
//     forms take a smaller UNROLL, their X chunks being longer: the registers bound it).
//   - The products run on the tensor cores (mma.sync m16n8k16): W is the 16 x 16 A operand and the
//     unit's 8 rows of X are the B operand's 8 columns (N = 8 is mma.sync's narrowest), so 1 to 8
//     rows cost the same instructions, and no cross-lane reduction is needed: a dot product does not
//     care in which order its k are summed, so each lane's k of the fragment layout (2t, 2t + 1, 2t +
//     8, 2t + 9) are mapped to 4 consecutive elements of its own chunk, in A and in B alike. A lane
//     then reads X row g at the same 8 / 16 / 32 consecutive k as its W chunk (16-byte loads through
//     the read-only path: X rows are read by every unit of the expert, W by one, so W is loaded with
//     L1::no_allocate and leaves L1 to X).
//   - A W chunk is converted 8 elements at a time (4 T pairs), right before its MMAs.
//   - Epilogue: the reduced 32 x 8 tile (f32) in shared memory, then bias, activation or GLU (the gate
//     and up rows of an output are in the same unit: b_row's order, local rows [0, 16) gate and
//     [16, 32) up), row scale, and the store of T, exactly as tc_epilogue computes them.
// The fast path needs 16-byte W and X chunks that are whole inside K and one scale per chunk:
//   16-bit W: K % 8 == 0; quantized: K % 8 == 0, stored bytes per row Kb % 16 == 0 (so a chunk of
//   8-bit codes is 16 elements, of 4-bit codes 32, whole inside K), and one scale block along K
//   (per channel) or block_in a multiple of the chunk (16 elements for 8-bit codes, 32 for 4-bit:
//   groups 32 / 64 / 128 and 2-D blocks 128 x 128 all qualify).
// Any other K or block (odd K for 4-bit, K not a multiple of 8, a group of 20 or 48, ...) takes the
// element-wise path of the same loop: each element loaded on its own, past K zero, dequantized by the
// contract's formula in float32 with its own block's scale (dequant1), rounded to T (correct, slower).
//
// Registers: beside the entry macros at the end of this file.
#include "skinny.cuh"
// The parameter lists: SMOE_GEMM_PARAMS (16-bit W) and SMOE_QGEMM_PARAMS (quantized), kernels/common.cuh.
#define SMOE_SKINNY_ARGS                                                                                   \
    X, reinterpret_cast<const unsigned char*>(W), bias, Y, sorted_idx, expert_offsets, row_scale, k, N, K, E, \
        grouped_in, grouped_out, act, gated, glu_layout, alpha, limit

// ---------------------------------------------------------------- entry points
// skinny_gemm for element type T: the 16-bit form (W in T, grouped_gemm.cu's parameter list) and the
// quantized ones (F = WqFp8, WqU8, WqU4: quant_gemm.cu's), one [[gemm]] table of kernels/manifest.toml
// (kernel = "skinny_gemm": tile = [BM, BN], threads, min_blocks, unroll for 16-bit W and quant_unroll
// per format). The tile, threads and smem stated there are checked against the template's.
//
// Registers per thread (ptxas -v, CUDA 13.0, 8 x 32 units, 4 warps), no spills on sm_80, sm_89 and
// sm_90a; the manifest's unroll is the most k-steps in flight that its min_blocks' cap holds without a
// spill (a larger one spilled):
//   16-bit W   min_blocks 4 (cap 128), unroll 4: 128 (f16, bf16)
//   fp8        min_blocks 3 (cap 168), unroll 3: 168
//   u8         min_blocks 3, unroll 2: 144-157 (unroll 3 spilled 4 bytes in the f16 form)
//   u4         min_blocks 3, unroll 2: 163-167 (at min_blocks 4, unroll 2 spilled; unroll 1 fit)
// W bytes in flight per lane: 16-bit 4 x 4 x 16 = 256, fp8 192, u8 and u4 128; per SM at full
// occupancy 128, 72 and 48 KB (16 or 12 resident warps), when there are units enough to fill it.
#define SMOE_SKINNY_CHECK(NAME, F, BM, BN, NTHREADS, U, DSMEM)                                            \
    static_assert(SkCfg<F, BM, BN, NTHREADS, U>::SMEM == DSMEM && NTHREADS == SkCfg<F, BM, BN, NTHREADS, U>::WARPS * 32, \
                  #NAME ": tile, threads or smem in kernels/manifest.toml differ from the kernel's");

#define SMOE_SKINNY_ENTRY(NAME, T, BM, BN, NTHREADS, MINB, U, DSMEM)                                      \
    SMOE_SKINNY_CHECK(NAME, WqT16, BM, BN, NTHREADS, U, DSMEM)                                            \
    extern "C" __global__ void __launch_bounds__(NTHREADS, MINB) NAME(SMOE_GEMM_PARAMS(T)) {            \
        pdl_begin();                                                                                    \
        skinny_gemm<T, WqT16, BM, BN, NTHREADS, U>(SMOE_SKINNY_ARGS, nullptr, nullptr, 0, 1, 1);         \
    }

#define SMOE_SKINNY_Q_ENTRY(NAME, T, F, BM, BN, NTHREADS, MINB, U, DSMEM)                                 \
    SMOE_SKINNY_CHECK(NAME, F, BM, BN, NTHREADS, U, DSMEM)                                                \
    extern "C" __global__ void __launch_bounds__(NTHREADS, MINB) NAME(SMOE_QGEMM_PARAMS(T)) {           \
        pdl_begin();                                                                                    \
        skinny_gemm<T, F, BM, BN, NTHREADS, U>(SMOE_SKINNY_ARGS, w_scale, w_zero, scale_f32, block_out,   \
                                               block_in);                                              \
    }

// The invocations, one per entry point: generated from kernels/manifest.toml (kernels/generated/).
#include "skinny_gemm_entries.cuh"
