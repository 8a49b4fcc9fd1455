// Depthwise k x k convolution (one filter per channel, any stride and zero padding) for
// src/nn/depthwise.rs: forward, input gradient and kernel gradient, one pass each over the
// map instead of the k*k shifted products and partial sums of a composite. Storage in
// bf16/f16/f32, math in f32. The CPU kernels in src/nn/depthwise.rs add the same products in
// the same order (taps ky-major, through the _rn intrinsics so nvcc cannot contract into FMAs),
// so in f32 the forward and the input gradient agree with the CPU bit for bit; the kernel
// gradient sums in another order.
//
//   dw_fwd        y[p, oy, ox] = sum_{ky,kx} x[p, oy*s + ky - pad, ox*s + kx - pad] * w[c, ky, kx]
//                 (p = b*C + c; taps outside the map read zero). One thread per output element.
//   dw_bwd_input  dx[p, iy, ix] = sum_{ky,kx} dy[p, oy, ox] * w[c, ky, kx] over the taps with
//                 oy*s + ky - pad = iy and ox*s + kx - pad = ix. One thread per input element.
//   dw_bwd_weight_part  partial[(c*k*k + t)*splits + sp] = sum of dy * x over split sp of the
//                 (b, oy, ox) of channel c and tap t (f32); one block per (c*k*k + t, sp).
//   dw_bwd_weight_sum   dw[c*k*k + t] = sum over sp of the partials, in order: deterministic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

// Mirrored by `DwGeom` in src/kernels/mod.rs (repr(C), 9 x i64).
struct DwGeom {
  int64_t b, c, h, w, ho, wo, k, stride, pad;
};

namespace {

__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ float widen(__half v) { return __half2float(v); }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ void narrow(float v, float& o) { o = v; }
__device__ __forceinline__ void narrow(float v, __half& o) { o = __float2half_rn(v); }
__device__ __forceinline__ void narrow(float v, __nv_bfloat16& o) { o = __float2bfloat16_rn(v); }

__device__ __forceinline__ int64_t global_index() { return blockIdx.x * (int64_t)blockDim.x + threadIdx.x; }
__device__ __forceinline__ int64_t grid_stride() { return (int64_t)gridDim.x * blockDim.x; }

template <typename T>
__device__ void dw_fwd(const T* x, const T* w, T* y, DwGeom g) {
  const int64_t n = g.b * g.c * g.ho * g.wo;
  for (int64_t i = global_index(); i < n; i += grid_stride()) {
    const int64_t ox = i % g.wo, r = i / g.wo;
    const int64_t oy = r % g.ho, plane = r / g.ho;
    const T* xp = x + plane * g.h * g.w;
    const T* wp = w + (plane % g.c) * g.k * g.k;
    float acc = 0.f;
    for (int64_t ky = 0; ky < g.k; ++ky) {
      const int64_t iy = oy * g.stride + ky - g.pad;
      if (iy < 0 || iy >= g.h) continue;
      for (int64_t kx = 0; kx < g.k; ++kx) {
        const int64_t ix = ox * g.stride + kx - g.pad;
        if (ix < 0 || ix >= g.w) continue;
        acc = __fadd_rn(acc, __fmul_rn(widen(xp[iy * g.w + ix]), widen(wp[ky * g.k + kx])));
      }
    }
    narrow(acc, y[i]);
  }
}

template <typename T>
__device__ void dw_bwd_input(const T* dy, const T* w, T* dx, DwGeom g) {
  const int64_t n = g.b * g.c * g.h * g.w;
  for (int64_t i = global_index(); i < n; i += grid_stride()) {
    const int64_t ix = i % g.w, r = i / g.w;
    const int64_t iy = r % g.h, plane = r / g.h;
    const T* gp = dy + plane * g.ho * g.wo;
    const T* wp = w + (plane % g.c) * g.k * g.k;
    float acc = 0.f;
    for (int64_t ky = 0; ky < g.k; ++ky) {
      const int64_t ty = iy + g.pad - ky;
      if (ty < 0 || ty % g.stride != 0 || ty / g.stride >= g.ho) continue;
      for (int64_t kx = 0; kx < g.k; ++kx) {
        const int64_t tx = ix + g.pad - kx;
        if (tx < 0 || tx % g.stride != 0 || tx / g.stride >= g.wo) continue;
        acc = __fadd_rn(acc, __fmul_rn(widen(gp[(ty / g.stride) * g.wo + tx / g.stride]), widen(wp[ky * g.k + kx])));
      }
    }
    narrow(acc, dx[i]);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v = __fadd_rn(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// blockDim.x is a multiple of 32 (<= 1024); every thread reaches the reduction.
template <typename T>
__device__ void dw_bwd_weight_part(const T* x, const T* dy, float* partial, DwGeom g) {
  __shared__ float smem[32];
  const int64_t kk = g.k * g.k;
  const int64_t ct = blockIdx.x, c = ct / kk, t = ct % kk;
  const int64_t ky = t / g.k, kx = t % g.k;
  const int64_t sp = blockIdx.y, splits = gridDim.y;
  const int64_t per_plane = g.ho * g.wo, n = g.b * per_plane;
  const int64_t chunk = (n + splits - 1) / splits;
  const int64_t lo = sp * chunk, hi = min(n, lo + chunk);
  float acc = 0.f;
  for (int64_t j = lo + threadIdx.x; j < hi; j += blockDim.x) {
    const int64_t b = j / per_plane, o = j % per_plane;
    const int64_t oy = o / g.wo, ox = o % g.wo;
    const int64_t iy = oy * g.stride + ky - g.pad, ix = ox * g.stride + kx - g.pad;
    if (iy < 0 || iy >= g.h || ix < 0 || ix >= g.w) continue;
    const int64_t plane = b * g.c + c;
    acc = __fadd_rn(acc, __fmul_rn(widen(dy[plane * per_plane + o]), widen(x[(plane * g.h + iy) * g.w + ix])));
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  acc = warp_sum(acc);
  if (lane == 0) smem[warp] = acc;
  __syncthreads();
  if (warp == 0) {
    float v = lane < warps ? smem[lane] : 0.f;
    v = warp_sum(v);
    if (lane == 0) partial[ct * splits + sp] = v;
  }
}

template <typename T>
__device__ void dw_bwd_weight_sum(const float* partial, T* dw, int64_t taps, int64_t splits) {
  for (int64_t i = global_index(); i < taps; i += grid_stride()) {
    float acc = 0.f;
    for (int64_t s = 0; s < splits; ++s) acc = __fadd_rn(acc, partial[i * splits + s]);
    narrow(acc, dw[i]);
  }
}

}  // namespace

#define DEPTHWISE_KERNELS(TAG, T)                                                                            \
  extern "C" __global__ void dw_fwd_##TAG(const T* x, const T* w, T* y, DwGeom g) { dw_fwd<T>(x, w, y, g); } \
  extern "C" __global__ void dw_bwd_input_##TAG(const T* dy, const T* w, T* dx, DwGeom g) {                  \
    dw_bwd_input<T>(dy, w, dx, g);                                                                           \
  }                                                                                                          \
  extern "C" __global__ void dw_bwd_weight_part_##TAG(const T* x, const T* dy, float* partial, DwGeom g) {   \
    dw_bwd_weight_part<T>(x, dy, partial, g);                                                                \
  }                                                                                                          \
  extern "C" __global__ void dw_bwd_weight_sum_##TAG(const float* partial, T* dw, int64_t taps,             \
                                                     int64_t splits) {                                      \
    dw_bwd_weight_sum<T>(partial, dw, taps, splits);                                                         \
  }
DEPTHWISE_KERNELS(f32, float)
DEPTHWISE_KERNELS(bf16, __nv_bfloat16)
DEPTHWISE_KERNELS(f16, __half)
