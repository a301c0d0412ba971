// kernels/routing_block.cuh -- the routing of N <= SMOE_ROUTING_CHUNK assignments by one block, with
// no capacity: expert counts, offsets, the grouped order (stable) and its inverse, and the error
// words, all from one read of the indices. Shared by routing.cu's one-block kernel
// (scattermoe_routing_small_*, 8 warps, results to global memory) and the decode kernel,
// moe_decode.cu (every CTA routes on its own, 4 warps, results to its shared memory).
#pragma once

#include "common.cuh"

#include <limits.h>

namespace {

template <typename I>
__device__ __forceinline__ int load_expert(const I* idx, long long f, int E, bool* bad) {
    long long v = (long long)idx[f];
    *bad = (v < 0 || v >= E);
    return *bad ? (v < 0 ? 0 : E - 1) : (int)v;
}

// Grouped position of each lane's assignment (expert e; valid lanes only), stable in lane order:
// counters[e] is the warp's next position for expert e. Lanes of one expert take consecutive
// positions, and the lowest of them advances the counter for the whole group.
__device__ __forceinline__ int next_position(int* counters, int e, bool valid, int lane) {
    const unsigned lt_mask = (1u << lane) - 1u;
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    int r = 0;
    if (valid) r = counters[e] + __popc(peers & lt_mask);
    __syncwarp();
    if (valid && (peers & lt_mask) == 0) counters[e] += __popc(peers);
    __syncwarp();
    return r;
}

// The block's working state (shared memory, the caller's: a kernel that routes in more than one
// way keeps one copy).
template <int WARPS> struct BlockRoutingSmem {
    int whist[WARPS][SMOE_ROUTING_MAX_E];
    int warp_tot[WARPS];
    int bad_min;
};

// All three steps (count, scan, scatter) in one block of WARPS warps. Same outputs and error words
// as count + scan + scatter with nb = 1: per-warp histograms over consecutive stretches of the flat
// order (per_warp assignments each, a multiple of 32, WARPS * per_warp >= N), their prefixes within
// each expert, an exclusive scan over experts, then stable ranks as in scatter_impl. Writes
// expert_offsets[0..E], sorted_idx[N], pos[N], kept[N] (all 1; null: none) and, when error is not
// null, error[0..1]. Every thread of the block must call it; the caller syncs before reading.
template <typename I, int WARPS>
__device__ void block_routing(const I* __restrict__ idx, int N, int E, int per_warp, BlockRoutingSmem<WARPS>& sm,
                              int* __restrict__ expert_offsets, int* __restrict__ sorted_idx, int* __restrict__ pos,
                              unsigned char* __restrict__ kept, int* __restrict__ error) {
    constexpr int THREADS = WARPS * 32;
    constexpr int PER_THREAD = SMOE_ROUTING_MAX_E / THREADS;  // experts per thread in the scan
    static_assert(SMOE_ROUTING_MAX_E % THREADS == 0, "experts split evenly over the threads");
    auto& whist = sm.whist;
    auto& warp_tot = sm.warp_tot;
    auto& bad_min = sm.bad_min;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    if (E > SMOE_ROUTING_MAX_E) {
        if (tid == 0 && error) { error[0] = SMOE_ERR_TOO_MANY_EXPERTS; error[1] = -1; }
        return;
    }
    for (int i = tid; i < WARPS * E; i += THREADS) whist[i / E][i % E] = 0;
    if (tid == 0) bad_min = INT_MAX;
    __syncthreads();
    const int qw0 = warp * per_warp;
    const int qw1 = min(N, qw0 + per_warp);
    int my_bad = INT_MAX;
    for (int q = qw0 + lane; q < qw1; q += 32) {
        bool bad;
        const int e = load_expert(idx, q, E, &bad);
        if (bad) my_bad = min(my_bad, q);
        atomicAdd(&whist[warp][e], 1);
    }
    if (my_bad != INT_MAX) atomicMin(&bad_min, my_bad);
    __syncthreads();
    // Thread tid owns experts [tid * PER_THREAD, +PER_THREAD): each expert's warp counts become
    // prefixes within the expert, its total joins the thread's sum; then a block scan of the sums.
    int tot[PER_THREAD];
    int sum = 0;
#pragma unroll
    for (int j = 0; j < PER_THREAD; ++j) {
        const int e = tid * PER_THREAD + j;
        int run = 0;
        if (e < E) {
#pragma unroll
            for (int w = 0; w < WARPS; ++w) {
                const int c = whist[w][e];
                whist[w][e] = run;
                run += c;
            }
        }
        tot[j] = run;
        sum += run;
    }
    int incl = sum;
#pragma unroll
    for (int s = 1; s < 32; s <<= 1) {
        const int v = __shfl_up_sync(0xffffffffu, incl, s);
        if (lane >= s) incl += v;
    }
    if (lane == 31) warp_tot[warp] = incl;
    __syncthreads();
    int base = incl - sum;
    for (int w = 0; w < warp; ++w) base += warp_tot[w];
#pragma unroll
    for (int j = 0; j < PER_THREAD; ++j) {
        const int e = tid * PER_THREAD + j;
        if (e < E) {
            expert_offsets[e] = base;
#pragma unroll
            for (int w = 0; w < WARPS; ++w) whist[w][e] += base;
        }
        base += tot[j];
    }
    if (tid == 0) expert_offsets[E] = N;
    if (tid == 0 && error) {
        error[0] = bad_min != INT_MAX ? SMOE_ERR_BAD_INDEX : 0;
        error[1] = bad_min != INT_MAX ? bad_min : -1;
    }
    __syncthreads();
    for (int qb = qw0; qb < qw1; qb += 32) {
        const int q = qb + lane;
        const bool valid = q < qw1;
        int e = -1;
        if (valid) {
            bool bad;
            e = load_expert(idx, q, E, &bad);
        }
        const int r = next_position(whist[warp], e, valid, lane);
        if (!valid) continue;
        sorted_idx[r] = q;
        pos[q] = r;
        if (kept) kept[q] = 1;
    }
}

}  // namespace
