// kernels/moe_decode.cu -- the whole ScatterMoE at decode: 16-bit or quantized W in one cooperative
// launch, for N = T * k <= DECODE_MAX_N assignments and no capacity, where the op otherwise runs four
// kernels (routing_small, the skinny GEMM1 and GEMM2, combine) each behind a dependency wait and a
// drain.
// Every CTA routes on its own in shared memory (routing_block.cuh: the same offsets, grouped order
// and inverse as routing_small; CTA 0 writes the error words), then
//   GEMM1 units (skinny_units: H = act(X[rows] W1[e]^T + b1), grouped out)  | grid barrier
//   GEMM2 units (O = H W2[e]^T + b2, grouped in and out; H read through L2)  | grid barrier
//   the combine (combine_item: Y[t] = sum_j w[t,j] O[pos[t*k+j]], O read through L2)
// with the skinny kernel's units, tile and arithmetic and combine.cu's, so its Y has the same bits as
// the four kernels'. H and O are the op's workspace as for those kernels.
// Launch: cooperative (the grid barriers need every CTA resident: grid <= resident CTAs), block
// THREADS, no dynamic smem; the grid's CTAs loop over each phase's units.
// Entry point: scattermoe_moe_decode_{f16,bf16}(X, W1, b1, W2, b2, rw, idx, ibytes, T, k, d, f, E, act,
//   gated, glu_layout, alpha, limit, H, O, Y, error): kernels/manifest.toml lists it ([[plain]]);
//   the host's choice and launch: src/cuda/forward/decode.rs.
#include <cooperative_groups.h>

#include "common.cuh"
#include "combine.cuh"
#include "routing_block.cuh"
#include "skinny.cuh"

namespace {

constexpr int DECODE_MAX_N = 512;

// A quantized W's scales, zero points and blocks (kernels/quant_gemm.cu's parameters).
struct QParams {
    const void* scale;
    const unsigned char* zero;
    int scale_f32, block_out, block_in;
};
// 16-bit W: the constants the skinny kernel's 16-bit entry points pass (never read).
struct NoQParams {
    static constexpr const void* scale = nullptr;
    static constexpr const unsigned char* zero = nullptr;
    static constexpr int scale_f32 = 0, block_out = 1, block_in = 1;
};

// F: W's stored format, the same for W1 and W2, WT its element (T for 16-bit W, else a byte); Q:
// QParams, or NoQParams for 16-bit W (WqT16).
template <typename T, typename F, int BM, int BN, int THREADS, int U, typename WT, typename Q>
__device__ void moe_decode(const T* __restrict__ X, const WT* __restrict__ W1, const T* __restrict__ b1,
                           const WT* __restrict__ W2, const T* __restrict__ b2, const T* __restrict__ rw,
                           const void* __restrict__ idx, int ibytes, int Tn, int k, int d, int f, int E, int act, int gated,
                           int layout, float alpha, float limit, T* H, T* O, T* __restrict__ Y, int* __restrict__ error,
                           Q q1, Q q2) {
    constexpr int WARPS = THREADS / 32;
    __shared__ BlockRoutingSmem<WARPS> rsm;
    __shared__ int off[SMOE_ROUTING_MAX_E + 1];
    __shared__ int sidx[DECODE_MAX_N];
    __shared__ int pos[DECODE_MAX_N];
    __shared__ int prefix[SMOE_ROUTING_MAX_E + 1];
    __shared__ int wsum[WARPS];
    const int N = Tn * k;
    // the host launches it only within these bounds; any CTA leaving here, all leave (no barrier waits)
    if (N > DECODE_MAX_N || N <= 0 || E > SMOE_ROUTING_MAX_E) return;
    auto grid = cooperative_groups::this_grid();
    pdl_begin();
    const int per_warp = ((N + WARPS - 1) / WARPS + 31) / 32 * 32;
    int* err = blockIdx.x == 0 ? error : nullptr;
    if (ibytes == 8) block_routing<long long, WARPS>(static_cast<const long long*>(idx), N, E, per_warp, rsm, off, sidx, pos, nullptr, err);
    else block_routing<int, WARPS>(static_cast<const int*>(idx), N, E, per_warp, rsm, off, sidx, pos, nullptr, err);
    __syncthreads();
    block_prefix<THREADS, true>(off, E, BM, prefix, wsum);
    const int n1 = gated ? 2 * f : f;
    skinny_units<T, F, BM, BN, THREADS, U>(X, reinterpret_cast<const unsigned char*>(W1), b1, H, sidx, off, prefix, nullptr, k, n1, d, E, 0, 1, act, gated, layout,
                                           alpha, limit, q1.scale, q1.zero, q1.scale_f32, q1.block_out, q1.block_in);
    grid.sync();
    skinny_units<T, F, BM, BN, THREADS, U, true>(H, reinterpret_cast<const unsigned char*>(W2), b2, O, sidx, off, prefix, nullptr, k, d, f, E, 1, 1, SMOE_ACT_NONE, 0,
                                                 SMOE_GLU_GATE_UP, 0.0f, 0.0f, q2.scale, q2.zero, q2.scale_f32, q2.block_out,
                                                 q2.block_in);
    grid.sync();
    constexpr int V = 16 / sizeof(T);
    const long long items = (long long)Tn * ((d + V - 1) / V);
    for (long long i = (long long)blockIdx.x * THREADS + threadIdx.x; i < items; i += (long long)gridDim.x * THREADS)
        combine_item<T, true>(O, pos, rw, nullptr, Y, Tn, k, d, i);
}

}  // namespace

// The entry points (moe_decode above), with the skinny kernel's units (8 x 32, 4 warps) and its
// blocks per SM (kernels/manifest.toml's skinny configuration: min_blocks 4 for 16-bit W,
// quant_min_blocks 3), and k-steps in flight: 4 for 16-bit W, 2 for each quantized format (the
// skinny kernel's fp8 form takes 3, which spills here). Registers (ptxas -v, CUDA 13.0): 128 for
// 16-bit W, 162-168 quantized; no spill but bf16 with 4-bit codes on sm_90a (8 bytes).
#define SMOE_MOE_DECODE_PARAMS(T, WT)                                                                    \
    const T *X, const WT *W1, const T *b1, const WT *W2, const T *b2, const T *rw, const void *idx,         \
        int ibytes, int T_, int k, int d, int f, int E, int act, int gated, int layout, float alpha,       \
        float limit, T *H, T *O, T *Y, int *error
#define SMOE_MOE_DECODE_ARGS                                                                             \
    X, W1, b1, W2, b2, rw, idx, ibytes, T_, k, d, f, E, act, gated, layout, alpha, limit, H, O, Y, error
#define SMOE_MOE_DECODE_CHECK(NAME, NTHREADS) \
    static_assert(NTHREADS == 128, #NAME ": threads in kernels/manifest.toml differ from the kernel's");

// 16-bit W: the 22 parameters.
#define SMOE_MOE_DECODE_ENTRY(NAME, T, NTHREADS)                                                         \
    SMOE_MOE_DECODE_CHECK(NAME, NTHREADS)                                                                \
    extern "C" __global__ void __launch_bounds__(128, 4) NAME(SMOE_MOE_DECODE_PARAMS(T, T)) {              \
        moe_decode<T, WqT16, 8, 32, 128, 4>(SMOE_MOE_DECODE_ARGS, NoQParams{}, NoQParams{});               \
    }

// Quantized W (both in format F): the 22, then W1's and W2's scale, zero point, scale_f32,
// block_out and block_in (kernels/quant_gemm.cu's).
#define SMOE_MOE_DECODE_Q_ENTRY(NAME, T, F, U, NTHREADS)                                                 \
    SMOE_MOE_DECODE_CHECK(NAME, NTHREADS)                                                                \
    extern "C" __global__ void __launch_bounds__(128, 3)                                                  \
        NAME(SMOE_MOE_DECODE_PARAMS(T, unsigned char), const void* s1, const unsigned char* z1, int sf1, int bo1, int bi1, \
             const void* s2, const unsigned char* z2, int sf2, int bo2, int bi2) {                         \
        moe_decode<T, F, 8, 32, 128, U>(SMOE_MOE_DECODE_ARGS, QParams{s1, z1, sf1, bo1, bi1},              \
                                        QParams{s2, z2, sf2, bo2, bi2});                                   \
    }
#define SMOE_MOE_DECODE_FP8_ENTRY(NAME, T, NTHREADS) SMOE_MOE_DECODE_Q_ENTRY(NAME, T, WqFp8, 2, NTHREADS)  // 3 spilled here
#define SMOE_MOE_DECODE_U8_ENTRY(NAME, T, NTHREADS) SMOE_MOE_DECODE_Q_ENTRY(NAME, T, WqU8, 2, NTHREADS)
#define SMOE_MOE_DECODE_U4_ENTRY(NAME, T, NTHREADS) SMOE_MOE_DECODE_Q_ENTRY(NAME, T, WqU4, 2, NTHREADS)

// The invocations, one per element type: generated from kernels/manifest.toml (kernels/generated/).
#include "moe_decode_entries.cuh"
