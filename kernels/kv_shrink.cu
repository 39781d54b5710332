// Lower packed groups one level (16->8->4->2): one thread per group, in integers on the codes (quant/mod.rs
// `shrink`). Equivalent Right Shift: round(q / (2^n + 1)) as ((2^2n - 2^n + 1)(q + 2^(n-1))) >> 3n, scale *(2^n+1),
// offset unchanged (exact). Direct: q >> n, same parameters. Modified: q >> n, scale * 2^n, offset moved to the
// bucket mean. Fitted: as Equivalent, but a group landing at 2 bits then gets its parameters and codes fitted by
// least squares to the values its 4-bit codes held (pmkvq_fit.h). `in` and `out` may not alias (out is the next
// width's buffer); parameters may be updated in place.
#include "pmkvq_kv.h"
#include "pmkvq_fit.h"

extern "C" __global__ void pmkvq_kv_shrink(const pmkvq_u8* __restrict__ in, int n_groups, int g, int bits_in,
                                           int mode, pmkvq_u8* __restrict__ out, pmkvq_u16* scale, pmkvq_u16* offset) {
    int gi = blockIdx.x * blockDim.x + threadIdx.x;
    if (gi >= n_groups || g > 256 || bits_in <= 2) return;
    int n = bits_in / 2;
    const pmkvq_u8* p = in + (size_t)gi * pmkvq_group_bytes(bits_in, g);
    float s = pmkvq_h2f(scale[gi]);
    float o = pmkvq_h2f(offset[gi]);
    // the fitted floor refits what the 4-bit codes held (quant/rows.rs: `fit_here`)
    int fit = mode == PMKVQ_SHIFT_FITTED && n == 2 && s > 0.0f;
    unsigned codes[256];
    float vals[256];
    unsigned long long m = (1ull << (2 * n)) - (1ull << n) + 1ull;
    int ers = mode == PMKVQ_SHIFT_EQUIVALENT || mode == PMKVQ_SHIFT_FITTED;
    for (int j = 0; j < g; ++j) {
        unsigned q = pmkvq_code(p, bits_in, g, j);
        if (fit) vals[j] = __fadd_rn(__fmul_rn((float)q, s), o);
        codes[j] = ers ? (unsigned)((m * ((unsigned long long)q + (1ull << (n - 1)))) >> (3 * n)) : q >> n;
    }
    float two_n = (float)(1u << n);
    if (mode == PMKVQ_SHIFT_MODIFIED) {
        float ns = __fmul_rn(s, two_n);
        float no = __fadd_rn(o, __fdiv_rn(__fmul_rn(s, __fsub_rn(two_n, 1.0f)), 2.0f));
        scale[gi] = pmkvq_f2h(ns);
        offset[gi] = pmkvq_f2h(no);
    } else {
        scale[gi] = pmkvq_f2h(__fmul_rn(s, __fadd_rn(two_n, 1.0f)));
        if (fit) {
            float fs = pmkvq_h2f(scale[gi]), fo = o;
            pmkvq_fit_group(vals, g, n, &fs, &fo, codes);
            scale[gi] = pmkvq_f2h(fs);
            offset[gi] = pmkvq_f2h(fo);
        }
    }
    pmkvq_pack(codes, n, g, out + (size_t)gi * pmkvq_group_bytes(n, g));
}
