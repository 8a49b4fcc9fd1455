// kernels/mask_upsample.cu under the CPU emulation (cuda_emu.h), driven by a script (emu_main.h)
// from tests/all/kernel_emu/upsample.rs.
#include "cuda_emu.h"
#include "../../kernels/mask_upsample.cu"
#include "emu_main.h"

#define K(name) {#name, emu::kernel(name)},
int main(int argc, char** argv) {
  return emu::run(argc, argv, {
    K(mask_up_f16_f16_v) K(mask_up_f16_f16_s) K(mask_up_f16_f32_v) K(mask_up_f16_f32_s)
    K(mask_up_bf16_bf16_v) K(mask_up_bf16_bf16_s) K(mask_up_bf16_f32_v) K(mask_up_bf16_f32_s)
    K(mask_up_f32_f32_v) K(mask_up_f32_f32_s) K(mask_up_f64_f64_v) K(mask_up_f64_f64_s)
    K(mask_up_sigmoid_f16_v) K(mask_up_sigmoid_f16_s) K(mask_up_sigmoid_bf16_v) K(mask_up_sigmoid_bf16_s)
    K(mask_up_sigmoid_f32_v) K(mask_up_sigmoid_f32_s) K(mask_up_sigmoid_f64_v) K(mask_up_sigmoid_f64_s)
    K(mask_up_mask_f16_v) K(mask_up_mask_f16_s) K(mask_up_mask_bf16_v) K(mask_up_mask_bf16_s)
    K(mask_up_mask_f32_v) K(mask_up_mask_f32_s) K(mask_up_mask_f64_v) K(mask_up_mask_f64_s)
    K(mask_up_taps_f32) K(mask_up_taps_f64)
    K(mask_up_grad_f16) K(mask_up_grad_bf16) K(mask_up_grad_f32) K(mask_up_grad_f64)
  });
}
