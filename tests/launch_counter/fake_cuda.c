// A stand-in for libcuda and libcublas in tests/all/launches.rs: the functions the launch
// counter wraps, with their signatures, doing nothing (the synchronisation sleeps 20 ms).
#include <time.h>

int cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                   unsigned shared, void* stream, void** params, void** extra) {
  return 0;
}

int cuStreamSynchronize(void* stream) {
  struct timespec t = {0, 20 * 1000 * 1000};
  nanosleep(&t, 0);
  return 0;
}

int cuMemAllocAsync(unsigned long long* p, unsigned long n, void* stream) {
  *p = 4096;
  return 0;
}

int cublasGemmStridedBatchedEx(void* h, int ta, int tb, int m, int n, int k, const void* alpha, const void* a,
                               int at, int lda, long long sa, const void* b, int bt, int ldb, long long sb,
                               const void* beta, void* c, int ct, int ldc, long long sc, int batch, int compute,
                               int algo) {
  return m == 7 ? 0 : 1;  // the driver passes m = 7: a wrong argument order shows as status 1
}
