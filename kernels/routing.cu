// kernels/routing.cu -- expert counts, offsets, grouped order, inverse, validation, capacity.
//
// N = T*k assignments; flat index f = t*k + j. Grouped order: assignments sorted by expert, ties by
// f (stable). Everything stays on the device: three launches (count, scan, scatter), or one
// (small) when N <= SMOE_ROUTING_CHUNK and no capacity is given; no host round trip.
//
// Orders: order 0 reads assignments in flat order (gives the grouped order); order 1 reads them in
// slot-major order q = j*T + t (only used to rank assignments for capacity_order = slot_major).
// Both are ranked stably within an expert; order 1 launches only when capacity is given AND
// capacity_order == 0 (slot_major). `orders` below is 1 or 2 (gridDim.y).
//
// Workspace `ws` (int32), size scattermoe_routing_workspace_bytes(T, k, E) (common.cuh):
//   ws[0 .. nb*E)            per-block counts, order 0, [nb][E]  (scan turns it into prefixes)
//   ws[nb*E .. 2*nb*E)       per-block counts, order 1
//   ws[2*nb*E .. 2*nb*E+nb)  per-block smallest bad flat index (INT_MAX if none)
// The kernels write every workspace word they read: no memset needed.
//
// Entry points (block sizes are fixed; E <= 1024):
//   scattermoe_routing_count_{i32,i64}(idx, N, T, k, E, ws)
//        grid (nb, orders), block 256, no dynamic smem.
//   scattermoe_routing_scan(N, E, nb, orders, capacity, ws, expert_offsets, error)
//        grid 1, block 1024. Writes expert_offsets[0..E] (int32, exclusive, [E] = N) and
//        error[0..1] (always): error[0] bit 1: an index outside [0,E) (it was clamped; the
//        results are then meaningless but every access stays in bounds), bit 2: capacity < 0,
//        bit 4: E > 1024 (nothing else was done); error[1]: smallest bad flat index or -1.
//        capacity: device pointer to one int64, or null (no capacity).
//   scattermoe_routing_scatter_{i32,i64}(idx, N, T, k, E, ws, expert_offsets, capacity,
//        capacity_order, sorted_idx, pos, kept, kept_out, kept_dtype)
//        grid (nb, orders), block 256, no dynamic smem.
//        sorted_idx[N] int32: flat index at each grouped position; pos[N] int32: its inverse.
//        capacity_order: 0 slot_major, 1 token_major.
//        kept: uint8 [N] mask indexed by flat index (1 kept, 0 dropped) or null; written
//        whenever non-null (all 1 without capacity).
//        kept_out: optional typed copy of kept (the op output), kept_dtype 0 none, 1 f32, 2 f16,
//        3 bf16.
//   scattermoe_routing_small_{i32,i64}(idx, N, E, expert_offsets, sorted_idx, pos, kept, error)
//        N <= SMOE_ROUTING_CHUNK, no capacity: the three above in one block (grid 1, block 256, no
//        workspace); the same expert_offsets, sorted_idx, pos, kept (all 1) and error words.
#include "common.cuh"
#include "routing_block.cuh"
#include <limits.h>

namespace {

// flat index of the q-th assignment in the given reading order
__device__ __forceinline__ int flat_of(int q, int order, int T, int k) {
    return order == 0 ? q : (q % T) * k + (q / T);
}

// Reads the expert of every assignment q = first, first + step, ... below q1 (reading order `order`)
// and hands it to visit(q, e). Four loads are in flight per thread before any visit, instead of a
// chain of one load then one shared-memory atomic per assignment. With the experts kept in shared
// memory for scatter's ranking pass: count + scan + scatter 18.5 -> 16.6 us at 8192 assignments
// (H200, tests/gpu/RESULTS.md). The one-block kernel keeps its plain loop: there the same change was
// slower (7.5 -> 9.6 us at 1024 assignments). Returns the smallest bad flat index seen (INT_MAX: none).
template <typename I, typename Visit>
__device__ __forceinline__ int for_each_expert(const I* __restrict__ idx, int first, int q1, int step, int order, int T,
                                               int k, int E, Visit visit) {
    constexpr int U = 4;
    int my_bad = INT_MAX;
    for (int q = first; q < q1; q += U * step) {
        int e[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int qq = q + u * step;
            e[u] = -1;
            if (qq < q1) {
                bool bad;
                const int f = flat_of(qq, order, T, k);
                e[u] = load_expert(idx, f, E, &bad);
                if (bad) my_bad = min(my_bad, f);
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u)
            if (e[u] >= 0) visit(q + u * step, e[u]);
    }
    return my_bad;
}

template <typename I>
__device__ void count_impl(const I* __restrict__ idx, int N, int T, int k, int E, int* __restrict__ ws) {
    __shared__ int hist[SMOE_ROUTING_MAX_E];
    __shared__ int bad_min;
    if (E > SMOE_ROUTING_MAX_E) return;
    const int order = blockIdx.y;
    const int nb = gridDim.x;
    const int b = blockIdx.x;
    for (int e = threadIdx.x; e < E; e += blockDim.x) hist[e] = 0;
    if (threadIdx.x == 0) bad_min = INT_MAX;
    __syncthreads();
    const int q0 = b * SMOE_ROUTING_CHUNK;
    const int q1 = min(N, q0 + SMOE_ROUTING_CHUNK);
    const int my_bad = for_each_expert(idx, q0 + (int)threadIdx.x, q1, (int)blockDim.x, order, T, k, E,
                                       [&](int, int e) { atomicAdd(&hist[e], 1); });
    if (my_bad != INT_MAX) atomicMin(&bad_min, my_bad);
    __syncthreads();
    int* counts = ws + (size_t)order * nb * E + (size_t)b * E;
    for (int e = threadIdx.x; e < E; e += blockDim.x) counts[e] = hist[e];
    if (order == 0 && threadIdx.x == 0) ws[(size_t)2 * nb * E + b] = bad_min;
}

template <typename I>
__device__ void scatter_impl(const I* __restrict__ idx, int N, int T, int k, int E, const int* __restrict__ ws,
                             const int* __restrict__ expert_offsets, const long long* __restrict__ capacity,
                             int capacity_order, int* __restrict__ sorted_idx, int* __restrict__ pos,
                             unsigned char* __restrict__ kept, void* __restrict__ kept_out, int kept_dtype) {
    constexpr int WARPS = SMOE_ROUTING_THREADS / 32;
    constexpr int PER_WARP = SMOE_ROUTING_CHUNK / WARPS;
    __shared__ int whist[WARPS][SMOE_ROUTING_MAX_E];
    __shared__ short eid[SMOE_ROUTING_CHUNK];  // the expert of each of the block's assignments (pass 1)
    if (E > SMOE_ROUTING_MAX_E) return;
    const int order = blockIdx.y;
    const int nb = gridDim.x;
    const int b = blockIdx.x;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const bool has_cap = capacity != nullptr;
    long long C = has_cap ? *capacity : 0;
    if (C < 0) C = 0;
    // order 0 decides kept unless capacity is slot-major (then order 1 does)
    const bool write_kept = (order == 0) ? !(has_cap && capacity_order == 0) : true;

    for (int i = threadIdx.x; i < WARPS * E; i += blockDim.x) whist[i / E][i % E] = 0;
    __syncthreads();
    const int qw0 = b * SMOE_ROUTING_CHUNK + warp * PER_WARP;
    const int qw1 = min(N, qw0 + PER_WARP);
    // pass 1: per-warp histogram; the experts stay in shared memory for pass 3
    const int qb0 = b * SMOE_ROUTING_CHUNK;
    for_each_expert(idx, qw0 + lane, qw1, 32, order, T, k, E, [&](int q, int e) {
        eid[q - qb0] = (short)e;
        atomicAdd(&whist[warp][e], 1);
    });
    __syncthreads();
    // pass 2: exclusive prefix over warps, plus the block's base within the expert
    const int* bprefix = ws + (size_t)order * nb * E + (size_t)b * E;
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        int run = bprefix[e] + (order == 0 ? expert_offsets[e] : 0);
#pragma unroll
        for (int w = 0; w < WARPS; ++w) {
            int c = whist[w][e];
            whist[w][e] = run;
            run += c;
        }
    }
    __syncthreads();
    // pass 3: stable ranks, 32 assignments at a time per warp, in reading order
    for (int qb = qw0; qb < qw1; qb += 32) {
        int q = qb + lane;
        bool valid = q < qw1;
        const int f = valid ? flat_of(q, order, T, k) : 0;
        const int e = valid ? eid[q - qb0] : -1;
        const int r = next_position(whist[warp], e, valid, lane);
        if (!valid) continue;
        bool keep = true;
        if (order == 0) {
            sorted_idx[r] = f;
            pos[f] = r;
            if (has_cap && capacity_order == 1) keep = (long long)(r - expert_offsets[e]) < C;
        } else {
            keep = (long long)r < C;
        }
        if (write_kept) {
            if (kept) kept[f] = keep ? 1 : 0;
            if (kept_out) {
                float kv = keep ? 1.0f : 0.0f;
                if (kept_dtype == 1) ((float*)kept_out)[f] = kv;
                else if (kept_dtype == 2) ((__half*)kept_out)[f] = __float2half_rn(kv);
                else if (kept_dtype == 3) ((__nv_bfloat16*)kept_out)[f] = __float2bfloat16_rn(kv);
            }
        }
    }
}

// All three steps in one block, for N <= SMOE_ROUTING_CHUNK without capacity (decode and small
// batches: one launch instead of three): routing_block.cuh, 8 warps over stretches of 512.
template <typename I>
__device__ void small_impl(const I* __restrict__ idx, int N, int E, int* __restrict__ expert_offsets,
                           int* __restrict__ sorted_idx, int* __restrict__ pos, unsigned char* __restrict__ kept,
                           int* __restrict__ error) {
    constexpr int WARPS = SMOE_ROUTING_THREADS / 32;
    __shared__ BlockRoutingSmem<WARPS> sm;
    block_routing<I, WARPS>(idx, N, E, SMOE_ROUTING_CHUNK / WARPS, sm, expert_offsets, sorted_idx, pos, kept, error);
}

// The scan: one block, one thread per expert (E <= SMOE_ROUTING_MAX_E = the block size).
__device__ void scan_impl(int N, int E, int nb, int orders, const long long* capacity, int* ws, int* expert_offsets,
                          int* error) {
    __shared__ int warp_tot[32];
    __shared__ int bad_red[32];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    if (E > SMOE_ROUTING_MAX_E) {
        if (tid == 0) { error[0] = SMOE_ERR_TOO_MANY_EXPERTS; error[1] = -1; }
        return;
    }
    // per-expert exclusive prefix over blocks, both orders; totals from order 0
    int total = 0;
    if (tid < E) {
        for (int o = 0; o < orders; ++o) {
            int* cm = ws + (size_t)o * nb * E;
            int run = 0;
            for (int b = 0; b < nb; ++b) {
                int c = cm[(size_t)b * E + tid];
                cm[(size_t)b * E + tid] = run;
                run += c;
            }
            if (o == 0) total = run;
        }
    }
    // exclusive scan of totals over experts (one expert per thread)
    int incl = total;
#pragma unroll
    for (int s = 1; s < 32; s <<= 1) {
        int v = __shfl_up_sync(0xffffffffu, incl, s);
        if (lane >= s) incl += v;
    }
    if (lane == 31) warp_tot[warp] = incl;
    // smallest bad flat index over blocks
    int bmin = INT_MAX;
    for (int b = tid; b < nb; b += blockDim.x) bmin = min(bmin, ws[(size_t)2 * nb * E + b]);
#pragma unroll
    for (int s = 16; s > 0; s >>= 1) bmin = min(bmin, __shfl_xor_sync(0xffffffffu, bmin, s));
    if (lane == 0) bad_red[warp] = bmin;
    __syncthreads();
    if (warp == 0) {
        int v = warp_tot[lane];
        int inc = v;
#pragma unroll
        for (int s = 1; s < 32; s <<= 1) {
            int u = __shfl_up_sync(0xffffffffu, inc, s);
            if (lane >= s) inc += u;
        }
        warp_tot[lane] = inc - v;  // exclusive prefix of warp totals
        int m = bad_red[lane];
#pragma unroll
        for (int s = 16; s > 0; s >>= 1) m = min(m, __shfl_xor_sync(0xffffffffu, m, s));
        if (lane == 0) bad_red[0] = m;
    }
    __syncthreads();
    if (tid < E) expert_offsets[tid] = warp_tot[warp] + incl - total;
    if (tid == 0) {
        expert_offsets[E] = N;
        int flags = 0;
        int m = bad_red[0];
        if (m != INT_MAX) flags |= SMOE_ERR_BAD_INDEX;
        if (capacity && *capacity < 0) flags |= SMOE_ERR_NEG_CAPACITY;
        error[0] = flags;
        error[1] = (m == INT_MAX) ? -1 : m;
    }
}

}  // namespace

// ---------------------------------------------------------------- entry points
// kernels/manifest.toml lists them ([[plain]]: name, entry macro, threads) and build.rs generates
// the invocations, included at the end of this file: one per index type ({i}: I = int or long
// long). Each macro checks the manifest's block size against the one the kernel is written for.
#define SMOE_ROUTING_CHECK(NAME, NTHREADS, WANT) \
    static_assert(NTHREADS == WANT, #NAME ": threads in kernels/manifest.toml differ from the kernel's");

#define SMOE_ROUTING_SMALL_ENTRY(NAME, I, NTHREADS)                                                        \
    SMOE_ROUTING_CHECK(NAME, NTHREADS, SMOE_ROUTING_THREADS)                                                \
    extern "C" __global__ void __launch_bounds__(SMOE_ROUTING_THREADS)                                      \
    NAME(const I* idx, int N, int E, int* expert_offsets, int* sorted_idx, int* pos, unsigned char* kept,   \
         int* error) {                                                                                      \
        smoe::pdl_begin();                                                                                  \
        small_impl<I>(idx, N, E, expert_offsets, sorted_idx, pos, kept, error);                            \
    }

#define SMOE_ROUTING_COUNT_ENTRY(NAME, I, NTHREADS)                                                        \
    SMOE_ROUTING_CHECK(NAME, NTHREADS, SMOE_ROUTING_THREADS)                                                \
    extern "C" __global__ void __launch_bounds__(SMOE_ROUTING_THREADS)                                      \
    NAME(const I* idx, int N, int T, int k, int E, int* ws) {                                               \
        smoe::pdl_begin();                                                                                  \
        count_impl<I>(idx, N, T, k, E, ws);                                                                 \
    }

#define SMOE_ROUTING_SCAN_ENTRY(NAME, NTHREADS)                                                            \
    SMOE_ROUTING_CHECK(NAME, NTHREADS, SMOE_ROUTING_MAX_E)                                                  \
    extern "C" __global__ void __launch_bounds__(SMOE_ROUTING_MAX_E)                                        \
    NAME(int N, int E, int nb, int orders, const long long* capacity, int* ws, int* expert_offsets,         \
         int* error) {                                                                                      \
        smoe::pdl_begin();                                                                                  \
        scan_impl(N, E, nb, orders, capacity, ws, expert_offsets, error);                                   \
    }

#define SMOE_ROUTING_SCATTER_ENTRY(NAME, I, NTHREADS)                                                      \
    SMOE_ROUTING_CHECK(NAME, NTHREADS, SMOE_ROUTING_THREADS)                                                \
    extern "C" __global__ void __launch_bounds__(SMOE_ROUTING_THREADS)                                      \
    NAME(const I* idx, int N, int T, int k, int E, const int* ws, const int* expert_offsets,                \
         const long long* capacity, int capacity_order, int* sorted_idx, int* pos, unsigned char* kept,     \
         void* kept_out, int kept_dtype) {                                                                  \
        smoe::pdl_begin();                                                                                  \
        scatter_impl<I>(idx, N, T, k, E, ws, expert_offsets, capacity, capacity_order, sorted_idx, pos, kept, \
                        kept_out, kept_dtype);                                                              \
    }

#include "routing_entries.cuh"
