// Stand-in for CUDA's cuda_fp16.h in the CPU emulation of our kernels (see ../cuda_emu.h):
// __half as its bits, converted through GCC's _Float16, which rounds to nearest even as
// __float2half_rn does.
#pragma once
#include <cstdint>
#include <cstring>

struct __half {
  uint16_t bits;
};

inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.bits, 2);
  return (float)f;
}

inline __half __float2half_rn(float v) {
  const _Float16 f = (_Float16)v;
  __half h;
  std::memcpy(&h.bits, &f, 2);
  return h;
}

inline __half __ushort_as_half(unsigned short bits) { return {bits}; }
