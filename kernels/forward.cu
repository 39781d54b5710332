// The decoder forward pass on the GPU (src/gpu/model.rs launches these; src/model/forward.rs is the CPU
// specification of the same arithmetic). Activations are f32; weights stay in their GGUF blocks; matmuls over
// block weights quantize the activations to 8-bit blocks of 32 first (llama.cpp's q8_0/q8_1, as the CPU path
// does), so every block product is an exact integer sum and only the float accumulation order differs.
//
// The KV cache is a per-(layer, sequence) list of segments (pk_seg): a 16-bit sink, body pages at the layer's
// width, a 16-bit window — or, for the fp16 cache, pages of raw f16 rows (bits 0). The host builds the tables
// once per step for every layer and uploads them in one copy.
#include "pmkvq_kv.h"
#include "pmkvq_rot.h"

#define PK_F32 0
#define PK_F16 1
#define PK_Q4_0 2
#define PK_Q4_1 3
#define PK_Q8_0 4

// Rows per matmul tile of tokens, and warps per matmul block.
#define PK_TT 8
#define PK_MM_WARPS 4

typedef unsigned long long pk_ptr;

__device__ __forceinline__ float pk_warp_sum(float x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}
__device__ __forceinline__ float pk_warp_max(float x) {
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}
__device__ __forceinline__ int pk_warp_sum_i(int x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}
__device__ __forceinline__ float pk_ld_h(const pmkvq_u8* p) {
    return pmkvq_h2f((pmkvq_u16)((unsigned)p[0] | ((unsigned)p[1] << 8)));
}
__device__ __forceinline__ int pk_block_bytes(int fmt) {
    return fmt == PK_Q4_0 ? 18 : fmt == PK_Q4_1 ? 20 : 34;
}

// Element j (0..31) of one weight block, dequantized (cpu::dequantize_row).
__device__ __forceinline__ float pk_dequant(const pmkvq_u8* blk, int fmt, int j) {
    float d = pk_ld_h(blk);
    switch (fmt) {
    case PK_Q4_0: {
        int q = j < 16 ? (blk[2 + j] & 0x0F) : (blk[2 + j - 16] >> 4);
        return d * (float)(q - 8);
    }
    case PK_Q4_1: {
        int q = j < 16 ? (blk[4 + j] & 0x0F) : (blk[4 + j - 16] >> 4);
        return d * (float)q + pk_ld_h(blk + 2);
    }
    default: return d * (float)(signed char)blk[2 + j];
    }
}

// Embedding rows: out[i] = row tokens[i] of w (cols values), dequantized. Grid (t), any block size.
extern "C" __global__ void pk_embed(const pmkvq_u8* __restrict__ w, int fmt, int cols, const int* __restrict__ tokens,
                                    float* __restrict__ out) {
    int i = blockIdx.x;
    size_t tok = (size_t)tokens[i];
    for (int j = threadIdx.x; j < cols; j += blockDim.x) {
        float v;
        if (fmt == PK_F32) {
            v = ((const float*)w)[tok * cols + j];
        } else if (fmt == PK_F16) {
            v = pmkvq_h2f(((const pmkvq_u16*)w)[tok * cols + j]);
        } else {
            const pmkvq_u8* row = w + tok * (cols / 32) * pk_block_bytes(fmt);
            v = pk_dequant(row + (j / 32) * pk_block_bytes(fmt), fmt, j % 32);
        }
        out[(size_t)i * cols + j] = v;
    }
}

// Quantize one 32-value block held one value per lane: llama.cpp's quantize_row_q8_1 (cpu::scalar::quantize_q8):
// d = amax/127, q = round_half_even(x * 127/amax), d and s = d·Σq rounded through f16.
__device__ __forceinline__ void pk_q8_lane(float v, signed char* qs, float* dptr, float* sptr, int lane) {
    float amax = pk_warp_max(fabsf(v));
    float d = __fdiv_rn(amax, 127.0f);
    float id = amax != 0.0f ? __fdiv_rn(127.0f, amax) : 0.0f;
    int q = (int)rintf(__fmul_rn(v, id));
    qs[lane] = (signed char)q;
    int sum = pk_warp_sum_i(q);
    if (lane == 0) {
        *dptr = pmkvq_h2f(pmkvq_f2h(d));
        *sptr = pmkvq_h2f(pmkvq_f2h(__fmul_rn((float)sum, d)));
    }
}

// 8-bit blocks of n_blocks·32 values: one warp per block. Grid (ceil(n_blocks/8)), block 256.
extern "C" __global__ void pk_quant8(const float* __restrict__ x, int n_blocks, signed char* __restrict__ qs,
                                     float* __restrict__ d, float* __restrict__ s) {
    int b = blockIdx.x * 8 + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (b >= n_blocks) return;
    pk_q8_lane(x[(size_t)b * 32 + lane], qs + (size_t)b * 32, d + b, s + b, lane);
}

// 1/√(mean(row²) + eps), as 256 threads compute it: virtual thread v sums row[j]² in f64 for j = v, v + 256, …,
// each virtual warp's sums reduce by xor shuffles, and thread 0 adds the 8 warp partials in order. The block's nt
// threads (a divisor of 256, at least 32) each play virtual threads tid, tid + nt, …, so every block size gets the
// same bits — pk_norm's and the blocks pk_matmul_qa makes for itself. part (8 doubles) and inv_s: shared memory.
__device__ __forceinline__ float pk_row_inv_rms(const float* row, int dim, float eps, double* part, float* inv_s) {
    for (int v = threadIdx.x; v < 256; v += blockDim.x) {
        double ss = 0.0;
        for (int j = v; j < dim; j += 256) ss += (double)__fmul_rn(row[j], row[j]);
        for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
        if (v % 32 == 0) part[v / 32] = ss;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        double t = 0.0;
        for (int i = 0; i < 8; ++i) t += part[i];
        float ms = (float)(t / (double)dim);
        *inv_s = __fdiv_rn(1.0f, sqrtf(__fadd_rn(ms, eps)));
    }
    __syncthreads();
    return *inv_s;
}

// One normalized value (the CPU's rms_norm: x·inv·w) and one SwiGLU value (silu(g)·u), each rounded as the CPU.
__device__ __forceinline__ float pk_normed(float x, float inv, float w) { return __fmul_rn(__fmul_rn(x, inv), w); }
__device__ __forceinline__ float pk_silu_mul(float g, float u) {
    return __fmul_rn(__fdiv_rn(g, __fadd_rn(1.0f, expf(-g))), u);
}

// RMSNorm of each row (sum of squares in double, as the CPU), written as f32 and as 8-bit blocks.
// Grid (rows), block 256; dim a multiple of 32.
extern "C" __global__ void pk_norm(const float* __restrict__ x, const float* __restrict__ w, int dim, float eps,
                                   float* __restrict__ out, signed char* __restrict__ qs, float* __restrict__ qd,
                                   float* __restrict__ qsum) {
    __shared__ double part[8];
    __shared__ float inv_s;
    const float* row = x + (size_t)blockIdx.x * dim;
    float inv = pk_row_inv_rms(row, dim, eps, part, &inv_s);
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nb = dim / 32;
    for (int b = warp; b < nb; b += blockDim.x / 32) {
        int j = b * 32 + lane;
        float v = pk_normed(row[j], inv, w[j]);
        out[(size_t)blockIdx.x * dim + j] = v;
        size_t gb = (size_t)blockIdx.x * nb + b;
        pk_q8_lane(v, qs + gb * 32, qd + gb, qsum + gb, lane);
    }
}

// Where a matmul's output rows go: rows [start[p], start[p+1]) to buffer p, row-major with leading dimension ld[p].
struct pk_out {
    pk_ptr ptr[3];
    int ld[3];
    int start[4];
    int parts;
    int accumulate;  // add to what is there (the residual stream)
};

__device__ __forceinline__ void pk_write(const pk_out& o, int r, int ti, float v) {
    int p = 0;
    while (p + 1 < o.parts && r >= o.start[p + 1]) ++p;
    float* dst = (float*)o.ptr[p] + (size_t)ti * o.ld[p] + (r - o.start[p]);
    *dst = o.accumulate ? *dst + v : v;
}

// Weight row r times the 8-bit activation rows xq/xd/xs (tn ≤ PK_TT tokens from the tile's first; output rows
// t0 + i), by one warp: lanes take (block, quarter) work items so short rows keep every lane busy, and each weight
// block is read once for the tile. y (+ bias[r]) goes to out.
__device__ __forceinline__ void pk_mm_row(const pmkvq_u8* __restrict__ w, int fmt, int r, int cols,
                                          const signed char* __restrict__ xq, const float* __restrict__ xd,
                                          const float* __restrict__ xs, int t0, int tn, const float* __restrict__ bias,
                                          const pk_out& out, int lane) {
    int nb = cols / 32, bb = pk_block_bytes(fmt);
    const pmkvq_u8* wr = w + (size_t)r * nb * bb;
    float acc[PK_TT];
#pragma unroll
    for (int i = 0; i < PK_TT; ++i) acc[i] = 0.0f;
    for (int item = lane; item < nb * 4; item += 32) {
        int b = item / 4, qtr = item % 4;
        const pmkvq_u8* blk = wr + (size_t)b * bb;
        float dw = pk_ld_h(blk);
        int wq[8];
        if (fmt == PK_Q8_0) {
#pragma unroll
            for (int e = 0; e < 8; ++e) wq[e] = (int)(signed char)blk[2 + qtr * 8 + e];
        } else {
            const pmkvq_u8* nib = blk + (fmt == PK_Q4_1 ? 4 : 2) + (qtr % 2) * 8;
            int sub = fmt == PK_Q4_0 ? 8 : 0;
#pragma unroll
            for (int e = 0; e < 8; ++e) wq[e] = (qtr < 2 ? (nib[e] & 0x0F) : (nib[e] >> 4)) - sub;
        }
        float mw = (fmt == PK_Q4_1 && qtr == 0) ? pk_ld_h(blk + 2) : 0.0f;
#pragma unroll
        for (int i = 0; i < PK_TT; ++i) {
            if (i < tn) {
                const signed char* xr = xq + (size_t)i * cols + b * 32 + qtr * 8;
                int sumi = 0;
#pragma unroll
                for (int e = 0; e < 8; ++e) sumi += wq[e] * (int)xr[e];
                acc[i] += dw * xd[(size_t)i * nb + b] * (float)sumi + mw * xs[(size_t)i * nb + b];
            }
        }
    }
#pragma unroll
    for (int i = 0; i < PK_TT; ++i) {
        float v = pk_warp_sum(acc[i]);
        if (lane == 0 && i < tn) pk_write(out, r, t0 + i, v + (bias ? bias[r] : 0.0f));
    }
}

// y[t][r] = W[r]·x[t] (+ bias[r]) for block weights and 8-bit activations (pk_mm_row): one warp per weight row,
// tiles of PK_TT tokens. Grid (ceil(rows/PK_MM_WARPS), ceil(t/PK_TT)), block 32·PK_MM_WARPS.
extern "C" __global__ void pk_matmul_q(const pmkvq_u8* __restrict__ w, int fmt, int rows, int cols,
                                       const signed char* __restrict__ xq, const float* __restrict__ xd,
                                       const float* __restrict__ xs, int t, const float* __restrict__ bias,
                                       pk_out out) {
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int r = blockIdx.x * PK_MM_WARPS + warp;
    if (r >= rows) return;
    int t0 = blockIdx.y * PK_TT, nb = cols / 32;
    pk_mm_row(w, fmt, r, cols, xq + (size_t)t0 * cols, xd + (size_t)t0 * nb, xs + (size_t)t0 * nb, t0,
              min(PK_TT, t - t0), bias, out, lane);
}

// Dynamic shared memory (its size set at launch); the host tests' driver runs one block at a time from a static.
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define PK_DYN_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#else
#define PK_DYN_SHARED(name) alignas(16) static unsigned char name[1 << 17]
#endif

// pk_matmul_q for one tile of t ≤ PK_TT tokens (a decode step) whose 8-bit activation blocks the block makes
// itself, in shared memory, from the f32 rows x (t × cols) — one launch instead of two. mode 0: RMSNorm of the
// residual rows with weight aux (pk_row_inv_rms and pk_normed, as pk_norm: its blocks bit for bit); mode 1:
// silu(x)·aux (gate, up), as pk_swiglu.
// Dynamic shared memory: PK_TT·cols + 2·PK_TT·(cols/32)·4 bytes. Grid (ceil(rows/PK_MM_WARPS)), block 128.
extern "C" __global__ void pk_matmul_qa(const pmkvq_u8* __restrict__ w, int fmt, int rows, int cols, int t,
                                        const float* __restrict__ bias, pk_out out, int mode,
                                        const float* __restrict__ x, const float* __restrict__ aux, float eps) {
    PK_DYN_SHARED(pk_smem);
    __shared__ double part[8];
    __shared__ float inv_s;
    int nb = cols / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32, nw = blockDim.x / 32;
    signed char* qs = (signed char*)pk_smem;
    float* qd = (float*)(pk_smem + PK_TT * cols);
    float* qsum = qd + PK_TT * nb;
    int tn = min(PK_TT, t);
    for (int i = 0; i < tn; ++i) {
        const float* row = x + (size_t)i * cols;
        float inv = mode == 0 ? pk_row_inv_rms(row, cols, eps, part, &inv_s) : 0.0f;
        for (int b = warp; b < nb; b += nw) {
            int j = b * 32 + lane;
            float v = mode == 0 ? pk_normed(row[j], inv, aux[j]) : pk_silu_mul(row[j], aux[(size_t)i * cols + j]);
            pk_q8_lane(v, qs + (size_t)i * cols + b * 32, qd + i * nb + b, qsum + i * nb + b, lane);
        }
    }
    __syncthreads();
    int r = blockIdx.x * PK_MM_WARPS + warp;
    if (r < rows) pk_mm_row(w, fmt, r, cols, qs, qd, qsum, 0, tn, bias, out, lane);
}

// The same for f32 or f16 weights with f32 activations (lanes over columns).
extern "C" __global__ void pk_matmul_f(const void* __restrict__ w, int fmt, int rows, int cols,
                                       const float* __restrict__ x, int t, const float* __restrict__ bias, pk_out out) {
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int r = blockIdx.x * PK_MM_WARPS + warp;
    if (r >= rows) return;
    int t0 = blockIdx.y * PK_TT;
    int tn = min(PK_TT, t - t0);
    float acc[PK_TT];
#pragma unroll
    for (int i = 0; i < PK_TT; ++i) acc[i] = 0.0f;
    for (int j = lane; j < cols; j += 32) {
        size_t wi = (size_t)r * cols + j;
        float wv = fmt == PK_F16 ? pmkvq_h2f(((const pmkvq_u16*)w)[wi]) : ((const float*)w)[wi];
#pragma unroll
        for (int i = 0; i < PK_TT; ++i)
            if (i < tn) acc[i] += wv * x[(size_t)(t0 + i) * cols + j];
    }
#pragma unroll
    for (int i = 0; i < PK_TT; ++i) {
        float v = pk_warp_sum(acc[i]);
        if (lane == 0 && i < tn) pk_write(out, r, t0 + i, v + (bias ? bias[r] : 0.0f));
    }
}

// RoPE in place on one token's q (q_heads·d) and k (kv_heads·d) rows with its (cos, sin) table row of d/2, by
// threads tid, tid + nt, … . neox: pairs (j, j + d/2); otherwise interleaved pairs (2j, 2j+1).
__device__ __forceinline__ void pk_rope_row(float* q, float* k, int q_heads, int kv_heads, int d, const float* c,
                                            const float* s, int neox, int tid, int nt) {
    int half = d / 2;
    for (int i = tid; i < (q_heads + kv_heads) * half; i += nt) {
        int h = i / half, j = i % half;
        float* hd = h < q_heads ? q + (size_t)h * d : k + (size_t)(h - q_heads) * d;
        int ia = neox ? j : 2 * j, ib = neox ? j + half : 2 * j + 1;
        float a = hd[ia], b = hd[ib];
        hd[ia] = __fsub_rn(__fmul_rn(a, c[j]), __fmul_rn(b, s[j]));
        hd[ib] = __fadd_rn(__fmul_rn(a, s[j]), __fmul_rn(b, c[j]));
    }
}

// RoPE in place on q (t rows of q_heads·d) and k (t rows of kv_heads·d), one (cos, sin) table row of d/2 per
// token (pk_rope_row). Grid (t), block 128.
extern "C" __global__ void pk_rope(float* __restrict__ q, float* __restrict__ k, int q_heads, int kv_heads, int d,
                                   const float* __restrict__ cosv, const float* __restrict__ sinv, int neox) {
    int ti = blockIdx.x, half = d / 2;
    pk_rope_row(q + (size_t)ti * q_heads * d, k + (size_t)ti * kv_heads * d, q_heads, kv_heads, d,
                cosv + (size_t)ti * half, sinv + (size_t)ti * half, neox, threadIdx.x, blockDim.x);
}

// act = silu(gate)·up, as f32 and 8-bit blocks; n a multiple of 32. One warp per 32 values; grid
// (ceil(n/256)), block 256.
extern "C" __global__ void pk_swiglu(const float* __restrict__ gate, const float* __restrict__ up, int n,
                                     float* __restrict__ act, signed char* __restrict__ qs, float* __restrict__ qd,
                                     float* __restrict__ qsum) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    int b = i / 32, lane = threadIdx.x % 32;
    if (b * 32 >= n) return;
    float v = pk_silu_mul(gate[i], up[i]);
    act[i] = v;
    pk_q8_lane(v, qs + (size_t)b * 32, qd + b, qsum + b, lane);
}

// Copy rows idx[i] of x (dim values) to out row i. Grid (n), block 128.
extern "C" __global__ void pk_gather(const float* __restrict__ x, const int* __restrict__ idx, int dim,
                                     float* __restrict__ out) {
    const float* src = x + (size_t)idx[blockIdx.x] * dim;
    for (int j = threadIdx.x; j < dim; j += blockDim.x) out[(size_t)blockIdx.x * dim + j] = src[j];
}

// ---- KV cache ------------------------------------------------------------------------------------------------

// One stored segment of one layer of one sequence. bits 0: raw f16 rows [len][kv_heads·d] with no parameters;
// 2/4/8/16: packed groups with f16 scale and offset (pmkvq_kv.h).
struct pk_seg {
    pk_ptr k_data, k_scale, k_off, v_data, v_scale, v_off;
    int len;
    int bits;
    int start;  // tokens of the sequence's earlier segments (so a split finds its first segment by bisection)
    int pad;
};

// One sequence in one layer: its segments seg_start.. (seg_count of them, sink | body | window), tokens stored,
// the key reparameterization (λ for queries, 1/λ for keys; 0 without), kv_heads·d each, and the layer's rotation
// signs (d of them; 0 without). A rotated sequence's q, k and v rows were rotated in place by pk_rotate, the key
// scales applied first, so attention and the store take them as they are.
struct pk_seq {
    int seg_start, seg_count, stored, g;  // g: the cache's quantization group
    pk_ptr qscale, kinv, signs;
};

// Where one new token's K and V go in one layer (the row start of its slot), at which width; kinv as above (0 for a
// rotated sequence: its keys were scaled when pk_rotate rotated them).
struct pk_dst {
    pk_ptr k_data, k_scale, k_off, v_data, v_scale, v_off, kinv;
    int bits, g;  // g: the cache's quantization group (a multiple of the batch's smallest)
};

// Four packed codes of one 32-bit word as floats, by width (2: the word holds codes j, j+G/4, j+G/2, j+3G/4 for
// four consecutive j; callers below index them accordingly).
__device__ __forceinline__ float pk_h2f_lo(unsigned w) { return pmkvq_h2f((pmkvq_u16)(w & 0xFFFF)); }
__device__ __forceinline__ float pk_h2f_hi(unsigned w) { return pmkvq_h2f((pmkvq_u16)(w >> 16)); }

// The most query heads one attention warp serves (its launch's gqa, 4 by default): the heads of one GQA group
// share every key and value it decodes.
#define PK_GQA 4

// out[i] = q_i · (stored key `pos` of segment s, head kvh) for the nh (≤ PK_GQA) query heads of qs (d values each;
// qsum: their group sums, d/g each). Packed widths: the group sums S·Σ q·code + min·Σ q, codes read as 32-bit words
// and decoded once for all heads (16-byte vectors for raw f16 rows). Each head's sum runs in the same order as a
// single head's would. Needs g % 16 == 0 for the word loads of every width (checked on the host).
__device__ __forceinline__ void pk_score(const pk_seg& s, int pos, int kvh, int kv_heads, int d, int g, int nh,
                                         const float* qs, const float* qsum, float* out) {
#pragma unroll
    for (int i = 0; i < PK_GQA; ++i) out[i] = 0.0f;
    if (s.bits == 0) {
        const uint4* k = (const uint4*)((const pmkvq_u16*)s.k_data + ((size_t)pos * kv_heads + kvh) * d);
        for (int v = 0; v < d / 8; ++v) {
            uint4 w = k[v];
            float c[8] = {pk_h2f_lo(w.x), pk_h2f_hi(w.x), pk_h2f_lo(w.y), pk_h2f_hi(w.y),
                          pk_h2f_lo(w.z), pk_h2f_hi(w.z), pk_h2f_lo(w.w), pk_h2f_hi(w.w)};
#pragma unroll
            for (int i = 0; i < PK_GQA; ++i) {
                if (i >= nh) break;
                const float* qv = qs + i * d + 8 * v;
                out[i] += qv[0] * c[0] + qv[1] * c[1] + qv[2] * c[2] + qv[3] * c[3] + qv[4] * c[4] + qv[5] * c[5] +
                          qv[6] * c[6] + qv[7] * c[7];
            }
        }
        return;
    }
    int gph = d / g, gb = pmkvq_group_bytes(s.bits, g);
    size_t g0 = ((size_t)pos * kv_heads + kvh) * gph;
    const pmkvq_u8* data = (const pmkvq_u8*)s.k_data;
    for (int k = 0; k < gph; ++k) {
        const unsigned* p = (const unsigned*)(data + (g0 + k) * gb);
        float dot[PK_GQA];
#pragma unroll
        for (int i = 0; i < PK_GQA; ++i) dot[i] = 0.0f;
        switch (s.bits) {
        case 2: {
            int qd = g / 4;
            for (int b = 0; b < qd; b += 4) {
                unsigned w = p[b / 4];
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    unsigned x = (w >> (8 * e)) & 0xFF;
                    int jb = b + e;
                    float c0 = (float)(x & 3), c1 = (float)((x >> 2) & 3), c2 = (float)((x >> 4) & 3),
                          c3 = (float)(x >> 6);
#pragma unroll
                    for (int i = 0; i < PK_GQA; ++i) {
                        if (i >= nh) break;
                        const float* qg = qs + i * d + k * g;
                        dot[i] += qg[jb] * c0 + qg[jb + qd] * c1 + qg[jb + 2 * qd] * c2 + qg[jb + 3 * qd] * c3;
                    }
                }
            }
            break;
        }
        case 4: {
            int h = g / 2;
            for (int b = 0; b < h; b += 4) {
                unsigned w = p[b / 4];
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    unsigned x = (w >> (8 * e)) & 0xFF;
                    float c0 = (float)(x & 0x0F), c1 = (float)(x >> 4);
#pragma unroll
                    for (int i = 0; i < PK_GQA; ++i) {
                        if (i >= nh) break;
                        const float* qg = qs + i * d + k * g;
                        dot[i] += qg[b + e] * c0 + qg[b + e + h] * c1;
                    }
                }
            }
            break;
        }
        case 8:
            for (int b = 0; b < g; b += 4) {
                unsigned w = p[b / 4];
                float c0 = (float)(w & 0xFF), c1 = (float)((w >> 8) & 0xFF), c2 = (float)((w >> 16) & 0xFF),
                      c3 = (float)(w >> 24);
#pragma unroll
                for (int i = 0; i < PK_GQA; ++i) {
                    if (i >= nh) break;
                    const float* qg = qs + i * d + k * g;
                    dot[i] += qg[b] * c0 + qg[b + 1] * c1 + qg[b + 2] * c2 + qg[b + 3] * c3;
                }
            }
            break;
        default:
            for (int b = 0; b < g; b += 2) {
                unsigned w = p[b / 2];
                float c0 = (float)(w & 0xFFFF), c1 = (float)(w >> 16);
#pragma unroll
                for (int i = 0; i < PK_GQA; ++i) {
                    if (i >= nh) break;
                    const float* qg = qs + i * d + k * g;
                    dot[i] += qg[b] * c0 + qg[b + 1] * c1;
                }
            }
        }
        float sc = pmkvq_h2f(((const pmkvq_u16*)s.k_scale)[g0 + k]), of = pmkvq_h2f(((const pmkvq_u16*)s.k_off)[g0 + k]);
#pragma unroll
        for (int i = 0; i < PK_GQA; ++i) {
            if (i >= nh) break;
            out[i] += sc * dot[i] + of * qsum[i * gph + k];
        }
    }
}

// Where dimension jj (0 <= jj < g) of a group sits at each width: byte and shift (see pmkvq_kv.h's layout).
struct pk_dim {
    int grp;  // group of the head the dimension is in
    int b16, b8, b4, s4, b2, s2;
};

__device__ __forceinline__ pk_dim pk_dim_of(int j, int g) {
    pk_dim r;
    int jj = j % g, h = g / 2, q = g / 4;
    r.grp = j / g;
    r.b16 = 2 * jj;
    r.b8 = jj;
    r.b4 = jj % h;
    r.s4 = 4 * (jj / h);
    r.b2 = jj % q;
    r.s2 = 2 * (jj / q);
    return r;
}

// Stored value `pos`, dimension j (described by dm) of head kvh.
__device__ __forceinline__ float pk_value(const pk_seg& s, int pos, int kvh, int j, const pk_dim& dm, int kv_heads,
                                          int d, int g) {
    if (s.bits == 0) return pmkvq_h2f(((const pmkvq_u16*)s.v_data)[((size_t)pos * kv_heads + kvh) * d + j]);
    size_t gi = ((size_t)pos * kv_heads + kvh) * (d / g) + dm.grp;
    const pmkvq_u8* p = (const pmkvq_u8*)s.v_data + gi * pmkvq_group_bytes(s.bits, g);
    unsigned c;
    switch (s.bits) {
    case 2: c = (p[dm.b2] >> dm.s2) & 3; break;
    case 4: c = (p[dm.b4] >> dm.s4) & 0x0F; break;
    case 8: c = p[dm.b8]; break;
    default: c = (unsigned)p[dm.b16] | ((unsigned)p[dm.b16 + 1] << 8);
    }
    return (float)c * pmkvq_h2f(((const pmkvq_u16*)s.v_scale)[gi]) + pmkvq_h2f(((const pmkvq_u16*)s.v_off)[gi]);
}

// Attention of every new row over its sequence's stored segments, then its own call's tokens up to itself,
// unquantized (spec §3.3; KvStore::attend_and_store). One warp serves up to gqa (≤ PK_GQA) query heads of one KV
// head (a GQA group, split in blocks of gqa): every key and value it reads is decoded once for all of them. Split-K:
// grid (kv_heads·ceil(group/gqa), rows, splits); split z takes tokens [z·chunk, (z+1)·chunk) of the
// concatenation and writes each head's (max, sum, acc[d]) to work; pk_attn_combine merges. Tiles of 32 tokens:
// each lane scores one token, then the lanes — each owning dimensions lane, lane+32, … — accumulate the tile's
// values. Online softmax per head.
extern "C" __global__ void pk_attention(const pk_seg* __restrict__ segs, const pk_seq* __restrict__ seqs,
                                        const int* __restrict__ row_seq, const int* __restrict__ row_fresh,
                                        const int* __restrict__ row_fresh0, const float* __restrict__ q,
                                        const float* __restrict__ knew, const float* __restrict__ vnew, int q_heads,
                                        int kv_heads, int d, float sm_scale, int chunk, int gqa,
                                        float* __restrict__ work) {
    __shared__ float qs[PK_GQA * PMKVQ_MAX_HEAD_DIM];
    __shared__ float qsum[PK_GQA * PMKVQ_MAX_HEAD_DIM];
    int row = blockIdx.y, split = blockIdx.z, splits = gridDim.z, lane = threadIdx.x;
    int per = q_heads / kv_heads, parts = (per + gqa - 1) / gqa;
    int kvh = blockIdx.x / parts, part = blockIdx.x % parts;
    int h0 = kvh * per + part * gqa, nh = min(gqa, per - part * gqa);
    pk_seq L = seqs[row_seq[row]];
    int g = L.g, gph = d / g;
    int kvd = kv_heads * d;
    const float* qscale = L.signs ? 0 : (const float*)L.qscale;
    const float* kinv = L.signs ? 0 : (const float*)L.kinv;
    for (int x = lane; x < nh * d; x += 32) {
        int i = x / d, j = x % d;
        float v = q[((size_t)row * q_heads + h0 + i) * d + j];
        qs[x] = qscale ? v * qscale[kvh * d + j] : v;
    }
    __syncwarp();
    for (int x = lane; x < nh * gph; x += 32) {
        int i = x / gph, k = x % gph;
        float s = 0.0f;
        for (int j = 0; j < g; ++j) s += qs[i * d + k * g + j];
        qsum[x] = s;
    }
    __syncwarp();
    int fresh0 = row_fresh0[row];
    int total = L.stored + row_fresh[row];
    int t0 = split * chunk, t1 = min(total, t0 + chunk);
    float m[PK_GQA], l[PK_GQA], acc[PK_GQA][4];
#pragma unroll
    for (int i = 0; i < PK_GQA; ++i) {
        m[i] = -PMKVQ_INF;
        l[i] = 0.0f;
#pragma unroll
        for (int k = 0; k < 4; ++k) acc[i][k] = 0.0f;
    }
    pk_dim dims[4];
    for (int k = 0; k < 4; ++k) dims[k] = pk_dim_of(min(lane + 32 * k, d - 1), g);
    const pk_seg* my = segs + L.seg_start;
    // the segment holding the tile's first stored token, and where it starts: the split's first one found by
    // bisection over the starts (a long cache has hundreds of pages), the next tiles' by walking on from there
    int cs = 0;
    if (t0 < L.stored) {
        int hi = L.seg_count - 1;
        while (cs < hi) {
            int mid = (cs + hi + 1) / 2;
            if (my[mid].start <= t0) cs = mid;
            else hi = mid - 1;
        }
    }
    int cbase = L.seg_count > 0 ? my[cs].start : 0;
    for (int tile = t0; tile < t1; tile += 32) {
        int idx = tile + lane;
        int si = cs, base = cbase, pos = 0, seg = -1;
        float s[PK_GQA];
#pragma unroll
        for (int i = 0; i < PK_GQA; ++i) s[i] = -PMKVQ_INF;
        if (idx < t1) {
            if (idx < L.stored) {
                while (si + 1 < L.seg_count && base + my[si].len <= idx) base += my[si++].len;
                seg = si;
                pos = idx - base;
                pk_score(my[si], pos, kvh, kv_heads, d, g, nh, qs, qsum, s);
            } else {
                pos = idx - L.stored;
                const float* kr = knew + (size_t)(fresh0 + pos) * kvd + kvh * d;
#pragma unroll
                for (int i = 0; i < PK_GQA; ++i) s[i] = 0.0f;
                for (int j = 0; j < d; ++j) {
                    float kj = kinv ? kr[j] * kinv[kvh * d + j] : kr[j];
#pragma unroll
                    for (int i = 0; i < PK_GQA; ++i) {
                        if (i >= nh) break;
                        s[i] += qs[i * d + j] * kj;
                    }
                }
            }
#pragma unroll
            for (int i = 0; i < PK_GQA; ++i) s[i] *= sm_scale;
        }
        int last = min(31, t1 - 1 - tile);
        cs = __shfl_sync(0xffffffffu, si, last);
        cbase = __shfl_sync(0xffffffffu, base, last);
        float p[PK_GQA];
#pragma unroll
        for (int i = 0; i < PK_GQA; ++i) p[i] = 0.0f;
#pragma unroll
        for (int i = 0; i < PK_GQA; ++i) {
            if (i >= nh) break;
            float mnew = fmaxf(m[i], pk_warp_max(s[i]));
            float corr = m[i] == -PMKVQ_INF ? 0.0f : expf(m[i] - mnew);
            p[i] = idx < t1 ? expf(s[i] - mnew) : 0.0f;
            l[i] = l[i] * corr + pk_warp_sum(p[i]);
#pragma unroll
            for (int k = 0; k < 4; ++k) acc[i][k] *= corr;
            m[i] = mnew;
        }
        for (int u = 0; u <= last; ++u) {
            float pu[PK_GQA];
#pragma unroll
            for (int i = 0; i < PK_GQA; ++i) pu[i] = i < nh ? __shfl_sync(0xffffffffu, p[i], u) : 0.0f;
            int su = __shfl_sync(0xffffffffu, seg, u);
            int pou = __shfl_sync(0xffffffffu, pos, u);
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                int j = lane + 32 * k;
                if (j >= d) break;
                float val = su >= 0 ? pk_value(my[su], pou, kvh, j, dims[k], kv_heads, d, g)
                                    : vnew[(size_t)(fresh0 + pou) * kvd + kvh * d + j];
#pragma unroll
                for (int i = 0; i < PK_GQA; ++i) acc[i][k] += pu[i] * val;
            }
        }
    }
#pragma unroll
    for (int i = 0; i < PK_GQA; ++i) {
        if (i >= nh) break;
        float* wp = work + (((size_t)row * q_heads + h0 + i) * splits + split) * (2 + d);
        if (lane == 0) {
            wp[0] = m[i];
            wp[1] = l[i];
        }
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            int j = lane + 32 * k;
            if (j < d) wp[2 + j] = acc[i][k];
        }
    }
}

// One value of the block from each thread: the block's max (is_max) or sum, in a fixed order (warps by shuffles,
// then warp 0's partial first), returned to every thread. red: 32 floats of shared memory.
__device__ __forceinline__ float pk_block_reduce(float x, bool is_max, float* red) {
    x = is_max ? pk_warp_max(x) : pk_warp_sum(x);
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nw = blockDim.x / 32;
    __syncthreads();  // an earlier call's readers are done with red
    if (lane == 0) red[warp] = x;
    __syncthreads();
    float r = red[0];
    for (int i = 1; i < nw; ++i) r = is_max ? fmaxf(r, red[i]) : r + red[i];
    return r;
}

// Merge the splits of pk_attention into out (rows × q_heads·d): out = Σ_s acc_s·e^(m_s − M) / Σ_s l_s·e^(m_s − M);
// then, in the same launch, what the output projection wants of it: the inverse rotation of a rotated sequence's
// head (seqs: the layer's pk_seq table, or null when no sequence of the step rotates; pmkvq_rot.h, as pk_rotate's
// inverse) and the 8-bit blocks of the result (qs non-null; needs d % 32 == 0 so a head holds whole blocks).
// The block shares the splits: the max and the denominator by block reductions, the numerators by thread groups
// of d threads, each group summing every (blockDim/d)-th split, then the groups' partials in group order.
// Grid (q_heads, rows), block PK_COMBINE_THREADS; d ≤ PMKVQ_MAX_HEAD_DIM.
#define PK_COMBINE_THREADS 256
extern "C" __global__ void pk_attn_combine(const float* __restrict__ work, int splits, int d,
                                           const pk_seq* __restrict__ seqs, const int* __restrict__ row_seq,
                                           int block, float scale, float* __restrict__ out,
                                           signed char* __restrict__ qs, float* __restrict__ qd,
                                           float* __restrict__ qsum) {
    __shared__ float red[32];
    __shared__ float part[PK_COMBINE_THREADS];
    __shared__ float hv[PMKVQ_MAX_HEAD_DIM];
    int h = blockIdx.x, row = blockIdx.y, q_heads = gridDim.x, tid = threadIdx.x, nt = blockDim.x;
    const float* w0 = work + ((size_t)row * q_heads + h) * splits * (2 + d);
    float mx = -PMKVQ_INF;
    for (int s = tid; s < splits; s += nt) mx = fmaxf(mx, w0[(size_t)s * (2 + d)]);
    mx = pk_block_reduce(mx, true, red);
    float l = 0.0f;
    for (int s = tid; s < splits; s += nt) {
        float ms = w0[(size_t)s * (2 + d)];
        if (ms != -PMKVQ_INF) l += w0[(size_t)s * (2 + d) + 1] * expf(ms - mx);
    }
    l = pk_block_reduce(l, false, red);
    int groups = nt / d, grp = tid / d, j = tid % d;
    float a = 0.0f;
    if (grp < groups) {
        for (int s = grp; s < splits; s += groups) {
            const float* ws = w0 + (size_t)s * (2 + d);
            float ms = ws[0];
            if (ms != -PMKVQ_INF) a += ws[2 + j] * expf(ms - mx);
        }
    }
    part[tid] = a;
    __syncthreads();
    if (grp == 0) {
        float t = part[j];
        for (int g = 1; g < groups; ++g) t += part[g * d + j];
        hv[j] = l > 0.0f ? t / l : 0.0f;
    }
    __syncthreads();
    const float* signs = seqs ? (const float*)seqs[row_seq[row]].signs : 0;
    if (signs) {
        if (tid == 0) pmkvq_rotate_head(hv, signs, 0, d, block, scale, 1);
        __syncthreads();
    }
    if (grp == 0) {
        size_t o = ((size_t)row * q_heads + h) * d + j;
        float v = hv[j];
        out[o] = v;
        if (qs) pk_q8_lane(v, qs + (o - j % 32), qd + o / 32, qsum + o / 32, j % 32);
    }
}

// The rotation of rotated sequences' rows (pmkvq_rot.h): forward (inverse 0) on the step's post-RoPE q, k and v,
// the key scales applied first; inverse (1) on the attention output in q (k, v unused). Rows of sequences without
// rotation are left alone. seqs: this layer's pk_seq table. Grid (t), block 32.
extern "C" __global__ void pk_rotate(const pk_seq* __restrict__ seqs, const int* __restrict__ row_seq,
                                     float* __restrict__ q, float* __restrict__ k, float* __restrict__ v,
                                     int q_heads, int kv_heads, int d, int block, float scale, int inverse) {
    int row = blockIdx.x;
    pk_seq L = seqs[row_seq[row]];
    if (!L.signs) return;
    size_t qo = (size_t)row * q_heads * d, ko = (size_t)row * kv_heads * d;
    pmkvq_rotate_row(threadIdx.x, blockDim.x, q + qo, inverse ? 0 : k + ko, inverse ? 0 : v + ko,
                     (const float*)L.signs, (const float*)L.qscale, (const float*)L.kinv, q_heads, kv_heads, d,
                     block, scale, inverse);
}

// Group gi of token tok's K (side 0) or V (side 1) into its slot D. Packed widths go through pmkvq_quantize_group
// (the codes kv_quant.cu and the CPU write); bits 0 stores raw f16 (F16KvStore's rounding). Keys are multiplied by
// 1/λ first when the sequence is reparameterized. A group past the slot's groups (its g larger than the batch's
// smallest) does nothing.
__device__ __forceinline__ void pk_store_group(const pk_dst& D, const float* knew, const float* vnew, int tok,
                                               int side, int gi, int kv_dim) {
    int g = D.g, gpt = kv_dim / g;
    if (gi >= gpt || g > 256) return;
    const float* x = (side ? vnew : knew) + (size_t)tok * kv_dim + gi * g;
    const float* kinv = side ? 0 : (const float*)D.kinv;
    float vals[256];
    for (int j = 0; j < g; ++j) vals[j] = kinv ? x[j] * kinv[gi * g + j] : x[j];
    if (D.bits == 0) {
        pmkvq_u16* o = (pmkvq_u16*)(side ? D.v_data : D.k_data) + gi * g;
        for (int j = 0; j < g; ++j) o[j] = pmkvq_f2h(vals[j]);
        return;
    }
    pmkvq_u8* o = (pmkvq_u8*)(side ? D.v_data : D.k_data) + (size_t)gi * pmkvq_group_bytes(D.bits, g);
    pmkvq_u16* sc = (pmkvq_u16*)(side ? D.v_scale : D.k_scale) + gi;
    pmkvq_u16* of = (pmkvq_u16*)(side ? D.v_off : D.k_off) + gi;
    pmkvq_quantize_group(vals, g, D.bits, o, sc, of);
}

// Store the new tokens' K and V into their slots: one thread per (token, K|V, group) (pk_store_group). g_min: the
// smallest group in the batch (threads are laid out for it). Grid (ceil(n·2·kv_dim/g_min/128)), block 128.
extern "C" __global__ void pk_kv_store(const pk_dst* __restrict__ dst, const float* __restrict__ knew,
                                       const float* __restrict__ vnew, int n, int kv_dim, int g_min) {
    int slots = kv_dim / g_min;
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n * 2 * slots) return;
    int tok = i / (2 * slots);
    pk_store_group(dst[tok], knew, vnew, tok, (i / slots) % 2, i % slots, kv_dim);
}

// What a layer does to its fresh q, k, v rows before attention, in one launch (one block per row): RoPE on q and
// k (pk_rope's arithmetic), then for a rotated sequence the key scales and the rotation (seqs non-null: the layer's
// pk_seq table; pk_rotate's forward), then K and V into the row's slot (pk_kv_store's). The store may precede
// attention: a step's slots lie past every segment attention reads, which takes the fresh rows from k and v.
// Grid (t), block 128.
extern "C" __global__ void pk_qkv_post(float* __restrict__ q, float* __restrict__ k, float* __restrict__ v,
                                       int q_heads, int kv_heads, int d, const float* __restrict__ cosv,
                                       const float* __restrict__ sinv, int neox, const pk_seq* __restrict__ seqs,
                                       const int* __restrict__ row_seq, int block, float scale,
                                       const pk_dst* __restrict__ dst, int g_min) {
    int ti = blockIdx.x, tid = threadIdx.x, nt = blockDim.x, half = d / 2, kv_dim = kv_heads * d;
    pk_rope_row(q + (size_t)ti * q_heads * d, k + (size_t)ti * kv_dim, q_heads, kv_heads, d,
                cosv + (size_t)ti * half, sinv + (size_t)ti * half, neox, tid, nt);
    __syncthreads();
    if (seqs) {
        pk_seq L = seqs[row_seq[ti]];
        if (L.signs) {
            size_t qo = (size_t)ti * q_heads * d, ko = (size_t)ti * kv_dim;
            pmkvq_rotate_row(tid, nt, q + qo, k + ko, v + ko, (const float*)L.signs, (const float*)L.qscale,
                             (const float*)L.kinv, q_heads, kv_heads, d, block, scale, 0);
        }
        __syncthreads();
    }
    int slots = kv_dim / g_min;
    for (int i = tid; i < 2 * slots; i += nt) pk_store_group(dst[ti], k, v, ti, i / slots, i % slots, kv_dim);
}
