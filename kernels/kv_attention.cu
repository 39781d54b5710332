// Decode attention for one query token over one layer of a mixed-precision cache: a 16-bit sink, a body at
// 16/8/4/2 bits and a 16-bit window (each a packed segment, see pmkvq_kv.h), then the current token's own K/V
// unquantized (spec §3.3) — the order and arithmetic of PmKvqStore::attend_and_store. Dequantization is fused:
// q·x̂ = S·Σ q·code + min·Σ q per group, and codes are never written out. GQA: query head h reads KV head
// h / (q_heads / kv_heads). Online softmax.
//
// Split-K: grid (q_heads, splits); split s takes tokens [s*chunk, (s+1)*chunk) of the concatenated sequence and
// writes its partial (max, sum, acc[d]) to `work`; pmkvq_attn_combine merges the splits. splits = 1 is the plain
// kernel. One warp per (head, split).
#include "pmkvq_kv.h"

struct pmkvq_segment {
    const pmkvq_u8* data;
    const pmkvq_u16* scale;
    const pmkvq_u16* offset;
    int len;   // tokens
    int bits;
};

struct pmkvq_layer_view {
    pmkvq_segment k[3];  // sink, body, window
    pmkvq_segment v[3];
    const float* k_cur;  // kv_heads * d, or null (no current token)
    const float* v_cur;
};

__device__ __forceinline__ float pmkvq_warp_sum(float x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

// Value of dimension `j` (of head `kvh`) of token `t` in segment `s`.
__device__ __forceinline__ float pmkvq_value(const pmkvq_segment& s, int t, int kvh, int j, int kv_heads, int d,
                                             int g) {
    int gph = d / g;
    size_t gi = ((size_t)t * kv_heads + kvh) * gph + j / g;
    const pmkvq_u8* p = s.data + gi * pmkvq_group_bytes(s.bits, g);
    float c = (float)pmkvq_code(p, s.bits, g, j % g);
    return c * pmkvq_h2f(s.scale[gi]) + pmkvq_h2f(s.offset[gi]);
}

// Score of one token against q (lane-per-token): Σ over the head's groups of S·Σ q·code + min·Σ q.
__device__ __forceinline__ float pmkvq_score(const pmkvq_segment& s, int t, int kvh, int kv_heads, int d, int g,
                                             const float* qs, const float* qsum) {
    int gph = d / g, gb = pmkvq_group_bytes(s.bits, g);
    size_t g0 = ((size_t)t * kv_heads + kvh) * gph;
    float acc = 0.0f;
    for (int k = 0; k < gph; ++k) {
        const pmkvq_u8* p = s.data + (g0 + k) * gb;
        const float* qg = qs + k * g;
        float dot = 0.0f;
        switch (s.bits) {
        case 2: {
            int qd = g / 4;
            for (int b = 0; b < qd; b += 4) {
                unsigned w = *(const unsigned*)(p + b);
                for (int e = 0; e < 4; ++e) {
                    unsigned x = (w >> (8 * e)) & 0xFF;
                    int jb = b + e;
                    dot += qg[jb] * (float)(x & 3) + qg[jb + qd] * (float)((x >> 2) & 3) +
                           qg[jb + 2 * qd] * (float)((x >> 4) & 3) + qg[jb + 3 * qd] * (float)(x >> 6);
                }
            }
            break;
        }
        case 4: {
            int h = g / 2;
            for (int b = 0; b < h; b += 4) {
                unsigned w = *(const unsigned*)(p + b);
                for (int e = 0; e < 4; ++e) {
                    unsigned x = (w >> (8 * e)) & 0xFF;
                    dot += qg[b + e] * (float)(x & 0x0F) + qg[b + e + h] * (float)(x >> 4);
                }
            }
            break;
        }
        case 8:
            for (int b = 0; b < g; b += 4) {
                unsigned w = *(const unsigned*)(p + b);
                dot += qg[b] * (float)(w & 0xFF) + qg[b + 1] * (float)((w >> 8) & 0xFF) +
                       qg[b + 2] * (float)((w >> 16) & 0xFF) + qg[b + 3] * (float)(w >> 24);
            }
            break;
        default:
            for (int b = 0; b < g; b += 2) {
                unsigned w = *(const unsigned*)(p + 2 * b);
                dot += qg[b] * (float)(w & 0xFFFF) + qg[b + 1] * (float)(w >> 16);
            }
        }
        acc += pmkvq_h2f(s.scale[g0 + k]) * dot + pmkvq_h2f(s.offset[g0 + k]) * qsum[k];
    }
    return acc;
}

// Tiles of 32 tokens: each lane scores one token (its codes read as 32-bit words, so a 2-bit token costs an
// eighth of a 16-bit one), one warp max/sum per tile updates the online softmax, then the lanes — each owning
// dimensions lane, lane+32, … — accumulate the tile's values. Requires g % 16 == 0 (word loads of every width).
extern "C" __global__ void pmkvq_attn_decode(pmkvq_layer_view view, const float* __restrict__ q, int q_heads,
                                             int kv_heads, int d, int g, float sm_scale, int chunk,
                                             float* __restrict__ work) {
    __shared__ float qs[PMKVQ_MAX_HEAD_DIM];
    __shared__ float qsum[PMKVQ_MAX_HEAD_DIM];
    int h = blockIdx.x, split = blockIdx.y, lane = threadIdx.x;
    int kvh = h / (q_heads / kv_heads);
    for (int j = lane; j < d; j += 32) qs[j] = q[h * d + j];
    __syncwarp();
    for (int k = lane; k < d / g; k += 32) {
        float s = 0.0f;
        for (int j = 0; j < g; ++j) s += qs[k * g + j];
        qsum[k] = s;
    }
    __syncwarp();
    int lens[3] = {view.k[0].len, view.k[1].len, view.k[2].len};
    int total = lens[0] + lens[1] + lens[2] + (view.k_cur ? 1 : 0);
    int t0 = split * chunk, t1 = min(total, t0 + chunk);
    int nd = 0, gph = d / g;
    // Per owned dimension: its group in the head, index in the group, and byte/shift at 2 and 4 bits.
    int gk[4], jg[4], b2[4], s2[4], b4[4], s4[4];
    for (int j = lane; j < d && nd < 4; j += 32, ++nd) {
        int jj = j % g, qd = g / 4, h2 = g / 2;
        gk[nd] = j / g;
        jg[nd] = jj;
        b2[nd] = jj % qd;
        s2[nd] = 2 * (jj / qd);
        b4[nd] = jj < h2 ? jj : jj - h2;
        s4[nd] = jj < h2 ? 0 : 4;
    }
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    float m = -PMKVQ_INF, l = 0.0f;
    for (int base = t0; base < t1; base += 32) {
        // 1. this lane's token: locate and score it.
        int t = base + lane, seg = 3, tt = 0;
        float s = -PMKVQ_INF;
        if (t < t1) {
            tt = t;
            seg = 0;
            while (seg < 3 && tt >= lens[seg]) { tt -= lens[seg]; ++seg; }
            if (seg < 3) {
                s = pmkvq_score(view.k[seg], tt, kvh, kv_heads, d, g, qs, qsum) * sm_scale;
            } else {
                float dot = 0.0f;
                for (int j = 0; j < d; ++j) dot += qs[j] * view.k_cur[kvh * d + j];
                s = dot * sm_scale;
            }
        }
        // 2. online softmax over the tile.
        float mt = s;
        for (int o = 16; o > 0; o >>= 1) mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, o));
        float mn = fmaxf(m, mt);
        float corr = __expf(m - mn);
        float p = t < t1 ? __expf(s - mn) : 0.0f;
        l = l * corr + pmkvq_warp_sum(p);
        for (int i = 0; i < nd; ++i) acc[i] *= corr;
        m = mn;
        // 3. values: every lane walks the tile's tokens for its own dimensions (byte and shift per width
        //    precomputed above: no integer division in the loop).
        int n = min(32, t1 - base);
        for (int u = 0; u < n; ++u) {
            float pu = __shfl_sync(0xffffffffu, p, u);
            int su = __shfl_sync(0xffffffffu, seg, u), tu = __shfl_sync(0xffffffffu, tt, u);
            if (su == 3) {
                for (int i = 0; i < nd; ++i) acc[i] += pu * view.v_cur[kvh * d + lane + 32 * i];
                continue;
            }
            const pmkvq_segment& vs = view.v[su];
            int bits = vs.bits, gb = (g * bits) >> 3;
            size_t g0 = ((size_t)tu * kv_heads + kvh) * gph;
            for (int i = 0; i < nd; ++i) {
                size_t gi = g0 + gk[i];
                const pmkvq_u8* pg = vs.data + gi * gb;
                unsigned c;
                if (bits == 2) c = (pg[b2[i]] >> s2[i]) & 3;
                else if (bits == 4) c = (pg[b4[i]] >> s4[i]) & 0x0F;
                else if (bits == 8) c = pg[jg[i]];
                else c = (unsigned)pg[2 * jg[i]] | ((unsigned)pg[2 * jg[i] + 1] << 8);
                acc[i] += pu * ((float)c * pmkvq_h2f(vs.scale[gi]) + pmkvq_h2f(vs.offset[gi]));
            }
        }
    }
    float* w = work + ((size_t)h * gridDim.y + split) * (2 + d);
    if (lane == 0) { w[0] = m; w[1] = l; }
    for (int i = 0; i < nd; ++i) w[2 + lane + 32 * i] = acc[i];
}

// out[h][j] = Σ_s acc_s[j]·e^(m_s − M) / Σ_s l_s·e^(m_s − M). One warp per head.
extern "C" __global__ void pmkvq_attn_combine(const float* __restrict__ work, int splits, int d,
                                              float* __restrict__ out) {
    int h = blockIdx.x, lane = threadIdx.x;
    const float* w = work + (size_t)h * splits * (2 + d);
    float M = -PMKVQ_INF;
    for (int s = 0; s < splits; ++s) M = fmaxf(M, w[s * (2 + d)]);
    float L = 0.0f;
    for (int s = 0; s < splits; ++s) {
        float ms = w[s * (2 + d)];
        if (ms > -PMKVQ_INF) L += w[s * (2 + d) + 1] * __expf(ms - M);
    }
    for (int j = lane; j < d; j += 32) {
        float a = 0.0f;
        for (int s = 0; s < splits; ++s) {
            float ms = w[s * (2 + d)];
            if (ms > -PMKVQ_INF) a += w[s * (2 + d) + 2 + j] * __expf(ms - M);
        }
        out[h * d + j] = L > 0.0f ? a / L : 0.0f;
    }
}
