// Multi-tensor AdamW for src/train/optim.rs: every trained tensor's update in one launch, and
// the sum of squares of every gradient (the global norm) in one more, where the composite took
// about 17 launches per tensor. All f32. A table of `AdamWTensor` (one per tensor, device
// pointers) lives in device memory; block `b` works on the tensor whose block range holds it
// (binary search over `first_block`) and on CHUNK elements of it.
//
// The update reproduces, operation by operation, the composite that src/train/fused_adamw.rs
// runs on the CPU (candle's `x * c` is `x * c + 0`, kept here so that -0 rounds the same), with
// the _rn intrinsics so that nvcc cannot contract into FMAs: CPU and CUDA agree bit for bit.
//
//   adamw_multi   g' = g*coef (if apply_coef); p' = p*decay (if apply_decay);
//                 m = m + (g' - m)*(1-b1); v = v*b2 + (g'*(1-b2))*g';
//                 p = p' + (m / (sqrt(v)*inv_bias2 + eps)) * step      (in place: p, m, v)
//   sumsq_multi   partial[b] = sum of g^2 over block b's chunk (f64, so that no square of a finite
//                 f32 overflows; tree order within a block)
#include <stdint.h>

// Mirrored by `AdamWTensor` in src/kernels/mod.rs (repr(C)).
struct AdamWTensor {
  uint64_t p, g, m, v;  // device pointers to f32
  int64_t n;            // elements
  int64_t first_block;  // blocks of the tensors before this one
  float decay;          // 1 - lr * wd
  float step;           // -lr / (1 - b1^t)
  float inv_bias2;      // 1 / sqrt(1 - b2^t)
  int32_t apply_decay;
};

#define CHUNK 4096
#define THREADS 256

namespace {

__device__ __forceinline__ float mul0(float a, float b) { return __fadd_rn(__fmul_rn(a, b), 0.0f); }

// The tensor whose block range holds block `b` (first_block ascending, the first is 0).
__device__ __forceinline__ int find_tensor(const AdamWTensor* t, int count, int64_t b) {
  int lo = 0, hi = count - 1;
  while (lo < hi) {
    int mid = (lo + hi + 1) / 2;
    if (t[mid].first_block <= b) lo = mid; else hi = mid - 1;
  }
  return lo;
}

}  // namespace

extern "C" __global__ void adamw_multi(const AdamWTensor* tensors, int count, float coef, int apply_coef,
                                       float one_minus_b1, float b2, float one_minus_b2, float eps) {
  const int i = find_tensor(tensors, count, blockIdx.x);
  const AdamWTensor t = tensors[i];
  float* p = reinterpret_cast<float*>(t.p);
  const float* g = reinterpret_cast<const float*>(t.g);
  float* m = reinterpret_cast<float*>(t.m);
  float* v = reinterpret_cast<float*>(t.v);
  const int64_t start = (blockIdx.x - t.first_block) * (int64_t)CHUNK;
  const int64_t end = min(start + (int64_t)CHUNK, t.n);
  for (int64_t j = start + threadIdx.x; j < end; j += blockDim.x) {
    float gj = g[j];
    if (apply_coef) gj = mul0(gj, coef);
    float pj = p[j];
    if (t.apply_decay) pj = mul0(pj, t.decay);
    const float mj = __fadd_rn(m[j], mul0(__fsub_rn(gj, m[j]), one_minus_b1));
    const float vj = __fadd_rn(mul0(v[j], b2), __fmul_rn(mul0(gj, one_minus_b2), gj));
    const float denom = __fadd_rn(__fmul_rn(__fsqrt_rn(vj), t.inv_bias2), eps);
    p[j] = __fadd_rn(pj, mul0(__fdiv_rn(mj, denom), t.step));
    m[j] = mj;
    v[j] = vj;
  }
}

extern "C" __global__ void sumsq_multi(const AdamWTensor* tensors, int count, double* partial) {
  __shared__ double acc[THREADS];
  const int i = find_tensor(tensors, count, blockIdx.x);
  const AdamWTensor t = tensors[i];
  const float* g = reinterpret_cast<const float*>(t.g);
  const int64_t start = (blockIdx.x - t.first_block) * (int64_t)CHUNK;
  const int64_t end = min(start + (int64_t)CHUNK, t.n);
  double s = 0.0;
  for (int64_t j = start + threadIdx.x; j < end; j += blockDim.x) s += (double)g[j] * (double)g[j];
  acc[threadIdx.x] = s;
  __syncthreads();
  for (int w = THREADS / 2; w > 0; w /= 2) {
    if (threadIdx.x < w) acc[threadIdx.x] += acc[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[blockIdx.x] = acc[0];
}
