// kernels/moe_decode.cu -- the whole ScatterMoE at decode: 16-bit W in one cooperative launch, for
// N = T * k <= DECODE_MAX_N assignments and no capacity, where the op otherwise runs four kernels
// (routing_small, the skinny GEMM1 and GEMM2, combine) each behind a dependency wait and a drain.
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

template <typename T, int BM, int BN, int THREADS, int U>
__device__ void moe_decode(const T* __restrict__ X, const T* __restrict__ W1, const T* __restrict__ b1,
                           const T* __restrict__ W2, const T* __restrict__ b2, const T* __restrict__ rw,
                           const void* __restrict__ idx, int ibytes, int Tn, int k, int d, int f, int E, int act, int gated,
                           int layout, float alpha, float limit, T* H, T* O, T* __restrict__ Y, int* __restrict__ error) {
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
    skinny_units<T, WqT16, BM, BN, THREADS, U>(X, reinterpret_cast<const unsigned char*>(W1), b1, H, sidx, off, prefix,
                                               nullptr, k, n1, d, E, 0, 1, act, gated, layout, alpha, limit, nullptr, nullptr,
                                               0, 1, 1);
    grid.sync();
    skinny_units<T, WqT16, BM, BN, THREADS, U, true>(H, reinterpret_cast<const unsigned char*>(W2), b2, O, sidx, off, prefix,
                                                     nullptr, k, d, f, E, 1, 1, SMOE_ACT_NONE, 0, SMOE_GLU_GATE_UP, 0.0f,
                                                     0.0f, nullptr, nullptr, 0, 1, 1);
    grid.sync();
    constexpr int V = 16 / sizeof(T);
    const long long items = (long long)Tn * ((d + V - 1) / V);
    for (long long i = (long long)blockIdx.x * THREADS + threadIdx.x; i < items; i += (long long)gridDim.x * THREADS)
        combine_item<T, true>(O, pos, rw, nullptr, Y, Tn, k, d, i);
}

}  // namespace

// The entry point (moe_decode above), with the skinny kernel's 16-bit unit: 8 x 32, 4 warps, 4
// k-steps in flight. Registers: as the skinny kernel's 16-bit form (min_blocks 4).
#define SMOE_MOE_DECODE_ENTRY(NAME, T, NTHREADS)                                                         \
    static_assert(NTHREADS == 128, #NAME ": threads in kernels/manifest.toml differ from the kernel's");  \
    extern "C" __global__ void __launch_bounds__(128, 4)                                                  \
        NAME(const T* X, const T* W1, const T* b1, const T* W2, const T* b2, const T* rw, const void* idx,  \
             int ibytes, int T_, int k, int d, int f, int E, int act, int gated, int layout, float alpha,   \
             float limit, T* H, T* O, T* Y, int* error) {                                                   \
        moe_decode<T, 8, 32, 128, 4>(X, W1, b1, W2, b2, rw, idx, ibytes, T_, k, d, f, E, act, gated, layout, \
                                     alpha, limit, H, O, Y, error);                                        \
    }

// The invocations, one per element type: generated from kernels/manifest.toml (kernels/generated/).
#include "moe_decode_entries.cuh"
