// pmkvq CUDA kernels: the fitted 2-bit floor (Rust: src/kvcache/quant/mod.rs `fit_group`, `grid_pass`).
//
// A group that lands at 2 bits under PMKVQ_SHIFT_FITTED gets (S, mn) fitted by least squares to the values its
// 4-bit codes held, starting from the shifted grid: codes assigned on the grid, (S, mn) refitted in closed form
// from each code's count and sum, for at most PMKVQ_FIT_ROUNDS rounds, a round kept only if its squared error is
// lower. The Rust code's operations in its order, each rounded once (f32 and f64 _rn intrinsics: nothing fused),
// f16 parameters through pmkvq_f2h/pmkvq_h2f, so the codes and parameters are the CPU's bit for bit.
//
// Needs pmkvq_f2h and pmkvq_h2f (pmkvq_kv.h) declared first. Plain C arithmetic otherwise: tests/cuda_host.rs
// compiles it with the host compiler and checks it against the Rust fit.
#pragma once

#define PMKVQ_FIT_ROUNDS 8

// One pass of x over the grid (s > 0, o) at `bits` (at most 4): codes counted and summed, squared error.
struct pmkvq_grid {
    unsigned count[16];
    double sum[16];
    double err;
};

__device__ __forceinline__ void pmkvq_grid_pass(const float* x, int g, int bits, float s, float o, pmkvq_grid* r) {
    float qmax = (float)((1u << bits) - 1u);
    float inv = __fdiv_rn(1.0f, s);
    for (int k = 0; k < 16; ++k) {
        r->count[k] = 0;
        r->sum[k] = 0.0;
    }
    r->err = 0.0;
    for (int j = 0; j < g; ++j) {
        float q = fminf(fmaxf(rintf(__fmul_rn(__fsub_rn(x[j], o), inv)), 0.0f), qmax);
        int k = (int)q;
        r->count[k] += 1;
        r->sum[k] = __dadd_rn(r->sum[k], (double)x[j]);
        double d = (double)__fsub_rn(__fadd_rn(__fmul_rn(q, s), o), x[j]);
        r->err = __dadd_rn(r->err, __dmul_rn(d, d));
    }
}

// Fit group x (g values) at `bits` from the stored parameters (*s, *o); writes the fitted stored (f16-exact)
// parameters back and the matching codes. A group with s <= 0 (or not finite) keeps its parameters and codes.
__device__ __forceinline__ void pmkvq_fit_group(const float* x, int g, int bits, float* s, float* o,
                                                unsigned* codes) {
    float bs = *s, bo = *o;
    if (!(bs > 0.0f) || isinf(bs) || isnan(bs)) return;
    double n = (double)g;
    pmkvq_grid pass, next;
    pmkvq_grid_pass(x, g, bits, bs, bo, &pass);
    int top = (1 << bits) - 1;
    for (int round = 0; round < PMKVQ_FIT_ROUNDS; ++round) {
        double sc = 0.0, scc = 0.0, sx = 0.0, scx = 0.0;
        for (int k = 0; k <= top; ++k) {
            double c = (double)pass.count[k], q = (double)k;
            sc = __dadd_rn(sc, __dmul_rn(c, q));
            scc = __dadd_rn(scc, __dmul_rn(__dmul_rn(c, q), q));
            sx = __dadd_rn(sx, pass.sum[k]);
            scx = __dadd_rn(scx, __dmul_rn(q, pass.sum[k]));
        }
        double det = __dsub_rn(__dmul_rn(n, scc), __dmul_rn(sc, sc));
        if (det <= 0.0) break;
        double fs = __ddiv_rn(__dsub_rn(__dmul_rn(n, scx), __dmul_rn(sc, sx)), det);
        double fm = __ddiv_rn(__dsub_rn(sx, __dmul_rn(fs, sc)), n);
        float ps = pmkvq_h2f(pmkvq_f2h((float)fs));
        float po = pmkvq_h2f(pmkvq_f2h((float)fm));
        if (!(ps > 0.0f) || isinf(ps) || isnan(ps) || isinf(po) || isnan(po) || (ps == bs && po == bo)) break;
        pmkvq_grid_pass(x, g, bits, ps, po, &next);
        if (next.err >= pass.err) break;
        bs = ps;
        bo = po;
        pass = next;
    }
    float qmax = (float)top;
    float inv = __fdiv_rn(1.0f, bs);
    for (int j = 0; j < g; ++j) codes[j] = (unsigned)fminf(fmaxf(rintf(__fmul_rn(__fsub_rn(x[j], bo), inv)), 0.0f), qmax);
    *s = bs;
    *o = bo;
}
