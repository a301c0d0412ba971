// kernels/tc_tile.cuh -- what the mma.sync grouped GEMMs share: the tile scheduler (expert
// segments into BM-row tiles), the W row of a B-tile row (gated layouts), the mma / ldmatrix
// wrappers, the smem swizzle, the tile geometry (TcCfg) and the epilogue. Included by
// grouped_gemm.cu (tc_gemm, and the Hopper kernels that reuse the scheduler) and quant_gemm.cu
// (tcq_gemm, W quantized); each includes it once, after common.cuh.
#pragma once

namespace {

using namespace smoe;

// ---------------------------------------------------------------- tile scheduling (all kernels)
// prefix[e] = number of BM-row tiles of experts < e. Warp 0 computes, then a barrier.
__device__ __forceinline__ void tile_prefix(const int* __restrict__ off, int E, int BM, int* prefix) {
    if (threadIdx.x < 32) {
        const int lane = threadIdx.x;
        int carry = 0;
        if (lane == 0) prefix[0] = 0;
        for (int base = 0; base < E; base += 32) {
            int e = base + lane;
            int mt = 0;
            if (e < E) {
                int c = off[e + 1] - off[e];
                mt = (c + BM - 1) / BM;
            }
            int incl = mt;
#pragma unroll
            for (int s = 1; s < 32; s <<= 1) {
                int v = __shfl_up_sync(0xffffffffu, incl, s);
                if (lane >= s) incl += v;
            }
            if (e < E) prefix[e + 1] = carry + incl;
            carry += __shfl_sync(0xffffffffu, incl, 31);
        }
    }
    __syncthreads();
}

struct Tile {
    int e, start, cnt, m0, nt;
};

__device__ __forceinline__ Tile find_tile(int g, const int* prefix, const int* __restrict__ off, int E, int nN, int BM) {
    int lo = 0, hi = E - 1;  // largest e with prefix[e]*nN <= g
    while (lo < hi) {
        int mid = (lo + hi + 1) >> 1;
        if ((long long)prefix[mid] * nN <= g) lo = mid; else hi = mid - 1;
    }
    Tile t;
    t.e = lo;
    int local = g - prefix[lo] * nN;
    int mte = prefix[lo + 1] - prefix[lo];
    t.nt = local / mte;
    t.m0 = (local % mte) * BM;
    t.start = off[lo];
    t.cnt = off[lo + 1] - t.start;
    return t;
}

// W row and validity of B-tile row r (gated: warp-interleaved gate/up halves, see below)
__device__ __forceinline__ int b_row(int r, int nt, int BN, int WN, int N, int gated, int layout, bool* ok) {
    if (!gated) {
        int n = nt * BN + r;
        *ok = n < N;
        return *ok ? n : 0;
    }
    const int f = N >> 1;
    int wn = r / WN, rr = r % WN, hw = WN >> 1;
    int i = nt * (BN >> 1) + wn * hw + rr % hw;
    *ok = i < f;
    if (!*ok) return 0;
    return rr < hw ? glu_gate_row(i, f, layout) : glu_up_row(i, f, layout);
}

// ---------------------------------------------------------------- tensor-core kernel
template <typename T> struct Mma;
template <> struct Mma<__nv_bfloat16> {
    static __device__ __forceinline__ void run(float* c, const unsigned* a, const unsigned* b) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
};
template <> struct Mma<__half> {
    static __device__ __forceinline__ void run(float* c, const unsigned* a, const unsigned* b) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
};

__device__ __forceinline__ void ldmatrix_x4(unsigned* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
}

template <int CPR> __device__ __forceinline__ int swz(int r, int c) {
    if constexpr (CPR == 8) return c ^ (r & 7);
    else if constexpr (CPR == 4) return c ^ ((r >> 1) & 3);
    else return c;
}

template <typename T, int BM, int BN, int BK, int WM, int WN, int STAGES>
struct TcCfg {
    static constexpr int TBM = BM, TWM = WM, TWN = WN;
    static constexpr int WARPS_M = BM / WM, WARPS_N = BN / WN;
    static constexpr int THREADS = WARPS_M * WARPS_N * 32;
    static constexpr int MI = WM / 16, NI = WN / 8;
    static constexpr int CPR = BK / 8;
    static constexpr int A_ELEMS = BM * BK, B_ELEMS = BN * BK;
    static constexpr int SMEM = STAGES * (A_ELEMS + B_ELEMS) * (int)sizeof(T);
    static constexpr int A_IT = BM * CPR / THREADS, B_IT = BN * CPR / THREADS;
    static constexpr int PAD = 8;
    static constexpr int RSTEP = THREADS / CPR;
    static_assert(RSTEP % 8 == 0, "row step keeps the swizzle");
    static_assert(NI % 2 == 0, "NI even");
    static_assert(A_IT * THREADS == BM * CPR && B_IT * THREADS == BN * CPR, "load split");
    static_assert(BM * (BN + PAD) * (int)sizeof(T) <= SMEM, "epilogue staging fits");
};

// What the epilogue of a tensor-core tile needs besides the accumulators and the tile.
template <typename T> struct TcEpi {
    T* Y;
    const T* bias;
    const int* sidx;
    const T* row_scale;
    int N, Nout, BNo, gated, layout, act, grouped_out;
    float alpha, limit;
    bool ovec;  // 16-byte stores (Nout % 8 == 0)
};

// The epilogue of one tc_gemm-shaped tile (C: its TcCfg): bias, activation / GLU, row scale ->
// staging smem sC (T) -> 16-byte stores. Called after the main loop's last barrier: sC overlays
// the pipeline's buffers. Ends with the staging area read out (the caller's barrier follows).
template <typename T, typename C>
__device__ __forceinline__ void tc_epilogue(const float (&acc)[C::MI][C::NI][4], const Tile& t, T* sC, const TcEpi<T>& ep,
                                            int tid, int wm, int wn) {
    const int lane = tid & 31;
    const int ldc = ep.BNo + C::PAD;
    const T* be = ep.bias ? ep.bias + (long long)t.e * ep.N : nullptr;
    const int f = ep.N >> 1;
#pragma unroll
    for (int mi = 0; mi < C::MI; ++mi) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int rl = wm * C::TWM + mi * 16 + (lane >> 2) + h * 8;
            float scale = 1.0f;
            if (ep.row_scale && t.m0 + rl < t.cnt) scale = to_f(ep.row_scale[ep.sidx[t.start + t.m0 + rl]]);
            if (ep.gated) {
#pragma unroll
                for (int ni = 0; ni < C::NI / 2; ++ni) {
                    const int oc = wn * (C::TWN / 2) + ni * 8 + 2 * (lane & 3);
                    float o[2];
#pragma unroll
                    for (int x = 0; x < 2; ++x) {
                        float gv = acc[mi][ni][2 * h + x];
                        float uv = acc[mi][ni + C::NI / 2][2 * h + x];
                        int i = t.nt * ep.BNo + oc + x;
                        if (be && i < f) {
                            gv += to_f(be[glu_gate_row(i, f, ep.layout)]);
                            uv += to_f(be[glu_up_row(i, f, ep.layout)]);
                        }
                        o[x] = glu(gv, uv, ep.act, ep.alpha, ep.limit) * scale;
                    }
                    sC[rl * ldc + oc] = from_f<T>(o[0]);
                    sC[rl * ldc + oc + 1] = from_f<T>(o[1]);
                }
            } else {
#pragma unroll
                for (int ni = 0; ni < C::NI; ++ni) {
                    const int oc = wn * C::TWN + ni * 8 + 2 * (lane & 3);
                    float o[2];
#pragma unroll
                    for (int x = 0; x < 2; ++x) {
                        float v = acc[mi][ni][2 * h + x];
                        int n = t.nt * ep.BNo + oc + x;
                        if (be && n < ep.N) v += to_f(be[n]);
                        o[x] = activate(v, ep.act) * scale;
                    }
                    sC[rl * ldc + oc] = from_f<T>(o[0]);
                    sC[rl * ldc + oc + 1] = from_f<T>(o[1]);
                }
            }
        }
    }
    __syncthreads();
    const int cpr_out = ep.BNo / 8;
    for (int id = tid; id < C::TBM * cpr_out; id += C::THREADS) {
        const int rl = id / cpr_out, c8 = id % cpr_out;
        if (t.m0 + rl >= t.cnt) continue;
        const int col = t.nt * ep.BNo + c8 * 8;
        if (col >= ep.Nout) continue;
        const int p = t.start + t.m0 + rl;
        const long long orow = ep.grouped_out ? p : ep.sidx[p];
        T* dst = ep.Y + orow * ep.Nout + col;
        const T* src = sC + rl * ldc + c8 * 8;
        if (ep.ovec) {
            *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
        } else {
#pragma unroll
            for (int j = 0; j < 8; ++j)
                if (col + j < ep.Nout) dst[j] = src[j];
        }
    }
}

}  // namespace
