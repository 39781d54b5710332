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
    pmkvq_quantize_group(x + (size_t)gi * g, g, bits, out + (size_t)gi * pmkvq_group_bytes(bits, g), scale + gi,
                         offset + gi);
}
