// CPU emulation of kernels/mask_upsample.cu (see cuda_emu.h), driven by tests/all/kernel_emu.rs:
//   mask_upsample fwd NAME GRID(3) BLOCK(3) planes h w ho wo sy sx thr IN OUT
//   mask_upsample bwd TAPS TGRID BLOCKX TABLE_BYTES NAME GRID(3) BLOCK(3) SMEM planes h w ho wo sy sx tile IN OUT
// IN holds the input's raw elements; OUT receives the output's. Every buffer is allocated at
// exactly the size the Rust host code gives a GPU, filled with garbage first, so the address
// sanitizer sees any access past it and a missed write shows in the result.
#include "cuda_emu.h"
#include "../../kernels/mask_upsample.cu"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>

namespace emu {

std::vector<unsigned char> read_file(const char* path) {
  FILE* f = std::fopen(path, "rb");
  if (!f) { std::perror(path); std::exit(3); }
  std::vector<unsigned char> v;
  unsigned char buf[1 << 16];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) v.insert(v.end(), buf, buf + n);
  std::fclose(f);
  return v;
}

void write_file(const char* path, const unsigned char* p, size_t n) {
  FILE* f = std::fopen(path, "wb");
  if (!f || std::fwrite(p, 1, n, f) != n) { std::perror(path); std::exit(3); }
  std::fclose(f);
}

template <typename T>
T* garbage(size_t n) {
  T* p = new T[n];
  std::memset((void*)p, 0xA5, n * sizeof(T));
  return p;
}

struct Cursor {
  char** argv;
  int i;
  const char* str() { return argv[i++]; }
  long num() { return std::strtol(argv[i++], nullptr, 10); }
  double real() { return std::strtod(argv[i++], nullptr); }
  EmuDim3 dim3() {
    EmuDim3 d;
    d.x = (unsigned)num();
    d.y = (unsigned)num();
    d.z = (unsigned)num();
    return d;
  }
};

using FwdFn = std::function<void(Cursor&)>;

template <typename In, typename Out>
FwdFn fwd(void (*k)(const In*, Out*, int, int, int, int, int, double, double, float)) {
  return [k](Cursor& c) {
    const EmuDim3 grid = c.dim3(), block = c.dim3();
    const int planes = c.num(), h = c.num(), w = c.num(), ho = c.num(), wo = c.num();
    const double sy = c.real(), sx = c.real();
    const float thr = (float)c.real();
    const char* in = c.str();
    const char* out = c.str();
    const std::vector<unsigned char> bytes = read_file(in);
    const size_t n_in = (size_t)planes * h * w;
    if (bytes.size() != n_in * sizeof(In)) { std::fprintf(stderr, "input size\n"); std::exit(3); }
    In* src = garbage<In>(n_in);
    std::memcpy((void*)src, bytes.data(), bytes.size());
    const size_t n_out = (size_t)planes * ho * wo;
    Out* dst = garbage<Out>(n_out);
    emu_launch(grid, block, false, [&] { k(src, dst, planes, h, w, ho, wo, sy, sx, thr); });
    write_file(out, (const unsigned char*)dst, n_out * sizeof(Out));
    delete[] src;
    delete[] dst;
  };
}

template <typename T>
FwdFn bwd(void (*k)(const T*, T*, unsigned char*, int, int, int, int, int, int)) {
  return [k](Cursor& c) {
    const std::string taps = c.str();
    const EmuDim3 tgrid{(unsigned)c.num(), 1, 1}, tblock{(unsigned)c.num(), 1, 1};
    const size_t table_bytes = (size_t)c.num();
    c.str();  // the gather's name, already chosen
    const EmuDim3 grid = c.dim3(), block = c.dim3();
    const long smem_bytes = c.num();
    const int planes = c.num(), h = c.num(), w = c.num(), ho = c.num(), wo = c.num();
    const double sy = c.real(), sx = c.real();
    const int tile = c.num();
    const char* in = c.str();
    const char* out = c.str();
    if (smem_bytes > (long)sizeof(smem)) { std::fprintf(stderr, "shared memory %ld\n", smem_bytes); std::exit(3); }
    unsigned char* tabs = garbage<unsigned char>(table_bytes);
    auto taps_fn = taps == "mask_up_taps_f64" ? mask_up_taps_f64 : mask_up_taps_f32;
    emu_launch(tgrid, tblock, false, [&] { taps_fn(tabs, h, w, ho, wo, sy, sx); });
    const std::vector<unsigned char> bytes = read_file(in);
    const size_t n_in = (size_t)planes * ho * wo;
    if (bytes.size() != n_in * sizeof(T)) { std::fprintf(stderr, "input size\n"); std::exit(3); }
    T* g = garbage<T>(n_in);
    std::memcpy((void*)g, bytes.data(), bytes.size());
    const size_t n_out = (size_t)planes * h * w;
    T* dst = garbage<T>(n_out);
    emu_launch(grid, block, true, [&] { k(g, dst, tabs, planes, h, w, ho, wo, tile); });
    write_file(out, (const unsigned char*)dst, n_out * sizeof(T));
    delete[] tabs;
    delete[] g;
    delete[] dst;
  };
}

}  // namespace emu

int main(int argc, char** argv) {
  using namespace emu;
  const std::map<std::string, FwdFn> kernels = {
#define F(name) {#name, fwd(name)},
      F(mask_up_f16_f16_v) F(mask_up_f16_f16_s) F(mask_up_f16_f32_v) F(mask_up_f16_f32_s)
      F(mask_up_bf16_bf16_v) F(mask_up_bf16_bf16_s) F(mask_up_bf16_f32_v) F(mask_up_bf16_f32_s)
      F(mask_up_f32_f32_v) F(mask_up_f32_f32_s) F(mask_up_f64_f64_v) F(mask_up_f64_f64_s)
      F(mask_up_sigmoid_f16_v) F(mask_up_sigmoid_f16_s) F(mask_up_sigmoid_bf16_v) F(mask_up_sigmoid_bf16_s)
      F(mask_up_sigmoid_f32_v) F(mask_up_sigmoid_f32_s) F(mask_up_sigmoid_f64_v) F(mask_up_sigmoid_f64_s)
      F(mask_up_mask_f16_v) F(mask_up_mask_f16_s) F(mask_up_mask_bf16_v) F(mask_up_mask_bf16_s)
      F(mask_up_mask_f32_v) F(mask_up_mask_f32_s) F(mask_up_mask_f64_v) F(mask_up_mask_f64_s)
#undef F
#define B(name) {#name, bwd(name)},
      B(mask_up_grad_f16) B(mask_up_grad_bf16) B(mask_up_grad_f32) B(mask_up_grad_f64)
#undef B
  };
  if (argc < 3) { std::fprintf(stderr, "usage: mask_upsample fwd|bwd ...\n"); return 2; }
  const std::string mode = argv[1];
  // The kernel's name is the first argument after the mode (fwd), or the sixth (bwd).
  const std::string name = mode == "bwd" ? (argc > 6 ? argv[6] : "") : argv[2];
  const auto k = kernels.find(name);
  if (k == kernels.end()) { std::fprintf(stderr, "no kernel %s\n", name.c_str()); return 2; }
  Cursor c{argv, mode == "bwd" ? 2 : 3};
  k->second(c);
  return 0;
}
