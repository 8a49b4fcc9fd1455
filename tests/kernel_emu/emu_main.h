// The driver of an emulated kernel file (included after cuda_emu.h and the kernel file, with a
// registry of the kernels to expose: see mask_upsample.cpp). Its arguments are a script, run in
// order (tests/all/kernel_emu/mod.rs writes it):
//   in PATH                      a new buffer holding the file's bytes
//   new BYTES                    a new buffer of BYTES garbage bytes (as uninitialised as on a GPU)
//   launch NAME serial|threads GX GY GZ BX BY BZ SMEM NARGS ARG...
//                                runs kernel NAME over the grid; `threads` runs each block's
//                                threads as real threads (kernels with __syncthreads or
//                                shuffles). An ARG is bN for a pointer to buffer N (or a struct
//                                passed by value, copied from buffer N), else a number.
//   addr DST OFFSET SRC          writes buffer SRC's address (u64) into buffer DST at byte OFFSET
//   out N PATH                   writes buffer N to the file
// Buffers are numbered from 0 in the order they are made, and sized exactly, so the address
// sanitizer sees any access past one.
#pragma once
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace emu {

[[noreturn]] inline void die(const std::string& why) {
  std::fprintf(stderr, "kernel emulation: %s\n", why.c_str());
  std::exit(3);
}

struct Buffer {
  std::unique_ptr<unsigned char[]> data;
  size_t size;
};
inline std::vector<Buffer> buffers;

inline Buffer& buffer(const std::string& word) {
  if (word.size() < 2 || word[0] != 'b') die("'" + word + "' does not name a buffer (bN)");
  const size_t i = std::stoul(word.substr(1));
  if (i >= buffers.size()) die("no buffer " + word);
  return buffers[i];
}

template <typename A>
A arg(const std::string& word) {
  if constexpr (std::is_pointer_v<A>) {
    return reinterpret_cast<A>(buffer(word).data.get());
  } else if constexpr (std::is_integral_v<A> && std::is_unsigned_v<A>) {
    return (A)std::strtoull(word.c_str(), nullptr, 10);
  } else if constexpr (std::is_integral_v<A>) {
    return (A)std::strtoll(word.c_str(), nullptr, 10);
  } else if constexpr (std::is_floating_point_v<A>) {
    return (A)std::strtod(word.c_str(), nullptr);
  } else {
    const Buffer& b = buffer(word);
    if (b.size != sizeof(A)) die("struct argument " + word + " has the wrong size");
    A v;
    std::memcpy((void*)&v, b.data.get(), sizeof(A));
    return v;
  }
}

template <typename... A, size_t... I>
std::tuple<A...> read_args(const std::vector<std::string>& words, std::index_sequence<I...>) {
  return std::tuple<A...>{arg<A>(words[I])...};
}

using Kernel = std::function<void(const std::vector<std::string>&, EmuDim3, EmuDim3, size_t, bool)>;

// Wraps a kernel: its parameters' types say how each script word is read.
template <typename... A>
Kernel kernel(void (*k)(A...)) {
  return [k](const std::vector<std::string>& words, EmuDim3 grid, EmuDim3 block, size_t smem_bytes, bool threads) {
    if (words.size() != sizeof...(A)) die(std::to_string(words.size()) + " arguments for " + std::to_string(sizeof...(A)) + " parameters");
    auto args = read_args<A...>(words, std::index_sequence_for<A...>{});
    emu_launch(grid, block, smem_bytes, threads, [&] { std::apply(k, args); });
  };
}

inline std::vector<unsigned char> read_file(const std::string& path) {
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) die("cannot read " + path);
  std::vector<unsigned char> v;
  unsigned char chunk[1 << 16];
  size_t n;
  while ((n = std::fread(chunk, 1, sizeof chunk, f)) > 0) v.insert(v.end(), chunk, chunk + n);
  std::fclose(f);
  return v;
}

inline Buffer make(size_t size) {
  Buffer b{std::make_unique<unsigned char[]>(size ? size : 1), size};
  std::memset(b.data.get(), 0xA5, size);
  return b;
}

inline int run(int argc, char** argv, const std::map<std::string, Kernel>& kernels) {
  int i = 1;
  auto next = [&]() -> std::string {
    if (i >= argc) die("the script ends early");
    return argv[i++];
  };
  auto num = [&]() { return (unsigned)std::stoul(next()); };
  while (i < argc) {
    const std::string op = next();
    if (op == "in") {
      const std::vector<unsigned char> bytes = read_file(next());
      buffers.push_back(make(bytes.size()));
      std::memcpy(buffers.back().data.get(), bytes.data(), bytes.size());
    } else if (op == "new") {
      buffers.push_back(make(std::stoull(next())));
    } else if (op == "launch") {
      const std::string name = next(), mode = next();
      const auto k = kernels.find(name);
      if (k == kernels.end()) die("no kernel " + name);
      EmuDim3 grid, block;
      grid.x = num(), grid.y = num(), grid.z = num();
      block.x = num(), block.y = num(), block.z = num();
      const size_t smem_bytes = num();
      // CUDA's launch limits (compute capability 9.0), and shared memory without an opt-in.
      if (grid.x < 1 || grid.x > 2147483647u || grid.y < 1 || grid.y > 65535 || grid.z < 1 || grid.z > 65535)
        die("grid out of CUDA's limits");
      if (block.x < 1 || block.y < 1 || block.z < 1 || block.x > 1024 || block.y > 1024 || block.z > 64 ||
          block.x * block.y * block.z > 1024)
        die("block out of CUDA's limits");
      if (smem_bytes > 48 * 1024) die("more than 48 KB of dynamic shared memory");
      std::vector<std::string> words(num());
      for (auto& w : words) w = next();
      k->second(words, grid, block, smem_bytes, mode == "threads");
    } else if (op == "addr") {
      // addr DST OFFSET SRC: buffer SRC's address, as a u64, into buffer DST at byte OFFSET (a
      // launch table of device pointers, as adamw.cu takes).
      Buffer& dst = buffer(next());
      const size_t offset = std::stoull(next());
      const uint64_t address = (uint64_t)(uintptr_t)buffer(next()).data.get();
      if (offset + 8 > dst.size) die("addr past the end of its buffer");
      std::memcpy(dst.data.get() + offset, &address, 8);
    } else if (op == "out") {
      const Buffer& b = buffer("b" + next());
      const std::string path = next();
      FILE* f = std::fopen(path.c_str(), "wb");
      if (!f || std::fwrite(b.data.get(), 1, b.size, f) != b.size) die("cannot write " + path);
      std::fclose(f);
    } else {
      die("unknown step " + op);
    }
  }
  return 0;
}

}  // namespace emu
