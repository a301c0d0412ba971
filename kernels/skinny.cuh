// kernels/skinny.cuh -- the skinny kernel's device code: its unit geometry, loads, MMAs, the
// element-wise path, the units of one GEMM (skinny_units) and the whole kernel
// (skinny_gemm). What it computes and why: kernels/skinny_gemm.cu's header. Included by
// skinny_gemm.cu (its entry points) and moe_decode.cu (the whole op at decode, on the same units).
#pragma once

#include "common.cuh"
#include "dequant.cuh"
#include "tc_tile.cuh"

namespace {

using namespace smoe;

// The "format" of 16-bit W (the 16-bit entry points): 8 elements per 16-byte chunk, no scale (the
// code paths that read a format's zero point are the quantized ones only).
struct WqT16 {
    static constexpr int BITS = 16;
};

// The geometry of one configuration: BM rows of X (a multiple of 8: mma.sync's N), BN rows of W
// (a multiple of 16: its M), THREADS / 32 warps splitting K, U k-steps in flight per warp.
template <typename F, int BM, int BN, int THREADS, int U>
struct SkCfg {
    static constexpr int WARPS = THREADS / 32;
    static constexpr int NT = BM / 8;          // n8 tiles: X rows of a unit
    static constexpr int MT = BN / 16;         // m16 tiles: W rows of a unit, every warp all of them
    static constexpr int RS = 2 * MT;          // W rows per lane (g, g + 8 of each m16 tile)
    static constexpr int EC = 128 / F::BITS;   // elements of one 16-byte chunk of stored W
    static constexpr int KSTEP = 4 * EC;       // elements of one warp k-step (4 lanes per row)
    static constexpr int XV = EC / 8;          // 16-byte X loads per chunk and X row
    static constexpr int ACC = MT * NT * 4;    // accumulators per lane
    static constexpr int SMEM = 0;             // dynamic: none (prefix and reduction are static)
    static_assert(BM % 8 == 0 && BN % 16 == 0 && THREADS % 32 == 0 && U >= 1, "unit shape");
    static_assert(BN % 2 == 0, "gated units hold BN / 2 gate and BN / 2 up rows");
};

// 16 bytes from global memory with the load qualifiers Q, zero when !pred (the address is then
// never read): one predicated load, no branch.
#define SMOE_PRED_LD16(Q, P, PRED, V)                                                             \
    asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %5, 0;\n"                                 \
                 " mov.b32 %0, 0;\n mov.b32 %1, 0;\n mov.b32 %2, 0;\n mov.b32 %3, 0;\n"          \
                 " @p ld.global" Q ".v4.u32 {%0, %1, %2, %3}, [%4];\n}\n"                         \
                 : "=r"(V.x), "=r"(V.y), "=r"(V.z), "=r"(V.w)                                      \
                 : "l"(P), "r"((int)(PRED)))

// W: read once, so it does not take L1 from X (L1::no_allocate); X: the read-only path.
__device__ __forceinline__ uint4 ld_w16(const void* p, bool pred) {
    uint4 v;
    SMOE_PRED_LD16(".nc.L1::no_allocate", p, pred, v);
    return v;
}
// XC: X was written by this same kernel (the decode kernel's second GEMM reads the first's output
// behind a grid barrier): read through L2 (ld.global.cg), which the barrier's fences order, and
// never through the read-only path, which is only for data no thread writes during the kernel.
template <bool XC = false>
__device__ __forceinline__ uint4 ld_x16(const void* p, bool pred) {
    uint4 v;
    if constexpr (XC) SMOE_PRED_LD16(".cg", p, pred, v);
    else SMOE_PRED_LD16(".nc", p, pred, v);
    return v;
}

__device__ __forceinline__ unsigned word(const uint4& v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }

template <typename T> __device__ __forceinline__ unsigned pack2(T lo, T hi) {
    return (unsigned)bits_as<unsigned short>(lo) | ((unsigned)bits_as<unsigned short>(hi) << 16);
}

// prefix[e] = number of BM-row tiles of experts < e, by the whole block: each thread loads the
// offsets of its few experts at once (one memory latency, where tile_prefix's single warp pays one
// per 32 experts), then a block scan. Ends with a barrier.
// SMEM_OFF: off is in shared memory (the decode kernel's own routing), read with plain loads.
template <int THREADS, bool SMEM_OFF = false>
__device__ __forceinline__ void block_prefix(const int* __restrict__ off, int E, int BM, int* prefix, int* wsum) {
    constexpr int MAXP = (SMOE_ROUTING_MAX_E + THREADS - 1) / THREADS;
    constexpr int WARPS = THREADS / 32;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int per = (E + THREADS - 1) / THREADS;
    const int e0 = tid * per;
    int o[MAXP + 1];
#pragma unroll
    for (int j = 0; j <= MAXP; ++j) o[j] = (j <= per && e0 + j <= E) ? (SMEM_OFF ? off[e0 + j] : __ldg(off + e0 + j)) : 0;
    int tiles[MAXP];
    int sum = 0;
#pragma unroll
    for (int j = 0; j < MAXP; ++j) {
        tiles[j] = (j < per && e0 + j < E) ? (o[j + 1] - o[j] + BM - 1) / BM : 0;
        sum += tiles[j];
    }
    int incl = sum;
#pragma unroll
    for (int s = 1; s < 32; s <<= 1) {
        const int v = __shfl_up_sync(0xffffffffu, incl, s);
        if (lane >= s) incl += v;
    }
    if (lane == 31) wsum[warp] = incl;
    __syncthreads();
    int run = incl - sum;
#pragma unroll
    for (int w = 0; w < WARPS; ++w)
        if (w < warp) run += wsum[w];
    if (tid == 0) prefix[0] = 0;
#pragma unroll
    for (int j = 0; j < MAXP; ++j) {
        if (j < per && e0 + j < E) {
            run += tiles[j];
            prefix[e0 + j + 1] = run;
        }
    }
    __syncthreads();
}

// Everything of one launch the main loop reads.
template <typename T> struct SkArgs {
    const T* X;
    const unsigned char* W;
    const int* sidx;
    int k, N, K, grouped_in, gated, layout;
    long long Kb;  // stored bytes of a W row
    // quantized W
    const void* w_scale;
    const unsigned char* w_zero;
    int scale_f32, block_out, block_in, nbi;
    FastDiv bdiv;  // k -> its block along K (k / block_in)
};

// One unit's W rows and X rows, as this lane sees them.
template <typename T, int RS, int NT> struct SkUnit {
    const unsigned char* wrow[RS];  // stored row of each W row of the lane (valid or not: W)
    unsigned wok;                   // bit i: W row i exists (i < N, gated: i < f)
    int srow[RS];                   // its first scale index in the expert's scales (quantized)
    const void* scale;              // the expert's scales (quantized)
    const unsigned char* zero;      // the expert's zero points, or null
    const T* xrow[NT];              // X row of each row of the lane's B column (valid or not: X)
    unsigned xok;                   // bit j: the unit has that row
};

// The 8 elements [8 * c8, 8 * c8 + 8) of a 16-byte chunk of stored W as 4 pairs of T: dequantized
// (dequant8: times the scale, rounded to T), or, POST, the codes less the zero point (decode8: exact
// in T; the scale comes after the MMAs).
template <typename T, typename F, bool POST>
__device__ __forceinline__ uint4 chunk8(const uint4& raw16, int c8, unsigned sbits, bool sf32, int z) {
    if constexpr (F::BITS == 16) {
        return raw16;
    } else {
        unsigned raw[2];
        if constexpr (F::BITS == 8) {
            raw[0] = word(raw16, 2 * c8);
            raw[1] = word(raw16, 2 * c8 + 1);
        } else {
            raw[0] = word(raw16, c8);
            raw[1] = 0u;
        }
        if constexpr (POST) {
            typename Dq<T>::T2 p[4];
            decode8<T, F>(raw, z, p);
            return make_uint4(bits_as<unsigned>(p[0]), bits_as<unsigned>(p[1]), bits_as<unsigned>(p[2]), bits_as<unsigned>(p[3]));
        } else {
            return dequant8<T, F>(raw, sbits, sf32, z);
        }
    }
}

// A scale's stored bits (a T in the low 16 bits, or a float32) as float32 (exact).
template <typename T> __device__ __forceinline__ float scale_f(unsigned bits, bool sf32) {
    return sf32 ? __uint_as_float(bits) : to_f(bits_as<T>((unsigned short)bits));
}

// The MMAs of 8 consecutive elements of each lane's chunk (two m16n8k16 per m16 and n8 tile): a[i]
// holds W row i's 4 pairs, b[j] X row j's; pairs 2h, 2h + 1 are the lane's k (2t, 2t + 1) and
// (2t + 8, 2t + 9) of MMA h.
template <typename T, int MT, int NT>
__device__ __forceinline__ void mma8(float (&acc)[MT][NT][4], const uint4 (&a)[2 * MT], const uint4 (&b)[NT]) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            const unsigned af[4] = {word(a[2 * mt], 2 * h), word(a[2 * mt + 1], 2 * h), word(a[2 * mt], 2 * h + 1),
                                    word(a[2 * mt + 1], 2 * h + 1)};
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const unsigned bf[2] = {word(b[nt], 2 * h), word(b[nt], 2 * h + 1)};
                Mma<T>::run(acc[mt][nt], af, bf);
            }
        }
    }
}

// The fast path: UNROLL k-steps of 16-byte loads in flight, then their MMAs. POST (quantized W with
// one scale per k-step of a row): each k-step's products of the codes less the zero point in a
// partial tile, which then takes the rows' scales into the accumulators (one FFMA each), instead of
// every element's conversion by its scale.
template <typename T, typename F, int BM, int BN, int THREADS, int U, bool POST, bool XC = false>
__device__ __forceinline__ void sk_fast(const SkArgs<T>& A, const SkUnit<T, 2 * (BN / 16), BM / 8>& u, int warp, int tq,
                                        float (&acc)[BN / 16][BM / 8][4]) {
    using C = SkCfg<F, BM, BN, THREADS, U>;
    const int S = (A.K + C::KSTEP - 1) / C::KSTEP;
    const bool sf32 = A.scale_f32 != 0;
#pragma unroll 1
    for (int s0 = warp; s0 < S; s0 += C::WARPS * U) {
        uint4 wv[U][C::RS];
        uint4 xv[U][C::NT][C::XV];
        unsigned sc[U][C::RS];
        int zp[U][C::RS];
#pragma unroll
        for (int v = 0; v < U; ++v) {
            const int step = s0 + v * C::WARPS;
            const int kc = step * C::KSTEP + tq * C::EC;
            const bool in = kc < A.K;  // the chunk is whole inside K or whole outside (fast path)
            const long long wb = (long long)step * 64 + tq * 16;
#pragma unroll
            for (int i = 0; i < C::RS; ++i) wv[v][i] = ld_w16(u.wrow[i] + wb, in && ((u.wok >> i) & 1));
#pragma unroll
            for (int j = 0; j < C::NT; ++j)
#pragma unroll
                for (int x = 0; x < C::XV; ++x) xv[v][j][x] = ld_x16<XC>(u.xrow[j] + kc + 8 * x, in && ((u.xok >> j) & 1));
            if constexpr (F::BITS < 16) {
                // one scale (and zero point) per chunk: its block, of a k inside K (past K the
                // chunk's X is zero, and any finite W will do). POST scales the whole k-step's
                // products, every lane's columns of them: each lane takes the block of the k-step's
                // first element, so a lane whose own chunk lies past K (the last, partial k-step)
                // still scales its columns by the block the step's in-range chunks belong to
                const int kb = POST ? step * C::KSTEP : kc;
                const int bk = (int)A.bdiv.div(kb < A.K ? kb : 0);
#pragma unroll
                for (int i = 0; i < C::RS; ++i) {
                    const int idx = u.srow[i] + bk;
                    sc[v][i] = sf32 ? __ldg(static_cast<const unsigned*>(u.scale) + idx)
                                    : (unsigned)__ldg(static_cast<const unsigned short*>(u.scale) + idx);
                    zp[v][i] = F::ZERO;
                    if constexpr (F::INT)
                        if (u.zero) zp[v][i] = __ldg(u.zero + idx);
                }
            }
        }
#pragma unroll
        for (int v = 0; v < U; ++v) {
            float part[C::MT][C::NT][4];
#pragma unroll
            for (int mt = 0; mt < C::MT; ++mt)
#pragma unroll
                for (int j = 0; j < C::NT; ++j)
#pragma unroll
                    for (int x = 0; x < 4; ++x) part[mt][j][x] = 0.0f;
#pragma unroll
            for (int c8 = 0; c8 < C::EC / 8; ++c8) {
                uint4 a[C::RS], b[C::NT];
#pragma unroll
                for (int i = 0; i < C::RS; ++i) {
                    if constexpr (F::BITS < 16) a[i] = chunk8<T, F, POST>(wv[v][i], c8, sc[v][i], sf32, zp[v][i]);
                    else a[i] = wv[v][i];
                }
#pragma unroll
                for (int j = 0; j < C::NT; ++j) b[j] = xv[v][j][c8];
                if constexpr (POST) mma8<T, C::MT, C::NT>(part, a, b);
                else mma8<T, C::MT, C::NT>(acc, a, b);
            }
            if constexpr (POST) {
                // accumulators 0, 1 are W row g of the m16 tile (the lane's row 2 mt), 2, 3 row g + 8
#pragma unroll
                for (int mt = 0; mt < C::MT; ++mt) {
                    const float s0 = scale_f<T>(sc[v][2 * mt], sf32), s1 = scale_f<T>(sc[v][2 * mt + 1], sf32);
#pragma unroll
                    for (int j = 0; j < C::NT; ++j) {
                        acc[mt][j][0] = fmaf(s0, part[mt][j][0], acc[mt][j][0]);
                        acc[mt][j][1] = fmaf(s0, part[mt][j][1], acc[mt][j][1]);
                        acc[mt][j][2] = fmaf(s1, part[mt][j][2], acc[mt][j][2]);
                        acc[mt][j][3] = fmaf(s1, part[mt][j][3], acc[mt][j][3]);
                    }
                }
            }
        }
    }
}

// One element of W the plain way (the element-wise path): T as stored, or the contract's formula
// in float32 with the element's own block, rounded to T. Zero past K or past the rows.
template <typename T, typename F>
__device__ __forceinline__ T w_elem(const SkArgs<T>& A, const unsigned char* row, bool ok, const void* scale,
                                    const unsigned char* zero, int srow, int kk) {
    if (!ok || kk >= A.K) return from_f<T>(0.0f);
    if constexpr (F::BITS == 16) {
        return reinterpret_cast<const T*>(row)[kk];
    } else {
        const unsigned code = F::BITS == 8 ? row[kk] : (row[kk >> 1] >> (4 * (kk & 1))) & 15u;
        const int idx = srow + kk / A.block_in;
        const float s = A.scale_f32 ? __ldg(static_cast<const float*>(scale) + idx) : to_f(static_cast<const T*>(scale)[idx]);
        const int z = F::INT ? (zero ? (int)__ldg(zero + idx) : F::ZERO) : 0;
        return from_f<T>(dequant1<F>(code, s, z));
    }
}

// The element-wise path: one k-step at a time, every element loaded on its own.
template <typename T, typename F, int BM, int BN, int THREADS, int U>
__device__ __forceinline__ void sk_plain(const SkArgs<T>& A, const SkUnit<T, 2 * (BN / 16), BM / 8>& u, int warp, int tq,
                                      float (&acc)[BN / 16][BM / 8][4]) {
    using C = SkCfg<F, BM, BN, THREADS, U>;
    const int S = (A.K + C::KSTEP - 1) / C::KSTEP;
#pragma unroll 1
    for (int step = warp; step < S; step += C::WARPS) {
        const int kc = step * C::KSTEP + tq * C::EC;
#pragma unroll 1
        for (int c8 = 0; c8 < C::EC / 8; ++c8) {
            const int k8 = kc + 8 * c8;
            uint4 a[C::RS], b[C::NT];
#pragma unroll
            for (int i = 0; i < C::RS; ++i) {
                unsigned p[4];
#pragma unroll
                for (int m = 0; m < 4; ++m)
                    p[m] = pack2(w_elem<T, F>(A, u.wrow[i], (u.wok >> i) & 1, u.scale, u.zero, u.srow[i], k8 + 2 * m),
                                 w_elem<T, F>(A, u.wrow[i], (u.wok >> i) & 1, u.scale, u.zero, u.srow[i], k8 + 2 * m + 1));
                a[i] = make_uint4(p[0], p[1], p[2], p[3]);
            }
#pragma unroll
            for (int j = 0; j < C::NT; ++j) {
                const bool ok = (u.xok >> j) & 1;
                unsigned p[4];
#pragma unroll
                for (int m = 0; m < 4; ++m) {
                    const int kk = k8 + 2 * m;
                    const T lo = ok && kk < A.K ? u.xrow[j][kk] : from_f<T>(0.0f);
                    const T hi = ok && kk + 1 < A.K ? u.xrow[j][kk + 1] : from_f<T>(0.0f);
                    p[m] = pack2(lo, hi);
                }
                b[j] = make_uint4(p[0], p[1], p[2], p[3]);
            }
            mma8<T, C::MT, C::NT>(acc, a, b);
        }
    }
}

// The units of one GEMM: the CTA takes units blockIdx.x, + gridDim.x, ... of the (expert, row
// tile, column tile) work that prefix (block_prefix) and off (expert offsets, global or shared
// memory) describe. sidx: the grouped order (global or shared memory). XC: X was written by this
// kernel (ld_x16). Ends with a barrier.
template <typename T, typename F, int BM, int BN, int THREADS, int U, bool XC = false>
__device__ __forceinline__ void skinny_units(const T* __restrict__ X, const unsigned char* __restrict__ W, const T* __restrict__ bias,
                                             T* __restrict__ Y, const int* __restrict__ sidx, const int* off, const int* prefix,
                                             const T* __restrict__ row_scale, int k, int N, int K, int E, int grouped_in,
                                             int grouped_out, int act, int gated, int layout, float alpha, float limit,
                                             const void* __restrict__ w_scale, const unsigned char* __restrict__ w_zero,
                                             int scale_f32, int block_out, int block_in) {
    using C = SkCfg<F, BM, BN, THREADS, U>;
    __shared__ float red[C::WARPS][C::ACC][32];  // the warps' partial tiles, [warp][accumulator][lane]
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int gq = lane >> 2, tq = lane & 3;
    const int Nout = gated ? (N >> 1) : N;
    const int BNo = gated ? (BN / 2) : BN;
    const int nN = (Nout + BNo - 1) / BNo;
    const int f = N >> 1;

    SkArgs<T> A;
    A.X = X;
    A.W = W;
    A.sidx = sidx;
    A.k = k;
    A.N = N;
    A.K = K;
    A.grouped_in = grouped_in;
    A.gated = gated;
    A.layout = layout;
    A.w_scale = w_scale;
    A.w_zero = w_zero;
    A.scale_f32 = scale_f32;
    A.block_out = block_out;
    A.block_in = block_in;
    bool fast, post = false;
    if constexpr (F::BITS == 16) {
        A.Kb = 2LL * K;
        A.nbi = 1;
        A.bdiv = FastDiv(1);
        fast = (K % 8) == 0;
    } else {
        A.Kb = F::BITS == 8 ? (long long)K : ((long long)K + 1) / 2;
        A.nbi = (K + block_in - 1) / block_in;
        A.bdiv = FastDiv((unsigned)block_in);
        fast = (K % 8) == 0 && (A.Kb % 16) == 0 && (A.nbi == 1 || (block_in % C::EC) == 0);
        // one block over a whole k-step of a row (4 chunks): the scale after the MMAs
        post = fast && (A.nbi == 1 || (block_in % C::KSTEP) == 0);
    }
    const int nbo = F::BITS == 16 ? 1 : (N + block_out - 1) / block_out;

    const int total = prefix[E] * nN;

    for (int g = blockIdx.x; g < total; g += gridDim.x) {
        const Tile t = find_tile(g, prefix, off, E, nN, BM);
        SkUnit<T, C::RS, C::NT> u;
        u.wok = 0;
        u.xok = 0;
        // the expert's scales and zero points: [nbo, nbi] blocks each
        u.scale = nullptr;
        u.zero = nullptr;
        if constexpr (F::BITS < 16) {
            const long long sbase = (long long)t.e * nbo * A.nbi;
            u.scale = static_cast<const unsigned char*>(w_scale) + sbase * (scale_f32 ? 4 : 2);
            u.zero = w_zero ? w_zero + sbase : nullptr;
        }
#pragma unroll
        for (int i = 0; i < C::RS; ++i) {
            bool ok;
            const int n = b_row(16 * (i >> 1) + 8 * (i & 1) + gq, t.nt, BN, BN, N, gated, layout, &ok);
            u.wrow[i] = W + ((long long)t.e * N + n) * A.Kb;
            u.srow[i] = F::BITS == 16 ? 0 : (n / block_out) * A.nbi;
            u.wok |= (unsigned)ok << i;
        }
#pragma unroll
        for (int j = 0; j < C::NT; ++j) {
            const int r = 8 * j + gq;
            u.xrow[j] = X;
            if (t.m0 + r < t.cnt) {
                const int p = t.start + t.m0 + r;
                const long long xr = grouped_in ? p : sidx[p] / k;
                u.xrow[j] = X + xr * K;
                u.xok |= 1u << j;
            }
        }

        float acc[C::MT][C::NT][4];
#pragma unroll
        for (int mt = 0; mt < C::MT; ++mt)
#pragma unroll
            for (int j = 0; j < C::NT; ++j)
#pragma unroll
                for (int x = 0; x < 4; ++x) acc[mt][j][x] = 0.0f;
        if constexpr (F::BITS < 16) {
            if (post) sk_fast<T, F, BM, BN, THREADS, U, true, XC>(A, u, warp, tq, acc);
            else if (fast) sk_fast<T, F, BM, BN, THREADS, U, false, XC>(A, u, warp, tq, acc);
            else sk_plain<T, F, BM, BN, THREADS, U>(A, u, warp, tq, acc);
        } else {
            if (fast) sk_fast<T, F, BM, BN, THREADS, U, false, XC>(A, u, warp, tq, acc);
            else sk_plain<T, F, BM, BN, THREADS, U>(A, u, warp, tq, acc);
        }

#pragma unroll
        for (int mt = 0; mt < C::MT; ++mt)
#pragma unroll
            for (int j = 0; j < C::NT; ++j)
#pragma unroll
                for (int x = 0; x < 4; ++x) red[warp][(mt * C::NT + j) * 4 + x][lane] = acc[mt][j][x];
        __syncthreads();

        // The sum over the warps of W row lr (local) and X row r of the unit: accumulator x of
        // m16 tile lr / 16, n8 tile r / 8 in lane 4 (lr % 8) + (r % 8) / 2, x = 2 ((lr % 16) / 8) + r % 2.
        auto tile_at = [&](int lr, int r) {
            const int x = 2 * ((lr & 15) >> 3) + (r & 1);
            const int ai = ((lr >> 4) * C::NT + (r >> 3)) * 4 + x;
            const int ln = 4 * (lr & 7) + ((r & 7) >> 1);
            float s = 0.0f;
#pragma unroll
            for (int w = 0; w < C::WARPS; ++w) s += red[w][ai][ln];
            return s;
        };
        const T* be = bias ? bias + (long long)t.e * N : nullptr;
        for (int id = tid; id < BM * BNo; id += THREADS) {
            const int r = id / BNo, o = id % BNo;
            const int col = t.nt * BNo + o;
            if (t.m0 + r >= t.cnt || col >= Nout) continue;
            const int p = t.start + t.m0 + r;
            const float scale = row_scale ? to_f(row_scale[sidx[p]]) : 1.0f;
            float v;
            if (gated) {
                float gv = tile_at(o, r), uv = tile_at(BN / 2 + o, r);
                if (be) {
                    gv += to_f(be[glu_gate_row(col, f, layout)]);
                    uv += to_f(be[glu_up_row(col, f, layout)]);
                }
                v = glu(gv, uv, act, alpha, limit);
            } else {
                v = tile_at(o, r);
                if (be) v += to_f(be[col]);
                v = activate(v, act);
            }
            const long long orow = grouped_out ? p : sidx[p];
            Y[orow * Nout + col] = from_f<T>(v * scale);
        }
        __syncthreads();
    }
}


template <typename T, typename F, int BM, int BN, int THREADS, int U>
__device__ void skinny_gemm(const T* __restrict__ X, const unsigned char* __restrict__ W, const T* __restrict__ bias,
                            T* __restrict__ Y, const int* __restrict__ sidx, const int* __restrict__ off,
                            const T* __restrict__ row_scale, int k, int N, int K, int E, int grouped_in, int grouped_out,
                            int act, int gated, int layout, float alpha, float limit, const void* __restrict__ w_scale,
                            const unsigned char* __restrict__ w_zero, int scale_f32, int block_out, int block_in) {
    using C = SkCfg<F, BM, BN, THREADS, U>;
    __shared__ int prefix[SMOE_ROUTING_MAX_E + 1];
    __shared__ int wsum[C::WARPS];
    if (E > SMOE_ROUTING_MAX_E) return;
    block_prefix<THREADS>(off, E, BM, prefix, wsum);
    skinny_units<T, F, BM, BN, THREADS, U>(X, W, bias, Y, sidx, off, prefix, row_scale, k, N, K, E, grouped_in, grouped_out,
                                           act, gated, layout, alpha, limit, w_scale, w_zero, scale_f32, block_out, block_in);
}

}  // namespace
