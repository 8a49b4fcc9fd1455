// Bilinear upsampling by an integer factor with align_corners = true, the mask head's last step
// (B*C planes of h x w -> (h*f) x (w*f)). The reference is the CPU op in src/nn/upsample.rs; these
// kernels repeat its arithmetic operation for operation so results match it bit for bit:
//   per axis  scale = (n_in - 1) / (n_out - 1) (0 when n_out == 1, computed on the host in f64),
//             src = d * scale, i0 = min(floor(src), n_in - 1), i1 = min(i0 + 1, n_in - 1),
//             w1 = src - i0 (all f64); the weights 1 - w1 and w1 are then rounded to the
//             accumulation type (f32, or f64 for f64 data).
//   value     (1-wy) * ((1-wx) X[y0,x0] + wx X[y0,x1]) + wy * ((1-wx) X[y1,x0] + wx X[y1,x1]).
// Every multiply/add goes through the _rn intrinsics so nvcc cannot contract them into FMAs (the
// CPU rounds each operation separately).
//
// Forward kernels: one thread writes V consecutive outputs of one row with one 16-byte store
// (V = 16 / sizeof(out)); `_s` variants store one element and serve widths not divisible by V.
// Epilogues fused into the same pass: identity (logits, optionally widened to f32), sigmoid, and
// sigmoid >= threshold -> u8 mask.
// Backward kernel (the adjoint): each low-resolution pixel gathers the weighted gradient of its
// output footprint, so there are no atomics; a block owns a tile of low-res columns of one low-res
// row, first sums its footprint rows per output column into shared memory, then sums columns.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace {

struct Tap {
  int i0, i1;
  double w1;
};

__device__ __forceinline__ Tap tap(int d, double scale, int n_in) {
  const double src = __dmul_rn((double)d, scale);
  const int lo = min((int)floor(src), n_in - 1);
  return {lo, min(lo + 1, n_in - 1), __dsub_rn(src, (double)lo)};
}

// Weight of input index s in output index d (both taps coincide at the last index).
__device__ __forceinline__ double weight(int d, int s, double scale, int n_in) {
  const Tap t = tap(d, scale, n_in);
  double w = 0.0;
  if (t.i0 == s) w = __dadd_rn(w, __dsub_rn(1.0, t.w1));
  if (t.i1 == s) w = __dadd_rn(w, t.w1);
  return w;
}

// First output index whose taps reach input index s, and one past the last (the CPU's
// `Taps::footprint`, by binary search over the same non-decreasing tap functions).
__device__ __forceinline__ int foot_start(int s, double scale, int n_in, int n_out) {
  int lo = 0, hi = n_out;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (tap(mid, scale, n_in).i1 < s) lo = mid + 1; else hi = mid;
  }
  return lo;
}
__device__ __forceinline__ int foot_end(int s, double scale, int n_in, int n_out) {
  int lo = 0, hi = n_out;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (tap(mid, scale, n_in).i0 <= s) lo = mid + 1; else hi = mid;
  }
  return max(lo, foot_start(s, scale, n_in, n_out));
}

__device__ __forceinline__ float mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add(double a, double b) { return __dadd_rn(a, b); }

__device__ __forceinline__ float widen(__half v) { return __half2float(v); }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ double widen(double v) { return v; }

__device__ __forceinline__ void narrow(float v, __half& o) { o = __float2half_rn(v); }
__device__ __forceinline__ void narrow(float v, __nv_bfloat16& o) { o = __float2bfloat16_rn(v); }
__device__ __forceinline__ void narrow(float v, float& o) { o = v; }
__device__ __forceinline__ void narrow(double v, double& o) { o = v; }

__device__ __forceinline__ float sigmoid(float v) { return 1.0f / (1.0f + expf(-v)); }
__device__ __forceinline__ double sigmoid(double v) { return 1.0 / (1.0 + exp(-v)); }

struct Logits {
  float thr;
  template <typename Acc, typename Out>
  __device__ __forceinline__ void operator()(Acc v, Out& o) const { narrow(v, o); }
};
struct Sigmoid {
  float thr;
  template <typename Acc, typename Out>
  __device__ __forceinline__ void operator()(Acc v, Out& o) const { narrow(sigmoid(v), o); }
};
struct Threshold {
  float thr;
  template <typename Acc>
  __device__ __forceinline__ void operator()(Acc v, uint8_t& o) const {
    o = sigmoid(v) >= (Acc)thr ? 1 : 0;
  }
};

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename In, typename Acc, typename Out, int V, typename Ep>
__device__ __forceinline__ void upsample_fwd(const In* __restrict__ src, Out* __restrict__ dst,
                                             int planes, int h, int w, int ho, int wo, double sy,
                                             double sx, Ep ep) {
  const int chunks = wo / V;
  const size_t total = (size_t)planes * ho * chunks;
  const size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= total) return;
  const int c = (int)(t % chunks);
  const size_t row = t / chunks;
  const int oy = (int)(row % ho);
  const size_t p = row / ho;
  const Tap ty = tap(oy, sy, h);
  const In* plane = src + p * h * w;
  const In* r0 = plane + (size_t)ty.i0 * w;
  const In* r1 = plane + (size_t)ty.i1 * w;
  const Acc a0 = (Acc)__dsub_rn(1.0, ty.w1), a1 = (Acc)ty.w1;
  Pack<Out, V> out;
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const Tap tx = tap(c * V + k, sx, w);
    const Acc b0 = (Acc)__dsub_rn(1.0, tx.w1), b1 = (Acc)tx.w1;
    const Acc top = add(mul(b0, (Acc)widen(r0[tx.i0])), mul(b1, (Acc)widen(r0[tx.i1])));
    const Acc bot = add(mul(b0, (Acc)widen(r1[tx.i0])), mul(b1, (Acc)widen(r1[tx.i1])));
    ep(add(mul(a0, top), mul(a1, bot)), out.v[k]);
  }
  reinterpret_cast<Pack<Out, V>*>(dst)[t] = out;
}

// grid.x = planes * h * ceil(w / TX) blocks; dynamic shared memory holds the vertical sums of the
// widest column span of any tile (computed on the host from the same taps).
template <typename In, typename Acc, int TX>
__device__ __forceinline__ void upsample_bwd(const In* __restrict__ g, In* __restrict__ dst,
                                             int planes, int h, int w, int ho, int wo, double sy,
                                             double sx) {
  extern __shared__ __align__(16) unsigned char smem[];
  Acc* col = reinterpret_cast<Acc*>(smem);
  const int tiles = (w + TX - 1) / TX;
  const int tile = blockIdx.x % tiles;
  const size_t py = blockIdx.x / tiles;  // plane * h + y
  const int y = (int)(py % h);
  const size_t p = py / h;
  const int x_first = tile * TX;
  const int x_last = min(x_first + TX, w) - 1;
  const int ys = foot_start(y, sy, h, ho), ye = foot_end(y, sy, h, ho);
  const int xs = foot_start(x_first, sx, w, wo), xe = foot_end(x_last, sx, w, wo);
  const In* plane = g + p * ho * wo;
  for (int i = threadIdx.x; i < xe - xs; i += blockDim.x) {
    const int ox = xs + i;
    Acc acc = 0;
    for (int oy = ys; oy < ye; ++oy) {
      const Acc wy = (Acc)weight(oy, y, sy, h);
      acc = add(acc, mul(wy, (Acc)widen(plane[(size_t)oy * wo + ox])));
    }
    col[i] = acc;
  }
  __syncthreads();
  const int x = x_first + (int)threadIdx.x;
  if ((int)threadIdx.x < TX && x <= x_last) {
    const int s = foot_start(x, sx, w, wo), e = foot_end(x, sx, w, wo);
    Acc acc = 0;
    for (int ox = s; ox < e; ++ox) acc = add(acc, mul((Acc)weight(ox, x, sx, w), col[ox - xs]));
    narrow(acc, dst[py * w + x]);
  }
}

}  // namespace

// Low-res columns per backward block (the host uses the same number to size shared memory).
#define BWD_TILE 32

#define FWD(NAME, IN, ACC, OUT, V, EP)                                                        \
  extern "C" __global__ void NAME(const IN* src, OUT* dst, int planes, int h, int w, int ho,  \
                                  int wo, double sy, double sx, float thr) {                  \
    upsample_fwd<IN, ACC, OUT, V>(src, dst, planes, h, w, ho, wo, sy, sx, EP{thr});           \
  }
// Vector (16-byte stores) and scalar variant of one kernel.
#define FWD2(NAME, IN, ACC, OUT, EP)                            \
  FWD(NAME##_v, IN, ACC, OUT, (int)(16 / sizeof(OUT)), EP)      \
  FWD(NAME##_s, IN, ACC, OUT, 1, EP)

FWD2(mask_up_f16_f16, __half, float, __half, Logits)
FWD2(mask_up_f16_f32, __half, float, float, Logits)
FWD2(mask_up_bf16_bf16, __nv_bfloat16, float, __nv_bfloat16, Logits)
FWD2(mask_up_bf16_f32, __nv_bfloat16, float, float, Logits)
FWD2(mask_up_f32_f32, float, float, float, Logits)
FWD2(mask_up_f64_f64, double, double, double, Logits)

FWD2(mask_up_sigmoid_f16, __half, float, __half, Sigmoid)
FWD2(mask_up_sigmoid_bf16, __nv_bfloat16, float, __nv_bfloat16, Sigmoid)
FWD2(mask_up_sigmoid_f32, float, float, float, Sigmoid)
FWD2(mask_up_sigmoid_f64, double, double, double, Sigmoid)

FWD2(mask_up_mask_f16, __half, float, uint8_t, Threshold)
FWD2(mask_up_mask_bf16, __nv_bfloat16, float, uint8_t, Threshold)
FWD2(mask_up_mask_f32, float, float, uint8_t, Threshold)
FWD2(mask_up_mask_f64, double, double, uint8_t, Threshold)

#define BWD(NAME, IN, ACC)                                                                  \
  extern "C" __global__ void NAME(const IN* g, IN* dst, int planes, int h, int w, int ho,   \
                                  int wo, double sy, double sx) {                           \
    upsample_bwd<IN, ACC, BWD_TILE>(g, dst, planes, h, w, ho, wo, sy, sx);                   \
  }

BWD(mask_up_grad_f16, __half, float)
BWD(mask_up_grad_bf16, __nv_bfloat16, float)
BWD(mask_up_grad_f32, float, float)
BWD(mask_up_grad_f64, double, double)
