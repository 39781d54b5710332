// What NVRTC provides and the host does not: the CUDA words these kernels use, each with its IEEE meaning.
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <functional>
#include <vector>
#include <ucontext.h>
using std::isfinite;
using std::isinf;
using std::isnan;
#define __global__
#define __device__
#define __forceinline__ inline
struct pk_dim3 { unsigned x, y, z; };
static pk_dim3 blockIdx, blockDim, threadIdx, gridDim;
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline double __dmul_rn(double a, double b) { return a * b; }
static inline double __dadd_rn(double a, double b) { return a + b; }
static inline double __dsub_rn(double a, double b) { return a - b; }
static inline double __ddiv_rn(double a, double b) { return a / b; }
static inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
// Warps and blocks on the host. `blocks` runs a grid one block at a time, each of the block's threads a fiber
// (ucontext) on this one OS thread, so `__shared__` can be a static. A shuffle or barrier parks its fiber until
// every live thread of its warp (of its block, for __syncthreads) has arrived, as on the GPU; a shuffle exchanges
// through the warp's slots between two such waits. Lanes of one warp at different shuffles (source lines), a lane
// that exits while its warp waits for it, or a block whose threads all wait where none can go on, is a divergence
// bug a GPU would hang on or leave undefined: the driver aborts naming it. `launch` below runs one-thread kernels thread by thread instead (no fibers: a primitive there
// aborts).
#define __shared__ static
namespace pkh {
enum { RUN, WAIT_WARP, WAIT_BLOCK, DONE };
struct Fiber { ucontext_t ctx; int state; };
static std::vector<Fiber> fibers;
static std::vector<std::vector<char>> stacks;
static ucontext_t sched;
static int cur = -1;  // the running fiber; -1 outside `blocks`
static int warp_live[32], warp_arrived[32], warp_site[32], block_live, block_arrived, block_site;
static unsigned long long slots[32][32];
static std::function<void()> body;
static void fail(const char* what) {
    fprintf(stderr, "block (%u, %u, %u), thread %d: %s\n", blockIdx.x, blockIdx.y, blockIdx.z, cur, what);
    abort();
}
static void release(int state, int from, int to) {
    for (int i = from; i < to; ++i)
        if (fibers[i].state == state) fibers[i].state = RUN;
}
static void park(int state) {
    fibers[cur].state = state;
    swapcontext(&fibers[cur].ctx, &sched);
}
// `site`: the kernel source line of the primitive; a warp's lanes must all be at the same one.
static void warp_wait(int site) {
    if (cur < 0) fail("a warp primitive in a one-thread launch");
    int w = cur / 32;
    if (warp_arrived[w] == 0) {
        warp_site[w] = site;
    } else if (warp_site[w] != site) {
        char what[96];
        snprintf(what, sizeof what, "at the shuffle of line %d while its warp-mates wait at line %d", site,
                 warp_site[w]);
        fail(what);
    }
    if (++warp_arrived[w] == warp_live[w]) {
        warp_arrived[w] = 0;
        release(WAIT_WARP, w * 32, std::min((int)blockDim.x, w * 32 + 32));
    } else {
        park(WAIT_WARP);
    }
}
static void block_wait(int site) {
    if (cur < 0) fail("__syncthreads in a one-thread launch");
    if (block_arrived == 0) {
        block_site = site;
    } else if (block_site != site) {
        char what[96];
        snprintf(what, sizeof what, "at the barrier of line %d while others wait at line %d", site, block_site);
        fail(what);
    }
    if (++block_arrived == block_live) {
        block_arrived = 0;
        release(WAIT_BLOCK, 0, blockDim.x);
    } else {
        park(WAIT_BLOCK);
    }
}
static void entry() {
    body();
    int w = cur / 32;
    fibers[cur].state = DONE;
    --warp_live[w];
    --block_live;
    if (warp_arrived[w] > 0) fail("exited while its warp waits at a shuffle");
    if (block_arrived > 0 && block_arrived == block_live) {
        block_arrived = 0;
        release(WAIT_BLOCK, 0, blockDim.x);
    }
}
template <class T> static T shfl(T x, int src, int site) {
    static_assert(sizeof(T) <= 8, "one slot per lane");
    int w = cur / 32;
    memcpy(&slots[w][cur % 32], &x, sizeof(T));
    warp_wait(site);
    T r;
    memcpy(&r, &slots[w][src & 31], sizeof(T));
    warp_wait(site);  // every lane has read before any writes its next value
    return r;
}
}  // namespace pkh
#define __shfl_sync(mask, x, src) pkh::shfl((x), (src), __LINE__)
#define __shfl_xor_sync(mask, x, o) pkh::shfl((x), (pkh::cur % 32) ^ (o), __LINE__)
#define __syncwarp() pkh::warp_wait(__LINE__)
#define __syncthreads() pkh::block_wait(__LINE__)
// Every block of `grid` with `threads` threads (a multiple of 32, at most 1024) running `f`, block by block.
template <class F> static void blocks(pk_dim3 grid, unsigned threads, F f) {
    using namespace pkh;
    const size_t stack = 128 * 1024;
    if (stacks.size() < threads) stacks.resize(threads, std::vector<char>(stack));
    fibers.resize(threads);
    gridDim = grid;
    blockDim = pk_dim3{threads, 1, 1};
    body = f;
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                blockIdx = pk_dim3{x, y, z};
                for (unsigned w = 0; w < threads / 32; ++w) { warp_live[w] = 32; warp_arrived[w] = 0; }
                block_live = threads;
                block_arrived = 0;
                for (unsigned i = 0; i < threads; ++i) {
                    getcontext(&fibers[i].ctx);
                    fibers[i].ctx.uc_stack.ss_sp = stacks[i].data();
                    fibers[i].ctx.uc_stack.ss_size = stack;
                    fibers[i].ctx.uc_link = &sched;
                    makecontext(&fibers[i].ctx, entry, 0);
                    fibers[i].state = RUN;
                }
                for (bool ran = true; ran;) {
                    ran = false;
                    for (unsigned i = 0; i < threads; ++i)
                        if (fibers[i].state == RUN) {
                            cur = i;
                            threadIdx = pk_dim3{i, 0, 0};
                            swapcontext(&sched, &fibers[i].ctx);
                            ran = true;
                        }
                }
                for (unsigned i = 0; i < threads; ++i)
                    if (fibers[i].state != DONE) { cur = i; fail("waits at a barrier no other thread reaches"); }
                cur = -1;
            }
}
using std::max;
using std::min;
struct uint4 { unsigned x, y, z, w; };

#include "pmkvq_rot.h"
#include "kv_quant.cu"
#include "kv_shrink.cu"
#include "forward.cu"

template <class T> static std::vector<T> read(int n) {
    std::vector<T> v(n);
    for (int i = 0; i < n; ++i) {
        unsigned u;
        if (scanf("%x", &u) != 1) throw 1;
        T x;
        memcpy(&x, &u, sizeof(T));  // little-endian: the low bytes of u
        v[i] = x;
    }
    return v;
}
template <class T> static void write(const std::vector<T>& v) {
    for (T x : v) { unsigned u = 0; memcpy(&u, &x, sizeof(T)); printf("%x ", u); }
    printf("\n");
}
// One launch of a one-thread-per-group kernel: every (block, thread) in turn, as the GPU would in any order.
template <class F> static void launch(int n_groups, F f) {
    blockDim.x = 128;
    for (unsigned b = 0; b * 128 < (unsigned)n_groups; ++b)
        for (unsigned t = 0; t < 128; ++t) { blockIdx.x = b; threadIdx.x = t; f(); }
}

// stdin, one command after another:
//   R q_heads kv_heads d block scale(bits) inverse scaled lanes / signs[d] / (qscale, kinv)[kv·d] if scaled /
//     q k v  ->  q, k, v after pmkvq_rotate_row over every lane
//   Q n_groups g bits / values[n_groups·g]  ->  packed bytes, f16 scales, f16 offsets (pmkvq_kv_quantize)
//   S n_groups g bits_in mode / bytes / scales / offsets  ->  the same one level down (pmkvq_kv_shrink)
//   F q_heads kv_heads d block scale(bits) inverse rows seqs / per sequence: rotates scaled [signs] [qscale kinv] /
//     row_seq / q k v  ->  q, k, v after pk_rotate over the grid (rows) × 32 threads
//   K n kv_dim g_min / per token: bits g has_kinv [kinv] / k v  ->  per token, K then V: bytes, scales, offsets
//     (bits 0: raw f16 rows, no parameters) after pk_kv_store
//   P q_heads kv_heads d t neox rot_block rot_scale g_min seqs / per sequence: rotates scaled [signs] [qscale kinv]
//     / row_seq / cos sin (t·d/2 each) / per token: bits g has_kinv [kinv] / q k v  ->  q, k, v and per token K
//     then V (bytes, scales, offsets) after pk_qkv_post; then the same after pk_rope, pk_rotate, pk_kv_store
//   G mode fmt rows cols t has_bias accumulate eps / weight bytes / x / aux (mode 0: norm weight[cols]; 1: up[t·cols])
//     / [bias] / [rows before]  ->  y after pk_matmul_qa; then y after pk_norm (mode 0) or pk_swiglu (1) and
//     pk_matmul_q
//   L  ->  sizes and field offsets of pk_seg, pk_seq, pk_dst, pk_out (a line each), then PK_COMBINE_THREADS,
//     PK_GQA and PK_TT
//   A q_heads kv_heads d chunk splits rows seqs segs sm_scale rot_block rot_scale quantize heads_per_warp / per
//     segment: bits len g, then K and V (bits 0: raw f16 rows; else bytes, f16 scales, f16 offsets) / per sequence: seg_start
//     seg_count stored g scaled rotates [qscale kinv] [signs] / row_seq row_fresh row_fresh0 / q knew vnew  ->
//     pk_attention over the grid (kv_heads·ceil(q_heads/kv_heads/heads_per_warp), rows, splits) × 32, then
//     pk_attn_combine as the step launches it: output [8-bit codes, d, s]; then the same merged by three
//     launches (plain combine, pk_rotate's inverse if a sequence rotates, pk_quant8 if quantize): output [codes, d,
//     s]. Each segment's start is the sum of its sequence's earlier lengths, as the device store sets it.
//   N rows dim eps / x w  ->  out, 8-bit codes, d, s after pk_norm (grid rows × 256)
//   M fmt rows cols t parts accumulate has_bias / start[parts+1] / weight bytes / x / [bias] / [each part's
//     rows before]  ->  pk_quant8's codes, d, s of x, then each part's rows after pk_matmul_q
int main() {
    char op[2];
    while (scanf("%1s", op) == 1) {
        if (op[0] == 'R') {
            int qh, kvh, d, block, inverse, scaled, lanes;
            unsigned sb;
            if (scanf("%d %d %d %d %x %d %d %d", &qh, &kvh, &d, &block, &sb, &inverse, &scaled, &lanes) != 8) return 2;
            float scale;
            memcpy(&scale, &sb, 4);
            std::vector<float> signs = read<float>(d), qs, ki;
            if (scaled) { qs = read<float>(kvh * d); ki = read<float>(kvh * d); }
            std::vector<float> q = read<float>(qh * d), k = read<float>(kvh * d), v = read<float>(kvh * d);
            for (int lane = 0; lane < lanes; ++lane)
                pmkvq_rotate_row(lane, lanes, q.data(), inverse ? 0 : k.data(), inverse ? 0 : v.data(), signs.data(),
                                 scaled ? qs.data() : 0, scaled ? ki.data() : 0, qh, kvh, d, block, scale, inverse);
            write(q); write(k); write(v);
        } else if (op[0] == 'Q') {
            int n, g, bits;
            if (scanf("%d %d %d", &n, &g, &bits) != 3) return 2;
            std::vector<float> x = read<float>(n * g);
            std::vector<pmkvq_u8> out(n * g * bits / 8);
            std::vector<pmkvq_u16> sc(n), of(n);
            launch(n, [&] { pmkvq_kv_quantize(x.data(), n, g, bits, out.data(), sc.data(), of.data()); });
            write(out); write(sc); write(of);
        } else if (op[0] == 'S') {
            int n, g, bits, mode;
            if (scanf("%d %d %d %d", &n, &g, &bits, &mode) != 4) return 2;
            std::vector<pmkvq_u8> in = read<pmkvq_u8>(n * g * bits / 8);
            std::vector<pmkvq_u16> sc = read<pmkvq_u16>(n), of = read<pmkvq_u16>(n);
            std::vector<pmkvq_u8> out(n * g * bits / 16);
            launch(n, [&] { pmkvq_kv_shrink(in.data(), n, g, bits, mode, out.data(), sc.data(), of.data()); });
            write(out); write(sc); write(of);
        } else if (op[0] == 'F') {
            // pk_rotate itself over a step's rows: per sequence, whether it rotates and has key scales
            int qh, kvh, d, block, inverse, t, ns;
            unsigned sb;
            if (scanf("%d %d %d %d %x %d %d %d", &qh, &kvh, &d, &block, &sb, &inverse, &t, &ns) != 8) return 2;
            float scale;
            memcpy(&scale, &sb, 4);
            std::vector<std::vector<float>> keep;  // the tables' storage
            std::vector<pk_seq> seqs(ns);
            for (int i = 0; i < ns; ++i) {
                int rotates, scaled;
                if (scanf("%d %d", &rotates, &scaled) != 2) return 2;
                seqs[i] = pk_seq{};
                if (rotates) { keep.push_back(read<float>(d)); seqs[i].signs = (pk_ptr)keep.back().data(); }
                if (scaled) {
                    keep.push_back(read<float>(kvh * d));
                    seqs[i].qscale = (pk_ptr)keep.back().data();
                    keep.push_back(read<float>(kvh * d));
                    seqs[i].kinv = (pk_ptr)keep.back().data();
                }
            }
            std::vector<int> row_seq = read<int>(t);
            std::vector<float> q = read<float>(t * qh * d), k = read<float>(t * kvh * d), v = read<float>(t * kvh * d);
            blockDim.x = 32;
            for (int row = 0; row < t; ++row)
                for (unsigned th = 0; th < 32; ++th) {
                    blockIdx.x = row;
                    threadIdx.x = th;
                    pk_rotate(seqs.data(), row_seq.data(), q.data(), k.data(), v.data(), qh, kvh, d, block, scale,
                              inverse);
                }
            write(q); write(k); write(v);
        } else if (op[0] == 'K') {
            // pk_kv_store: each token's K and V into its own slot, at its width and group, keys times its kinv
            int n, kv_dim, g_min;
            if (scanf("%d %d %d", &n, &kv_dim, &g_min) != 3) return 2;
            std::vector<std::vector<float>> kinv(n);
            std::vector<std::vector<pmkvq_u8>> data(2 * n);
            std::vector<std::vector<pmkvq_u16>> params(4 * n);
            std::vector<pk_dst> dst(n);
            for (int i = 0; i < n; ++i) {
                int bits, g, has;
                if (scanf("%d %d %d", &bits, &g, &has) != 3) return 2;
                if (has) kinv[i] = read<float>(kv_dim);
                int groups = kv_dim / g, bytes = bits ? groups * g * bits / 8 : kv_dim * 2;
                for (int side = 0; side < 2; ++side) {
                    data[2 * i + side].assign(bytes, 0);
                    params[4 * i + 2 * side].assign(groups, 0);
                    params[4 * i + 2 * side + 1].assign(groups, 0);
                }
                dst[i] = pk_dst{(pk_ptr)data[2 * i].data(), (pk_ptr)params[4 * i].data(), (pk_ptr)params[4 * i + 1].data(),
                                (pk_ptr)data[2 * i + 1].data(), (pk_ptr)params[4 * i + 2].data(),
                                (pk_ptr)params[4 * i + 3].data(), has ? (pk_ptr)kinv[i].data() : 0, bits, g};
            }
            std::vector<float> k = read<float>(n * kv_dim), v = read<float>(n * kv_dim);
            int threads = n * 2 * (kv_dim / g_min);
            blockDim.x = 128;
            for (int b = 0; b * 128 < threads; ++b)
                for (unsigned th = 0; th < 128; ++th) {
                    blockIdx.x = b;
                    threadIdx.x = th;
                    pk_kv_store(dst.data(), k.data(), v.data(), n, kv_dim, g_min);
                }
            for (int i = 0; i < n; ++i)
                for (int side = 0; side < 2; ++side) {
                    write(data[2 * i + side]); write(params[4 * i + 2 * side]); write(params[4 * i + 2 * side + 1]);
                }
        } else if (op[0] == 'P') {
            // pk_qkv_post against the three launches it replaces: pk_rope, pk_rotate, pk_kv_store
            int qh, kvh, d, t, neox, block, g_min, ns;
            unsigned sb;
            if (scanf("%d %d %d %d %d %d %x %d %d", &qh, &kvh, &d, &t, &neox, &block, &sb, &g_min, &ns) != 9) return 2;
            float scale;
            memcpy(&scale, &sb, 4);
            int kvd = kvh * d, half = d / 2;
            std::vector<std::vector<float>> keep;
            keep.reserve(3 * ns + t);
            std::vector<pk_seq> seqs(ns);
            for (pk_seq& L : seqs) {
                int rotates, scaled;
                if (scanf("%d %d", &rotates, &scaled) != 2) return 2;
                L = pk_seq{};
                if (rotates) { keep.push_back(read<float>(d)); L.signs = (pk_ptr)keep.back().data(); }
                if (scaled) {
                    keep.push_back(read<float>(kvd));
                    L.qscale = (pk_ptr)keep.back().data();
                    keep.push_back(read<float>(kvd));
                    L.kinv = (pk_ptr)keep.back().data();
                }
            }
            std::vector<int> row_seq = read<int>(t);
            std::vector<float> cs = read<float>(t * half), sn = read<float>(t * half);
            std::vector<int> bits(t), gs(t);
            std::vector<pk_ptr> kinv(t);
            for (int i = 0; i < t; ++i) {
                int has;
                if (scanf("%d %d %d", &bits[i], &gs[i], &has) != 3) return 2;
                kinv[i] = 0;
                if (has) { keep.push_back(read<float>(kvd)); kinv[i] = (pk_ptr)keep.back().data(); }
            }
            std::vector<float> q0 = read<float>(t * qh * d), k0 = read<float>(t * kvd), v0 = read<float>(t * kvd);
            for (int path = 0; path < 2; ++path) {
                std::vector<float> q = q0, k = k0, v = v0;
                std::vector<std::vector<pmkvq_u8>> data(2 * t);
                std::vector<std::vector<pmkvq_u16>> params(4 * t);
                std::vector<pk_dst> dst(t);
                for (int i = 0; i < t; ++i) {
                    int groups = kvd / gs[i], bytes = bits[i] ? groups * gs[i] * bits[i] / 8 : kvd * 2;
                    for (int side = 0; side < 2; ++side) {
                        data[2 * i + side].assign(bytes, 0);
                        params[4 * i + 2 * side].assign(groups, 0);
                        params[4 * i + 2 * side + 1].assign(groups, 0);
                    }
                    dst[i] = pk_dst{(pk_ptr)data[2 * i].data(), (pk_ptr)params[4 * i].data(),
                                    (pk_ptr)params[4 * i + 1].data(), (pk_ptr)data[2 * i + 1].data(),
                                    (pk_ptr)params[4 * i + 2].data(), (pk_ptr)params[4 * i + 3].data(), kinv[i],
                                    bits[i], gs[i]};
                }
                bool rotates = false;
                for (const pk_seq& L : seqs) rotates = rotates || L.signs;
                if (path == 0) {
                    blocks(pk_dim3{(unsigned)t, 1, 1}, 128, [&] {
                        pk_qkv_post(q.data(), k.data(), v.data(), qh, kvh, d, cs.data(), sn.data(), neox,
                                    rotates ? seqs.data() : 0, row_seq.data(), block, scale, dst.data(), g_min);
                    });
                } else {
                    blocks(pk_dim3{(unsigned)t, 1, 1}, 128,
                           [&] { pk_rope(q.data(), k.data(), qh, kvh, d, cs.data(), sn.data(), neox); });
                    if (rotates)
                        blocks(pk_dim3{(unsigned)t, 1, 1}, 32, [&] {
                            pk_rotate(seqs.data(), row_seq.data(), q.data(), k.data(), v.data(), qh, kvh, d, block,
                                      scale, 0);
                        });
                    int threads = t * 2 * (kvd / g_min);
                    blocks(pk_dim3{(unsigned)((threads + 127) / 128), 1, 1}, 128,
                           [&] { pk_kv_store(dst.data(), k.data(), v.data(), t, kvd, g_min); });
                }
                write(q); write(k); write(v);
                for (int i = 0; i < t; ++i)
                    for (int side = 0; side < 2; ++side) {
                        write(data[2 * i + side]); write(params[4 * i + 2 * side]); write(params[4 * i + 2 * side + 1]);
                    }
            }
        } else if (op[0] == 'G') {
            // pk_matmul_qa against the two launches it replaces: pk_norm (mode 0) or pk_swiglu (mode 1), then
            // pk_matmul_q
            int mode, fmt, rows, cols, t, has_bias, accumulate;
            unsigned eb;
            if (scanf("%d %d %d %d %d %d %d %x", &mode, &fmt, &rows, &cols, &t, &has_bias, &accumulate, &eb) != 8)
                return 2;
            float eps;
            memcpy(&eps, &eb, 4);
            int nb = cols / 32;
            std::vector<pmkvq_u8> w = read<pmkvq_u8>(rows * nb * pk_block_bytes(fmt));
            std::vector<float> x = read<float>(t * cols), aux = read<float>(mode == 0 ? cols : t * cols), bias;
            if (has_bias) bias = read<float>(rows);
            std::vector<float> init = accumulate ? read<float>(t * rows) : std::vector<float>(t * rows, NAN);
            for (int path = 0; path < 2; ++path) {
                std::vector<float> y = init;
                pk_out o{};
                o.parts = 1;
                o.accumulate = accumulate;
                o.ptr[0] = (pk_ptr)y.data();
                o.ld[0] = rows;
                o.start[1] = rows;
                const float* bp = has_bias ? bias.data() : 0;
                unsigned grid = (unsigned)((rows + PK_MM_WARPS - 1) / PK_MM_WARPS);
                if (path == 0) {
                    blocks(pk_dim3{grid, 1, 1}, 32 * PK_MM_WARPS, [&] {
                        pk_matmul_qa(w.data(), fmt, rows, cols, t, bp, o, mode, x.data(), aux.data(), eps);
                    });
                } else {
                    std::vector<float> f(t * cols), qd(t * nb), qsum(t * nb);
                    std::vector<signed char> qs(t * cols);
                    if (mode == 0)
                        blocks(pk_dim3{(unsigned)t, 1, 1}, 256, [&] {
                            pk_norm(x.data(), aux.data(), cols, eps, f.data(), qs.data(), qd.data(), qsum.data());
                        });
                    else
                        blocks(pk_dim3{(unsigned)((t * cols + 255) / 256), 1, 1}, 256, [&] {
                            pk_swiglu(x.data(), aux.data(), t * cols, f.data(), qs.data(), qd.data(), qsum.data());
                        });
                    blocks(pk_dim3{grid, 1, 1}, 32 * PK_MM_WARPS, [&] {
                        pk_matmul_q(w.data(), fmt, rows, cols, qs.data(), qd.data(), qsum.data(), t, bp, o);
                    });
                }
                write(y);
            }
        } else if (op[0] == 'L') {
            printf("%zx %zx %zx %zx %zx %zx\n", sizeof(pk_seg), offsetof(pk_seg, v_off), offsetof(pk_seg, len),
                   offsetof(pk_seg, bits), offsetof(pk_seg, start), offsetof(pk_seg, pad));
            printf("%zx %zx %zx %zx %zx %zx %zx %zx\n", sizeof(pk_seq), offsetof(pk_seq, seg_start),
                   offsetof(pk_seq, seg_count), offsetof(pk_seq, stored), offsetof(pk_seq, g),
                   offsetof(pk_seq, qscale), offsetof(pk_seq, kinv), offsetof(pk_seq, signs));
            printf("%zx %zx %zx %zx %zx\n", sizeof(pk_dst), offsetof(pk_dst, v_off), offsetof(pk_dst, kinv),
                   offsetof(pk_dst, bits), offsetof(pk_dst, g));
            printf("%zx %zx %zx %zx %zx %zx\n", sizeof(pk_out), offsetof(pk_out, ptr), offsetof(pk_out, ld),
                   offsetof(pk_out, start), offsetof(pk_out, parts), offsetof(pk_out, accumulate));
            printf("%x %x %x\n", PK_COMBINE_THREADS, PK_GQA, PK_TT);
        } else if (op[0] == 'A') {
            int qh, kvh, d, chunk, splits, rows, ns, nsegs, block, quant, gqa;
            unsigned smb, rsb;
            if (scanf("%d %d %d %d %d %d %d %d %x %d %x %d %d", &qh, &kvh, &d, &chunk, &splits, &rows, &ns, &nsegs,
                      &smb, &block, &rsb, &quant, &gqa) != 13)
                return 2;
            float sm, rscale;
            memcpy(&sm, &smb, 4);
            memcpy(&rscale, &rsb, 4);
            int kvd = kvh * d;
            std::vector<std::vector<pmkvq_u8>> bytes;  // the tables' storage
            std::vector<std::vector<pmkvq_u16>> halves;
            std::vector<std::vector<float>> floats;
            auto u8s = [&](int n) { bytes.push_back(read<pmkvq_u8>(n)); return (pk_ptr)bytes.back().data(); };
            auto u16s = [&](int n) { halves.push_back(read<pmkvq_u16>(n)); return (pk_ptr)halves.back().data(); };
            auto f32s = [&](int n) { floats.push_back(read<float>(n)); return (pk_ptr)floats.back().data(); };
            bytes.reserve(2 * nsegs);
            halves.reserve(6 * nsegs);
            floats.reserve(2 * ns);
            std::vector<pk_seg> segs(nsegs);
            for (pk_seg& sg : segs) {
                int bits, len, g;
                if (scanf("%d %d %d", &bits, &len, &g) != 3) return 2;
                sg = pk_seg{};
                sg.len = len;
                sg.bits = bits;
                if (bits == 0) {
                    sg.k_data = u16s(len * kvd);
                    sg.v_data = u16s(len * kvd);
                } else {
                    int groups = len * kvd / g;
                    sg.k_data = u8s(groups * g * bits / 8);
                    sg.k_scale = u16s(groups);
                    sg.k_off = u16s(groups);
                    sg.v_data = u8s(groups * g * bits / 8);
                    sg.v_scale = u16s(groups);
                    sg.v_off = u16s(groups);
                }
            }
            std::vector<pk_seq> seqs(ns);
            bool rotates = false;
            for (pk_seq& L : seqs) {
                int scaled, rot;
                L = pk_seq{};
                if (scanf("%d %d %d %d %d %d", &L.seg_start, &L.seg_count, &L.stored, &L.g, &scaled, &rot) != 6)
                    return 2;
                if (scaled) {
                    L.qscale = f32s(kvd);
                    L.kinv = f32s(kvd);
                }
                if (rot) {
                    L.signs = f32s(d);
                    rotates = true;
                }
                for (int i = 0, at = 0; i < L.seg_count; ++i) {
                    segs[L.seg_start + i].start = at;
                    at += segs[L.seg_start + i].len;
                }
            }
            std::vector<int> row_seq = read<int>(rows), row_fresh = read<int>(rows), row_fresh0 = read<int>(rows);
            std::vector<float> q = read<float>(rows * qh * d), kn = read<float>(rows * kvd),
                               vn = read<float>(rows * kvd);
            std::vector<float> work((size_t)rows * qh * splits * (2 + d), NAN), out((size_t)rows * qh * d, NAN);
            unsigned parts = (qh / kvh + gqa - 1) / gqa;
            blocks(pk_dim3{(unsigned)kvh * parts, (unsigned)rows, (unsigned)splits}, 32, [&] {
                pk_attention(segs.data(), seqs.data(), row_seq.data(), row_fresh.data(), row_fresh0.data(), q.data(),
                             kn.data(), vn.data(), qh, kvh, d, sm, chunk, gqa, work.data());
            });
            // the combine as the step launches it (inverse rotation and 8-bit blocks fused) ...
            int nq = rows * qh * d;
            std::vector<signed char> qs(nq), qs2(nq);
            std::vector<float> qd(nq / 32), qsum(nq / 32), qd2(nq / 32), qsum2(nq / 32), out2(nq, NAN);
            blocks(pk_dim3{(unsigned)qh, (unsigned)rows, 1}, PK_COMBINE_THREADS, [&] {
                pk_attn_combine(work.data(), splits, d, rotates ? seqs.data() : 0, row_seq.data(), block, rscale,
                                out.data(), quant ? qs.data() : 0, qd.data(), qsum.data());
            });
            // ... and as three launches: the plain merge, pk_rotate's inverse, pk_quant8
            blocks(pk_dim3{(unsigned)qh, (unsigned)rows, 1}, PK_COMBINE_THREADS, [&] {
                pk_attn_combine(work.data(), splits, d, 0, row_seq.data(), block, rscale, out2.data(), 0, 0, 0);
            });
            if (rotates)
                blocks(pk_dim3{(unsigned)rows, 1, 1}, 32, [&] {
                    pk_rotate(seqs.data(), row_seq.data(), out2.data(), 0, 0, qh, kvh, d, block, rscale, 1);
                });
            if (quant)
                blocks(pk_dim3{(unsigned)((nq / 32 + 7) / 8), 1, 1}, 256,
                       [&] { pk_quant8(out2.data(), nq / 32, qs2.data(), qd2.data(), qsum2.data()); });
            write(out);
            if (quant) { write(qs); write(qd); write(qsum); }
            write(out2);
            if (quant) { write(qs2); write(qd2); write(qsum2); }
        } else if (op[0] == 'N') {
            int rows, dim;
            unsigned eb;
            if (scanf("%d %d %x", &rows, &dim, &eb) != 3) return 2;
            float eps;
            memcpy(&eps, &eb, 4);
            std::vector<float> x = read<float>(rows * dim), w = read<float>(dim);
            std::vector<float> out(rows * dim), qd(rows * dim / 32), qsum(rows * dim / 32);
            std::vector<signed char> qs(rows * dim);
            blocks(pk_dim3{(unsigned)rows, 1, 1}, 256,
                   [&] { pk_norm(x.data(), w.data(), dim, eps, out.data(), qs.data(), qd.data(), qsum.data()); });
            write(out); write(qs); write(qd); write(qsum);
        } else if (op[0] == 'M') {
            int fmt, rows, cols, t, parts, accumulate, has_bias;
            if (scanf("%d %d %d %d %d %d %d", &fmt, &rows, &cols, &t, &parts, &accumulate, &has_bias) != 7) return 2;
            std::vector<int> start = read<int>(parts + 1);
            int nb = cols / 32;
            std::vector<pmkvq_u8> w = read<pmkvq_u8>(rows * nb * pk_block_bytes(fmt));
            std::vector<float> x = read<float>(t * cols), bias;
            if (has_bias) bias = read<float>(rows);
            std::vector<std::vector<float>> ys(parts);
            pk_out o{};
            o.parts = parts;
            o.accumulate = accumulate;
            for (int p = 0; p <= parts; ++p) o.start[p] = start[p];
            for (int p = 0; p < parts; ++p) {
                int n = start[p + 1] - start[p];
                ys[p] = accumulate ? read<float>(t * n) : std::vector<float>(t * n, NAN);
                o.ptr[p] = (pk_ptr)ys[p].data();
                o.ld[p] = n;
            }
            std::vector<signed char> qs(t * cols);
            std::vector<float> qd(t * nb), qsum(t * nb);
            int n_blocks = t * nb;
            blocks(pk_dim3{(unsigned)((n_blocks + 7) / 8), 1, 1}, 256,
                   [&] { pk_quant8(x.data(), n_blocks, qs.data(), qd.data(), qsum.data()); });
            blocks(pk_dim3{(unsigned)((rows + PK_MM_WARPS - 1) / PK_MM_WARPS), (unsigned)((t + PK_TT - 1) / PK_TT), 1},
                   32 * PK_MM_WARPS, [&] {
                       pk_matmul_q(w.data(), fmt, rows, cols, qs.data(), qd.data(), qsum.data(), t,
                                   has_bias ? bias.data() : 0, o);
                   });
            write(qs); write(qd); write(qsum);
            for (auto& y : ys) write(y);
        } else {
            return 2;
        }
    }
    return 0;
}
