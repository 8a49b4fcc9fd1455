// kernels/fused.cu under the CPU emulation (cuda_emu.h), driven by a script (emu_main.h) from
// tests/all/kernel_emu/fused.rs.
#include "cuda_emu.h"
#include "../../kernels/fused.cu"
#include "emu_main.h"

#define K(name) {#name, emu::kernel(name)},
#define ROW(tag) K(softmax_bwd_##tag) K(rms_fwd_##tag) K(rms_bwd_##tag) K(silu_mul_fwd_##tag) K(silu_mul_bwd_##tag) \
  K(gelu_erf_bwd_##tag) K(rope_heads_fwd_##tag) K(rope_heads_bwd_##tag)
int main(int argc, char** argv) {
  return emu::run(argc, argv, {
    K(softmax_fwd_f32) K(softmax_fwd_bf16) K(softmax_fwd_bf16_mf32) K(softmax_fwd_f16) K(softmax_fwd_f16_mf32)
    ROW(f32) ROW(bf16) ROW(f16)
  });
}
