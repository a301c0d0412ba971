// tests/gpu/f8x8.cu -- an experiment, not part of the op library: float8 activations times float8
// weights on Hopper's e4m3 wgmma (issue 18's fp8 x fp8 path), to learn whether it is fast enough
// before the op contract, the Rust host and the CPU reference take it on.
//
// Built only by tests/gpu/run_f8x8.sh (sm_90a), run by tests/gpu/bench_f8x8.py against float64 and
// against the 16-bit wgmma kernel on the same routing. Two entry points per output type T:
//
//   scattermoe_f8x8_quant_rows_{t}(const T* X, unsigned char* Q, float* s, int R, int K)
//     one block per row r < R of X [R, K]: a = max_i |X[r, i]| (float32), s[r] = a / 448 (1 when
//     a == 0), Q[r, i] = e4m3(X[r, i] * (448 / a)) rounded to nearest even and saturated to +-448
//     (a non-finite X gives a non-finite scale: no check, an experiment).
//   scattermoe_f8x8_gemm_{t}(SMOE_QGEMM_PARAMS(T), const float* a_scale)
//     grouped_gemm.cu's contract with X the e4m3 codes of the quantized rows (X [T, K] for
//     grouped_in = 0, [T*k, K] for grouped_in = 1, row scales a_scale) and W [E, N, K] e4m3 codes
//     with one scale per output channel (w_scale [E, N], float32; block_out = 1, block_in >= K;
//     w_zero null; scale_f32 must be 1): each product is sum_i Q[r, i] * W[e, n, i] in float32, times a_scale[r] *
//     w_scale[e, n], then bias, activation or GLU, row scale and the store as in the 16-bit forms.
//     Geometry of wgmma_ws (128x256 tiles, 384 threads, 197632 bytes of dynamic smem, persistent
//     grid).
#include "common.cuh"
#include "dequant.cuh"
#include "tc_tile.cuh"

#include <cuda_fp8.h>

namespace {

using namespace smoe;

#include "gemm_hopper_ws.cuh"

template <typename T>
__device__ void quant_rows(const T* __restrict__ X, unsigned char* __restrict__ Q, float* __restrict__ s, int R, int K) {
    __shared__ float red[32];
    const int r = blockIdx.x;
    if (r >= R) return;
    const T* x = X + (long long)r * K;
    float m = 0.0f;
    for (int i = threadIdx.x; i < K; i += blockDim.x) m = fmaxf(m, fabsf(to_f(x[i])));
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = m;
    __syncthreads();
    if (threadIdx.x < 32) {
        m = threadIdx.x < blockDim.x / 32 ? red[threadIdx.x] : 0.0f;
        for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
        if (threadIdx.x == 0) red[0] = m;
    }
    __syncthreads();
    const float a = red[0];
    const float inv = a > 0.0f ? 448.0f / a : 1.0f;
    if (threadIdx.x == 0) s[r] = a > 0.0f ? a / 448.0f : 1.0f;
    unsigned char* q = Q + (long long)r * K;
    for (int i = threadIdx.x; i < K; i += blockDim.x)
        q[i] = (unsigned char)__nv_cvt_float_to_fp8(to_f(x[i]) * inv, __NV_SATFINITE, __NV_E4M3);
}

}  // namespace

#define SMOE_F8X8_ENTRIES(TN, T)                                                                             \
    extern "C" __global__ void __launch_bounds__(256) scattermoe_f8x8_quant_rows_##TN(                      \
        const T* X, unsigned char* Q, float* s, int R, int K) {                                              \
        quant_rows<T>(X, Q, s, R, K);                                                                        \
    }                                                                                                        \
    static_assert(WsCfg<4>::SMEM == 197632, "f8x8: the smem bench_f8x8.py launches with");                  \
    extern "C" __global__ void __launch_bounds__(384, 1) scattermoe_f8x8_gemm_##TN(SMOE_QGEMM_PARAMS(T),     \
                                                                               const float* a_scale) {      \
        pdl_begin();                                                                                         \
        ws_gemm<T, 4, WS_CP_ASYNC, WS_A_GATHER, void, true>(                                                 \
            X, W, bias, Y, sorted_idx, expert_offsets, row_scale, k, N, K, E, grouped_in, grouped_out, act,  \
            gated, glu_layout, alpha, limit, nullptr, nullptr,                                               \
            WsQuant{w_scale, w_zero, scale_f32, block_out, block_in, a_scale});                              \
    }

SMOE_F8X8_ENTRIES(f16, __half)
SMOE_F8X8_ENTRIES(bf16, __nv_bfloat16)
