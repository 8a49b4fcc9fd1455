// Row-wise and element-wise kernels of the fused ops in src/nn/fused.rs and src/nn/softmax.rs,
// each replacing a chain of candle kernels with one pass. Storage in bf16/f16/f32, all math in
// f32, one rounding to the storage type at the end. The CPU references are the composites in
// those files; these kernels follow their operation order (through the _rn intrinsics, so nvcc
// cannot contract into FMAs) but sum in another order, so results agree to rounding, not bits.
//
// Row kernels run one block per row (gridDim.x = rows), blockDim.x a multiple of 32 (<= 1024);
// each thread strides over the row, so any row length works. Reductions: a butterfly warp
// shuffle (full mask: every lane of every warp takes part, no thread returns early), one value
// per warp through shared memory, then every warp reduces those values the same way, so all
// threads get the same result with no broadcast step.
//
//   softmax_fwd   y = softmax(scale * x + m) over the last dim, m the additive mask (broadcast
//                 rows via RowMap), or `fill` where causal masking hides key j from query
//                 i = row % q_len (j > i + past). A row whose entries are all -inf gives zeros.
//   softmax_bwd   dx = ((g - sum(g * p)) * p) * scale
//   rms_fwd       y = x / sqrt(sum(x^2) * inv_n + eps)
//   rms_bwd       r = 1 / sqrt(sum(x^2) * inv_n + eps), y = x r: dx = (g - y * mean(g y)) * r
//   silu_mul_fwd  y = silu(a) * u, silu(a) = a / (1 + exp(-a))
//   silu_mul_bwd  d_gate = g * u * s (1 + a (1 - s)), d_up = g * silu(a), s = sigmoid(a);
//                 written as one (2, n) output: d_gate first, then d_up.
//   gelu_erf_bwd  dx = g * (0.5 + 0.398942 x exp(-x^2 / 2) + 0.5 erf(x / sqrt(2)))
//   rope_heads_fwd  y[b,h,t,j] = x[b,t,h*D+j] cos[b,t,j] + r sin[b,t,j], r = -x[.., j+D/2] for
//                 j < D/2, x[.., j-D/2] otherwise: a projection's rows split into heads and
//                 rotated (src/nn/rope.rs); one thread per output element.
//   rope_heads_bwd  its transpose: dx[b,t,h*D+j] = g[b,h,t,j] cos[b,t,j] + (g[.., j+D/2]
//                 sin[b,t,j+D/2] for j < D/2, -(g[.., j-D/2] sin[b,t,j-D/2]) otherwise).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <stdint.h>

// How row r of the scores (leading dimensions flattened, row-major) finds its mask row: the
// scores' leading dimensions (front-padded with 1) and the mask's element strides along them
// (0 where the mask broadcasts), and the mask's stride along the last dimension (1 or 0).
// Mirrored by `RowMap` in src/kernels/mod.rs (repr(C), 9 x i64).
struct RowMap {
  int64_t dims[4];
  int64_t strides[4];
  int64_t last;
};

namespace {

__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ float widen(__half v) { return __half2float(v); }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ void narrow(float v, float& o) { o = v; }
__device__ __forceinline__ void narrow(float v, __half& o) { o = __float2half_rn(v); }
__device__ __forceinline__ void narrow(float v, __nv_bfloat16& o) { o = __float2bfloat16_rn(v); }

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v = __fadd_rn(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide max (MAX) or sum of v; every thread of the block must call it.
template <bool MAX>
__device__ __forceinline__ float block_reduce(float v, float* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = MAX ? warp_max(v) : warp_sum(v);
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = lane < warps ? smem[lane] : (MAX ? -INFINITY : 0.0f);
  v = MAX ? warp_max(v) : warp_sum(v);
  __syncthreads();  // before the next reduction overwrites smem
  return v;
}

__device__ __forceinline__ int64_t mask_row(const RowMap& m, int64_t r) {
  int64_t off = 0;
  for (int d = 3; d >= 0; --d) {
    off += (r % m.dims[d]) * m.strides[d];
    r /= m.dims[d];
  }
  return off;
}

template <typename T, typename M>
__device__ void softmax_fwd(const T* __restrict__ x, const M* __restrict__ mask, T* __restrict__ y, int n,
                            float scale, int has_mask, RowMap map, int causal, int q_len, int past, float fill) {
  __shared__ float smem[32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * n;
  T* yr = y + row * n;
  const M* mr = has_mask ? mask + mask_row(map, row) : nullptr;
  // Keys after `limit` are hidden by causal masking.
  const int limit = causal ? (int)(row % q_len) + past : n;
  auto val = [&](int j) {
    float v = widen(xr[j]);
    if (scale != 1.0f) v = __fmul_rn(v, scale);
    if (j > limit) return __fadd_rn(v, fill);
    return mr ? __fadd_rn(v, widen(mr[j * map.last])) : v;
  };
  float mx = -INFINITY;
  for (int j = threadIdx.x; j < n; j += blockDim.x) mx = fmaxf(mx, val(j));
  mx = block_reduce<true>(mx, smem);
  float s = 0.0f;
  if (mx != -INFINITY)
    for (int j = threadIdx.x; j < n; j += blockDim.x) s = __fadd_rn(s, expf(__fsub_rn(val(j), mx)));
  s = block_reduce<false>(s, smem);
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    const float p = mx == -INFINITY ? 0.0f : __fdiv_rn(expf(__fsub_rn(val(j), mx)), s);
    narrow(p, yr[j]);
  }
}

template <typename T>
__device__ void softmax_bwd(const T* __restrict__ p, const T* __restrict__ g, T* __restrict__ dx, int n,
                            float scale) {
  __shared__ float smem[32];
  const int64_t off = (int64_t)blockIdx.x * n;
  float dot = 0.0f;
  for (int j = threadIdx.x; j < n; j += blockDim.x) dot = __fadd_rn(dot, __fmul_rn(widen(g[off + j]), widen(p[off + j])));
  dot = block_reduce<false>(dot, smem);
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    float d = __fmul_rn(__fsub_rn(widen(g[off + j]), dot), widen(p[off + j]));
    if (scale != 1.0f) d = __fmul_rn(d, scale);
    narrow(d, dx[off + j]);
  }
}

template <typename T>
__device__ void rms_fwd(const T* __restrict__ x, T* __restrict__ y, int n, float inv_n, float eps) {
  __shared__ float smem[32];
  const int64_t off = (int64_t)blockIdx.x * n;
  float ss = 0.0f;
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    const float v = widen(x[off + j]);
    ss = __fadd_rn(ss, __fmul_rn(v, v));
  }
  ss = block_reduce<false>(ss, smem);
  const float rms = sqrtf(__fadd_rn(__fmul_rn(ss, inv_n), eps));
  for (int j = threadIdx.x; j < n; j += blockDim.x) narrow(__fdiv_rn(widen(x[off + j]), rms), y[off + j]);
}

template <typename T>
__device__ void rms_bwd(const T* __restrict__ x, const T* __restrict__ g, T* __restrict__ dx, int n, float inv_n,
                        float eps) {
  __shared__ float smem[32];
  const int64_t off = (int64_t)blockIdx.x * n;
  float ss = 0.0f, gx = 0.0f;
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    const float v = widen(x[off + j]);
    ss = __fadd_rn(ss, __fmul_rn(v, v));
    gx = __fadd_rn(gx, __fmul_rn(widen(g[off + j]), v));
  }
  ss = block_reduce<false>(ss, smem);
  gx = block_reduce<false>(gx, smem);
  const float r = __frcp_rn(sqrtf(__fadd_rn(__fmul_rn(ss, inv_n), eps)));
  // mean(g * y) with y = x r.
  const float gy = __fmul_rn(__fmul_rn(gx, r), inv_n);
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    const float yj = __fmul_rn(widen(x[off + j]), r);
    narrow(__fmul_rn(__fsub_rn(widen(g[off + j]), __fmul_rn(yj, gy)), r), dx[off + j]);
  }
}

__device__ __forceinline__ float sigmoid(float a) { return __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-a))); }

template <typename T>
__device__ void silu_mul_fwd(const T* __restrict__ a, const T* __restrict__ u, T* __restrict__ y, int64_t n) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const float av = widen(a[i]);
    const float silu = __fdiv_rn(av, __fadd_rn(1.0f, expf(-av)));
    narrow(__fmul_rn(silu, widen(u[i])), y[i]);
  }
}

template <typename T>
__device__ void silu_mul_bwd(const T* __restrict__ a, const T* __restrict__ u, const T* __restrict__ g,
                             T* __restrict__ out, int64_t n) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const float av = widen(a[i]), gv = widen(g[i]);
    const float s = sigmoid(av);
    const float dsilu = __fmul_rn(s, __fadd_rn(__fmul_rn(av, __fsub_rn(1.0f, s)), 1.0f));
    narrow(__fmul_rn(__fmul_rn(gv, widen(u[i])), dsilu), out[i]);
    narrow(__fmul_rn(gv, __fmul_rn(av, s)), out[n + i]);
  }
}

}  // namespace

#define SOFTMAX_FWD(NAME, T, M)                                                                              \
  extern "C" __global__ void NAME(const T* x, const M* mask, T* y, int n, float scale, int has_mask,         \
                                  RowMap map, int causal, int q_len, int past, float fill) {                 \
    softmax_fwd<T, M>(x, mask, y, n, scale, has_mask, map, causal, q_len, past, fill);                      \
  }
SOFTMAX_FWD(softmax_fwd_f32, float, float)
SOFTMAX_FWD(softmax_fwd_bf16, __nv_bfloat16, __nv_bfloat16)
SOFTMAX_FWD(softmax_fwd_bf16_mf32, __nv_bfloat16, float)
SOFTMAX_FWD(softmax_fwd_f16, __half, __half)
SOFTMAX_FWD(softmax_fwd_f16_mf32, __half, float)

template <typename T>
__device__ void gelu_erf_bwd(const T* __restrict__ x, const T* __restrict__ g, T* __restrict__ dx, int64_t n) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const float xv = widen(x[i]);
    const float d = 0.5f + 0.398942f * expf(-0.5f * xv * xv) * xv + 0.5f * erff(xv * 0.70710678118654752f);
    narrow(__fmul_rn(widen(g[i]), d), dx[i]);
  }
}

template <typename T>
__device__ void rope_heads_fwd(const T* x, const T* cos, const T* sin, T* y, int64_t n, int heads, int t_len, int dim) {
  const int half = dim / 2;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const int j = (int)(i % dim);
    int64_t r = i / dim;
    const int64_t t = r % t_len;
    r /= t_len;
    const int64_t h = r % heads, b = r / heads;
    const int64_t bt = b * t_len + t;
    const T* row = x + bt * heads * dim + h * dim;
    const float p = j < half ? -widen(row[j + half]) : widen(row[j - half]);
    narrow(__fadd_rn(__fmul_rn(widen(row[j]), widen(cos[bt * dim + j])), __fmul_rn(p, widen(sin[bt * dim + j]))), y[i]);
  }
}

template <typename T>
__device__ void rope_heads_bwd(const T* g, const T* cos, const T* sin, T* dx, int64_t n, int heads, int t_len, int dim) {
  const int half = dim / 2;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t bt = i / ((int64_t)heads * dim);
    const int hd = (int)(i % ((int64_t)heads * dim));
    const int h = hd / dim, j = hd % dim;
    const int64_t b = bt / t_len, t = bt % t_len;
    const T* gr = g + ((b * heads + h) * t_len + t) * dim;
    const T* c = cos + bt * dim;
    const T* s = sin + bt * dim;
    const float r = j < half ? __fmul_rn(widen(gr[j + half]), widen(s[j + half]))
                             : -__fmul_rn(widen(gr[j - half]), widen(s[j - half]));
    narrow(__fadd_rn(__fmul_rn(widen(gr[j]), widen(c[j])), r), dx[i]);
  }
}

#define ROW_KERNELS(TAG, T)                                                                                  \
  extern "C" __global__ void softmax_bwd_##TAG(const T* p, const T* g, T* dx, int n, float scale) {          \
    softmax_bwd<T>(p, g, dx, n, scale);                                                                      \
  }                                                                                                          \
  extern "C" __global__ void rms_fwd_##TAG(const T* x, T* y, int n, float inv_n, float eps) {                \
    rms_fwd<T>(x, y, n, inv_n, eps);                                                                         \
  }                                                                                                          \
  extern "C" __global__ void rms_bwd_##TAG(const T* x, const T* g, T* dx, int n, float inv_n, float eps) {   \
    rms_bwd<T>(x, g, dx, n, inv_n, eps);                                                                     \
  }                                                                                                          \
  extern "C" __global__ void silu_mul_fwd_##TAG(const T* a, const T* u, T* y, int64_t n) {                   \
    silu_mul_fwd<T>(a, u, y, n);                                                                             \
  }                                                                                                          \
  extern "C" __global__ void silu_mul_bwd_##TAG(const T* a, const T* u, const T* g, T* out, int64_t n) {      \
    silu_mul_bwd<T>(a, u, g, out, n);                                                                        \
  }                                                                                                          \
  extern "C" __global__ void gelu_erf_bwd_##TAG(const T* x, const T* g, T* dx, int64_t n) {                   \
    gelu_erf_bwd<T>(x, g, dx, n);                                                                            \
  }                                                                                                          \
  extern "C" __global__ void rope_heads_fwd_##TAG(const T* x, const T* c, const T* s, T* y, int64_t n,        \
                                                  int heads, int t_len, int dim) {                          \
    rope_heads_fwd<T>(x, c, s, y, n, heads, t_len, dim);                                                     \
  }                                                                                                          \
  extern "C" __global__ void rope_heads_bwd_##TAG(const T* g, const T* c, const T* s, T* dx, int64_t n,       \
                                                  int heads, int t_len, int dim) {                          \
    rope_heads_bwd<T>(g, c, s, dx, n, heads, t_len, dim);                                                    \
  }
ROW_KERNELS(f32, float)
ROW_KERNELS(bf16, __nv_bfloat16)
ROW_KERNELS(f16, __half)
