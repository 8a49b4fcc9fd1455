// Inverted dropout with a counter-based mask: element i of a contiguous tensor is kept when
// the top 32 bits of splitmix64(seed + (i + 1) * golden) are below `threshold` (keep * 2^32),
// and then scaled by 1 / keep. The mask is a pure function of (seed, i), so the CPU reference
// in src/nn/dropout.rs draws the same one, nothing is stored for backward (the backward applies
// the same op to the gradient), and no host RNG or transfer sits in the training step.
// The scale is applied in f32 and rounded once to the storage type, as on the CPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace {

__device__ __forceinline__ bool keep(uint64_t seed, uint64_t i, uint64_t threshold) {
  uint64_t z = seed + (i + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return (z >> 32) < threshold;
}

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
__device__ void dropout(const T* x, T* y, uint64_t n, uint64_t seed, uint64_t threshold, float scale) {
  const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
  for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    y[i] = keep(seed, i, threshold) ? from_f<T>(__fmul_rn(to_f(x[i]), scale)) : from_f<T>(0.0f);
  }
}

__device__ void dropout_f64_impl(const double* x, double* y, uint64_t n, uint64_t seed, uint64_t threshold, double scale) {
  const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
  for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    y[i] = keep(seed, i, threshold) ? __dmul_rn(x[i], scale) : 0.0;
  }
}

}  // namespace

extern "C" __global__ void dropout_f32(const float* x, float* y, uint64_t n, uint64_t seed, uint64_t threshold, float scale) {
  dropout(x, y, n, seed, threshold, scale);
}
extern "C" __global__ void dropout_f16(const __half* x, __half* y, uint64_t n, uint64_t seed, uint64_t threshold, float scale) {
  dropout(x, y, n, seed, threshold, scale);
}
extern "C" __global__ void dropout_bf16(const __nv_bfloat16* x, __nv_bfloat16* y, uint64_t n, uint64_t seed, uint64_t threshold, float scale) {
  dropout(x, y, n, seed, threshold, scale);
}
extern "C" __global__ void dropout_f64(const double* x, double* y, uint64_t n, uint64_t seed, uint64_t threshold, double scale) {
  dropout_f64_impl(x, y, n, seed, threshold, scale);
}
