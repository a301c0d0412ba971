// kernels/router.cu -- TopKRouter (docs/op-spec.md): a router's scores, its top-k and its weights,
// one warp per token, one launch for the whole router.
//
// Each lane holds the logits of experts lane, lane + 32, ... (E <= 1024: at most 32 per lane, in
// registers). The same float32 operations in the same order as the CPU (src/cpu/router.rs):
//   scores s: softmax p = expf(x - max) / sum, sigmoid 1 / (1 + expf(-x)), or the logits
//     themselves (topk_softmax, identity);
//   choice scores c = s + bias (float32 or T, read as float32; c = s without one);
//   the group-limited choice (n_group > 0): c goes to the warp's shared-memory row (padded one
//     float in 32 against bank conflicts); lane g, g + 32, ... scores group g over its experts
//     (top2_sum: its two best by the order below, added; max: its best) and writes the score
//     over the group's first slot (no other lane reads that group); then topk_group rounds of a
//     warp argmax over the groups (same order, group numbers for ties), and every expert of a
//     group not kept gets c = fill;
//   k rounds of a warp argmax over c of the experts not yet taken: larger first, NaN below every
//     number, equal values by the tie rule; the winner's lane keeps its s or c (weights_from)
//     in shared memory;
//   the weights: topk_softmax: softmax over the k; normalize: divided by (their sum + eps), at
//     least normalize_min;
//     times the chosen expert's expert_scale (if any), then times scale; each rounded to T once.
//
// Entry point: scattermoe_topk_router_{t}(logits, bias, bias_f32, expert_scale, expert_scale_f32,
//     rows, E, k, scoring, normalize, tie_higher, n_group, topk_group, group_max, group_fill,
//     weights_from_choice, normalize_eps, normalize_min, scale, weights, indices): grid
//     ceil(rows / SMOE_ROUTER_WARPS), block 32 * SMOE_ROUTER_WARPS, no dynamic smem. bias and
//     expert_scale: E values or null; *_f32: 1 when they are float32, 0 when T.
//     scoring: 0 softmax, 1 topk_softmax, 2 sigmoid, 3 identity. n_group: 0 for no group limit, else it divides
//     E and topk_group < n_group. group_max: 0 top2_sum, 1 max. weights_from_choice: 0 the weights
//     from s, 1 from c. indices int64.
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

// The warp's best (value, index) by ranks_before: every lane ends with the winner.
__device__ __forceinline__ void warp_best(float& best, int& bi, bool tie_higher) {
#pragma unroll
    for (int s = 16; s > 0; s >>= 1) {
        const float ob = __shfl_xor_sync(0xffffffffu, best, s);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, s);
        if (ranks_before(ob, oi, best, bi, tie_higher)) {
            best = ob;
            bi = oi;
        }
    }
}

// The slot of expert i in the shared row of the group phase: one float of padding every 32, so
// that lanes reading the groups lane * size + e hit different banks.
__device__ __forceinline__ int pad(int i) { return i + (i >> 5); }

// Value i of a per-expert input held in float32 or T.
template <typename T>
__device__ __forceinline__ float per_expert(const void* p, int is_f32, int i) {
    return is_f32 ? static_cast<const float*>(p)[i] : smoe::to_f(static_cast<const T*>(p)[i]);
}

template <typename T>
__device__ void topk_router_impl(const T* logits, const void* bias, int bias_f32, const void* expert_scale,
                                 int expert_scale_f32, int rows, int E, int k, int scoring,
                                 int normalize, int tie_higher, int n_group, int topk_group, int group_max,
                                 float group_fill, int weights_from_choice, float normalize_eps, float normalize_min, float scale,
                                 T* weights, long long* indices) {
    // per warp: the group phase's row of c (padded), then the k chosen weights
    __shared__ float shared_all[SMOE_ROUTER_WARPS][SMOE_ROUTER_MAX_E + SMOE_ROUTER_MAX_E / 32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const long long row = (long long)blockIdx.x * SMOE_ROUTER_WARPS + warp;
    if (row >= rows) return;
    float* sh = shared_all[warp];
    const T* x = logits + row * E;
    const bool higher = tie_higher != 0;

    float v[SMOE_ROUTER_PER_LANE];  // the scores s
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

    float c[SMOE_ROUTER_PER_LANE];  // the choice scores c = s + bias
    if (bias != nullptr) {
#pragma unroll
        for (int s = 0; s < SMOE_ROUTER_PER_LANE; ++s) {
            int i = lane + 32 * s;
            c[s] = i < E ? v[s] + per_expert<T>(bias, bias_f32, i) : v[s];
        }
    } else {
#pragma unroll
        for (int s = 0; s < SMOE_ROUTER_PER_LANE; ++s) c[s] = v[s];
    }

    if (n_group > 0) {  // the group-limited choice
        const int size = E / n_group;
#pragma unroll
        for (int s = 0; s < SMOE_ROUTER_PER_LANE; ++s) {
            int i = lane + 32 * s;
            if (i < E) sh[pad(i)] = c[s];
        }
        __syncwarp();
        // group g's score, by lane g % 32 alone, over the group's first slot
        for (int g = lane; g < n_group; g += 32) {
            float b0 = 0.f, b1 = 0.f;
            int i0 = -1, i1 = -1;
            for (int e = 0; e < size; ++e) {
                const float ce = sh[pad(g * size + e)];
                if (ranks_before(ce, e, b0, i0, higher)) {
                    b1 = b0;
                    i1 = i0;
                    b0 = ce;
                    i0 = e;
                } else if (ranks_before(ce, e, b1, i1, higher)) {
                    b1 = ce;
                    i1 = e;
                }
            }
            sh[pad(g * size)] = group_max ? b0 : b0 + b1;
        }
        // the topk_group best groups (no __syncwarp needed: each lane reads its own groups' slots)
        unsigned kept = 0;  // bit j: group lane + 32 j is kept
        for (int r = 0; r < topk_group; ++r) {
            float best = 0.f;
            int bg = -1;
            for (int g = lane, j = 0; g < n_group; g += 32, ++j) {
                const float gs = sh[pad(g * size)];
                if (!(kept >> j & 1u) && ranks_before(gs, g, best, bg, higher)) {
                    best = gs;
                    bg = g;
                }
            }
            warp_best(best, bg, higher);
            if (bg >= 0 && (bg & 31) == lane) kept |= 1u << (bg >> 5);  // topk_group < n_group: there is one
        }
        for (int g = lane, j = 0; g < n_group; g += 32, ++j) sh[pad(g * size)] = (kept >> j & 1u) ? 1.f : 0.f;
        __syncwarp();
#pragma unroll
        for (int s = 0; s < SMOE_ROUTER_PER_LANE; ++s) {
            int i = lane + 32 * s;
            if (i < E && sh[pad(i / size * size)] == 0.f) c[s] = group_fill;
        }
        __syncwarp();  // the row is read before the weights take it
    }

    float* chosen = sh;  // the weights of the k chosen, best first
    unsigned taken = 0;  // bit s: expert lane + 32 s is chosen
    for (int j = 0; j < k; ++j) {
        float best = 0.f, bw = 0.f;
        int bi = -1;
#pragma unroll
        for (int s = 0; s < SMOE_ROUTER_PER_LANE; ++s) {
            int i = lane + 32 * s;
            if (i < E && !(taken >> s & 1u) && ranks_before(c[s], i, best, bi, higher)) {
                best = c[s];
                bw = weights_from_choice ? c[s] : v[s];
                bi = i;
            }
        }
        warp_best(best, bi, higher);
        // every lane holds the winner now (k <= E: there is one); it was its own lane's best, so
        // that lane's bw is the winner's weight
        if ((bi & 31) == lane) {
            taken |= 1u << (bi >> 5);
            chosen[j] = bw;
            indices[row * k + j] = bi;
        }
    }
    __syncwarp();

    if (scoring == 1) {  // softmax over the k chosen logits; chosen[0] is the largest
        float m = chosen[0], sum = 0.f;
        __syncwarp();
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
        sum = warp_sum(sum) + normalize_eps;
        // clamp(min=), 0 meaning none (a negative sum of choice scores stays); a NaN sum stays NaN
        if (normalize_min > 0.f && sum < normalize_min) sum = normalize_min;
        for (int j = lane; j < k; j += 32) chosen[j] = chosen[j] / sum;
        __syncwarp();
    }
    // indices[row * k + j] was written by the winner's lane; __syncwarp above orders it for the warp
    for (int j = lane; j < k; j += 32) {
        float w = chosen[j];
        if (expert_scale != nullptr) w = w * per_expert<T>(expert_scale, expert_scale_f32, (int)indices[row * k + j]);
        weights[row * k + j] = smoe::from_f<T>(w * scale);
    }
}

}  // namespace

// ---------------------------------------------------------------- entry points
// kernels/manifest.toml lists them ([[plain]]: name, entry macro, threads); build.rs generates
// the invocations, included at the end of this file: one per element type ({t}).
#define SMOE_TOPK_ROUTER_ENTRY(NAME, T, NTHREADS)                                                           \
    static_assert(NTHREADS == 32 * SMOE_ROUTER_WARPS, #NAME ": threads in kernels/manifest.toml differ from the kernel's"); \
    extern "C" __global__ void __launch_bounds__(32 * SMOE_ROUTER_WARPS)                                    \
    NAME(const T* logits, const void* bias, int bias_f32, const void* expert_scale, int expert_scale_f32,    \
         int rows, int E, int k, int scoring, int normalize, int tie_higher,                                \
         int n_group, int topk_group, int group_max, float group_fill, int weights_from_choice, \
         float normalize_eps, float normalize_min, float scale, T* weights, long long* indices) {            \
        smoe::pdl_begin();                                                                                  \
        topk_router_impl<T>(logits, bias, bias_f32, expert_scale, expert_scale_f32, rows, E, k, scoring,   \
                            normalize, tie_higher, n_group, topk_group, group_max, group_fill, weights_from_choice, normalize_eps,      \
                            normalize_min, scale, weights, indices);                                       \
    }

#include "router_entries.cuh"
