// The dequantization of kernels/dequant.cuh on the CPU (its functions are host and device code):
// every code of every format, for f16 and bf16, scales in T and in float32 (normal, subnormal,
// large, negative), default and explicit zero points, against the contract's formula
// W = (q - z) * s in float32 rounded to T, bit for bit; and the e4m3fn decoding against its
// definition (2^(e-7) (1 + m/8), subnormals m 2^-9); and FastDiv, the division the skinny kernel
// finds a k's scale block with, against the division. Compiled and run by tests/dequant_host.rs.
#include <cmath>
#include <cstdio>
#include <vector>

#include "dequant.cuh"

using namespace smoe;

static int failures = 0;
static long checks = 0;

template <typename T> static unsigned short t_bits(float v);
template <> unsigned short t_bits<__half>(float v) { return bits_as<unsigned short>(__float2half_rn(v)); }
template <> unsigned short t_bits<__nv_bfloat16>(float v) { return bits_as<unsigned short>(__float2bfloat16_rn(v)); }
template <typename T> static float t_val(unsigned short b);
template <> float t_val<__half>(unsigned short b) { return __half2float(bits_as<__half>(b)); }
template <> float t_val<__nv_bfloat16>(unsigned short b) { return __bfloat162float(bits_as<__nv_bfloat16>(b)); }

// e4m3fn by its definition (the NaN codes excluded by the caller)
static double e4m3(unsigned c) {
    const int e = (c >> 3) & 15, m = c & 7;
    const double mag = e ? std::ldexp(1.0 + m / 8.0, e - 7) : std::ldexp(m / 8.0, -6);
    return (c & 0x80) ? -mag : mag;
}

template <typename T, typename F> static void run(const char* tname, const char* fname) {
    // scales: as T (rounded to T first) and as float32
    const float scales[] = {1.0f, 0.0123f, -3.5f, 1e-6f, 6.1e-5f, 250.0f, 3.0e4f, 1.7e-38f, 2.5e9f};
    const int zs[] = {F::ZERO, 0, 7, 15, 127, 128, 200, 255};
    const int ncodes = F::BITS == 8 ? 256 : 16;
    for (int sf = 0; sf < 2; ++sf) {
        for (float s0 : scales) {
            unsigned sbits;
            float s;
            if (sf) {
                s = s0;
                sbits = bits_as<unsigned>(s0);
            } else {
                sbits = t_bits<T>(s0);
                s = t_val<T>((unsigned short)sbits);
                if (!std::isfinite(s)) continue;  // 2.5e9 overflows f16
            }
            for (int z : zs) {
                if (!F::INT && z != 0) continue;
                // every code in every position of a chunk: chunk i holds codes 8i .. 8i+7 (mod ncodes),
                // rotated through the positions
                for (int base = 0; base < ncodes; ++base) {
                    unsigned code[8];
                    for (int j = 0; j < 8; ++j) code[j] = (unsigned)(base + 3 * j) % ncodes;
                    unsigned raw[2] = {0, 0};
                    if (F::BITS == 8) {
                        for (int j = 0; j < 8; ++j) raw[j / 4] |= code[j] << (8 * (j % 4));
                    } else {
                        for (int j = 0; j < 8; ++j) raw[0] |= code[j] << (4 * j);
                    }
                    const uint4 out = dequant8<T, F>(raw, sbits, sf != 0, z);
                    const unsigned words[4] = {out.x, out.y, out.z, out.w};
                    for (int j = 0; j < 8; ++j) {
                        const unsigned short got = (unsigned short)(words[j / 2] >> (16 * (j % 2)));
                        const unsigned short want = t_bits<T>(dequant1<F>(code[j], s, z));
                        ++checks;
                        // NaN codes of fp8 decode as +-480 on both paths (dequant.cuh); -0 and +0 equal
                        const bool same = got == want || ((got | want) & 0x7FFF) == 0;
                        if (!same && failures++ < 20)
                            printf("FAIL %s %s scale_f32=%d s=%g z=%d code=0x%02x: got 0x%04x (%g), want 0x%04x (%g)\n", tname, fname, sf,
                                   (double)s, z, code[j], got, (double)t_val<T>(got), want, (double)t_val<T>(want));
                    }
                }
            }
        }
    }
}

int main() {
    // the plain path's e4m3fn decoding against the definition
    for (unsigned c = 0; c < 256; ++c) {
        if ((c & 0x7F) == 0x7F) continue;
        ++checks;
        const double want = e4m3(c);
        const float got = dequant1<WqFp8>(c, 1.0f, 0);
        if ((double)got != want && failures++ < 20) printf("FAIL e4m3 code 0x%02x: got %g, want %g\n", c, (double)got, want);
    }
    // and its extremes
    if (dequant1<WqFp8>(0x7E, 1.0f, 0) != 448.0f || dequant1<WqFp8>(0x01, 1.0f, 0) != std::ldexp(1.0f, -9) ||
        dequant1<WqFp8>(0x80, 1.0f, 0) != 0.0f)
        printf("FAIL e4m3 extremes\n"), ++failures;
    // FastDiv (the skinny kernel's block of k, k / block_in) against the division: every divisor a
    // kernel can get for small ones, powers of two and their neighbours, the formats' chunk sizes'
    // multiples and large ones, at numerators around each multiple of the divisor and at the range's end
    {
        std::vector<unsigned> ds;
        for (unsigned d = 1; d <= 300; ++d) ds.push_back(d);
        for (unsigned p = 9; p <= 31; ++p) {
            const unsigned b = 1u << p;
            ds.push_back(b - 1), ds.push_back(b);
            if (p < 31) ds.push_back(b + 1);  // divisors up to 2^31 (a block is at most K < 2^31)
        }
        for (unsigned d : {448u, 1000u, 2880u, 4096u, 7168u, 14336u, 65535u, 1000003u, 123456789u, 0x7fffffffu}) ds.push_back(d);
        for (unsigned d : ds) {
            const FastDiv f(d);
            auto one = [&](unsigned n) {
                ++checks;
                if (f.div(n) != n / d && failures++ < 20) printf("FAIL FastDiv %u / %u: got %u\n", n, d, f.div(n));
            };
            for (unsigned n = 0; n < 4096; ++n) one(n);
            for (unsigned long long q = 1; q * d < 0x80000000ull; q = q * 3 + 1)
                for (int dn = -2; dn <= 2; ++dn) one((unsigned)(q * d + dn));
            for (unsigned n = 0x7fffffffu - 4096; n < 0x7fffffffu; ++n) one(n);
            one(0x7fffffffu);
        }
    }
    run<__half, WqFp8>("f16", "fp8");
    run<__half, WqU8>("f16", "u8");
    run<__half, WqU4>("f16", "u4");
    run<__nv_bfloat16, WqFp8>("bf16", "fp8");
    run<__nv_bfloat16, WqU8>("bf16", "u8");
    run<__nv_bfloat16, WqU4>("bf16", "u4");
    printf("%ld checks, %d failures\n", checks, failures);
    return failures ? 1 : 0;
}
