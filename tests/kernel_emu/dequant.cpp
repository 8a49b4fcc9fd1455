// kernels/dequant.cu under the CPU emulation (cuda_emu.h), driven by a script (emu_main.h) from
// tests/all/kernel_emu/dequant.rs.
#include "cuda_emu.h"
#include "../../kernels/dequant.cu"
#include "emu_main.h"

#define K(name) {#name, emu::kernel(name)},
int main(int argc, char** argv) {
  return emu::run(argc, argv, {
    K(dequant_q4k_f32) K(dequant_q4k_bf16) K(dequant_q4k_f16) K(dequant_q8_0_f32) K(dequant_q8_0_bf16) K(dequant_q8_0_f16)
  });
}
