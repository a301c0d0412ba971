// kernels/grouped_gemm.cu -- scatter2scatter grouped GEMM with fused epilogues.
//
// For every grouped position p in [0, N_assign) (expert e = the segment of expert_offsets holding p):
//   x_p  = X[sorted_idx[p] / k]   (grouped_in = 0: X has T rows)      row stride K
//        = X[p]                   (grouped_in = 1: X has T*k rows)
//   a_p  = W[e] x_p + bias[e]     W [E, N, K] row-major (torch Linear: out x in), bias [E, N] or null
//   h_p  = act(a_p)                                        gated = 0, Nout = N
//   h_p[i] = glu(a_p[gate_row(i)], a_p[up_row(i)])         gated = 1, Nout = N/2 (glu_layout)
//   h_p *= row_scale[sorted_idx[p]]                        if row_scale (indexed by flat t*k+j)
//   Y[p] = h_p (grouped_out = 1)  or  Y[sorted_idx[p]] = h_p (grouped_out = 0); Y row stride Nout.
// Accumulation in f32; activations in f32; one rounding to T at the store.
//
// Entry points, all with the same parameter list:
//   (const T* X, const T* W, const T* bias, T* Y, const int* sorted_idx, const int* expert_offsets,
//    const T* row_scale, int k, int N, int K, int E, int grouped_in, int grouped_out,
//    int act, int gated, int glu_layout, float alpha, float limit)
//   act: SMOE_ACT_* (the codes of kernels/manifest.toml's `activations`); swiglu_oai and
//   swiglu_limit need gated = 1; alpha, limit used by them only.
//   N_assign is expert_offsets[E]; E <= 1024. N even when gated.
//
//   The configurations, each with its tile, block and dynamic smem, are kernels/manifest.toml's
//   [[gemm]] tables; the entry macros at the end of this file define them, one per template:
//   scattermoe_gemm_{f16,bf16}_<tile>    tc_gemm: tensor cores (mma.sync m16n8k16, ldmatrix,
//        multi-stage cp.async), any arch.
//   scattermoe_gemm_{f16,bf16}_wgmma_ws  ws_gemm, sm_90a only, warp-specialised (gemm_hopper_ws.cuh):
//        a cp.async producer warpgroup and two m64n256k16 consumer warpgroups, 128x256x64 tiles,
//        block 384, dynamic smem STAGES*49152+1024 bytes. Traps below sm_90a.
//   scattermoe_gemm_{f16,bf16}_wgmma_tma sm_90a only: wgmma_ws with W loaded by TMA (the
//        producer gathers only the A rows). One extra, last parameter: `const __grid_constant__
//        TmaMap w_map`, the 128-byte tensor map of W (src/cuda/tensor_map.rs). Needs K % 8 == 0
//        and a 16-byte-aligned W.
//   scattermoe_gemm_{f16,bf16}_wgmma_mc  sm_90a only: wgmma_tma in clusters of two CTAs
//        (__cluster_dims__(2, 1, 1)) sharing each W tile through a multicast TMA load. Same extra
//        parameter and needs.
//   scattermoe_gemm_{f16,bf16}_wgmma_mc_ga  wgmma_mc for grouped input (grouped_in = 1 only) with
//        A by TMA too: two extra, last parameters, the W map and the map of X as rows of K (same
//        128-byte maps). Needs K % 8 == 0 and a 16-byte-aligned X as well.
//   scattermoe_qgemm_{f16,bf16}_{fp8,u8,u4}_wgmma_ws  wgmma_ws with W quantized (gemm_hopper_ws.cuh,
//        "Quantized W"): kernels/quant_gemm.cu's parameter list and contract, wgmma_ws's geometry.
//   (the wgmma_* forms are defined in kernels/grouped_gemm_ws.cu, a module of their own)
//   scattermoe_gemm_f32                  f32_gemm: SIMT f32, 64x64 tiles, block 256, no dynamic smem.
//   scattermoe_gemm_{f16,bf16}_skinny    kernels/skinny_gemm.cu (its own module, with its quantized
//        forms): few rows per expert, W streamed from global memory into registers; units of 8 rows
//        of X by 32 rows of W, block 128, no dynamic smem; same parameter list.
//   The tensor-core kernels also hold ~4.2 KB of static smem (tile prefix), so static + dynamic
//   exceeds 48 KB: the host must call cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES, dynamic
//   bytes) once per function before launching.
// Choosing a kernel (measured on H200, bf16, but the skinny thresholds and the H100's table,
// measured on H100; R = rows per active expert = N_assign / min(E, N_assign)):
//   quantized W: R <= QUANT_SKINNY_ROWS (32) -> skinny, every arch; 16-bit W: skinny at K <= 1024
//           and R <= 8, or at R <= 1 when the hit experts' W (min(E, N_assign) N K 2 bytes) is at
//           most 100 MiB (kernels/manifest.toml [selection]; src/cuda/forward/selection.rs
//           `skinny_16bit` gives the measurements);
//   R <= 1 and K <= 2048 -> 32x32;
//   sm_90a: R <= 16 -> 32x64 (32x64s6 when K >= 8192); else wgmma_mc when K >= 8192 and R > 64
//           or K >= 4096 and R >= 1024, wgmma_tma when K >= 4096 or R >= 256 (on an H100: R > 16;
//           the per-card table of src/cuda/arch.rs `Table`) (both when W is TMA-readable), else
//           wgmma_ws;
//           grouped input (grouped_in = 1) takes wgmma_mc_ga instead of wgmma_mc when X is
//           TMA-readable too;
//   elsewhere: R <= 128 -> 32x64 (32x64s6 when K >= 8192); K < 1024 and R <= 512 -> 32x64;
//   else 128x128.
//   Quantized W above QUANT_SKINNY_ROWS: on sm_90a, wgmma_ws's quantized form above QUANT_WGMMA_ROWS
//   (32) when K % 16 == 0 and the scale block along K is a multiple of 64 or the whole row; else the
//   mma.sync choice of the archs without wgmma (kernels/quant_gemm.cu).
// Grid: 1-D and persistent: any gridDim.x >= 1 works (each block walks tiles g = blockIdx.x,
//   g += gridDim.x). Useful size: min(tiles_bound, SMs * resident blocks per SM) with
//   tiles_bound = (ceil(N_assign/BM) + min(E, N_assign)) * ceil(Nout / BNo),
//   BM, BN = the tile in the name (f32: 64x64; wgmma_*: 128x256; skinny: 8x32), BNo = BN
//   (plain) or BN/2 (gated). wgmma_mc: the grid is even (clusters of two), units are pairs of M
//   tiles (ceil(N_assign / 2BM) + min(E, N_assign)) * ceil(Nout / BNo), and the useful size is
//   2 * cuOccupancyMaxActiveClusters (clusters must fit in one GPC). The host gives the TMA
//   kernels (wgmma_tma, wgmma_mc) a full grid instead from K >= 4096, one CTA (pair) per unit, so
//   that the tiles sharing a W tile start together (src/cuda/forward/selection.rs FULL_GRID_K).
// Alignment: every pointer 16-byte aligned. Tensor-core path: K % 8 == 0 takes 16-byte cp.async
//   loads, any other K a slower element-wise path; Nout % 8 == 0 takes 16-byte stores.
// Experts with no rows cost nothing; M, N, K need not be multiples of the tile.
#include "common.cuh"
#include "dequant.cuh"
#include "tc_tile.cuh"

namespace {

using namespace smoe;

template <typename T, int BM, int BN, int BK, int WM, int WN, int STAGES>
__device__ void tc_gemm(const T* __restrict__ X, const T* __restrict__ W, const T* __restrict__ bias, T* __restrict__ Y,
                        const int* __restrict__ sidx, const int* __restrict__ off, const T* __restrict__ row_scale,
                        int k, int N, int K, int E, int grouped_in, int grouped_out, int act, int gated,
                        int layout, float alpha, float limit) {
    using C = TcCfg<T, BM, BN, BK, WM, WN, STAGES>;
    extern __shared__ __align__(128) unsigned char smem_raw[];
    __shared__ int prefix[SMOE_ROUTING_MAX_E + 1];
    if (E > SMOE_ROUTING_MAX_E) return;
    T* sA = reinterpret_cast<T*>(smem_raw);
    T* sB = sA + STAGES * C::A_ELEMS;
    T* sC = reinterpret_cast<T*>(smem_raw);

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp / C::WARPS_N, wn = warp % C::WARPS_N;
    const int Nout = gated ? (N >> 1) : N;
    const int BNo = gated ? (BN / 2) : BN;
    const int nN = (Nout + BNo - 1) / BNo;
    const int KB = (K + BK - 1) / BK;
    const bool kvec = (K % 8) == 0;
    const bool ovec = (Nout % 8) == 0;

    tile_prefix(off, E, BM, prefix);
    const int total = prefix[E] * nN;

    for (int g = blockIdx.x; g < total; g += gridDim.x) {
        const Tile t = find_tile(g, prefix, off, E, nN, BM);
        // per-thread source rows for the A and B chunks it loads: chunk column c is the same for
        // every slot, rows step by RSTEP (a multiple of 8, so the swizzle is the same too)
        const int c = tid % C::CPR, kc = c * 8, r0 = tid / C::CPR;
        const int dst0 = r0 * BK + swz<C::CPR>(r0, c) * 8;
        const T* a_src[C::A_IT];
#pragma unroll
        for (int i = 0; i < C::A_IT; ++i) {
            int r = r0 + i * C::RSTEP;
            a_src[i] = nullptr;
            if (t.m0 + r < t.cnt) {
                int p = t.start + t.m0 + r;
                long long xr = grouped_in ? p : sidx[p] / k;
                a_src[i] = X + xr * K + kc;
            }
        }
        const T* b_src[C::B_IT];
#pragma unroll
        for (int i = 0; i < C::B_IT; ++i) {
            bool ok;
            int n = b_row(r0 + i * C::RSTEP, t.nt, BN, WN, N, gated, layout, &ok);
            b_src[i] = ok ? W + ((long long)t.e * N + n) * K + kc : nullptr;
        }

        auto load_stage = [&](int s, int kb) {
            const int k0 = kb * BK;
            T* a = sA + s * C::A_ELEMS + dst0;
            T* b = sB + s * C::B_ELEMS + dst0;
            const bool kin = k0 + kc < K;
            if (kvec) {
#pragma unroll
                for (int i = 0; i < C::A_IT; ++i) {
                    bool p = a_src[i] != nullptr && kin;
                    cp_async16(a + i * C::RSTEP * BK, p ? (const void*)(a_src[i] + k0) : (const void*)X, p);
                }
#pragma unroll
                for (int i = 0; i < C::B_IT; ++i) {
                    bool p = b_src[i] != nullptr && kin;
                    cp_async16(b + i * C::RSTEP * BK, p ? (const void*)(b_src[i] + k0) : (const void*)W, p);
                }
            } else {
#pragma unroll
                for (int i = 0; i < C::A_IT; ++i) {
                    __align__(16) T v[8];
#pragma unroll
                    for (int j = 0; j < 8; ++j)
                        v[j] = (a_src[i] && k0 + kc + j < K) ? a_src[i][k0 + j] : from_f<T>(0.0f);
                    *reinterpret_cast<uint4*>(a + i * C::RSTEP * BK) = *reinterpret_cast<const uint4*>(v);
                }
#pragma unroll
                for (int i = 0; i < C::B_IT; ++i) {
                    __align__(16) T v[8];
#pragma unroll
                    for (int j = 0; j < 8; ++j)
                        v[j] = (b_src[i] && k0 + kc + j < K) ? b_src[i][k0 + j] : from_f<T>(0.0f);
                    *reinterpret_cast<uint4*>(b + i * C::RSTEP * BK) = *reinterpret_cast<const uint4*>(v);
                }
            }
        };

        float acc[C::MI][C::NI][4];
#pragma unroll
        for (int mi = 0; mi < C::MI; ++mi)
#pragma unroll
            for (int ni = 0; ni < C::NI; ++ni)
#pragma unroll
                for (int x = 0; x < 4; ++x) acc[mi][ni][x] = 0.0f;

#pragma unroll
        for (int s = 0; s < STAGES - 1; ++s) {
            if (s < KB) load_stage(s, s);
            cp_async_commit();
        }

        for (int kb = 0; kb < KB; ++kb) {
            cp_async_wait<STAGES - 2>();
            __syncthreads();
            {
                int nk = kb + STAGES - 1;
                if (nk < KB) load_stage(nk % STAGES, nk);
                cp_async_commit();
            }
            const T* a = sA + (kb % STAGES) * C::A_ELEMS;
            const T* b = sB + (kb % STAGES) * C::B_ELEMS;
#pragma unroll
            for (int kk = 0; kk < BK / 16; ++kk) {
                unsigned bfr[C::NI][2];
#pragma unroll
                for (int nj = 0; nj < C::NI / 2; ++nj) {
                    int r = wn * WN + nj * 16 + ((lane >> 4) << 3) + (lane & 7);
                    int c = kk * 2 + ((lane >> 3) & 1);
                    unsigned q[4];
                    ldmatrix_x4(q, b + r * BK + swz<C::CPR>(r, c) * 8);
                    bfr[2 * nj][0] = q[0];
                    bfr[2 * nj][1] = q[1];
                    bfr[2 * nj + 1][0] = q[2];
                    bfr[2 * nj + 1][1] = q[3];
                }
#pragma unroll
                for (int mi = 0; mi < C::MI; ++mi) {
                    unsigned af[4];
                    int r = wm * WM + mi * 16 + (lane & 15);
                    int c = kk * 2 + (lane >> 4);
                    ldmatrix_x4(af, a + r * BK + swz<C::CPR>(r, c) * 8);
#pragma unroll
                    for (int ni = 0; ni < C::NI; ++ni) Mma<T>::run(acc[mi][ni], af, bfr[ni]);
                }
            }
        }
        cp_async_wait<0>();
        __syncthreads();

        const TcEpi<T> ep{Y, bias, sidx, row_scale, N, Nout, BNo, gated, layout, act, grouped_out, alpha, limit, ovec};
        tc_epilogue<T, C>(acc, t, sC, ep, tid, wm, wn);
        __syncthreads();
    }
}

// ---------------------------------------------------------------- f32 SIMT kernel
constexpr int F_BM = 64, F_BN = 64, F_BK = 16;
constexpr int F_THREADS = 256;  // 16 x 16 threads, 4 x 4 outputs each

__device__ void f32_gemm(const float* __restrict__ X, const float* __restrict__ W, const float* __restrict__ bias,
                         float* __restrict__ Y, const int* __restrict__ sidx, const int* __restrict__ off,
                         const float* __restrict__ row_scale, int k, int N, int K, int E, int grouped_in,
                         int grouped_out, int act, int gated, int layout, float alpha, float limit) {
    __shared__ int prefix[SMOE_ROUTING_MAX_E + 1];
    __shared__ __align__(16) float As[F_BK][F_BM];
    __shared__ __align__(16) float Bs[F_BK][F_BN];
    if (E > SMOE_ROUTING_MAX_E) return;
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    const int Nout = gated ? (N >> 1) : N;
    const int BNo = gated ? F_BN / 2 : F_BN;
    const int nN = (Nout + BNo - 1) / BNo;
    const int f = N >> 1;
    tile_prefix(off, E, F_BM, prefix);
    const int total = prefix[E] * nN;
    // this thread's load slots: row lr = tid / 4, k = (tid % 4) * 4 .. +3
    const int lr = tid >> 2, lk = (tid & 3) * 4;

    for (int g = blockIdx.x; g < total; g += gridDim.x) {
        const Tile t = find_tile(g, prefix, off, E, nN, F_BM);
        bool a_ok = t.m0 + lr < t.cnt;
        long long xr = 0;
        if (a_ok) {
            int p = t.start + t.m0 + lr;
            xr = grouped_in ? p : sidx[p] / k;
        }
        const float* a_src = X + xr * K;
        bool b_ok;
        int n = b_row(lr, t.nt, F_BN, F_BN, N, gated, layout, &b_ok);
        const float* b_src = W + ((long long)t.e * N + n) * K;

        float acc[4][4];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

        for (int k0 = 0; k0 < K; k0 += F_BK) {
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                int kk = k0 + lk + j;
                As[lk + j][lr] = (a_ok && kk < K) ? a_src[kk] : 0.0f;
                Bs[lk + j][lr] = (b_ok && kk < K) ? b_src[kk] : 0.0f;
            }
            __syncthreads();
#pragma unroll
            for (int kk = 0; kk < F_BK; ++kk) {
                float4 av = *reinterpret_cast<const float4*>(&As[kk][ty * 4]);
                float2 b0 = *reinterpret_cast<const float2*>(&Bs[kk][tx * 2]);
                float2 b1 = *reinterpret_cast<const float2*>(&Bs[kk][32 + tx * 2]);
                float a[4] = {av.x, av.y, av.z, av.w};
                float b[4] = {b0.x, b0.y, b1.x, b1.y};
#pragma unroll
                for (int i = 0; i < 4; ++i)
#pragma unroll
                    for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
            }
            __syncthreads();
        }
        const float* be = bias ? bias + (long long)t.e * N : nullptr;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int rl = ty * 4 + i;
            if (t.m0 + rl >= t.cnt) continue;
            const int p = t.start + t.m0 + rl;
            const float scale = row_scale ? row_scale[sidx[p]] : 1.0f;
            float* dst = Y + (long long)(grouped_out ? p : sidx[p]) * Nout;
            if (gated) {
#pragma unroll
                for (int x = 0; x < 2; ++x) {
                    int ii = t.nt * BNo + tx * 2 + x;
                    if (ii >= f) continue;
                    float gv = acc[i][x], uv = acc[i][2 + x];
                    if (be) {
                        gv += be[glu_gate_row(ii, f, layout)];
                        uv += be[glu_up_row(ii, f, layout)];
                    }
                    dst[ii] = glu(gv, uv, act, alpha, limit) * scale;
                }
            } else {
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    int c = (j < 2) ? tx * 2 + j : 32 + tx * 2 + (j - 2);
                    int nn = t.nt * BNo + c;
                    if (nn >= N) continue;
                    float v = acc[i][j];
                    if (be) v += be[nn];
                    dst[nn] = activate(v, act) * scale;
                }
            }
        }
    }
}

}  // namespace

// The parameter list, SMOE_GEMM_PARAMS / SMOE_GEMM_ARGS: kernels/common.cuh (the skinny kernel shares it).

// ---------------------------------------------------------------- entry points
// One macro per kernel template and parameter list. kernels/manifest.toml lists the entry points
// (one [[gemm]] table per configuration) and build.rs generates the invocations, included at the
// end of this file. Each macro first checks the manifest's geometry (the numbers the host launches
// with) against the template's own constants.

// tc_gemm (mma.sync).
#define SMOE_TC_ENTRY(NAME, T, BM, BN, BK, WM, WN, ST, MINB, NTHREADS, DSMEM)                            \
    static_assert(TcCfg<T, BM, BN, BK, WM, WN, ST>::THREADS == NTHREADS &&                              \
                      TcCfg<T, BM, BN, BK, WM, WN, ST>::SMEM == DSMEM,                                   \
                  #NAME ": threads or smem in kernels/manifest.toml differ from the kernel's");         \
    extern "C" __global__ void __launch_bounds__((BM / WM) * (BN / WN) * 32, MINB)                       \
        NAME(SMOE_GEMM_PARAMS(T)) {                                                                     \
        pdl_begin();                                                                                    \
        tc_gemm<T, BM, BN, BK, WM, WN, ST>(SMOE_GEMM_ARGS);                                              \
    }

// f32_gemm (SIMT): its tile and block are fixed.
#define SMOE_F32_ENTRY(NAME, T, BM, BN, NTHREADS, DSMEM)                                                \
    static_assert(F_BM == BM && F_BN == BN && F_THREADS == NTHREADS && DSMEM == 0,                       \
                  #NAME ": tile, threads or smem in kernels/manifest.toml differ from the kernel's");   \
    extern "C" __global__ void __launch_bounds__(F_THREADS) NAME(SMOE_GEMM_PARAMS(T)) {                 \
        pdl_begin();                                                                                    \
        f32_gemm(SMOE_GEMM_ARGS);                                                                       \
    }

// The invocations, one per entry point: generated from kernels/manifest.toml (kernels/generated/).
#include "grouped_gemm_entries.cuh"
