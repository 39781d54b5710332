// Quantize and pack tokens' K or V: one thread per group, the asymmetric quantizer of quant/mod.rs
// (`quantize_group`): S = (max - min) / (2^b - 1), code = round_half_even((x - min) / S) clamped, f16 S and min.
// Arithmetic uses explicit _rn intrinsics so the compiler cannot contract it into FMAs: codes equal the CPU's.
#include "pmkvq_kv.h"

// x: n_groups * g floats (tokens' K or V, kv_heads * head_dim each); out: n_groups * group_bytes;
// scale, offset: n_groups f16 each.
extern "C" __global__ void pmkvq_kv_quantize(const float* __restrict__ x, int n_groups, int g, int bits,
                                             pmkvq_u8* __restrict__ out, pmkvq_u16* __restrict__ scale,
                                             pmkvq_u16* __restrict__ offset) {
    int gi = blockIdx.x * blockDim.x + threadIdx.x;
    if (gi >= n_groups || g > 256) return;
    const float* v = x + (size_t)gi * g;
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
    pmkvq_pack(codes, bits, g, out + (size_t)gi * pmkvq_group_bytes(bits, g));
    scale[gi] = pmkvq_f2h(s);
    offset[gi] = pmkvq_f2h(off);
}
