// Dequantisation of the frozen base's ggml blocks (src/nn/quant.rs) straight to the compute
// dtype, one thread per output value: candle's CUDA path writes f32 and then casts, three times
// the traffic and an f32 copy of the weight in between. Each value is computed with the
// operations of candle's CPU `to_float` in its order (the _rn intrinsics keep nvcc from
// contracting them into FMAs), then rounded once, so the f32 output equals the CPU's bit for bit.
//
//   dequant_q4k   144-byte blocks of 256: f16 d, f16 dmin, 12 bytes of 6-bit scales and
//                 minimums, 128 bytes of 4-bit values; value = (d*sc)*q - dmin*m
//   dequant_q8_0  34-byte blocks of 32: f16 d, 32 int8; value = q*d
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace {

__device__ __forceinline__ void narrow(float v, float& o) { o = v; }
__device__ __forceinline__ void narrow(float v, __half& o) { o = __float2half_rn(v); }
__device__ __forceinline__ void narrow(float v, __nv_bfloat16& o) { o = __float2bfloat16_rn(v); }

__device__ __forceinline__ int64_t global_index() { return blockIdx.x * (int64_t)blockDim.x + threadIdx.x; }
__device__ __forceinline__ int64_t grid_stride() { return (int64_t)gridDim.x * blockDim.x; }

__device__ __forceinline__ float f16_at(const uint8_t* b) {
  return __half2float(__ushort_as_half((unsigned short)(b[0] | (b[1] << 8))));
}

template <typename T>
__device__ void q4k(const uint8_t* blocks, T* out, int64_t n) {
  for (int64_t e = global_index(); e < n; e += grid_stride()) {
    const uint8_t* b = blocks + (e / 256) * 144;
    const int r = (int)(e % 256), g = r / 64, hi = (r % 64) >= 32, k = r % 32, is = 2 * g + hi;
    const uint8_t* sc = b + 4;
    unsigned s, m;
    if (is < 4) {
      s = sc[is] & 63;
      m = sc[is + 4] & 63;
    } else {
      s = (sc[is + 4] & 0xF) | ((sc[is - 4] >> 6) << 4);
      m = (sc[is + 4] >> 4) | ((sc[is] >> 6) << 4);
    }
    const uint8_t q = b[16 + 32 * g + k];
    const unsigned v = hi ? (q >> 4) : (q & 0xF);
    const float d1 = __fmul_rn(f16_at(b), (float)s), m1 = __fmul_rn(f16_at(b + 2), (float)m);
    narrow(__fsub_rn(__fmul_rn(d1, (float)v), m1), out[e]);
  }
}

template <typename T>
__device__ void q8_0(const uint8_t* blocks, T* out, int64_t n) {
  for (int64_t e = global_index(); e < n; e += grid_stride()) {
    const uint8_t* b = blocks + (e / 32) * 34;
    narrow(__fmul_rn((float)(int8_t)b[2 + e % 32], f16_at(b)), out[e]);
  }
}

}  // namespace

#define DEQUANT(NAME, T, FN) \
  extern "C" __global__ void NAME(const uint8_t* blocks, T* out, int64_t n) { FN<T>(blocks, out, n); }

DEQUANT(dequant_q4k_f32, float, q4k)
DEQUANT(dequant_q4k_bf16, __nv_bfloat16, q4k)
DEQUANT(dequant_q4k_f16, __half, q4k)
DEQUANT(dequant_q8_0_f32, float, q8_0)
DEQUANT(dequant_q8_0_bf16, __nv_bfloat16, q8_0)
DEQUANT(dequant_q8_0_f16, __half, q8_0)
