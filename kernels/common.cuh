// kernels/common.cuh -- shared device helpers and the host-visible launch contract of the
// ScatterMoE kernels (routing.cu, grouped_gemm.cu, combine.cu).
//
// Every entry point is `extern "C" __global__` with plain arguments (pointers, int32, int64
// pointers, float), so a host can launch it with cuLaunchKernel after cuModuleLoadData on the
// fatbin. Device pointers are raw allocations (>= 16-byte aligned). No kernel allocates memory.
//
// Index types: expert_offsets, sorted_scattered_idxs and pos are int32 (T*k < 2^31).
//
// ---------------------------------------------------------------------------------------------
// A full ScatterMoE forward, N = T*k assignments (see each .cu file for the exact contracts):
//   1. scattermoe_routing_count_{i32,i64}    grid (nb, orders), block 256
//   2. scattermoe_routing_scan               grid 1,            block 1024
//   3. scattermoe_routing_scatter_{i32,i64}  grid (nb, orders), block 256
//        nb = ceil(N / 4096); orders = 2 when capacity is given with slot_major order, else 1.
//        (N == 0: launch only the scan, with nb = 0.)
//   4. scattermoe_gemm_<t>_<cfg>   H = act(X[grouped rows] W1[e]^T + b1)  grouped_in=0, grouped_out=1
//   5. scattermoe_gemm_<t>_<cfg>   O = H W2[e]^T + b2                      grouped_in=1, grouped_out=1
//   6. scattermoe_combine_<t>      Y[t] = sum_j w[t,j] kept[t,j] O[pos[t*k+j]]
//
// Routing workspace (bytes), for the count/scan/scatter kernels:
//   nb    = ceil(T*k / 4096)
//   bytes = 4 * (2 * nb * E + nb + 64)       (two count matrices [nb][E] int32, nb int32 + slack)
// scattermoe_routing_workspace_bytes() below computes it (C/C++ hosts; Rust: same formula).
// ---------------------------------------------------------------------------------------------
#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

#define SMOE_ROUTING_CHUNK 4096    // assignments per routing block
#define SMOE_ROUTING_THREADS 256   // threads per count/scatter block (8 warps)
#define SMOE_ROUTING_MAX_E 1024    // largest E the routing and GEMM kernels accept

// error word bits (error[0]); error[1] = smallest flat index t*k+j holding a bad expert, or -1
#define SMOE_ERR_BAD_INDEX 1
#define SMOE_ERR_NEG_CAPACITY 2
#define SMOE_ERR_TOO_MANY_EXPERTS 4

// activation codes (grouped_gemm.cu): SMOE_ACT_<NAME>, generated from kernels/manifest.toml's
// `activations` (kernels/generated/activations.cuh). Each has its branch in activate() / glu()
// below and in the Hopper epilogue's dispatch (gemm_hopper_ws.cuh); swiglu_oai is gated only.
#include "activations.cuh"

// GLU layouts
#define SMOE_GLU_GATE_UP 0
#define SMOE_GLU_UP_GATE 1
#define SMOE_GLU_INTERLEAVED 2

static inline __host__ __device__ size_t scattermoe_routing_workspace_bytes(long long T, long long k,
                                                                            long long E) {
    long long n = T * k;
    long long nb = (n + SMOE_ROUTING_CHUNK - 1) / SMOE_ROUTING_CHUNK;
    return (size_t)(4 * (2 * nb * E + nb + 64));
}

namespace smoe {

template <typename T> struct Cvt;
template <> struct Cvt<float> {
    static __device__ __forceinline__ float to_f(float v) { return v; }
    static __device__ __forceinline__ float from_f(float v) { return v; }
};
template <> struct Cvt<__half> {
    static __device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
    static __device__ __forceinline__ __half from_f(float v) { return __float2half_rn(v); }
};
template <> struct Cvt<__nv_bfloat16> {
    static __device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
    static __device__ __forceinline__ __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
};

template <typename T> __device__ __forceinline__ float to_f(T v) { return Cvt<T>::to_f(v); }
template <typename T> __device__ __forceinline__ T from_f(float v) { return Cvt<T>::from_f(v); }

// Element-wise activation (non-gated, or the gate half of a GLU), ACT known at compile time.
template <int ACT> __device__ __forceinline__ float activate_c(float x) {
    // __fdividef: a reciprocal and a multiply. IEEE division added a range check and a slow-path
    // branch per element, which made the unrolled GEMM epilogues long (ncu: branch and
    // instruction-fetch stalls); its 2-ulp error is far below every output type's rounding.
    if constexpr (ACT == SMOE_ACT_SILU) return __fdividef(x, 1.0f + __expf(-x));
    else if constexpr (ACT == SMOE_ACT_GELU) return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
    else if constexpr (ACT == SMOE_ACT_GELU_TANH) {
        float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
        return 0.5f * x * (1.0f + tanhf(u));
    } else if constexpr (ACT == SMOE_ACT_RELU) return fmaxf(x, 0.0f);
    else if constexpr (ACT == SMOE_ACT_RELU2) {
        float r = fmaxf(x, 0.0f);
        return r * r;
    } else return x;
}

// GLU: h = act(gate) * up; swiglu_oai: (clamp(u,-l,l)+1) * g' * sigmoid(alpha g'), g' = min(g, l);
// swiglu_limit: the same without the + 1
template <int ACT> __device__ __forceinline__ float glu_c(float g, float u, float alpha, float limit) {
    if constexpr (ACT == SMOE_ACT_SWIGLU_OAI || ACT == SMOE_ACT_SWIGLU_LIMIT) {
        float gc = fminf(g, limit);
        float uc = fminf(fmaxf(u, -limit), limit);
        float offset = ACT == SMOE_ACT_SWIGLU_OAI ? 1.0f : 0.0f;
        return (uc + offset) * __fdividef(gc, 1.0f + __expf(-alpha * gc));
    } else {
        return activate_c<ACT>(g) * u;
    }
}

// The same with ACT at run time.
__device__ __forceinline__ float activate(float x, int act) {
    switch (act) {
    case SMOE_ACT_SILU: return activate_c<SMOE_ACT_SILU>(x);
    case SMOE_ACT_GELU: return activate_c<SMOE_ACT_GELU>(x);
    case SMOE_ACT_GELU_TANH: return activate_c<SMOE_ACT_GELU_TANH>(x);
    case SMOE_ACT_RELU: return activate_c<SMOE_ACT_RELU>(x);
    case SMOE_ACT_RELU2: return activate_c<SMOE_ACT_RELU2>(x);
    default: return x;
    }
}
__device__ __forceinline__ float glu(float g, float u, int act, float alpha, float limit) {
    if (act == SMOE_ACT_SWIGLU_OAI) return glu_c<SMOE_ACT_SWIGLU_OAI>(g, u, alpha, limit);
    if (act == SMOE_ACT_SWIGLU_LIMIT) return glu_c<SMOE_ACT_SWIGLU_LIMIT>(g, u, alpha, limit);
    return activate(g, act) * u;
}

// W row of output column i (i < f) of a GLU: gate or up half.
__device__ __forceinline__ int glu_gate_row(int i, int f, int layout) {
    return layout == SMOE_GLU_INTERLEAVED ? 2 * i : (layout == SMOE_GLU_UP_GATE ? f + i : i);
}
__device__ __forceinline__ int glu_up_row(int i, int f, int layout) {
    return layout == SMOE_GLU_INTERLEAVED ? 2 * i + 1 : (layout == SMOE_GLU_UP_GATE ? i : f + i);
}

__device__ __forceinline__ unsigned smem_u32(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// Programmatic dependent launch (sm_90 and newer; src/cuda/driver.rs launches every kernel with
// the programmatic-stream-serialization attribute there): a kernel's CTAs may be scheduled while
// the previous kernel in the stream drains, so the launch latency between the forward's six kernels
// overlaps the previous kernel's tail. Every entry point calls this before touching global memory:
// griddepcontrol.wait returns once the previous grid has completed and its writes are visible;
// launch_dependents then lets the next kernel launch (after the wait, so at most two of our grids
// are resident at once, and the next one's CTAs only take SMs this one leaves free). Without the
// attribute, and below sm_90, both do nothing.
__device__ __forceinline__ void pdl_begin() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// The 16-byte cp.async of every tensor-core kernel. (An L2 prefetch-size hint, .L2::128B or
// .L2::256B, changed no GEMM by more than the noise on H200: tests/gpu/RESULTS.md.)
#define SMOE_CP_ASYNC16 "cp.async.cg.shared.global"

// 16-byte cp.async, zero-filled when !pred (src must still be a valid address).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
    unsigned s = smem_u32(smem);
    int n = pred ? 16 : 0;
    asm volatile(SMOE_CP_ASYNC16 " [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

}  // namespace smoe

// The parameter list of every 16-bit grouped GEMM entry point (grouped_gemm.cu's header says what each
// parameter is; skinny_gemm.cu's 16-bit forms take it too).
#define SMOE_GEMM_PARAMS(T)                                                                                 \
    const T *X, const T *W, const T *bias, T *Y, const int *sorted_idx, const int *expert_offsets,          \
        const T *row_scale, int k, int N, int K, int E, int grouped_in, int grouped_out, int act, int gated, \
        int glu_layout, float alpha, float limit
#define SMOE_GEMM_ARGS                                                                                      \
    X, W, bias, Y, sorted_idx, expert_offsets, row_scale, k, N, K, E, grouped_in, grouped_out, act, gated, \
        glu_layout, alpha, limit

// The parameter list of every quantized-W grouped GEMM entry point (quant_gemm.cu's mma.sync forms,
// grouped_gemm.cu's wgmma forms, skinny_gemm.cu's quantized forms; quant_gemm.cu's header says what
// each parameter is).
#define SMOE_QGEMM_PARAMS(T)                                                                                  \
    const T *X, const unsigned char *W, const T *bias, T *Y, const int *sorted_idx, const int *expert_offsets, \
        const T *row_scale, int k, int N, int K, int E, int grouped_in, int grouped_out, int act, int gated,   \
        int glu_layout, float alpha, float limit, const void *w_scale, const unsigned char *w_zero,            \
        int scale_f32, int block_out, int block_in
#define SMOE_QGEMM_ARGS                                                                                       \
    X, W, bias, Y, sorted_idx, expert_offsets, row_scale, k, N, K, E, grouped_in, grouped_out, act, gated,   \
        glu_layout, alpha, limit, w_scale, w_zero, scale_f32, block_out, block_in
