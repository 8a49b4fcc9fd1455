// Bilinear upsampling by an integer factor with align_corners = true, the mask head's last step
// (B*C planes of h x w -> (h*f) x (w*f)). The reference is the CPU op in src/nn/upsample.rs; these
// kernels repeat its arithmetic operation for operation so results match it bit for bit (except
// the sigmoid and threshold epilogues: CUDA's expf is not correctly rounded):
//   per axis  scale = (n_in - 1) / (n_out - 1) (0 when n_out == 1, computed on the host in f64),
//             src = d * scale, i0 = min(floor(src), n_in - 1), i1 = min(i0 + 1, n_in - 1),
//             w1 = src - i0 (all f64); the weights 1 - w1 and w1 are then rounded to the
//             accumulation type (f32, or f64 for f64 data).
//   value     (1-wy) * ((1-wx) X[y0,x0] + wx X[y0,x1]) + wy * ((1-wx) X[y1,x0] + wx X[y1,x1]).
// Every multiply/add goes through the _rn intrinsics so nvcc cannot contract them into FMAs (the
// CPU rounds each operation separately).
//
// The f64 tap arithmetic (a multiply, a floor and four conversions; 64-bit conversions run at an
// eighth of the f32 rate on sm_90) is done once per thread and axis index, not per output element.
// Forward kernels: a thread owns V consecutive output columns (one vector store per row, V = 16 /
// sizeof(out) but at most 8), computes their taps once into registers, then writes those columns
// for several rows (one y tap per row, shared by its V outputs). `_s` variants (V = 1) serve
// widths not divisible by V. Blocks are 2-D (columns x rows) and the grid is (column blocks, row
// blocks, planes), so no thread divides a 64-bit index. Epilogues fused into the same pass:
// identity (logits, optionally widened to f32), sigmoid, and sigmoid >= threshold -> u8 mask.
// Backward (the adjoint, as a gather: each low-resolution pixel sums the weighted gradient of its
// output footprint, so there are no atomics): `mask_up_taps_*` first writes both axes' tap tables
// (per output index: first tap and the adjoint's two weights; per input index: its footprint), then
// a block owns a tile of low-res columns of one low-res row, sums its footprint rows per output
// column into shared memory (coalesced reads of the gradient), then sums columns, in the CPU's order.
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
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= chunks) return;
  int x0[V];  // the second tap is min(x0 + 1, w - 1), recomputed: registers are the limit here
  Acc b0[V], b1[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const Tap tx = tap(c * V + k, sx, w);
    x0[k] = tx.i0;
    b0[k] = (Acc)__dsub_rn(1.0, tx.w1);
    b1[k] = (Acc)tx.w1;
  }
  const int row_step = gridDim.y * blockDim.y;
  for (int p = blockIdx.z; p < planes; p += gridDim.z) {
    const In* plane = src + (size_t)p * h * w;
    Pack<Out, V>* out_plane = reinterpret_cast<Pack<Out, V>*>(dst + (size_t)p * ho * wo);
    for (int oy = blockIdx.y * blockDim.y + threadIdx.y; oy < ho; oy += row_step) {
      const Tap ty = tap(oy, sy, h);
      const In* r0 = plane + (size_t)ty.i0 * w;
      const In* r1 = plane + (size_t)ty.i1 * w;
      const Acc a0 = (Acc)__dsub_rn(1.0, ty.w1), a1 = (Acc)ty.w1;
      Pack<Out, V> out;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const int x1 = min(x0[k] + 1, w - 1);
        const Acc top = add(mul(b0[k], (Acc)widen(r0[x0[k]])), mul(b1[k], (Acc)widen(r0[x1])));
        const Acc bot = add(mul(b0[k], (Acc)widen(r1[x0[k]])), mul(b1[k], (Acc)widen(r1[x1])));
        ep(add(mul(a0, top), mul(a1, bot)), out.v[k]);
      }
      out_plane[(size_t)oy * chunks + c] = out;
    }
  }
}

// One axis's tap table, laid out in a byte buffer (16-byte aligned arrays; the host sizes the
// buffer with the same rule, `axis_table_bytes` in src/kernels/plan.rs):
//   i0[n_out]            first tap of each output index
//   g0[n_out], g1[n_out] the adjoint's weights of inputs i0 and i1 (Taps::weight: their sum
//                        when both taps coincide), rounded to Acc
//   fs[n_in], fe[n_in]   footprint of each input index: the outputs [fs, fe) that read it
template <typename Acc>
struct AxisTable {
  int* i0;
  Acc* g0;
  Acc* g1;
  int* fs;
  int* fe;
};

__device__ __forceinline__ size_t align16(size_t n) { return (n + 15) & ~(size_t)15; }

template <typename Acc>
__device__ __forceinline__ AxisTable<Acc> axis_table(unsigned char* base, int n_in, int n_out,
                                                     size_t* bytes) {
  AxisTable<Acc> t;
  size_t off = 0;
  t.i0 = reinterpret_cast<int*>(base + off);
  off = align16(off + sizeof(int) * n_out);
  t.g0 = reinterpret_cast<Acc*>(base + off);
  off = align16(off + sizeof(Acc) * n_out);
  t.g1 = reinterpret_cast<Acc*>(base + off);
  off = align16(off + sizeof(Acc) * n_out);
  t.fs = reinterpret_cast<int*>(base + off);
  off = align16(off + sizeof(int) * n_in);
  t.fe = reinterpret_cast<int*>(base + off);
  off = align16(off + sizeof(int) * n_in);
  *bytes = off;
  return t;
}

// The y table at the start of `tabs`, the x table right after it.
template <typename Acc>
__device__ __forceinline__ void tables(unsigned char* tabs, int h, int w, int ho, int wo,
                                       AxisTable<Acc>* ty, AxisTable<Acc>* tx) {
  size_t ybytes, xbytes;
  *ty = axis_table<Acc>(tabs, h, ho, &ybytes);
  *tx = axis_table<Acc>(tabs + ybytes, w, wo, &xbytes);
}

template <typename Acc>
__device__ __forceinline__ void fill_axis(AxisTable<Acc> t, int i, int n_in, int n_out,
                                          double scale) {
  if (i < n_out) {
    const Tap k = tap(i, scale, n_in);
    t.i0[i] = k.i0;
    t.g0[i] = (Acc)weight(i, k.i0, scale, n_in);
    t.g1[i] = (Acc)weight(i, k.i1, scale, n_in);
  }
  if (i < n_in) {
    t.fs[i] = foot_start(i, scale, n_in, n_out);
    t.fe[i] = foot_end(i, scale, n_in, n_out);
  }
}

// One thread per index of the longer axis (outputs outnumber inputs on both axes).
template <typename Acc>
__device__ __forceinline__ void build_tables(unsigned char* tabs, int h, int w, int ho, int wo,
                                             double sy, double sx) {
  AxisTable<Acc> ty, tx;
  tables<Acc>(tabs, h, w, ho, wo, &ty, &tx);
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  fill_axis(ty, i, h, ho, sy);
  fill_axis(tx, i, w, wo, sx);
}

// Weight of input s in output d, for d in s's footprint (so s is d's first or second tap).
template <typename Acc>
__device__ __forceinline__ Acc adjoint_weight(const AxisTable<Acc>& t, int d, int s) {
  return t.i0[d] == s ? t.g0[d] : t.g1[d];
}

// grid = (ceil(w / tile), low-res rows, planes), both strided; dynamic shared memory holds the
// vertical sums of the widest output-column span of any tile (the host computes it from the CPU
// taps and picks `tile` so that it fits).
template <typename In, typename Acc>
__device__ __forceinline__ void upsample_bwd(const In* __restrict__ g, In* __restrict__ dst,
                                             unsigned char* tabs, int planes, int h, int w,
                                             int ho, int wo, int tile) {
#ifndef PRS_KERNEL_EMU  // the CPU emulation (tests/kernel_emu) provides the dynamic shared memory
  extern __shared__ __align__(16) unsigned char smem[];
#endif
  Acc* col = reinterpret_cast<Acc*>(smem);
  AxisTable<Acc> ty, tx;
  tables<Acc>(tabs, h, w, ho, wo, &ty, &tx);
  const int x_first = blockIdx.x * tile;
  const int x_last = min(x_first + tile, w) - 1;
  const int xs = tx.fs[x_first], xe = tx.fe[x_last];
  for (int p = blockIdx.z; p < planes; p += gridDim.z) {
    const In* plane = g + (size_t)p * ho * wo;
    for (int y = blockIdx.y; y < h; y += gridDim.y) {
      const int ys = ty.fs[y], ye = ty.fe[y];
      for (int i = threadIdx.x; i < xe - xs; i += blockDim.x) {
        const In* column = plane + xs + i;
        Acc acc = 0;
        for (int oy = ys; oy < ye; ++oy) {
          acc = add(acc, mul(adjoint_weight(ty, oy, y), (Acc)widen(column[(size_t)oy * wo])));
        }
        col[i] = acc;
      }
      __syncthreads();
      for (int x = x_first + (int)threadIdx.x; x <= x_last; x += blockDim.x) {
        const int s = tx.fs[x], e = tx.fe[x];
        Acc acc = 0;
        for (int ox = s; ox < e; ++ox) {
          acc = add(acc, mul(adjoint_weight(tx, ox, x), col[ox - xs]));
        }
        narrow(acc, dst[((size_t)p * h + y) * w + x]);
      }
      __syncthreads();  // the next row rewrites `col`
    }
  }
}

}  // namespace

#define FWD(NAME, IN, ACC, OUT, V, EP)                                                        \
  extern "C" __global__ void NAME(const IN* src, OUT* dst, int planes, int h, int w, int ho,  \
                                  int wo, double sy, double sx, float thr) {                  \
    upsample_fwd<IN, ACC, OUT, V>(src, dst, planes, h, w, ho, wo, sy, sx, EP{thr});           \
  }
// Vector (V = min(16 / sizeof(out), 8) elements per store: 16 bytes, or 8 for the u8 mask, whose
// 16 columns of taps per thread cost 136 registers) and scalar variant of one kernel.
#define FWD2(NAME, IN, ACC, OUT, EP)                                                 \
  FWD(NAME##_v, IN, ACC, OUT, (int)(16 / sizeof(OUT) < 8 ? 16 / sizeof(OUT) : 8), EP) \
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

extern "C" __global__ void mask_up_taps_f32(unsigned char* tabs, int h, int w, int ho, int wo,
                                            double sy, double sx) {
  build_tables<float>(tabs, h, w, ho, wo, sy, sx);
}
extern "C" __global__ void mask_up_taps_f64(unsigned char* tabs, int h, int w, int ho, int wo,
                                            double sy, double sx) {
  build_tables<double>(tabs, h, w, ho, wo, sy, sx);
}

#define BWD(NAME, IN, ACC)                                                                     \
  extern "C" __global__ void NAME(const IN* g, IN* dst, unsigned char* tabs, int planes, int h, \
                                  int w, int ho, int wo, int tile) {                            \
    upsample_bwd<IN, ACC>(g, dst, tabs, planes, h, w, ho, wo, tile);                            \
  }

BWD(mask_up_grad_f16, __half, float)
BWD(mask_up_grad_bf16, __nv_bfloat16, float)
BWD(mask_up_grad_f32, float, float)
BWD(mask_up_grad_f64, double, double)
