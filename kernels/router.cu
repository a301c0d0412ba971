// kernels/router.cu -- TopKRouter (docs/op-spec.md): a router's scores, its top-k and its weights,
// one warp per token, one launch for the whole router.
//
// Each lane holds the logits of experts lane, lane + 32, ... (E <= 1024: at most 32 per lane, in
// registers). Scores in float32 as the CPU (src/cpu/router.rs) computes them: softmax
// p = expf(x - max) / sum, sigmoid 1 / (1 + expf(-x)), or the logits themselves (topk_softmax).
// Then k rounds of a warp argmax over the experts not yet taken, by the contract's order (larger
// score first, NaN below every number, equal scores by the tie rule); the chosen scores wait in
// shared memory for the weights (topk_softmax: softmax over the k; normalize: divided by their
// sum), each rounded to T once.
//
// Entry point: scattermoe_topk_router_{t}(logits, rows, E, k, scoring, normalize, tie_higher,
//     weights, indices): grid ceil(rows / SMOE_ROUTER_WARPS), block 32 * SMOE_ROUTER_WARPS, no
//     dynamic smem. scoring: 0 softmax, 1 topk_softmax, 2 sigmoid. indices int64.
#include "common.cuh"

#define SMOE_ROUTER_WARPS 4
#define SMOE_ROUTER_MAX_E 1024
#define SMOE_ROUTER_PER_LANE (SMOE_ROUTER_MAX_E / 32)

namespace {

// Whether (a, ia) ranks before (b, ib); index -1 means "no candidate" and ranks last.
__device__ __forceinline__ bool ranks_before(float a, int ia, float b, int ib, bool tie_higher) {
    if (ib < 0) return ia >= 0;
    if (ia < 0) return false;
    const bool na = isnan(a), nb = isnan(b);
    if (na != nb) return nb;
    if (!na && a != b) return a > b;
    return tie_higher ? ia > ib : ia < ib;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int s = 16; s > 0; s >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, s));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int s = 16; s > 0; s >>= 1) v += __shfl_xor_sync(0xffffffffu, v, s);
    return v;
}

template <typename T>
__device__ void topk_router_impl(const T* logits, int rows, int E, int k, int scoring, int normalize, int tie_higher,
                                 T* weights, long long* indices) {
    __shared__ float chosen_all[SMOE_ROUTER_WARPS][SMOE_ROUTER_MAX_E];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const long long row = (long long)blockIdx.x * SMOE_ROUTER_WARPS + warp;
    if (row >= rows) return;
    float* chosen = chosen_all[warp];
    const T* x = logits + row * E;
    const bool higher = tie_higher != 0;

    float v[SMOE_ROUTER_PER_LANE];
#pragma unroll
    for (int s = 0; s < SMOE_ROUTER_PER_LANE; ++s) {
        int i = lane + 32 * s;
        v[s] = i < E ? smoe::to_f(x[i]) : -INFINITY;
    }
    if (scoring == 0) {  // softmax over all E
        float m = -INFINITY;
#pragma unroll
        for (int s = 0; s < SMOE_ROUTER_PER_LANE; ++s)
            if (lane + 32 * s < E) m = fmaxf(m, v[s]);
        m = warp_max(m);
        float sum = 0.f;
#pragma unroll
        for (int s = 0; s < SMOE_ROUTER_PER_LANE; ++s)
            if (lane + 32 * s < E) {
                v[s] = expf(v[s] - m);
                sum += v[s];
            }
        sum = warp_sum(sum);
#pragma unroll
        for (int s = 0; s < SMOE_ROUTER_PER_LANE; ++s) v[s] = v[s] / sum;
    } else if (scoring == 2) {  // sigmoid
#pragma unroll
        for (int s = 0; s < SMOE_ROUTER_PER_LANE; ++s) v[s] = 1.f / (1.f + expf(-v[s]));
    }

    unsigned taken = 0;  // bit s: expert lane + 32 s is chosen
    for (int j = 0; j < k; ++j) {
        float best = 0.f;
        int bi = -1;
#pragma unroll
        for (int s = 0; s < SMOE_ROUTER_PER_LANE; ++s) {
            int i = lane + 32 * s;
            if (i < E && !(taken >> s & 1u) && ranks_before(v[s], i, best, bi, higher)) {
                best = v[s];
                bi = i;
            }
        }
#pragma unroll
        for (int s = 16; s > 0; s >>= 1) {
            float ob = __shfl_xor_sync(0xffffffffu, best, s);
            int oi = __shfl_xor_sync(0xffffffffu, bi, s);
            if (ranks_before(ob, oi, best, bi, higher)) {
                best = ob;
                bi = oi;
            }
        }
        // every lane holds the winner now (k <= E: there is one)
        if ((bi & 31) == lane) taken |= 1u << (bi >> 5);
        if (lane == 0) {
            chosen[j] = best;
            indices[row * k + j] = bi;
        }
    }
    __syncwarp();

    if (scoring == 1) {  // softmax over the k chosen logits; chosen[0] is the largest
        float m = chosen[0], sum = 0.f;
        for (int j = lane; j < k; j += 32) {
            float e = expf(chosen[j] - m);
            chosen[j] = e;
            sum += e;
        }
        sum = warp_sum(sum);
        __syncwarp();
        for (int j = lane; j < k; j += 32) chosen[j] = chosen[j] / sum;
        __syncwarp();
    }
    if (normalize) {
        float sum = 0.f;
        for (int j = lane; j < k; j += 32) sum += chosen[j];
        sum = warp_sum(sum);
        for (int j = lane; j < k; j += 32) chosen[j] = chosen[j] / sum;
        __syncwarp();
    }
    for (int j = lane; j < k; j += 32) weights[row * k + j] = smoe::from_f<T>(chosen[j]);
}

}  // namespace

// ---------------------------------------------------------------- entry points
// kernels/manifest.toml lists them ([[plain]]: name, entry macro, threads); build.rs generates
// the invocations, included at the end of this file: one per element type ({t}).
#define SMOE_TOPK_ROUTER_ENTRY(NAME, T, NTHREADS)                                                           \
    static_assert(NTHREADS == 32 * SMOE_ROUTER_WARPS, #NAME ": threads in kernels/manifest.toml differ from the kernel's"); \
    extern "C" __global__ void __launch_bounds__(32 * SMOE_ROUTER_WARPS)                                    \
    NAME(const T* logits, int rows, int E, int k, int scoring, int normalize, int tie_higher, T* weights, \
         long long* indices) {                                                                              \
        smoe::pdl_begin();                                                                                  \
        topk_router_impl<T>(logits, rows, E, k, scoring, normalize, tie_higher, weights, indices);          \
    }

#include "router_entries.cuh"
