// kernels/gemm_hopper_ws.cuh -- the large-batch grouped GEMM on Hopper (sm_90a): warp-specialised
// wgmma with a cp.async producer. Included, inside an anonymous namespace after common.cuh,
// dequant.cuh and tc_tile.cuh (the tile scheduler, b_row, swizzle), by grouped_gemm_ws.cu (the
// 16-bit forms) and quant_gemm_ws.cu (the quantized forms); same parameters and semantics as every
// entry point of grouped_gemm.cu.
//
// Why this shape:
//   - A non-specialised wgmma kernel (128x128 tiles, every warp loading and multiplying; removed,
//     see tests/gpu/RESULTS.md) waited on its own cp.async groups between wgmma batches, so loads
//     and math took turns: ~400 TFLOP/s on Mixtral GEMM1, against ~520 here.
//   - Here warpgroup 0 only loads (cp.async, 16-byte chunks, so A rows can be gathered by the sorted
//     order: no grouped copy of X; eight threads per row so each warp reads whole rows) and warpgroups 1-2 only multiply. They hand stages over with
//     mbarriers: full[s] completes when all 128 producer threads' copies for stage s have landed
//     (cp.async.mbarrier.arrive.noinc), empty[s] when all 8 consumer warps have retired the wgmmas
//     that read stage s. The producer runs ahead into the next tile while consumers run the
//     epilogue, so the epilogue's stores overlap the next tile's loads.
//   - Tile 128 x 256 x 64: each consumer warpgroup owns 64 rows x 256 columns (m64n256k16, 128
//     f32 accumulators per thread): twice the math per staged byte of a 128 x 128 tile.
//     Gated forms put the tile's 128 gate rows of W in smem rows 0-127 and the matching up rows in
//     128-255 (b_row with WN = BN), so each thread holds gate and up of the same output in
//     registers ni and ni + 16.
//   - W comes through cp.async as well in wgmma_ws (any K and alignment, gated layouts and row
//     validity through b_row), through TMA in wgmma_tma and wgmma_mc (below: WLOAD).
//   - No setmaxnreg: ptxas gives the whole kernel one register count (168 at 384 threads), which
//     holds the 128 accumulators; lowering the producer's count only made it spill (measured).
// The epilogue stores straight from registers (bias, activation / GLU, row scale fused).
// Dynamic smem: STAGES * 49152 + 1024 bytes. K % 8 == 0 takes 16-byte cp.async; any other K a slow
// element-wise path (correct, not tuned).

#pragma once

// wgmma helpers.
// Operands sit in smem in the 128-byte-swizzled K-major layout wgmma reads (chunk c of row r at
// r*128 + ((c ^ r%8) * 16)), which needs 1024-byte-aligned tiles.
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SMOE_HAS_WGMMA 1
#else
#define SMOE_HAS_WGMMA 0
#endif

#if SMOE_HAS_WGMMA
__device__ __forceinline__ unsigned long long wg_desc(unsigned saddr) {
    // start address >> 4 | LBO 16 B (unused for swizzled K-major) | SBO 1024 B (8 rows) | 128B swizzle
    return (unsigned long long)((saddr & 0x3FFFF) >> 4) | (1ull << 16) | (64ull << 32) | (1ull << 62);
}
__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wg_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
#endif

// ws_gemm (Hopper, gemm_hopper_ws.cuh): its tile and block are fixed (WsCfg), STAGES sets the smem.
#define SMOE_WS_CHECK(NAME, ST, TBM, TBN, NTHREADS, DSMEM)                                              \
    static_assert(WsCfg<ST>::BM == TBM && WsCfg<ST>::BN == TBN && WsCfg<ST>::THREADS == NTHREADS &&      \
                      WsCfg<ST>::SMEM == DSMEM,                                                          \
                  #NAME ": tile, threads or smem in kernels/manifest.toml differ from the kernel's");

// A tensor map as the host encodes it (cuTensorMapEncodeTiled), passed by value as a
// __grid_constant__ kernel parameter: TMA reads it from parameter space.
struct __align__(64) TmaMap {
    unsigned long long words[16];
};
// Cluster shapes exist from sm_90; the entry points built for older targets trap and are never
// launched there. SMOE_CLUSTER_NONE: the entry macros' cluster argument for one CTA per tile.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
#define SMOE_CLUSTER_PAIR __cluster_dims__(2, 1, 1)
#else
#define SMOE_CLUSTER_PAIR
#endif
#define SMOE_CLUSTER_NONE

#if SMOE_HAS_WGMMA
#define SMOE_WGMMA_N256(TY)                                                                       \
    asm volatile("wgmma.mma_async.sync.aligned.m64n256k16.f32." TY "." TY " "                     \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "  \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "  \
    "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "  \
    "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "  \
    "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "  \
    "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "  \
    "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "  \
    "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, %128, %129, 1, 1, 1, 0, 0;\n"                                                \
    : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),  \
      "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),  \
      "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),  \
      "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),  \
      "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),  \
      "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),  \
      "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),  \
      "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),  \
      "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),  \
      "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),  \
      "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),  \
      "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),  \
      "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),  \
      "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),  \
      "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),  \
      "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])  \
    : "l"(da), "l"(db))

template <typename T> struct Wgmma256;
template <> struct Wgmma256<__nv_bfloat16> {
    // D[64x256] += A[64x16] * B[16x256], A and B K-major in smem (128-byte swizzle descriptors)
    static __device__ __forceinline__ void run(float* d, unsigned long long da, unsigned long long db) {
        SMOE_WGMMA_N256("bf16");
    }
};
template <> struct Wgmma256<__half> {
    static __device__ __forceinline__ void run(float* d, unsigned long long da, unsigned long long db) {
        SMOE_WGMMA_N256("f16");
    }
};
#undef SMOE_WGMMA_N256

// ---- mbarrier helpers (CTA scope)
__device__ __forceinline__ void mbar_init(unsigned bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_wait(unsigned bar, unsigned parity) {
    unsigned done = 0;
    do {
        asm volatile(
            "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(bar), "r"(parity)
            : "memory");
    } while (!done);
}
__device__ __forceinline__ void mbar_arrive(unsigned bar) {
    asm volatile("{\n .reg .b64 st;\n mbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(bar) : "memory");
}
// Barrier 1 among the producer warpgroup only (barrier 0 is __syncthreads).
__device__ __forceinline__ void producer_sync() { asm volatile("bar.sync 1, 128;\n" ::: "memory"); }
// Arrives on `bar` once every cp.async this thread issued so far has landed; counts as one of the
// barrier's expected arrivals (.noinc).
__device__ __forceinline__ void mbar_arrive_cp_async(unsigned bar) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}

// ---- cluster helpers (the multicast variant: two CTAs of a cluster share each W tile)
__device__ __forceinline__ unsigned cluster_rank() {
    unsigned r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
    return r;
}
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
// Adds `bytes` to the transactions the current phase of `bar` waits for, and arrives once.
__device__ __forceinline__ void mbar_arrive_expect_tx(unsigned bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
// Arrives on the barrier at the same offset in CTA `rank` of this cluster. Default (CTA-scope
// release) semantics: what must precede the peer's next write into this CTA's stage is the
// retirement of this warp's wgmma reads, which wgmma.wait_group already ensured; a cluster-scope
// release made every arrive a memory barrier (measured: "membar" the top stall; Mixtral GEMM1 at
// 454 TFLOP/s against 612 without it).
__device__ __forceinline__ void mbar_arrive_cluster(unsigned bar, unsigned rank) {
    asm volatile(
        "{\n .reg .b32 ra;\n mapa.shared::cluster.u32 ra, %0, %1;\n"
        " mbarrier.arrive.shared::cluster.b64 _, [ra];\n}\n" ::"r"(bar),
        "r"(rank)
        : "memory");
}
// One TMA box of the 4-D map at (c0..c3) into this CTA's `dst`; `bar` is credited with its bytes.
__device__ __forceinline__ void tma_load_4d(unsigned dst, const TmaMap* map, int c0, int c1, int c2, int c3, unsigned bar) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes"
        " [%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(dst),
        "l"(reinterpret_cast<unsigned long long>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
        : "memory");
}
// One TMA box of the 4-D map at (c0..c3), written to `dst` in every CTA of `mask`; each receiver's
// barrier at offset `bar` is credited with the bytes that landed in that CTA.
__device__ __forceinline__ void tma_load_4d_multicast(unsigned dst, const TmaMap* map, int c0, int c1, int c2, int c3,
                                                      unsigned bar, unsigned short mask) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
        " [%0], [%1, {%2, %3, %4, %5}], [%6], %7;\n" ::"r"(dst),
        "l"(reinterpret_cast<unsigned long long>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar), "h"(mask)
        : "memory");
}
#endif  // SMOE_HAS_WGMMA

// 16 bytes into the 128-byte-swizzled K-major layout wgmma reads (grouped_gemm.cu's wgmma helpers):
// chunk c of row r at `tile` + r * 128 + (c ^ r % 8) * 16, the tile 1024-byte aligned. For the stores
// of the producer paths that fill a stage with ordinary shared-memory stores.
__device__ __forceinline__ void st_swizzled16(unsigned tile, int r, int c, uint4 u) {
    asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(tile + r * 128 + ((c ^ (r & 7)) * 16)), "r"(u.x), "r"(u.y),
                 "r"(u.z), "r"(u.w)
                 : "memory");
}

// Two adjacent outputs of one row: one 4-byte store when the row stride allows (vec), else
// element-wise with the column bound.
template <typename T>
__device__ __forceinline__ void store_pair(T* row, int col, int n, bool vec, float a, float b) {
    if (vec && col + 1 < n) {
        __align__(4) T v[2] = {from_f<T>(a), from_f<T>(b)};
        *reinterpret_cast<unsigned*>(row + col) = *reinterpret_cast<const unsigned*>(v);
    } else {
        if (col < n) row[col] = from_f<T>(a);
        if (col + 1 < n) row[col + 1] = from_f<T>(b);
    }
}

// What the epilogue needs besides the accumulators and the tile.
template <typename T> struct WsEpi {
    T* Y;
    const T* bias;
    const int* sidx;
    const T* row_scale;
    int N, Nout, layout, grouped_out;
    float alpha, limit;
    int row0;  // this thread's first tile row (the second is row0 + 8)
    int col0;  // this thread's first column inside each 8-column fragment
};

// Bias, activation or GLU, row scale, store, for one consumer thread's 64 x 256 fragment: fragment
// ni covers columns 8 ni .. 8 ni + 7 (as mma.m16n8); gated: gate in ni < 16, up in ni + 16.
template <typename T, int ACT>
__device__ __forceinline__ void ws_epilogue(const float (&acc)[128], const Tile& t, int gated, const WsEpi<T>& ep) {
    const T* be = ep.bias ? ep.bias + (long long)t.e * ep.N : nullptr;
    const int f = ep.N >> 1;
    const bool ovec = (ep.Nout % 2) == 0;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int rl = ep.row0 + h * 8;
        if (t.m0 + rl >= t.cnt) continue;
        const int p = t.start + t.m0 + rl;
        const int sp = ep.sidx[p];
        const float scale = ep.row_scale ? to_f(ep.row_scale[sp]) : 1.0f;
        T* dst = ep.Y + (long long)(ep.grouped_out ? p : sp) * ep.Nout;
        if (gated) {
#pragma unroll
            for (int ni = 0; ni < 16; ++ni) {
                const int col = t.nt * 128 + ni * 8 + ep.col0;
                float o[2];
#pragma unroll
                for (int x = 0; x < 2; ++x) {
                    float gv = acc[ni * 4 + 2 * h + x];
                    float uv = acc[(ni + 16) * 4 + 2 * h + x];
                    const int i = col + x;
                    if (be && i < f) {
                        gv += to_f(be[glu_gate_row(i, f, ep.layout)]);
                        uv += to_f(be[glu_up_row(i, f, ep.layout)]);
                    }
                    o[x] = glu_c<ACT>(gv, uv, ep.alpha, ep.limit) * scale;
                }
                store_pair(dst, col, ep.Nout, ovec, o[0], o[1]);
            }
        } else {
#pragma unroll
            for (int ni = 0; ni < 32; ++ni) {
                const int col = t.nt * 256 + ni * 8 + ep.col0;
                float o[2];
#pragma unroll
                for (int x = 0; x < 2; ++x) {
                    float v = acc[ni * 4 + 2 * h + x];
                    if (be && col + x < ep.N) v += to_f(be[col + x]);
                    o[x] = activate_c<ACT>(v) * scale;
                }
                store_pair(dst, col, ep.Nout, ovec, o[0], o[1]);
            }
        }
    }
}

template <int STAGES> struct WsCfg {
    static constexpr int BM = 128, BN = 256, BK = 64, THREADS = 384;
    static constexpr int A_BYTES = BM * BK * 2, B_BYTES = BN * BK * 2;
    static constexpr int STAGE_BYTES = A_BYTES + B_BYTES;
    static constexpr int SMEM = STAGES * STAGE_BYTES + 1024;
    static constexpr int PRODUCERS = 128;     // warpgroup 0
    static constexpr int CONSUMER_WARPS = 8;  // warpgroups 1 and 2
};

// How W reaches shared memory (template parameter WLOAD):
// WS_CP_ASYNC (wgmma_ws): W rows by cp.async like the A rows (any K, any alignment).
// WS_TMA (wgmma_tma): one thread loads the W tile with two TMA boxes (its two 128-row halves); the
// producer warpgroup then issues only the A copies, a third of the cp.async of WS_CP_ASYNC, and W
// arrives in bulk. Same tiles and schedule as wgmma_ws.
// WS_TMA_PAIR (wgmma_mc): clusters of two CTAs (the entry point declares __cluster_dims__(2, 1, 1))
// take two M tiles of the same expert and column tile. Each CTA fetches one half of the shared W
// tile with a multicast TMA (cp.async.bulk.tensor) that lands in both CTAs, so each W byte leaves
// L2 once per pair: L2-to-SM traffic per CTA and stage drops from 48 KiB to 32 KiB (Mixtral GEMMs
// 1.15-1.3x faster from 1024 rows per expert; slower when few rows share a W tile, see pick_cfg in
// src/cuda/forward/selection.rs). A stage is free again only when the consumers of both CTAs have retired it
// (each consumer warp arrives on both CTAs' empty barriers), because either CTA's TMA writes it in
// both.
// The TMA forms read W through `tmap` (4-D: K, row, half, expert; see src/cuda/tensor_map.rs), so
// gated layouts and rows past N (zero-filled) need no per-row table; they require K % 8 == 0 and a
// 16-byte-aligned W (the host checks; otherwise it launches wgmma_ws).
//
// How A reaches shared memory (template parameter ALOAD):
// WS_A_GATHER: the producer warpgroup gathers the A rows by cp.async, by the sorted order or, for
// grouped input, from consecutive rows (TMA on sm_90 cannot gather rows).
// WS_A_TMA (wgmma_mc_ga; grouped input and a TMA W only): the tile's A rows are consecutive rows
// start + m0 .. + 127 of X, so one more TMA box through `amap` (X as rows of K, same box as a W half)
// brings them, and one thread of the producer warpgroup issues everything: no cp.async at all. Rows
// of the box past the expert's count belong to the next expert (or lie past X: zeros); their
// results are never stored.
//
// A consumer warpgroup whose 64 rows all lie past the expert's count skips its wgmmas (tiles of up
// to 64 rows: decode batches, the last M tile of many experts, the idle CTA of a pair at small
// batches) and only hands the stages back. (A build that also skipped the copies of those A rows,
// a branch per copy in the producer, and kept the tile lookup alive through the main loop ran the
// large GEMMs 15-25% slower; tests/gpu/RESULTS.md.)
// Quantized W (the `quant` forms of wgmma_ws: scattermoe_qgemm_{t}_{format}_wgmma_ws, with
// kernels/quant_gemm.cu's parameter list and contract, docs/op-spec.md "Quantized expert weights").
// The producer warpgroup brings W's stored codes into registers with plain 16- or 8-byte loads,
// dequantizes them there (kernels/dequant.cuh's dequant8: the contract's (q - z) * s rounded to T,
// bit for bit as the mma.sync forms) and stores T into the same swizzled B tile wgmma_ws's cp.async
// fills; the consumers are unchanged. Why this shape:
//   - at many rows per expert the layer is compute-bound: the quantized mma.sync forms ran 3.5-4x
//     slower than bf16 wgmma there (1024-4096 tokens, bench/results/quant/README.md);
//     converting once per CTA and stage keeps the wgmma rate, the conversion running in the
//     producer warpgroup beside the consumers' tensor-core work;
//   - the codes of stage kb + 1 are loaded into registers before stage kb is converted, so one
//     stage's conversion covers the next stage's load latency (one stage per tile is not covered:
//     the first, loaded when the tile's row tables are ready). Codes copied by cp.async two stages
//     ahead instead ran no faster (bench/results/quant/README.md): the conversion is the bound;
//   - each thread takes 16 consecutive elements (one 16-byte load of 8-bit codes, 8 bytes of 4-bit)
//     of 8 rows: a warp reads 8 rows' 64 contiguous bytes per load, and one scale and zero point
//     per row and stage.
// The packed path needs K % 16 == 0 (whole, aligned 16-element pieces) and one scale block per
// stage and row (block_in % 64 == 0, or one block across K); the host chooses these forms only
// then (src/cuda/forward/selection.rs). Other shapes take an element-wise path (correct, slow),
// so that every case the GPU tests force onto these forms computes the contract.
struct WsQuant {
    const void* scale;          // [E, ceil(N / block_out), ceil(K / block_in)], T or float32
    const unsigned char* zero;  // same shape, or null: the format's default
    int scale_f32, block_out, block_in;
};
template <typename F> struct WsQ {
    static constexpr bool ON = true;
    static constexpr int ROWS = 8;                   // B rows per producer thread
    static constexpr int WORDS = F::BITS == 8 ? 4 : 2;  // 32-bit words of one thread's 16 codes of a row
};
template <> struct WsQ<void> {
    static constexpr bool ON = false;
    static constexpr int ROWS = 1;
    static constexpr int WORDS = 1;
};
// One stage's codes of a producer thread, with each row's scale bits and zero point.
template <typename F> struct WsQRegs {
    unsigned raw[WsQ<F>::ROWS][WsQ<F>::WORDS];
    unsigned sc[WsQ<F>::ROWS];
    int z[WsQ<F>::ROWS];
    unsigned valid;  // bit i: row i of the thread exists and its piece lies inside K
};

#define WS_CP_ASYNC 0
#define WS_TMA 1
#define WS_TMA_PAIR 2
#define WS_A_GATHER 0
#define WS_A_TMA 1
// F: void (W in T), or the quantized format (WqFp8, WqU8, WqU4; W its stored bytes, wq its scales).
template <typename T, int STAGES, int WLOAD, int ALOAD, typename F = void>
__device__ void ws_gemm(const T* __restrict__ X, const void* __restrict__ Wv, const T* __restrict__ bias, T* __restrict__ Y,
                        const int* __restrict__ sidx, const int* __restrict__ off, const T* __restrict__ row_scale,
                        int k, int N, int K, int E, int grouped_in, int grouped_out, int act, int gated,
                        int layout, float alpha, float limit, const TmaMap* tmap, const TmaMap* amap,
                        WsQuant wq = WsQuant{}) {
#if SMOE_HAS_WGMMA
    using C = WsCfg<STAGES>;
    using Q = WsQ<F>;
    constexpr int BM = C::BM, BN = C::BN, BK = C::BK;
    constexpr bool MC = WLOAD == WS_TMA_PAIR;  // a CTA pair
    constexpr bool TMA_W = WLOAD != WS_CP_ASYNC;
    constexpr bool TMA_A = ALOAD == WS_A_TMA;
    constexpr bool QUANT = Q::ON;
    static_assert(!TMA_A || TMA_W, "A by TMA only with W by TMA");
    static_assert(!QUANT || (!TMA_W && !TMA_A), "quantized W: by the producer's loads only");
    const T* __restrict__ W = static_cast<const T*>(Wv);
    const unsigned char* __restrict__ Wq = static_cast<const unsigned char*>(Wv);
    extern __shared__ __align__(128) unsigned char smem_raw[];
    __shared__ int prefix[SMOE_ROUTING_MAX_E + 1];
    __shared__ __align__(8) unsigned long long full_bar[STAGES], empty_bar[STAGES];
    __shared__ long long row_src[BM + BN];        // producer's per-tile row table
    __shared__ long long row_scl[QUANT ? BN : 1];  // quantized W: each B row's first scale block
    if (E > SMOE_ROUTING_MAX_E) return;     // (uniform over the grid: no cluster peer is left waiting)
    if (TMA_A && !grouped_in) __trap();     // the host launches wgmma_mc_ga for grouped input only
    // 1024-byte aligned ring (the 128-byte swizzle pattern repeats every 1024 bytes). Stage s holds
    // A (BM rows x 128 bytes) then B (BN rows x 128 bytes). Same offset in both CTAs of a cluster.
    const unsigned raw_s = smem_u32(smem_raw);
    const unsigned ring = (raw_s + 1023u) & ~1023u;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wg = warp >> 2;
    const int Nout = gated ? (N >> 1) : N;
    const int BNo = gated ? (BN / 2) : BN;
    const int nN = (Nout + BNo - 1) / BNo;
    const int KB = (K + BK - 1) / BK;
    const bool kvec = (K % 8) == 0;
    // Work units: one tile, or (MC) one pair of M tiles; this CTA's M tile in a pair is `rank`.
    const unsigned rank = MC ? cluster_rank() : 0u;
    const int unit_m = MC ? 2 * BM : BM;
    const int first = MC ? (int)(blockIdx.x >> 1) : (int)blockIdx.x;
    const int stride = MC ? (int)(gridDim.x >> 1) : (int)gridDim.x;
    auto tile_of = [&](int g) {
        Tile t = find_tile(g, prefix, off, E, nN, unit_m);
        t.m0 += (int)rank * BM;
        return t;
    };

    if (tid == 0) {
        for (int s = 0; s < STAGES; ++s) {
            // TMA: 128 cp.async arrivals + the arrival that sets the TMA byte count (TMA_A: that
            // arrival only). MC: both CTAs' consumer warps release a stage.
            // Quantized W: the A copies' 128 arrivals and 128 more once the converted B is stored.
            mbar_init(smem_u32(&full_bar[s]), TMA_A ? 1 : C::PRODUCERS + (TMA_W ? 1 : 0) + (QUANT ? C::PRODUCERS : 0));
            mbar_init(smem_u32(&empty_bar[s]), C::CONSUMER_WARPS * (MC ? 2 : 1));
        }
        if (MC) asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    tile_prefix(off, E, unit_m, prefix);  // ends with __syncthreads: barriers initialised too
    if (MC) cluster_sync();               // the peer's barriers exist before anything signals them
    const int total = prefix[E] * nN;

    if (wg == 0) {
        // ------------------------------------------------------------ producer warpgroup
        int stage = 0;
        unsigned phase = 0;
        // Per tile, the source of each staged row goes to row_src (element offset into X for the BM
        // A rows, into W for the BN B rows; -1 = zero row). Each stage, thread tid copies 16-byte
        // chunk c = tid % 8 of rows tid / 8 + 16 i: eight consecutive threads read one row's 128
        // contiguous bytes, so every warp-wide copy touches 4 whole rows (full 32-byte sectors).
        // TMA: only the A rows go through the table.
        constexpr int ROWS = (TMA_W || QUANT) ? BM : BM + BN;  // rows copied by cp.async
        constexpr int TABLE = TMA_W ? BM : BM + BN;            // rows in the table
        const int c = tid & 7, rg = tid >> 3;
        // Quantized W: stored bytes per row, scale blocks, and whether the packed path applies.
        const int Kb = QUANT && Q::WORDS == 2 ? (K + 1) / 2 : K;
        const int nbo = QUANT ? (N + wq.block_out - 1) / wq.block_out : 1;
        const int nbi = QUANT ? (K + wq.block_in - 1) / wq.block_in : 1;
        const bool qfast = QUANT && K % 16 == 0 && (wq.block_in % BK == 0 || wq.block_in >= K);
        const int qc = tid & 3;  // this thread's 16-element piece of each of its B rows
        auto qrow = [&](int i) { return (tid >> 2) + 32 * i; };
        const unsigned dst_off = (unsigned)rg * 128u + (((unsigned)c ^ (unsigned)(rg & 7)) * 16u);
        // TMA_A: thread 0 issues every load. Its whole warp walks the loop with it, so the warp is
        // converged again at the cluster barrier at the end; the other three warps have nothing to do.
        for (int g = first; g < total && (!TMA_A || warp == 0); g += stride) {
            const Tile t = tile_of(g);
            if (!TMA_A) producer_sync();  // the previous tile's table is no longer read
            for (int r = tid; r < TABLE && !TMA_A; r += C::PRODUCERS) {
                long long o = -1;
                if (r < BM) {
                    if (t.m0 + r < t.cnt) {
                        const int p = t.start + t.m0 + r;
                        o = (long long)(grouped_in ? p : sidx[p] / k) * K;
                    }
                } else {
                    bool ok;
                    const int n = b_row(r - BM, t.nt, BN, BN, N, gated, layout, &ok);
                    if (ok) o = ((long long)t.e * N + n) * (QUANT ? Kb : K);  // bytes when quantized
                    if (QUANT) row_scl[r - BM] = ok ? ((long long)t.e * nbo + n / wq.block_out) * nbi : 0;
                }
                row_src[r] = o;
            }
            if (!TMA_A) producer_sync();
            // Quantized W: stage kb's codes of this thread's 8 B rows (16 elements each), scales and
            // zero points into registers (the packed path; `valid` off for absent rows and pieces
            // past K).
            auto q_fetch = [&](WsQRegs<F>& g, int kb) {
                if constexpr (QUANT) {
                    const int k0 = kb * BK + qc * 16;
                    const int blk = wq.block_in >= K ? 0 : (kb * BK) / wq.block_in;
                    g.valid = 0;
#pragma unroll
                    for (int i = 0; i < Q::ROWS; ++i) {
                        const int r = qrow(i);
                        const long long o = row_src[BM + r];
                        const bool ok = o >= 0 && k0 < K;
#pragma unroll
                        for (int w = 0; w < Q::WORDS; ++w) g.raw[i][w] = 0;
                        g.sc[i] = 0;
                        g.z[i] = F::ZERO;
                        if (ok) {
                            g.valid |= 1u << i;
                            if constexpr (Q::WORDS == 4) {
                                const uint4 v = __ldg(reinterpret_cast<const uint4*>(Wq + o + k0));
                                g.raw[i][0] = v.x; g.raw[i][1] = v.y; g.raw[i][2] = v.z; g.raw[i][3] = v.w;
                            } else {
                                const uint2 v = __ldg(reinterpret_cast<const uint2*>(Wq + o + k0 / 2));
                                g.raw[i][0] = v.x; g.raw[i][1] = v.y;
                            }
                            const long long si = row_scl[r] + blk;
                            g.sc[i] = wq.scale_f32 ? __ldg(static_cast<const unsigned*>(wq.scale) + si)
                                                   : (unsigned)__ldg(static_cast<const unsigned short*>(wq.scale) + si);
                            if (F::INT && wq.zero) g.z[i] = (int)__ldg(wq.zero + si);
                        }
                    }
                }
            };
            // ... and dequantized into the B tile at `bdst` (the packed path).
            auto q_store = [&](const WsQRegs<F>& g, unsigned bdst) {
                if constexpr (QUANT) {
#pragma unroll
                    for (int i = 0; i < Q::ROWS; ++i) {
                        const int r = qrow(i);
#pragma unroll
                        for (int h = 0; h < 2; ++h) {
                            uint4 u = make_uint4(0, 0, 0, 0);
                            if (g.valid >> i & 1u) u = dequant8<T, F>(&g.raw[i][h * (Q::WORDS / 2)], g.sc[i], wq.scale_f32 != 0, g.z[i]);
                            st_swizzled16(bdst, r, 2 * qc + h, u);
                        }
                    }
                }
            };
            // The element-wise path: each element by the contract's formula with its own block.
            auto q_store_plain = [&](int kb, unsigned bdst) {
                if constexpr (QUANT) {
                    for (int i = 0; i < Q::ROWS; ++i) {
                        const int r = qrow(i);
                        const long long o = row_src[BM + r];
#pragma unroll
                        for (int h = 0; h < 2; ++h) {
                            __align__(16) T v[8];
#pragma unroll
                            for (int j = 0; j < 8; ++j) {
                                const int kk = kb * BK + qc * 16 + h * 8 + j;
                                float w = 0.0f;
                                if (o >= 0 && kk < K) {
                                    const unsigned code = F::BITS == 8 ? Wq[o + kk] : (Wq[o + kk / 2] >> (4 * (kk & 1))) & 15u;
                                    const long long si = row_scl[r] + kk / wq.block_in;
                                    const float s = wq.scale_f32 ? __ldg(static_cast<const float*>(wq.scale) + si)
                                                                 : to_f(static_cast<const T*>(wq.scale)[si]);
                                    const int z = F::INT ? (wq.zero ? (int)__ldg(wq.zero + si) : F::ZERO) : 0;
                                    w = dequant1<F>(code, s, z);
                                }
                                v[j] = from_f<T>(w);
                            }
                            const uint4 u = *reinterpret_cast<const uint4*>(v);
                            st_swizzled16(bdst, r, 2 * qc + h, u);
                        }
                    }
                }
            };
            WsQRegs<F> qcur;
            if (QUANT && qfast) q_fetch(qcur, 0);
            // TMA coordinates (K, row, half, expert) of smem half h of the W tile: gated tiles
            // take the 128 gate rows in half 0 and the 128 up rows in half 1. MC: this CTA loads
            // half `rank` (for both CTAs); otherwise both halves.
            auto w_coords = [&](int h, int& c1, int& c2) {
                if (!gated) {
                    c1 = t.nt * BN + h * (BN / 2);
                    c2 = 0;
                } else {
                    const int hh = layout == SMOE_GLU_UP_GATE ? 1 - h : h;
                    c1 = layout == SMOE_GLU_INTERLEAVED ? hh : t.nt * (BN / 2);
                    c2 = layout == SMOE_GLU_INTERLEAVED ? t.nt * (BN / 2) : hh;
                }
            };
            for (int kb = 0; kb < KB; ++kb) {
                WsQRegs<F> qnxt;
                if (QUANT && qfast && kb + 1 < KB) q_fetch(qnxt, kb + 1);  // in flight while kb is converted
                mbar_wait(smem_u32(&empty_bar[stage]), phase ^ 1u);
                const unsigned sbase = ring + stage * C::STAGE_BYTES;
                const unsigned dst = sbase + dst_off;
                const int k0 = kb * BK + c * 8;
                if (TMA_W && tid == 0) {
                    const unsigned fb = smem_u32(&full_bar[stage]);
                    mbar_arrive_expect_tx(fb, C::B_BYTES + (TMA_A ? C::A_BYTES : 0));  // both W halves land here
                    if (TMA_A) tma_load_4d(sbase, amap, kb * BK, t.start + t.m0, 0, 0, fb);
                    int c1, c2;
                    if (MC) {
                        w_coords((int)rank, c1, c2);
                        tma_load_4d_multicast(sbase + C::A_BYTES + rank * (C::B_BYTES / 2), tmap, kb * BK, c1, c2, t.e,
                                              fb, (unsigned short)0x3);
                    } else {
#pragma unroll
                        for (int h = 0; h < 2; ++h) {
                            w_coords(h, c1, c2);
                            tma_load_4d(sbase + C::A_BYTES + h * (C::B_BYTES / 2), tmap, kb * BK, c1, c2, t.e, fb);
                        }
                    }
                }
                if (TMA_A) {
                    // nothing else to load
                } else if (TMA_W || kvec) {
                    const bool kin = k0 < K;
                    // Offsets first, then the copies: each copy would otherwise wait on its own
                    // shared-memory load (measured 1.3x slower).
#pragma unroll
                    for (int i0 = 0; i0 < ROWS / 16; i0 += 8) {
                        long long o[8];
#pragma unroll
                        for (int j = 0; j < 8; ++j) o[j] = row_src[rg + 16 * (i0 + j)];
#pragma unroll
                        for (int j = 0; j < 8; ++j) {
                            const int i = i0 + j;
                            const T* src = i < BM / 16 ? X : W;  // B follows A in the stage
                            const bool ok = o[j] >= 0 && kin;
                            asm volatile(SMOE_CP_ASYNC16 " [%0], [%1], 16, %2;\n" ::"r"(dst + i * 16 * 128),
                                         "l"(ok ? (const void*)(src + o[j] + k0) : (const void*)src), "r"(ok ? 16 : 0));
                        }
                    }
                    mbar_arrive_cp_async(smem_u32(&full_bar[stage]));
                    if constexpr (QUANT) {
                        // B: this thread's pieces converted and stored; the proxy fence wgmma needs;
                        // the second arrival.
                        if (qfast) {
                            q_store(qcur, sbase + C::A_BYTES);
                            qcur = qnxt;
                        } else {
                            q_store_plain(kb, sbase + C::A_BYTES);
                        }
                        fence_proxy_async();
                        mbar_arrive(smem_u32(&full_bar[stage]));
                    }
                } else {
                    // K % 8 != 0: rows are not 16-byte aligned; element loads and ordinary smem
                    // stores, then the proxy fence wgmma needs, then a plain arrive.
                    for (int i = 0; i < ROWS / 16; ++i) {
                        const long long o = row_src[rg + 16 * i];
                        const T* src = i < BM / 16 ? X : W;
                        __align__(16) T v[8];
                        for (int j = 0; j < 8; ++j) v[j] = (o >= 0 && k0 + j < K) ? src[o + k0 + j] : from_f<T>(0.0f);
                        const uint4 u = *reinterpret_cast<const uint4*>(v);
                        asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(dst + i * 16 * 128), "r"(u.x),
                                     "r"(u.y), "r"(u.z), "r"(u.w)
                                     : "memory");
                    }
                    if constexpr (QUANT) q_store_plain(kb, sbase + C::A_BYTES);  // (qfast needs K % 16 == 0)
                    fence_proxy_async();
                    mbar_arrive(smem_u32(&full_bar[stage]));
                    if constexpr (QUANT) mbar_arrive(smem_u32(&full_bar[stage]));  // both arrivals of this thread
                }
                if (++stage == STAGES) { stage = 0; phase ^= 1u; }
            }
        }
        // Drain: the block must not exit with this thread's copies still in flight.
        cp_async_wait<0>();
    } else {
        // ------------------------------------------------------------ consumer warpgroups
        const int cw = wg - 1;        // rows cw*64 .. cw*64+63 of the tile
        const int wq = warp & 3;      // 16-row slice inside them
        int stage = 0;
        unsigned phase = 0;
        // Hands stage s back: to this CTA's producer, and (MC) to the peer's, whose TMA also
        // writes this CTA's copy of the stage.
        auto release = [&](int s) {
            if (lane == 0) {
                mbar_arrive(smem_u32(&empty_bar[s]));
                if (MC) mbar_arrive_cluster(smem_u32(&empty_bar[s]), rank ^ 1u);
            }
        };
        for (int g = first; g < total; g += stride) {
            float acc[128];
#pragma unroll
            for (int i = 0; i < 128; ++i) acc[i] = 0.0f;
            int prev = -1;
            // Whether any of this warpgroup's 64 rows is one of the tile's (else: no wgmma, see above).
            // Only this bool lives through the main loop: the tile is found again after it, from
            // an opaque copy of g so the compiler cannot keep this lookup's registers alive instead.
            bool busy;
            {
                const Tile t0 = tile_of(g);
                busy = t0.m0 + cw * 64 < t0.cnt;
            }
            int g_after = g;
            asm volatile("" : "+r"(g_after));
            for (int kb = 0; kb < KB; ++kb) {
                mbar_wait(smem_u32(&full_bar[stage]), phase);
                if (!busy) {
                    release(stage);
                    if (++stage == STAGES) { stage = 0; phase ^= 1u; }
                    continue;
                }
                // cp.async wrote the stage through the generic proxy; wgmma reads it through the async proxy.
                fence_proxy_async();
                const unsigned a_s = ring + stage * C::STAGE_BYTES + cw * 64 * 128;
                const unsigned b_s = ring + stage * C::STAGE_BYTES + C::A_BYTES;
                wg_fence();
#pragma unroll
                for (int kk = 0; kk < BK / 16; ++kk) Wgmma256<T>::run(acc, wg_desc(a_s + kk * 32), wg_desc(b_s + kk * 32));
                wg_commit();
                wg_wait<1>();  // the previous stage's wgmmas are done: hand that stage back
                if (prev >= 0) release(prev);
                prev = stage;
                if (++stage == STAGES) { stage = 0; phase ^= 1u; }
            }
            wg_wait<0>();
            if (prev >= 0) release(prev);
            // The tile's coordinates are needed only now: finding them here keeps their registers
            // free during the main loop (128 accumulators leave little room at 168 registers).
            const Tile t = tile_of(g_after);

            // ---- epilogue, specialised per activation: a run-time switch per element made the
            // unrolled epilogue large and slow (measured: gated GEMMs at ~70% of plain ones).
            const WsEpi<T> ep{Y, bias, sidx, row_scale, N, Nout, layout, grouped_out, alpha, limit,
                              cw * 64 + wq * 16 + (lane >> 2), 2 * (lane & 3)};
            switch (act) {
            case SMOE_ACT_SILU: ws_epilogue<T, SMOE_ACT_SILU>(acc, t, gated, ep); break;
            case SMOE_ACT_GELU: ws_epilogue<T, SMOE_ACT_GELU>(acc, t, gated, ep); break;
            case SMOE_ACT_GELU_TANH: ws_epilogue<T, SMOE_ACT_GELU_TANH>(acc, t, gated, ep); break;
            case SMOE_ACT_RELU: ws_epilogue<T, SMOE_ACT_RELU>(acc, t, gated, ep); break;
            case SMOE_ACT_SWIGLU_OAI: ws_epilogue<T, SMOE_ACT_SWIGLU_OAI>(acc, t, gated, ep); break;
            case SMOE_ACT_RELU2: ws_epilogue<T, SMOE_ACT_RELU2>(acc, t, gated, ep); break;
            case SMOE_ACT_SWIGLU_LIMIT: ws_epilogue<T, SMOE_ACT_SWIGLU_LIMIT>(acc, t, gated, ep); break;
            default: ws_epilogue<T, SMOE_ACT_NONE>(acc, t, gated, ep); break;
            }
        }
    }
    // MC: neither CTA may exit while its peer can still arrive on its barriers or write its smem.
    if (MC) cluster_sync();
#else
    __trap();  // built for a target without wgmma: the host must not pick this kernel
#endif
}
