// GPU verification of the kernels against reference vectors from the CPU specification
// (`cargo run --release --example gpu_vectors -- DIR`), then decode-attention timings at 32k context.
//
//   nvcc -O3 -arch=sm_90 -o check kernels/harness/check.cu && ./check DIR
//
// Exit status 0 only if every comparison passes.
#include "../kv_quant.cu"
#include "../kv_shrink.cu"
#include "../kv_attention.cu"
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { \
    fprintf(stderr, "%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e)); exit(2); } } while (0)

struct Reader {
    std::vector<unsigned char> b; size_t p = 0;
    explicit Reader(const std::string& path) {
        FILE* f = fopen(path.c_str(), "rb");
        if (!f) { fprintf(stderr, "cannot open %s\n", path.c_str()); exit(2); }
        fseek(f, 0, SEEK_END); b.resize(ftell(f)); fseek(f, 0, SEEK_SET);
        if (fread(b.data(), 1, b.size(), f) != b.size()) exit(2);
        fclose(f);
    }
    unsigned u32() { unsigned v; memcpy(&v, &b[p], 4); p += 4; return v; }
    std::vector<float> f32s() { unsigned n = u32(); std::vector<float> v(n); memcpy(v.data(), &b[p], 4 * n); p += 4 * n; return v; }
    std::vector<unsigned char> bytes() { unsigned n = u32(); std::vector<unsigned char> v(b.begin() + p, b.begin() + p + n); p += n; return v; }
    std::vector<unsigned short> halves() { unsigned n = u32(); std::vector<unsigned short> v(n); memcpy(v.data(), &b[p], 2 * n); p += 2 * n; return v; }
};

struct Rows { unsigned bits, len; std::vector<unsigned char> data; std::vector<unsigned short> scale, offset; };
static Rows read_rows(Reader& r) { Rows x; x.bits = r.u32(); x.len = r.u32(); x.data = r.bytes(); x.scale = r.halves(); x.offset = r.halves(); return x; }

template <class T> static T* up(const std::vector<T>& v) {
    T* d; CK(cudaMalloc(&d, std::max<size_t>(1, v.size() * sizeof(T))));
    if (!v.empty()) CK(cudaMemcpy(d, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
    return d;
}
template <class T> static std::vector<T> down(const T* d, size_t n) {
    std::vector<T> v(n); if (n) CK(cudaMemcpy(v.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost)); return v;
}
static int failures = 0;
static void check(bool ok, const char* what) { if (!ok) { ++failures; printf("FAIL %s\n", what); } }

static pmkvq_segment seg_up(const Rows& r) {
    pmkvq_segment s;
    s.data = up(r.data); s.scale = (const pmkvq_u16*)up(r.scale); s.offset = (const pmkvq_u16*)up(r.offset);
    s.len = (int)r.len; s.bits = (int)r.bits; return s;
}

// Run decode attention; returns output (q_heads * d).
static std::vector<float> attend(const pmkvq_layer_view& v, const float* dq, int qh, int kvh, int d, int g, int ctx,
                                 int chunk, float* work, float* dout) {
    int total = ctx + (v.k_cur ? 1 : 0);
    int splits = (total + chunk - 1) / chunk;
    pmkvq_attn_decode<<<dim3(qh, splits), 32>>>(v, dq, qh, kvh, d, g, 1.0f / sqrtf((float)d), chunk, work);
    pmkvq_attn_combine<<<qh, 32>>>(work, splits, d, dout);
    CK(cudaGetLastError()); CK(cudaDeviceSynchronize());
    return down(dout, (size_t)qh * d);
}

int main(int argc, char** argv) {
    std::string dir = argc > 1 ? argv[1] : "gpu-vectors";
    cudaDeviceProp prop; CK(cudaGetDeviceProperties(&prop, 0));
    printf("# pmkvq kernel check on %s (sm_%d%d)\n\n", prop.name, prop.major, prop.minor);

    { // 1. quantize + pack
        Reader r(dir + "/quant.bin"); unsigned n = r.u32(); int bad_codes = 0, bad_params = 0;
        for (unsigned i = 0; i < n; ++i) {
            unsigned kvh = r.u32(), d = r.u32(), g = r.u32(), t = r.u32();
            auto x = r.f32s(); Rows want = read_rows(r);
            int groups = t * kvh * d / g;
            float* dx = up(x); unsigned char* dd; pmkvq_u16 *ds, *dof;
            CK(cudaMalloc(&dd, want.data.size())); CK(cudaMalloc(&ds, groups * 2)); CK(cudaMalloc(&dof, groups * 2));
            pmkvq_kv_quantize<<<(groups + 127) / 128, 128>>>(dx, groups, g, want.bits, dd, ds, dof);
            CK(cudaDeviceSynchronize());
            auto got = down(dd, want.data.size());
            auto gs = down((unsigned short*)ds, groups), go = down((unsigned short*)dof, groups);
            for (size_t j = 0; j < got.size(); ++j) bad_codes += got[j] != want.data[j];
            for (int j = 0; j < groups; ++j) bad_params += (gs[j] != want.scale[j]) + (go[j] != want.offset[j]);
            printf("quantize kv_heads %u d %u g %u tokens %u bits %2u: %s\n", kvh, d, g, t, want.bits,
                   got == want.data && gs == want.scale && go == want.offset ? "identical" : "DIFFERS");
            cudaFree(dx); cudaFree(dd); cudaFree(ds); cudaFree(dof);
        }
        check(bad_codes == 0 && bad_params == 0, "quantize equals the CPU bit for bit");
    }
    { // 2. shrink
        Reader r(dir + "/shrink.bin"); unsigned n = r.u32(); const char* names[] = {"ERS", "direct", "modified"};
        for (unsigned i = 0; i < n; ++i) {
            unsigned mode = r.u32(), g = r.u32(); Rows in = read_rows(r), want = read_rows(r);
            int groups = (int)in.scale.size();
            unsigned char* din = up(in.data); unsigned char* dout; CK(cudaMalloc(&dout, want.data.size()));
            unsigned short* ds = up(in.scale); unsigned short* dof = up(in.offset);
            pmkvq_kv_shrink<<<(groups + 127) / 128, 128>>>(din, groups, g, in.bits, mode, dout, (pmkvq_u16*)ds, (pmkvq_u16*)dof);
            CK(cudaDeviceSynchronize());
            bool same = down(dout, want.data.size()) == want.data && down(ds, groups) == want.scale &&
                        down(dof, groups) == want.offset;
            printf("shrink %-8s %2u -> %u bits, %d groups: %s\n", names[mode], in.bits, want.bits, groups,
                   same ? "identical" : "DIFFERS");
            check(same, "shrink equals the CPU bit for bit");
            cudaFree(din); cudaFree(dout); cudaFree(ds); cudaFree(dof);
        }
    }
    { // 3. attention
        Reader r(dir + "/attn.bin"); unsigned n = r.u32();
        float* work; CK(cudaMalloc(&work, (size_t)64 * 1024 * (2 + PMKVQ_MAX_HEAD_DIM) * 4));
        for (unsigned i = 0; i < n; ++i) {
            int qh = r.u32(), kvh = r.u32(), d = r.u32(), g = r.u32(), ctx = r.u32(), bits = r.u32();
            auto q = r.f32s(), kc = r.f32s(), vc = r.f32s();
            pmkvq_layer_view v;
            Rows rows[6]; for (auto& x : rows) x = read_rows(r);
            for (int s = 0; s < 3; ++s) { v.k[s] = seg_up(rows[s]); v.v[s] = seg_up(rows[3 + s]); }
            auto want = r.f32s();
            float* dq = up(q); v.k_cur = up(kc); v.v_cur = up(vc); float* dout; CK(cudaMalloc(&dout, want.size() * 4));
            double worst = 0;
            for (int chunk : {1 << 30, 256, 64}) {
                auto got = attend(v, dq, qh, kvh, d, g, ctx, chunk, work, dout);
                for (int h = 0; h < qh; ++h) {
                    double mx = 1e-6, err = 0;
                    for (int j = 0; j < d; ++j) mx = std::max(mx, (double)fabsf(want[h * d + j]));
                    for (int j = 0; j < d; ++j) err = std::max(err, (double)fabsf(got[h * d + j] - want[h * d + j]));
                    worst = std::max(worst, err / mx);
                }
            }
            printf("attention ctx %5d body %2d bits (plain and split-K): max rel err %.2e\n", ctx, bits, worst);
            check(worst <= 1e-3, "attention within 1e-3 relative of the CPU");
            for (int s = 0; s < 3; ++s) for (auto* sg : {&v.k[s], &v.v[s]}) {
                cudaFree((void*)sg->data); cudaFree((void*)sg->scale); cudaFree((void*)sg->offset); }
            cudaFree(dq); cudaFree((void*)v.k_cur); cudaFree((void*)v.v_cur); cudaFree(dout);
        }
        cudaFree(work);
    }
    { // 4. timings: one decode step's attention for one layer at 32k context, body at each width
        printf("\n## decode attention, one layer, 32768 tokens (sink 1, window 127, body 32640)\n\n");
        printf("| geometry | split-K chunk | body bits | median µs | vs 16-bit |\n|---|---|---|---|---|\n");
        struct Geo { int qh, kvh, d; const char* name; } geos[] = {{9, 3, 64, "SmolLM2-135M (9/3 heads, d 64)"},
                                                                   {32, 8, 128, "Llama-8B-like (32/8 heads, d 128)"}};
        for (auto geo : geos) for (int chunk : {64, 128, 256}) {
            int ctx = 32768, g = geo.d, body = ctx - 128;
            float base = 0;
            for (int bits : {16, 8, 4, 2}) {
                pmkvq_layer_view v;
                auto mk = [&](int len, int b) {
                    size_t groups = (size_t)len * geo.kvh;
                    std::vector<unsigned char> data(groups * g * b / 8);
                    for (size_t j = 0; j < data.size(); ++j) data[j] = (unsigned char)(j * 2654435761u >> 13);
                    std::vector<unsigned short> sc(groups, 0x2000), of(groups, 0xB800);
                    Rows r{(unsigned)b, (unsigned)len, data, sc, of}; return seg_up(r);
                };
                for (int s = 0; s < 2; ++s) {
                    pmkvq_segment* side = s == 0 ? v.k : v.v;
                    side[0] = mk(1, 16); side[1] = mk(body, bits); side[2] = mk(127, 16);
                }
                std::vector<float> q(geo.qh * geo.d, 0.01f), cur(geo.kvh * geo.d, 0.02f);
                float* dq = up(q); v.k_cur = up(cur); v.v_cur = up(cur);
                float *work, *dout; int splits = (ctx + 1 + chunk - 1) / chunk;
                CK(cudaMalloc(&work, (size_t)geo.qh * splits * (2 + geo.d) * 4)); CK(cudaMalloc(&dout, q.size() * 4));
                cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
                std::vector<float> times;
                for (int rep = 0; rep < 7; ++rep) {
                    cudaEventRecord(a);
                    for (int it = 0; it < 50; ++it) {
                        pmkvq_attn_decode<<<dim3(geo.qh, splits), 32>>>(v, dq, geo.qh, geo.kvh, geo.d, g,
                                                                        0.125f, chunk, work);
                        pmkvq_attn_combine<<<geo.qh, 32>>>(work, splits, geo.d, dout);
                    }
                    cudaEventRecord(b); CK(cudaEventSynchronize(b));
                    float ms; cudaEventElapsedTime(&ms, a, b); times.push_back(ms * 1000.0f / 50);
                }
                std::sort(times.begin(), times.end());
                float med = times[times.size() / 2];
                if (bits == 16) base = med;
                printf("| %s | %d | %d | %.1f | %.2fx |\n", geo.name, chunk, bits, med, base / med);
                if (bits == 2) check(med < base, "2-bit body faster than 16-bit at 32k");
                for (int s = 0; s < 3; ++s) for (auto* sg : {&v.k[s], &v.v[s]}) {
                    cudaFree((void*)sg->data); cudaFree((void*)sg->scale); cudaFree((void*)sg->offset); }
                cudaFree(dq); cudaFree((void*)v.k_cur); cudaFree((void*)v.v_cur); cudaFree(work); cudaFree(dout);
            }
        }
    }
    printf("\n%s\n", failures ? "SOME CHECKS FAILED" : "all checks passed");
    return failures ? 1 : 0;
}
