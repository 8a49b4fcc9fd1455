// Calls the fake CUDA functions as candle would (linked dynamically), then prints the launch
// counter's totals: "counts c0 c1 ... nanos n0 n1 ...". Exit 2 when a wrapped call's result or
// argument went wrong, 3 when the counter library is not loaded.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>

int cuLaunchKernel(void*, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void*, void**, void**);
int cuStreamSynchronize(void*);
int cuMemAllocAsync(unsigned long long*, unsigned long, void*);
int cublasGemmStridedBatchedEx(void*, int, int, int, int, int, const void*, const void*, int, int, long long,
                               const void*, int, int, long long, const void*, void*, int, int, long long, int, int,
                               int);

int main(void) {
  int bad = 0;
  for (int i = 0; i < 3; i++) bad |= cuLaunchKernel(0, 1, 1, 1, 32, 1, 1, 0, 0, 0, 0);
  for (int i = 0; i < 2; i++)
    bad |= cublasGemmStridedBatchedEx(0, 0, 0, 7, 8, 9, 0, 0, 0, 7, 0, 0, 0, 9, 0, 0, 0, 0, 7, 0, 1, 0, 0);
  unsigned long long p = 0;
  bad |= cuMemAllocAsync(&p, 64, 0);
  bad |= p != 4096;
  bad |= cuStreamSynchronize(0);
  if (bad) return 2;
  int (*counts)(uint64_t*, int) = (int (*)(uint64_t*, int))dlsym(RTLD_DEFAULT, "prs_launch_counts");
  if (!counts) return 3;
  uint64_t v[18];
  int n = counts(v, 9);
  printf("counters %d counts", n);
  for (int i = 0; i < 9; i++) printf(" %llu", (unsigned long long)v[2 * i]);
  printf(" nanos");
  for (int i = 0; i < 9; i++) printf(" %llu", (unsigned long long)v[2 * i + 1]);
  printf("\n");
  return 0;
}
