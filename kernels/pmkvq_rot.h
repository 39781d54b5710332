// pmkvq CUDA kernels: the rotation of what the cache stores (Rust: src/kvcache/rotate.rs and reparam.rs).
//
// Per layer and head, post-RoPE queries, keys and values are multiplied by R = H·D/√n (D: ±1 signs of the layer,
// H: the Walsh–Hadamard matrix over blocks of n channels) and the attention output by Rᵀ = D·H/√n. Keys are first
// multiplied by 1/λ and queries by λ when the cache is reparameterized (R(k/λ)·R(qλ) = q·k). Same operations in
// the same order as the Rust code, each rounded once (_rn intrinsics: no contraction into FMAs), so the rotated
// values — and the codes the cache stores from them — are the CPU's bit for bit.
//
// Plain C arithmetic, no CUDA built-ins: tests/cuda_host.rs compiles this file with the host compiler (the four
// macros below stubbed) and checks it against the Rust rotation.
#pragma once

// x ← R·(x∘mul) (inverse 0; `mul` may be null) or x ← Rᵀ·x (inverse 1) for one head of d channels.
__device__ __forceinline__ void pmkvq_rotate_head(float* x, const float* signs, const float* mul, int d, int block,
                                                  float scale, int inverse) {
    if (!inverse) {
        for (int j = 0; j < d; ++j) {
            float v = mul ? __fmul_rn(x[j], mul[j]) : x[j];
            x[j] = __fmul_rn(v, __fmul_rn(signs[j], scale));
        }
    }
    for (int b0 = 0; b0 < d; b0 += block) {
        for (int h = 1; h < block; h *= 2) {
            for (int i = b0; i < b0 + block; i += 2 * h) {
                for (int j = i; j < i + h; ++j) {
                    float p = x[j], q = x[j + h];
                    x[j] = __fadd_rn(p, q);
                    x[j + h] = __fsub_rn(p, q);
                }
            }
        }
    }
    if (inverse) {
        for (int j = 0; j < d; ++j) x[j] = __fmul_rn(x[j], __fmul_rn(signs[j], scale));
    }
}

// One token row: heads lane, lane + lanes, … of its q_heads query heads, then (forward only) kv_heads key heads
// and kv_heads value heads. q: q_heads·d, k and v: kv_heads·d; qscale (λ) and kinv (1/λ): kv_heads·d or null.
// The inverse (the attention output, q_heads·d in q) touches q only.
__device__ __forceinline__ void pmkvq_rotate_row(int lane, int lanes, float* q, float* k, float* v,
                                                 const float* signs, const float* qscale, const float* kinv,
                                                 int q_heads, int kv_heads, int d, int block, float scale,
                                                 int inverse) {
    int heads = inverse ? q_heads : q_heads + 2 * kv_heads;
    int per_kv = q_heads / kv_heads;
    for (int h = lane; h < heads; h += lanes) {
        if (h < q_heads) {
            const float* mul = (!inverse && qscale) ? qscale + (h / per_kv) * d : 0;
            pmkvq_rotate_head(q + h * d, signs, mul, d, block, scale, inverse);
        } else if (h < q_heads + kv_heads) {
            int kh = h - q_heads;
            pmkvq_rotate_head(k + kh * d, signs, kinv ? kinv + kh * d : 0, d, block, scale, 0);
        } else {
            int vh = h - q_heads - kv_heads;
            pmkvq_rotate_head(v + vh * d, signs, 0, d, block, scale, 0);
        }
    }
}
