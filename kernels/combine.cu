// kernels/combine.cu -- deterministic weighted sum over each token's k expert outputs.
//
//   Y[t, :] = sum_j w[t,j] * kept[t,j] * O[pos[t*k+j], :]      f32 accumulation, one rounding
//
// Entry points: scattermoe_combine_{f32,f16,bf16}(const T* O, const int* pos, const T* w,
//                const unsigned char* kept, T* Y, int T, int k, int d)
//   O [T*k, d] in grouped order (pos = routing's inverse), or scattered [T, k, d] with pos = null.
//   w: routing weights [T*k] (flat index) or null (1). kept: uint8 mask [T*k] or null (all kept);
//   dropped assignments (kept 0) are skipped entirely.
//   block B = kernels/manifest.toml's threads (256); grid ceil(T * ceil(d / V) / B), V = 16 / sizeof(T)
//   (8 for f16/bf16, 4 for f32).
//   Each thread owns V consecutive columns of one token: 16-byte loads and stores when
//   d % V == 0 (pointers 16-byte aligned), element-wise otherwise.
#include "common.cuh"
#include "combine.cuh"

namespace {

using namespace smoe;

template <typename T>
__device__ void combine_impl(const T* __restrict__ O, const int* __restrict__ pos, const T* __restrict__ w,
                             const unsigned char* __restrict__ kept, T* __restrict__ Y, int T_, int k, int d) {
    constexpr int V = 16 / sizeof(T);
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)T_ * ((d + V - 1) / V)) return;
    combine_item<T>(O, pos, w, kept, Y, T_, k, d, i);
}

}  // namespace

// The entry points: kernels/manifest.toml lists them ([[plain]]) and build.rs generates the
// invocations, included below, one per element type. Any block size works (the grid covers
// T * ceil(d / V) threads); the manifest's is the launch bound.
#define SMOE_COMBINE_ENTRY(NAME, T, NTHREADS)                                                            \
    extern "C" __global__ void __launch_bounds__(NTHREADS)                                               \
        NAME(const T* O, const int* pos, const T* w, const unsigned char* kept, T* Y, int T_, int k, int d) { \
        pdl_begin();                                                                                     \
        combine_impl<T>(O, pos, w, kept, Y, T_, k, d);                                                   \
    }

#include "combine_entries.cuh"
