// kernels/dequant.cuh -- weight-only dequantization for the quantized grouped GEMM (quant_gemm.cu):
// 8 consecutive elements of one W row, from their stored codes to T (f16 / bf16), with the scale
// and zero point of their block. Host and device code (tests/dequant_host.cu checks it on the CPU,
// every code against the contract's formula, bit for bit).
//
// The contract (docs/op-spec.md, "Quantized expert weights"): W = (q - z) * s, computed in float32
// (q, z and s are exact there), which the kernels round to T once, before the product with X.
// Codes (the format is the kernel's template parameter, WqFp8 / WqU8 / WqU4 below):
//   fp8  float8 e4m3fn, one byte per element, no zero point;
//   u8   uint8, one byte per element, zero point z (default 128);
//   u4   uint8-packed 4-bit: byte i of a row holds element 2i in bits 0-3, 2i + 1 in bits 4-7; z
//        default 8.
// What is computed here equals that formula rounded to T, bit for bit:
//   1. The code, less its zero point, is made exactly in T, two elements per 32-bit register,
//      with byte permutes (PRMT, __byte_perm) and 3-input logic (LOP3) instead of integer-to-float
//      conversions: I2F is a quarter-rate instruction and would take one per element; these take
//      1-2 full-rate instructions per pair.
//      - integers: the code is OR'ed into the low mantissa bits of a "magic" float whose ulp is 1
//        (f16 1024.0: 0x6400, for 4- and 8-bit codes; bf16 128.0: 0x4300, for 4-bit codes), which
//        gives magic + q exactly; one packed subtraction of magic + z leaves q - z, exact (an
//        integer of at most 8 bits). bf16 has 8 significand bits, too few for 128 + a byte: 8-bit
//        codes go through f32 (magic 2^23, 0x4B000000) and are packed to bf16 (exact).
//      - e4m3fn: the byte's exponent and mantissa bits are moved under T's (f16: one bit down in
//        each half, bf16: four), the sign kept, which reads as the code's value times 2^-8 (f16)
//        or 2^-120 (bf16), subnormal codes included (they land on T's subnormals); one packed
//        multiply by 2^8 / 2^120 makes it exact. The two NaN codes (0x7f, 0xff) read as +-480,
//        not NaN (no quantizer writes them).
//   2. The product with the scale: a scale in T takes one packed multiply (HMUL2), whose single
//      rounding of the exact product is the contract's value (the float32 product of two T
//      values is exact: 11 + 11 or 8 + 8 significand bits); a float32 scale takes the pair widened
//      to float32 (exact), the float32 products and one rounding to T (cvt.rn), as the formula says.
// Elements past the row (k >= K) are the kernel's business: it writes zeros for whole chunks past
// K, and X is zero there.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <string.h>

#define SMOE_HD __host__ __device__ __forceinline__

namespace smoe {

// The formats (the template parameter of the quantized kernels; kernels/manifest.toml's
// [quant].formats names them).
struct WqFp8 {
    static constexpr int BITS = 8;
    static constexpr int ZERO = 0;  // no zero point
    static constexpr bool INT = false;
};
struct WqU8 {
    static constexpr int BITS = 8;
    static constexpr int ZERO = 128;
    static constexpr bool INT = true;
};
struct WqU4 {
    static constexpr int BITS = 4;
    static constexpr int ZERO = 8;
    static constexpr bool INT = true;
};

template <typename To, typename From> SMOE_HD To bits_as(From v) {
    static_assert(sizeof(To) == sizeof(From), "same size");
    To r;
    memcpy(&r, &v, sizeof(To));
    return r;
}

// PRMT: byte n of the result is byte ((sel >> 4n) & 7) of {b:a} (a bytes 0-3, b bytes 4-7).
SMOE_HD unsigned prmt(unsigned a, unsigned b, unsigned sel) {
#ifdef __CUDA_ARCH__
    return __byte_perm(a, b, sel);
#else
    unsigned long long x = ((unsigned long long)b << 32) | a;
    unsigned r = 0;
    for (int n = 0; n < 4; ++n) r |= (unsigned)((x >> (8 * ((sel >> (4 * n)) & 7))) & 0xFF) << (8 * n);
    return r;
#endif
}

// The element type's pair arithmetic and constants.
template <typename T> struct Dq;
template <> struct Dq<__half> {
    using T2 = __half2;
    static constexpr bool F16 = true;
    static constexpr unsigned MAGIC = 0x64006400u;  // 1024.0 in each half: ulp 1 on [1024, 2048)
    static constexpr float MAGIC_F = 1024.0f;
    static constexpr int FP8_SHIFT = 1;             // e4m3 bits 6..0 -> f16 bits 13..7
    static constexpr unsigned FP8_FIX = 0x5C005C00u;  // 2^8
    static SMOE_HD T2 sub(T2 a, T2 b) { return __hsub2(a, b); }
    static SMOE_HD T2 mul(T2 a, T2 b) { return __hmul2(a, b); }
    static SMOE_HD float2 widen(T2 a) { return __half22float2(a); }
    static SMOE_HD T2 pack(float a, float b) { return __floats2half2_rn(a, b); }
    static SMOE_HD T2 splat(float v) { return __float2half2_rn(v); }
};
template <> struct Dq<__nv_bfloat16> {
    using T2 = __nv_bfloat162;
    static constexpr bool F16 = false;
    static constexpr unsigned MAGIC = 0x43004300u;  // 128.0: ulp 1 on [128, 256)
    static constexpr float MAGIC_F = 128.0f;
    static constexpr int FP8_SHIFT = 4;             // e4m3 bits 6..0 -> bf16 bits 10..4
    static constexpr unsigned FP8_FIX = 0x7B807B80u;  // 2^120
    static SMOE_HD T2 sub(T2 a, T2 b) { return __hsub2(a, b); }
    static SMOE_HD T2 mul(T2 a, T2 b) { return __hmul2(a, b); }
    static SMOE_HD float2 widen(T2 a) { return __bfloat1622float2(a); }
    static SMOE_HD T2 pack(float a, float b) { return __floats2bfloat162_rn(a, b); }
    static SMOE_HD T2 splat(float v) { return __float2bfloat162_rn(v); }
};

// The e4m3fn codes in bytes 1 and 3 of x (each the high byte of a 16-bit half) as a pair of T
// reading code * 2^-8 (f16) or * 2^-120 (bf16): sign kept, exponent and mantissa moved under T's.
template <typename T> SMOE_HD unsigned fp8_pair_bits(unsigned x) {
    return ((x & 0x7F007F00u) >> Dq<T>::FP8_SHIFT) | (x & 0x80008000u);
}

// The 8 elements of one chunk as 4 pairs of T, exact: q - z for the integer formats, the e4m3
// value for fp8. raw: the chunk's stored bytes, 8 for 8-bit codes (raw[0] bytes 0-3 = elements
// 0-3), 4 for 4-bit ones (raw[0] only). z: the zero point (ignored for fp8).
template <typename T, typename F> SMOE_HD void decode8(const unsigned* raw, int z, typename Dq<T>::T2* p) {
    using D = Dq<T>;
    using T2 = typename D::T2;
    if constexpr (!F::INT) {
        const T2 fix = bits_as<T2>(D::FP8_FIX);
#pragma unroll
        for (int w = 0; w < 2; ++w) {
            // bytes 0, 1 (2, 3) of the word into the high bytes of the two halves
            p[2 * w] = D::mul(bits_as<T2>(fp8_pair_bits<T>(prmt(raw[w], 0, 0x1404))), fix);
            p[2 * w + 1] = D::mul(bits_as<T2>(fp8_pair_bits<T>(prmt(raw[w], 0, 0x3424))), fix);
        }
    } else if constexpr (F::BITS == 4) {
        // element n is nibble n of the word: mask two nibbles 16 bits apart under the magic at a
        // time, which pairs (0, 4), (1, 5), (2, 6), (3, 7); subtract, then re-pair with PRMT.
        const unsigned w = raw[0];
        unsigned q[4];
#pragma unroll
        for (int s = 0; s < 4; ++s) {
            T2 m = bits_as<T2>(((w >> (4 * s)) & 0x000F000Fu) | D::MAGIC);
            if constexpr (D::F16) {
                m = D::sub(m, D::splat(D::MAGIC_F + (float)z));  // f16: 1024 + z exact for any byte z
            } else {
                // bf16: 128 + z is exact only below 128; take the magic off first (exact), then z
                m = D::sub(D::sub(m, bits_as<T2>(D::MAGIC)), D::splat((float)z));
            }
            q[s] = bits_as<unsigned>(m);
        }
        p[0] = bits_as<T2>(prmt(q[0], q[1], 0x5410));  // (e0, e1)
        p[1] = bits_as<T2>(prmt(q[2], q[3], 0x5410));  // (e2, e3)
        p[2] = bits_as<T2>(prmt(q[0], q[1], 0x7632));  // (e4, e5)
        p[3] = bits_as<T2>(prmt(q[2], q[3], 0x7632));  // (e6, e7)
    } else if constexpr (D::F16) {
        // f16, 8-bit: bytes under the 1024 magic, two per PRMT
        const T2 zm = D::splat(D::MAGIC_F + (float)z);
#pragma unroll
        for (int w = 0; w < 2; ++w) {
            p[2 * w] = D::sub(bits_as<T2>(prmt(raw[w], 0x64646464u, 0x4140)), zm);
            p[2 * w + 1] = D::sub(bits_as<T2>(prmt(raw[w], 0x64646464u, 0x4342)), zm);
        }
    } else {
        // bf16, 8-bit: each byte under the f32 magic 2^23 (0x4B0000bb), less 2^23 + z (exact),
        // packed to bf16 (exact: at most 8 significant bits)
        const float zm = 8388608.0f + (float)z;
#pragma unroll
        for (int w = 0; w < 2; ++w) {
            float f[4];
#pragma unroll
            for (int j = 0; j < 4; ++j) f[j] = bits_as<float>(prmt(raw[w], 0x4B000000u, 0x7440u | j)) - zm;
            p[2 * w] = D::pack(f[0], f[1]);
            p[2 * w + 1] = D::pack(f[2], f[3]);
        }
    }
}

// The chunk dequantized into 16 bytes of T (8 elements in order): decode8, times the scale. The
// scale's stored bits: a T in the low 16 bits (scale_f32 false) or a float32.
template <typename T, typename F> SMOE_HD uint4 dequant8(const unsigned* raw, unsigned scale_bits, bool scale_f32, int z) {
    using D = Dq<T>;
    using T2 = typename D::T2;
    T2 p[4];
    decode8<T, F>(raw, z, p);
    if (scale_f32) {
        const float s = bits_as<float>(scale_bits);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const float2 v = D::widen(p[i]);
            p[i] = D::pack(v.x * s, v.y * s);
        }
    } else {
        const T2 s2 = bits_as<T2>((scale_bits & 0xFFFFu) * 0x10001u);
#pragma unroll
        for (int i = 0; i < 4; ++i) p[i] = D::mul(p[i], s2);
    }
    return make_uint4(bits_as<unsigned>(p[0]), bits_as<unsigned>(p[1]), bits_as<unsigned>(p[2]), bits_as<unsigned>(p[3]));
}

// n / d for a divisor 1 <= d <= 2^31 fixed at run time and 0 <= n < 2^31, without a division: the block
// along K of element n (d = block_in) in the skinny kernel's main loop, where an integer division
// (a ~20-instruction sequence) per chunk and row would cost more than the chunk's conversion.
// Granlund and Montgomery's round-up method: s = ceil(log2 d), m = floor(2^32 (2^s - d) / d) + 1,
// n / d = (umulhi(m, n) + n) >> s (the sum fits 32 bits for n < 2^31). tests/dequant_host.cu
// checks it against the division.
struct FastDiv {
    unsigned m, s;
    FastDiv() = default;
    SMOE_HD explicit FastDiv(unsigned d) {
        s = 0;
        while (s < 31 && (1u << s) < d) ++s;
        m = (unsigned)(((1ull << 32) * ((1ull << s) - d)) / d + 1);
    }
    SMOE_HD unsigned div(unsigned n) const {
#ifdef __CUDA_ARCH__
        const unsigned hi = __umulhi(m, n);
#else
        const unsigned hi = (unsigned)(((unsigned long long)m * n) >> 32);
#endif
        return (hi + n) >> s;
    }
};

// One element the plain way, the contract's formula in float32 (the kernel's path for blocks that
// are not whole chunks, and the host test's reference). code: the element's byte or nibble.
template <typename F> SMOE_HD float dequant1(unsigned code, float s, int z) {
    if constexpr (F::INT) {
        return ((float)code - (float)z) * s;
    } else {
        const unsigned e = (code >> 3) & 15, m = code & 7;
        // normal: 2^(e-7) (1 + m/8); subnormal (e = 0): 2^-6 m/8 = m 2^-9
        const float mag = e ? (float)(8 + m) * bits_as<float>((e + 117u) << 23) : (float)m * 0.001953125f;
        return (code & 0x80) ? -mag * s : mag * s;
    }
}

}  // namespace smoe

#undef SMOE_HD
