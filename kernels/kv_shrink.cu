// Lower packed groups one level (16->8->4->2): one thread per group, in integers on the codes (quant/mod.rs
// `shrink`). Equivalent Right Shift: round(q / (2^n + 1)) as ((2^2n - 2^n + 1)(q + 2^(n-1))) >> 3n, scale *(2^n+1),
// offset unchanged (exact). Direct: q >> n, same parameters. Modified: q >> n, scale * 2^n, offset moved to the
// bucket mean. `in` and `out` may not alias (out is the next width's buffer); parameters may be updated in place.
#include "pmkvq_kv.h"

extern "C" __global__ void pmkvq_kv_shrink(const pmkvq_u8* __restrict__ in, int n_groups, int g, int bits_in,
                                           int mode, pmkvq_u8* __restrict__ out, pmkvq_u16* scale, pmkvq_u16* offset) {
    int gi = blockIdx.x * blockDim.x + threadIdx.x;
    if (gi >= n_groups || g > 256 || bits_in <= 2) return;
    int n = bits_in / 2;
    const pmkvq_u8* p = in + (size_t)gi * pmkvq_group_bytes(bits_in, g);
    unsigned codes[256];
    unsigned long long m = (1ull << (2 * n)) - (1ull << n) + 1ull;
    for (int j = 0; j < g; ++j) {
        unsigned q = pmkvq_code(p, bits_in, g, j);
        codes[j] = mode == PMKVQ_SHIFT_EQUIVALENT
                       ? (unsigned)((m * ((unsigned long long)q + (1ull << (n - 1)))) >> (3 * n))
                       : q >> n;
    }
    pmkvq_pack(codes, n, g, out + (size_t)gi * pmkvq_group_bytes(n, g));
    float s = pmkvq_h2f(scale[gi]);
    float o = pmkvq_h2f(offset[gi]);
    float two_n = (float)(1u << n);
    if (mode == PMKVQ_SHIFT_MODIFIED) {
        float ns = __fmul_rn(s, two_n);
        float no = __fadd_rn(o, __fdiv_rn(__fmul_rn(s, __fsub_rn(two_n, 1.0f)), 2.0f));
        scale[gi] = pmkvq_f2h(ns);
        offset[gi] = pmkvq_f2h(no);
    } else {
        scale[gi] = pmkvq_f2h(__fmul_rn(s, __fadd_rn(two_n, 1.0f)));
    }
}
