// kernels/combine.cuh -- one thread's share of the combine (kernels/combine.cu's contract):
//   Y[t, c .. c + V) = sum_j w[t,j] * kept[t,j] * O[pos[t*k+j], c .. c + V)   f32 accumulation, one rounding
// Shared by combine.cu's kernel and the decode kernel (moe_decode.cu), so both give the same bits.
#pragma once

#include "common.cuh"

#include <type_traits>

namespace {

using namespace smoe;

// One element of T through L2 (ld.global.cg): __ldcg has no 16-bit float overloads.
template <typename T> __device__ __forceinline__ T ld_cg(const T* p) {
    if constexpr (std::is_same_v<T, __half>) return __ushort_as_half(__ldcg(reinterpret_cast<const unsigned short*>(p)));
    else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __ushort_as_bfloat16(__ldcg(reinterpret_cast<const unsigned short*>(p)));
    else return __ldcg(p);
}

// Thread item i < T * ceil(d / V): token i / ceil(d / V), its V columns from V * (i % ceil(d / V)).
// COHERENT: O was written by this same kernel (the decode kernel, behind a grid barrier), so it is
// read through L2 (ld.global.cg), never the read-only path.
template <typename T, bool COHERENT = false>
__device__ __forceinline__ void combine_item(const T* __restrict__ O, const int* __restrict__ pos, const T* __restrict__ w,
                                             const unsigned char* __restrict__ kept, T* __restrict__ Y, int T_, int k,
                                             int d, long long i) {
    constexpr int V = 16 / sizeof(T);
    const int nvec = (d + V - 1) / V;
    const int t = (int)(i / nvec);
    const int c = (int)(i % nvec) * V;
    const bool vec = (d % V) == 0;
    float acc[V];
#pragma unroll
    for (int x = 0; x < V; ++x) acc[x] = 0.0f;
#pragma unroll 4
    for (int j = 0; j < k; ++j) {
        const int f = t * k + j;
        if (kept && kept[f] == 0) continue;
        const float wt = w ? to_f(w[f]) : 1.0f;
        const long long row = pos ? pos[f] : f;
        const T* src = O + row * d + c;
        if (vec) {
            __align__(16) T v[V];
            *reinterpret_cast<uint4*>(v) = COHERENT ? __ldcg(reinterpret_cast<const uint4*>(src)) : *reinterpret_cast<const uint4*>(src);
#pragma unroll
            for (int x = 0; x < V; ++x) acc[x] = fmaf(wt, to_f(v[x]), acc[x]);
        } else {
#pragma unroll
            for (int x = 0; x < V; ++x)
                if (c + x < d) acc[x] = fmaf(wt, to_f(COHERENT ? ld_cg(src + x) : src[x]), acc[x]);
        }
    }
    T* dst = Y + (long long)t * d + c;
    if (vec) {
        __align__(16) T v[V];
#pragma unroll
        for (int x = 0; x < V; ++x) v[x] = from_f<T>(acc[x]);
        *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(v);
    } else {
#pragma unroll
        for (int x = 0; x < V; ++x)
            if (c + x < d) dst[x] = from_f<T>(acc[x]);
    }
}

}  // namespace
