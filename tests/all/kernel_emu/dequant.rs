//! `kernels/dequant.cu` under the CPU emulation, with the launch `src/kernels/cuda_dequant.rs`
//! uses: the 4- and 8-bit blocks of a quantised weight dequantised straight to f32, bf16 and
//! f16 equal the CPU op's values bit for bit.

use candle_core::DType;
use prs::kernels::elementwise_launch;
use prs::nn::quant::{BaseQuant, QuantWeight};

use super::{compare, random, Script};

#[test]
fn emulated_dequantisation_equals_the_cpu_op() {
    // 3 rows of 512: two Q4_K super-blocks or 16 Q8_0 blocks per row.
    let w = random(&[3, 512], DType::F32, 91);
    for (mode, root) in [(BaseQuant::Int4, "dequant_q4k"), (BaseQuant::Int8, "dequant_q8_0")] {
        let q = QuantWeight::quantize(&w, mode).unwrap().expect("512 columns hold whole blocks");
        let blocks = q.blocks().unwrap();
        for (dt, tag) in [(DType::F32, "f32"), (DType::BF16, "bf16"), (DType::F16, "f16")] {
            let mut s = Script::new("dequant");
            let args = [s.bytes(&blocks), s.output(dt, &[3, 512]), (3 * 512).to_string()];
            s.launch(&format!("{root}_{tag}"), &elementwise_launch(3 * 512), false, &args);
            let (rel, n) = compare(&s.run()[0], &q.dequantize(dt).unwrap());
            assert_eq!(n, 0, "{root} to {dt:?}: {n} values differ, worst {rel:e}");
        }
    }
}
