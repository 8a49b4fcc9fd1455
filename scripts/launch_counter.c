// Counts what a CUDA build of prs asks of the driver and cuBLAS, for `prs bench` to report per
// step or per token: kernel launches, GEMM calls, copies, allocations, and the host time spent
// blocked in stream synchronisation. Preload it:
//
//   LD_PRELOAD=libprs_launch_counter.so prs bench train ... --device cuda
//
// candle links the CUDA driver and cuBLAS dynamically (cudarc's `dynamic-linking`), so the
// dynamic linker resolves these symbols here first; each wrapper counts, times, and calls the
// next definition (the real library). `prs` finds `prs_launch_counts` with dlsym; without this
// library it reports that no counts are available. Kernels that cuBLAS launches inside a GEMM
// go through its own runtime, not through cuLaunchKernel: they are counted as GEMM calls.
//
// The order of the counters is mirrored by `LaunchCounter` in src/phases.rs.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

enum {
  KERNEL_LAUNCHES,
  GEMM_CALLS,
  HOST_TO_DEVICE,
  DEVICE_TO_HOST,
  DEVICE_TO_DEVICE,
  MEMSETS,
  ALLOCATIONS,
  FREES,
  STREAM_SYNCS,
  COUNTERS
};

static uint64_t counts[COUNTERS];
static uint64_t nanos[COUNTERS];

static uint64_t now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

// The real function, looked up once; a missing one aborts with its name (a library this
// build does not link would be a setup error worth seeing).
static void* next(void** cache, const char* name) {
  void* f = __atomic_load_n(cache, __ATOMIC_ACQUIRE);
  if (!f) {
    f = dlsym(RTLD_NEXT, name);
    if (!f) {
      fprintf(stderr, "libprs_launch_counter: no next definition of %s\n", name);
      abort();
    }
    __atomic_store_n(cache, f, __ATOMIC_RELEASE);
  }
  return f;
}

#define COUNTED(counter, call)                                   \
  do {                                                           \
    uint64_t t0 = now_ns();                                      \
    int r = (call);                                              \
    __atomic_add_fetch(&nanos[counter], now_ns() - t0, __ATOMIC_RELAXED); \
    __atomic_add_fetch(&counts[counter], 1, __ATOMIC_RELAXED);   \
    return r;                                                    \
  } while (0)

typedef unsigned long long devptr;  // CUdeviceptr

int cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                   unsigned shared, void* stream, void** params, void** extra) {
  static void* real;
  typedef int (*fn)(void*, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void*, void**,
                    void**);
  COUNTED(KERNEL_LAUNCHES,
          ((fn)next(&real, "cuLaunchKernel"))(f, gx, gy, gz, bx, by, bz, shared, stream, params, extra));
}

int cuMemcpyHtoDAsync_v2(devptr dst, const void* src, size_t n, void* stream) {
  static void* real;
  typedef int (*fn)(devptr, const void*, size_t, void*);
  COUNTED(HOST_TO_DEVICE, ((fn)next(&real, "cuMemcpyHtoDAsync_v2"))(dst, src, n, stream));
}

int cuMemcpyDtoHAsync_v2(void* dst, devptr src, size_t n, void* stream) {
  static void* real;
  typedef int (*fn)(void*, devptr, size_t, void*);
  COUNTED(DEVICE_TO_HOST, ((fn)next(&real, "cuMemcpyDtoHAsync_v2"))(dst, src, n, stream));
}

int cuMemcpyDtoDAsync_v2(devptr dst, devptr src, size_t n, void* stream) {
  static void* real;
  typedef int (*fn)(devptr, devptr, size_t, void*);
  COUNTED(DEVICE_TO_DEVICE, ((fn)next(&real, "cuMemcpyDtoDAsync_v2"))(dst, src, n, stream));
}

int cuMemsetD8Async(devptr dst, unsigned char v, size_t n, void* stream) {
  static void* real;
  typedef int (*fn)(devptr, unsigned char, size_t, void*);
  COUNTED(MEMSETS, ((fn)next(&real, "cuMemsetD8Async"))(dst, v, n, stream));
}

int cuMemAllocAsync(devptr* p, size_t n, void* stream) {
  static void* real;
  typedef int (*fn)(devptr*, size_t, void*);
  COUNTED(ALLOCATIONS, ((fn)next(&real, "cuMemAllocAsync"))(p, n, stream));
}

int cuMemFreeAsync(devptr p, void* stream) {
  static void* real;
  typedef int (*fn)(devptr, void*);
  COUNTED(FREES, ((fn)next(&real, "cuMemFreeAsync"))(p, stream));
}

int cuStreamSynchronize(void* stream) {
  static void* real;
  typedef int (*fn)(void*);
  COUNTED(STREAM_SYNCS, ((fn)next(&real, "cuStreamSynchronize"))(stream));
}

// cublasGemmStridedBatchedEx (every candle matmul in f32/bf16/f16), and the f64 one.
int cublasGemmStridedBatchedEx(void* h, int ta, int tb, int m, int n, int k, const void* alpha, const void* a,
                               int at, int lda, long long sa, const void* b, int bt, int ldb, long long sb,
                               const void* beta, void* c, int ct, int ldc, long long sc, int batch, int compute,
                               int algo) {
  static void* real;
  typedef int (*fn)(void*, int, int, int, int, int, const void*, const void*, int, int, long long, const void*, int,
                    int, long long, const void*, void*, int, int, long long, int, int, int);
  COUNTED(GEMM_CALLS, ((fn)next(&real, "cublasGemmStridedBatchedEx"))(h, ta, tb, m, n, k, alpha, a, at, lda, sa, b,
                                                                       bt, ldb, sb, beta, c, ct, ldc, sc, batch,
                                                                       compute, algo));
}

int cublasDgemmStridedBatched(void* h, int ta, int tb, int m, int n, int k, const double* alpha, const double* a,
                              int lda, long long sa, const double* b, int ldb, long long sb, const double* beta,
                              double* c, int ldc, long long sc, int batch) {
  static void* real;
  typedef int (*fn)(void*, int, int, int, int, int, const double*, const double*, int, long long, const double*, int,
                    long long, const double*, double*, int, long long, int);
  COUNTED(GEMM_CALLS, ((fn)next(&real, "cublasDgemmStridedBatched"))(h, ta, tb, m, n, k, alpha, a, lda, sa, b, ldb,
                                                                      sb, beta, c, ldc, sc, batch));
}

// For prs: copies `min(n, COUNTERS)` (count, nanoseconds) pairs into `out` and returns how many
// counters this library has.
int prs_launch_counts(uint64_t* out, int n) {
  for (int i = 0; i < n && i < COUNTERS; i++) {
    out[2 * i] = __atomic_load_n(&counts[i], __ATOMIC_RELAXED);
    out[2 * i + 1] = __atomic_load_n(&nanos[i], __ATOMIC_RELAXED);
  }
  return COUNTERS;
}
