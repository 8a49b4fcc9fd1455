// kernels/depthwise.cu under the CPU emulation (cuda_emu.h), driven by a script (emu_main.h)
// from tests/all/kernel_emu/depthwise.rs.
#include "cuda_emu.h"
#include "../../kernels/depthwise.cu"
#include "emu_main.h"

#define K(name) {#name, emu::kernel(name)},
#define DW(tag) K(dw_fwd_##tag) K(dw_bwd_input_##tag) K(dw_bwd_weight_part_##tag) K(dw_bwd_weight_sum_##tag)
int main(int argc, char** argv) { return emu::run(argc, argv, {DW(f32) DW(bf16) DW(f16)}); }
