// kernels/quant_gemm.cu -- the scatter2scatter grouped GEMM of grouped_gemm.cu with W quantized
// (weight-only): W tiles arrive in shared memory as their stored bytes, by cp.async, and are
// dequantized there, a k-block at a time, into the T tile the tensor cores read. There is never a
// dequantized copy of W in global memory.
//
// Same computation, grid, scheduling, epilogues and alignment rules as tc_gemm in grouped_gemm.cu
// (see its header: grouped / scattered rows, bias, activation or GLU, row scale), with
//   W[e, o, i] = (q[e, o, i] - z) * s        docs/op-spec.md "Quantized expert weights"
// rounded to T once (kernels/dequant.cuh: how, and why that is the contract's value bit for bit).
//
// Entry points: scattermoe_qgemm_{f16,bf16}_{fp8,u8,u4}_<tile>, one per format and tile of
// kernels/manifest.toml ([[gemm]] tables with `quant`, [quant].formats), with tc_gemm's parameter
// list (W now the stored bytes) and five more at its end:
//   (const T* X, const unsigned char* W, const T* bias, T* Y, const int* sorted_idx,
//    const int* expert_offsets, const T* row_scale, int k, int N, int K, int E, int grouped_in,
//    int grouped_out, int act, int gated, int glu_layout, float alpha, float limit,
//    const void* w_scale, const unsigned char* w_zero, int scale_f32, int block_out, int block_in)
//   W        [E, N, Kb] bytes: Kb = K (fp8, u8) or ceil(K / 2) (u4: element 2i in the low nibble
//            of byte i, 2i + 1 in the high one)
//   w_scale  [E, ceil(N / block_out), ceil(K / block_in)], T (scale_f32 = 0) or float32 (1);
//            per output channel: block_out = 1, block_in >= K; group-wise along the input:
//            block_out = 1, block_in = the group; 2-D blocks: both. Any positive block sizes:
//            partial last blocks, K not a multiple of the group.
//   w_zero   uint8, the shape of w_scale, or null (the format's default: 128 for u8, 8 for u4;
//            never read for fp8)
//
// Why a dequantizing step per stage in shared memory, and not in the B fragments:
//   - the mma.sync B fragment gives each thread elements k = 2t, 2t+1, 2t+8, 2t+9 of a row (t =
//     lane % 4), which are not adjacent in the stored bytes unless W is re-laid out beforehand
//     (as Marlin and TensorRT-LLM's weight-only kernels do offline); the contract keeps W as stored.
//     From bytes in their stored order each thread would need two 2-byte shared loads per fragment
//     and a byte shuffle, per warp that reads the fragment;
//   - the tiles have several warps along M (32x32: 2, 128x128: 2), which read the same B
//     fragments: converting in the fragments repeats the dequantization per warp, converting the
//     stage once per CTA does not;
//   - so each thread dequantizes whole 8-element chunks (8 or 4 stored bytes: one 8- or 4-byte
//     shared load, a 16-byte store of T into the same swizzled layout tc_gemm's cp.async fills),
//     and the fragments come through ldmatrix exactly as in tc_gemm. The converted tile is double
//     buffered and the conversion of k-block kb + 1 runs after the MMAs of kb in the same
//     iteration, so it costs no extra barrier: one __syncthreads per k-block, as tc_gemm.
//   - the scales and zero points of the chunks a thread converts are read from global memory one
//     k-block ahead, into registers (a T scale is 2 bytes, below cp.async's 4), so their latency is
//     hidden behind a whole iteration.
// Shared memory: STAGES stages of A (T) and of stored W, two converted B tiles (T):
//   STAGES * BM * BK * sizeof(T) + 2 * BN * BK * sizeof(T) + STAGES * BN * BK * bits / 8.
// Stored W is read with 16-byte cp.async when Kb % 16 == 0 (K % 16 for 8-bit codes, K % 32 for
// 4-bit), element-wise otherwise (correct, slower). Chunks whose 8 elements share one block
// (block_in % 8 == 0, or one block across K) take the packed conversion; other block sizes take
// the plain formula per element, with its scale read then (correct, slower).
//
// Hopper: wgmma_ws has quantized forms of its own (gemm_hopper_ws.cuh, "Quantized W": its producer
// warpgroup converts the codes with the same dequant8 on their way to shared memory), which the kernel
// choice (src/cuda/forward/selection.rs) takes on sm_90a above QUANT_WGMMA_ROWS rows per expert where
// their packed path applies; these mma.sync forms run everywhere else above QUANT_SKINNY_ROWS, with
// the thresholds used where there is no wgmma. At decode (up to QUANT_SKINNY_ROWS rows per expert) it
// takes kernels/skinny_gemm.cu instead, which streams the stored codes into registers and converts
// them there with the same dequant8: no stage, no barrier.
#include "common.cuh"
#include "dequant.cuh"
#include "tc_tile.cuh"

namespace {

using namespace smoe;

template <typename T, typename F, int BM, int BN, int BK, int WM, int WN, int STAGES>
struct TcqCfg {
    // tile, warps, the A loads and the converted B tile's layout are tc_gemm's
    using Tc = TcCfg<T, BM, BN, BK, WM, WN, STAGES>;
    static constexpr int THREADS = Tc::THREADS;
    static constexpr int RB = BK * F::BITS / 8;  // stored bytes of one W row in a k-block
    static constexpr int RCPR = RB / 16;         // their 16-byte chunks
    static constexpr int RAW_CHUNKS = BN * RCPR;
    static constexpr int RAW_IT = (RAW_CHUNKS + THREADS - 1) / THREADS;
    static constexpr int CB = F::BITS;           // stored bytes of 8 elements
    static constexpr int A_BYTES = STAGES * Tc::A_ELEMS * (int)sizeof(T);
    static constexpr int TB_BYTES = 2 * Tc::B_ELEMS * (int)sizeof(T);
    static constexpr int RAW_STAGE = BN * RB;
    static constexpr int SMEM = A_BYTES + TB_BYTES + STAGES * RAW_STAGE;
    static_assert(RB % 16 == 0, "a k-block of a stored row is whole 16-byte chunks");
    static_assert(STAGES >= 3, "the conversion of k-block kb + 1 waits for all but STAGES - 3 groups");
    static_assert(BM * (BN + Tc::PAD) * (int)sizeof(T) <= SMEM, "epilogue staging fits");
};

// The plain path: the chunk's 8 elements (stored bytes `src` in shared memory, first element
// kc0) by the contract's formula, each with its own block's scale and zero point. Elements past
// K are zero.
template <typename T, typename F>
__device__ __forceinline__ uint4 dequant_plain(const unsigned char* src, int kc0, int K, long long srow, int block_in,
                                            const void* __restrict__ w_scale, int scale_f32,
                                            const unsigned char* __restrict__ w_zero) {
    __align__(16) T v[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        const int kk = kc0 + j;
        float w = 0.0f;
        if (kk < K) {
            const unsigned code = F::BITS == 8 ? src[j] : (src[j >> 1] >> (4 * (j & 1))) & 15u;
            const long long idx = srow + kk / block_in;
            const float s = scale_f32 ? __ldg(static_cast<const float*>(w_scale) + idx) : to_f(static_cast<const T*>(w_scale)[idx]);
            const int z = F::INT ? (w_zero ? (int)__ldg(w_zero + idx) : F::ZERO) : 0;
            w = dequant1<F>(code, s, z);
        }
        v[j] = from_f<T>(w);
    }
    return *reinterpret_cast<const uint4*>(v);
}

template <typename T, typename F, int BM, int BN, int BK, int WM, int WN, int STAGES>
__device__ void tcq_gemm(const T* __restrict__ X, const unsigned char* __restrict__ W, const T* __restrict__ bias,
                         T* __restrict__ Y, const int* __restrict__ sidx, const int* __restrict__ off,
                         const T* __restrict__ row_scale, int k, int N, int K, int E, int grouped_in, int grouped_out,
                         int act, int gated, int layout, float alpha, float limit, const void* __restrict__ w_scale,
                         const unsigned char* __restrict__ w_zero, int scale_f32, int block_out, int block_in) {
    using Q = TcqCfg<T, F, BM, BN, BK, WM, WN, STAGES>;
    using C = typename Q::Tc;
    extern __shared__ __align__(128) unsigned char smem_raw[];
    __shared__ int prefix[SMOE_ROUTING_MAX_E + 1];
    if (E > SMOE_ROUTING_MAX_E) return;
    T* sA = reinterpret_cast<T*>(smem_raw);
    T* sB = reinterpret_cast<T*>(smem_raw + Q::A_BYTES);     // the two converted B tiles
    unsigned char* sR = smem_raw + Q::A_BYTES + Q::TB_BYTES;  // stored W, STAGES k-blocks
    T* sC = reinterpret_cast<T*>(smem_raw);

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp / C::WARPS_N, wn = warp % C::WARPS_N;
    const int Nout = gated ? (N >> 1) : N;
    const int BNo = gated ? (BN / 2) : BN;
    const int nN = (Nout + BNo - 1) / BNo;
    const int KB = (K + BK - 1) / BK;
    const bool kvec = (K % 8) == 0;
    const bool ovec = (Nout % 8) == 0;
    const long long Kb = F::BITS == 8 ? (long long)K : ((long long)K + 1) / 2;  // stored bytes per row
    const bool wvec = (Kb % 16) == 0;
    const int nbo = (N + block_out - 1) / block_out, nbi = (K + block_in - 1) / block_in;
    const bool uniform = nbi == 1 || (block_in % 8) == 0;  // every 8-element chunk inside one block
    const unsigned short* __restrict__ S16 = static_cast<const unsigned short*>(w_scale);
    const unsigned* __restrict__ S32 = static_cast<const unsigned*>(w_scale);

    tile_prefix(off, E, BM, prefix);
    const int total = prefix[E] * nN;

    for (int g = blockIdx.x; g < total; g += gridDim.x) {
        const Tile t = find_tile(g, prefix, off, E, nN, BM);
        // A chunks and converted B chunks: column c, rows r0 + i * RSTEP (as tc_gemm)
        const int c = tid % C::CPR, kc = c * 8, r0 = tid / C::CPR;
        const int dst0 = r0 * BK + swz<C::CPR>(r0, c) * 8;
        const T* a_src[C::A_IT];
#pragma unroll
        for (int i = 0; i < C::A_IT; ++i) {
            int r = r0 + i * C::RSTEP;
            a_src[i] = nullptr;
            if (t.m0 + r < t.cnt) {
                int p = t.start + t.m0 + r;
                long long xr = grouped_in ? p : sidx[p] / k;
                a_src[i] = X + xr * K + kc;
            }
        }
        // stored W chunks this thread loads: chunk id = tid + j * THREADS of the stage, row id / RCPR
        const unsigned char* w_src[Q::RAW_IT];
        int w_dst[Q::RAW_IT], w_col[Q::RAW_IT];
#pragma unroll
        for (int j = 0; j < Q::RAW_IT; ++j) {
            const int id = tid + j * C::THREADS;
            w_src[j] = nullptr;
            w_dst[j] = -1;
            w_col[j] = 0;
            if (id < Q::RAW_CHUNKS) {
                const int r = id / Q::RCPR;
                w_col[j] = (id % Q::RCPR) * 16;
                w_dst[j] = r * Q::RB + w_col[j];
                bool ok;
                const int n = b_row(r, t.nt, BN, WN, N, gated, layout, &ok);
                if (ok) w_src[j] = W + ((long long)t.e * N + n) * Kb + w_col[j];
            }
        }
        // the scales of the chunks this thread converts: row srow[i] of the expert's [nbo, nbi] blocks,
        // at sbase; -1: the W row is past N (zeros)
        const long long sbase = (long long)t.e * nbo * nbi;
        int srow[C::B_IT];
#pragma unroll
        for (int i = 0; i < C::B_IT; ++i) {
            bool ok;
            const int n = b_row(r0 + i * C::RSTEP, t.nt, BN, WN, N, gated, layout, &ok);
            srow[i] = ok ? (n / block_out) * nbi : -1;
        }

        auto load_stage = [&](int s, int kb) {
            const int k0 = kb * BK;
            T* a = sA + s * C::A_ELEMS + dst0;
            const bool kin = k0 + kc < K;
            if (kvec) {
#pragma unroll
                for (int i = 0; i < C::A_IT; ++i) {
                    bool p = a_src[i] != nullptr && kin;
                    cp_async16(a + i * C::RSTEP * BK, p ? (const void*)(a_src[i] + k0) : (const void*)X, p);
                }
            } else {
#pragma unroll
                for (int i = 0; i < C::A_IT; ++i) {
                    __align__(16) T v[8];
#pragma unroll
                    for (int j = 0; j < 8; ++j)
                        v[j] = (a_src[i] && k0 + kc + j < K) ? a_src[i][k0 + j] : from_f<T>(0.0f);
                    *reinterpret_cast<uint4*>(a + i * C::RSTEP * BK) = *reinterpret_cast<const uint4*>(v);
                }
            }
            unsigned char* rs = sR + s * Q::RAW_STAGE;
            const long long kb0 = (long long)kb * Q::RB;  // this k-block's first stored byte in a row
#pragma unroll
            for (int j = 0; j < Q::RAW_IT; ++j) {
                if (w_dst[j] < 0) continue;
                if (wvec) {
                    bool p = w_src[j] != nullptr && kb0 + w_col[j] < Kb;
                    cp_async16(rs + w_dst[j], p ? (const void*)(w_src[j] + kb0) : (const void*)W, p);
                } else {
                    __align__(16) unsigned char v[16];
#pragma unroll
                    for (int b = 0; b < 16; ++b) v[b] = (w_src[j] && kb0 + w_col[j] + b < Kb) ? w_src[j][kb0 + b] : 0;
                    *reinterpret_cast<uint4*>(rs + w_dst[j]) = *reinterpret_cast<const uint4*>(v);
                }
            }
        };

        // the raw scale bits and zero points of k-block kb's chunks (uniform blocks only)
        auto fetch = [&](int kb, unsigned (&sb)[C::B_IT], unsigned char (&zb)[C::B_IT]) {
            const int kc0 = kb * BK + kc;
            const int bk = kc0 / block_in;
#pragma unroll
            for (int i = 0; i < C::B_IT; ++i) {
                sb[i] = 0;
                zb[i] = F::ZERO;
                if (uniform && srow[i] >= 0 && kc0 < K) {
                    const long long idx = sbase + srow[i] + bk;
                    sb[i] = scale_f32 ? __ldg(S32 + idx) : (unsigned)__ldg(S16 + idx);
                    if (F::INT && w_zero) zb[i] = __ldg(w_zero + idx);
                }
            }
        };

        // stored k-block kb (stage s) -> converted tile kb % 2
        auto convert = [&](int s, int kb, const unsigned (&sb)[C::B_IT], const unsigned char (&zb)[C::B_IT]) {
            const unsigned char* rs = sR + s * Q::RAW_STAGE;
            T* b = sB + (kb & 1) * C::B_ELEMS + dst0;
            const int kc0 = kb * BK + kc;
#pragma unroll
            for (int i = 0; i < C::B_IT; ++i) {
                const unsigned char* src = rs + (r0 + i * C::RSTEP) * Q::RB + c * Q::CB;
                uint4 v = make_uint4(0, 0, 0, 0);
                if (srow[i] >= 0 && kc0 < K) {
                    if (uniform) {
                        unsigned raw[2];
                        if constexpr (F::BITS == 8) {
                            const uint2 u = *reinterpret_cast<const uint2*>(src);
                            raw[0] = u.x;
                            raw[1] = u.y;
                        } else {
                            raw[0] = *reinterpret_cast<const unsigned*>(src);
                            raw[1] = 0;
                        }
                        v = dequant8<T, F>(raw, sb[i], scale_f32 != 0, zb[i]);
                    } else {
                        v = dequant_plain<T, F>(src, kc0, K, sbase + srow[i], block_in, w_scale, scale_f32, w_zero);
                    }
                }
                *reinterpret_cast<uint4*>(b + i * C::RSTEP * BK) = v;
            }
        };

        float acc[C::MI][C::NI][4];
#pragma unroll
        for (int mi = 0; mi < C::MI; ++mi)
#pragma unroll
            for (int ni = 0; ni < C::NI; ++ni)
#pragma unroll
                for (int x = 0; x < 4; ++x) acc[mi][ni][x] = 0.0f;

        // One k-block: its MMAs, then the conversion of the next one. The scales of k-block j live in
        // register set j % 2 (the loop runs two k-blocks per turn, so no set is copied: a copy would
        // wait for the loads in flight).
        auto step = [&](int kb, const unsigned (&s_conv)[C::B_IT], const unsigned char (&z_conv)[C::B_IT],
                        unsigned (&s_fetch)[C::B_IT], unsigned char (&z_fetch)[C::B_IT]) {
            // k-block kb + 1 stored and visible; converted tile kb % 2 written (in the previous
            // step) and tile (kb + 1) % 2 no longer read (its MMAs were the previous step's)
            cp_async_wait<STAGES - 3>();
            __syncthreads();
            {
                int nk = kb + STAGES - 1;
                if (nk < KB) load_stage(nk % STAGES, nk);
                cp_async_commit();
            }
            if (kb + 2 < KB) fetch(kb + 2, s_fetch, z_fetch);
            const T* a = sA + (kb % STAGES) * C::A_ELEMS;
            const T* b = sB + (kb & 1) * C::B_ELEMS;
#pragma unroll
            for (int kk = 0; kk < BK / 16; ++kk) {
                unsigned bfr[C::NI][2];
#pragma unroll
                for (int nj = 0; nj < C::NI / 2; ++nj) {
                    int r = wn * WN + nj * 16 + ((lane >> 4) << 3) + (lane & 7);
                    int cc = kk * 2 + ((lane >> 3) & 1);
                    unsigned q[4];
                    ldmatrix_x4(q, b + r * BK + swz<C::CPR>(r, cc) * 8);
                    bfr[2 * nj][0] = q[0];
                    bfr[2 * nj][1] = q[1];
                    bfr[2 * nj + 1][0] = q[2];
                    bfr[2 * nj + 1][1] = q[3];
                }
#pragma unroll
                for (int mi = 0; mi < C::MI; ++mi) {
                    unsigned af[4];
                    int r = wm * WM + mi * 16 + (lane & 15);
                    int cc = kk * 2 + (lane >> 4);
                    ldmatrix_x4(af, a + r * BK + swz<C::CPR>(r, cc) * 8);
#pragma unroll
                    for (int ni = 0; ni < C::NI; ++ni) Mma<T>::run(acc[mi][ni], af, bfr[ni]);
                }
            }
            if (kb + 1 < KB) convert((kb + 1) % STAGES, kb + 1, s_conv, z_conv);
        };

        // prologue: STAGES - 1 k-blocks in flight, the first converted
        unsigned s0[C::B_IT], s1[C::B_IT];
        unsigned char z0[C::B_IT], z1[C::B_IT];
#pragma unroll
        for (int s = 0; s < STAGES - 1; ++s) {
            if (s < KB) load_stage(s, s);
            cp_async_commit();
        }
        fetch(0, s0, z0);
        fetch(1, s1, z1);  // (past K: nothing read)
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        if (KB > 0) convert(0, 0, s0, z0);
        for (int kb = 0; kb < KB; kb += 2) {
            step(kb, s1, z1, s0, z0);
            if (kb + 1 < KB) step(kb + 1, s0, z0, s1, z1);
        }
        cp_async_wait<0>();
        __syncthreads();

        const TcEpi<T> ep{Y, bias, sidx, row_scale, N, Nout, BNo, gated, layout, act, grouped_out, alpha, limit, ovec};
        tc_epilogue<T, C>(acc, t, sC, ep, tid, wm, wn);
        __syncthreads();
    }
}

}  // namespace

// The parameter list, SMOE_QGEMM_PARAMS / SMOE_QGEMM_ARGS: kernels/common.cuh (the wgmma forms in
// grouped_gemm.cu share it).

// tcq_gemm, for element type T and weight format F (WqFp8, WqU8, WqU4): the configurations of
// kernels/manifest.toml's [[gemm]] tables that have a `quant` key, with the dynamic smem it states
// per format (checked against the template's own).
#define SMOE_TCQ_ENTRY(NAME, T, F, BM, BN, BK, WM, WN, ST, MINB, NTHREADS, DSMEM)                          \
    static_assert(TcqCfg<T, F, BM, BN, BK, WM, WN, ST>::THREADS == NTHREADS &&                            \
                      TcqCfg<T, F, BM, BN, BK, WM, WN, ST>::SMEM == DSMEM,                                 \
                  #NAME ": threads or smem in kernels/manifest.toml differ from the kernel's");           \
    extern "C" __global__ void __launch_bounds__((BM / WM) * (BN / WN) * 32, MINB)                         \
        NAME(SMOE_QGEMM_PARAMS(T)) {                                                                      \
        pdl_begin();                                                                                      \
        tcq_gemm<T, F, BM, BN, BK, WM, WN, ST>(SMOE_QGEMM_ARGS);                                           \
    }

// The invocations, one per entry point: generated from kernels/manifest.toml (kernels/generated/).
#include "quant_gemm_entries.cuh"
