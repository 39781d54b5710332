// pmkvq CUDA kernels: shared definitions. Mirrors src/kvcache/quant (a Rust test pins every value here).
//
// Packed layout of one quantization group of G codes at B bits (G a multiple of 4), as in quant/mod.rs:
//   16: code j as little-endian u16 at bytes 2j, 2j+1
//    8: byte j = code j
//    4: byte j < G/2 holds code j (low nibble) and code j + G/2 (high nibble)
//    2: byte j < G/4 holds codes j, j+G/4, j+G/2, j+3G/4 at bits 0, 2, 4, 6
// Groups are token-major: [token][kv_head][group-in-head][bytes]; one f16 scale and one f16 offset per group,
// in the same order. A value reconstructs as code * scale + offset.
#pragma once

// Bit-widths (Rust `Bits`, #[repr(i32)]: the values are the bit counts).
#define PMKVQ_BITS_2 2
#define PMKVQ_BITS_4 4
#define PMKVQ_BITS_8 8
#define PMKVQ_BITS_16 16

// How a code is lowered from 2n to n bits (Rust `ShiftMode`, #[repr(i32)]).
#define PMKVQ_SHIFT_EQUIVALENT 0
#define PMKVQ_SHIFT_DIRECT 1
#define PMKVQ_SHIFT_MODIFIED 2
#define PMKVQ_SHIFT_FITTED 3

// Largest head dimension the attention kernel handles (one warp, 4 dimensions per lane).
#define PMKVQ_MAX_HEAD_DIM 128

// +infinity without math.h (NVRTC compiles these files with no host headers).
#define PMKVQ_INF __int_as_float(0x7f800000)

typedef unsigned char pmkvq_u8;
typedef unsigned short pmkvq_u16;

// f16 <-> f32 without cuda_fp16.h (NVRTC has no headers to include): parameters are stored as raw f16 bits.
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
__device__ __forceinline__ float pmkvq_h2f(pmkvq_u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
// Round to nearest even, as Rust's `half::f16::from_f32`.
__device__ __forceinline__ pmkvq_u16 pmkvq_f2h(float f) {
    pmkvq_u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
#else
// Host build (tests/cuda_host.rs runs the one-thread-per-group kernels on the CPU): the same conversions through
// the host compiler's _Float16 (round to nearest even).
__device__ __forceinline__ float pmkvq_h2f(pmkvq_u16 h) {
    _Float16 x;
    __builtin_memcpy(&x, &h, 2);
    return (float)x;
}
__device__ __forceinline__ pmkvq_u16 pmkvq_f2h(float f) {
    _Float16 x = (_Float16)f;
    pmkvq_u16 h;
    __builtin_memcpy(&h, &x, 2);
    return h;
}
#endif

// Bytes of one packed group.
__device__ __forceinline__ int pmkvq_group_bytes(int bits, int g) { return g * bits / 8; }

// Code `j` (0 <= j < g) of the packed group at `p`.
__device__ __forceinline__ unsigned pmkvq_code(const pmkvq_u8* p, int bits, int g, int j) {
    switch (bits) {
    case 16: return (unsigned)p[2 * j] | ((unsigned)p[2 * j + 1] << 8);
    case 8: return p[j];
    case 4: { int h = g / 2; return j < h ? (p[j] & 0x0F) : (p[j - h] >> 4); }
    default: { int qd = g / 4; return (p[j % qd] >> (2 * (j / qd))) & 3; }
    }
}

// Pack `codes` (one group of g) at `bits` into `out`.
__device__ __forceinline__ void pmkvq_pack(const unsigned* codes, int bits, int g, pmkvq_u8* out) {
    switch (bits) {
    case 16:
        for (int j = 0; j < g; ++j) { out[2 * j] = codes[j] & 0xFF; out[2 * j + 1] = (codes[j] >> 8) & 0xFF; }
        break;
    case 8:
        for (int j = 0; j < g; ++j) out[j] = (pmkvq_u8)codes[j];
        break;
    case 4: {
        int h = g / 2;
        for (int j = 0; j < h; ++j) out[j] = (pmkvq_u8)((codes[j] & 0x0F) | ((codes[j + h] & 0x0F) << 4));
        break;
    }
    default: {
        int qd = g / 4;
        for (int j = 0; j < qd; ++j)
            out[j] = (pmkvq_u8)((codes[j] & 3) | ((codes[j + qd] & 3) << 2) | ((codes[j + 2 * qd] & 3) << 4) |
                                ((codes[j + 3 * qd] & 3) << 6));
    }
    }
}

// Quantize one group of g (<= 256) values at `bits` with the asymmetric quantizer of quant/mod.rs
// (`quantize_group`): S = (max - min) / (2^b - 1), code = round_half_even((x - min) / S) clamped, f16 S and min.
// Explicit _rn intrinsics keep the compiler from contracting into FMAs, so codes equal the CPU's. Every kernel
// that stores K/V (kv_quant.cu, forward.cu's pk_kv_store) calls this one function.
__device__ __forceinline__ void pmkvq_quantize_group(const float* v, int g, int bits, pmkvq_u8* out,
                                                     pmkvq_u16* scale, pmkvq_u16* offset) {
    float mn = PMKVQ_INF, mx = -PMKVQ_INF;
    for (int j = 0; j < g; ++j) { mn = fminf(mn, v[j]); mx = fmaxf(mx, v[j]); }
    float qmax = (float)((1u << bits) - 1u);
    float s = __fdiv_rn(__fsub_rn(mx, mn), qmax);
    unsigned codes[256];
    float off;
    if (isnan(s) || s <= 0.0f || isinf(s)) {
        for (int j = 0; j < g; ++j) codes[j] = 0;
        s = 0.0f;
        off = isfinite(mn) ? mn : 0.0f;
    } else {
        float inv = __fdiv_rn(1.0f, s);
        for (int j = 0; j < g; ++j) {
            float c = rintf(__fmul_rn(__fsub_rn(v[j], mn), inv));
            codes[j] = (unsigned)fminf(fmaxf(c, 0.0f), qmax);
        }
        off = mn;
    }
    pmkvq_pack(codes, bits, g, out);
    *scale = pmkvq_f2h(s);
    *offset = pmkvq_f2h(off);
}
