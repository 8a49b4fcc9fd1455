// kernels/adamw.cu under the CPU emulation (cuda_emu.h), driven by a script (emu_main.h) from
// tests/all/kernel_emu/adamw.rs; its launch table's device pointers are buffer addresses.
#include "cuda_emu.h"
#include "../../kernels/adamw.cu"
#include "emu_main.h"

#define K(name) {#name, emu::kernel(name)},
int main(int argc, char** argv) { return emu::run(argc, argv, {K(adamw_multi) K(sumsq_multi)}); }
