//! `kernels/depthwise.cu` under the CPU emulation, with the launches `src/kernels/cuda_depthwise.rs`
//! uses (`elementwise_launch`, `depthwise_weight_launch`): the forward and the input gradient
//! equal the CPU op's bit for bit (same products in the same order); the kernel gradient, summed
//! per split and then across splits, agrees to a few f32 roundings.

use candle_core::{DType, Tensor, Var};
use prs::kernels::{depthwise_weight_launch, elementwise_launch, DwGeom};
use prs::nn::depthwise::depthwise_conv2d;

use super::{compare, random, tag, Sanitizer, Script};

fn geom_bytes(g: &DwGeom) -> Vec<u8> {
    [g.b, g.c, g.h, g.w, g.ho, g.wo, g.k, g.stride, g.pad].iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// (b, c, h, w, k, stride, pad): TinySAM's 3x3 with two splits of the kernel gradient's sums,
/// stride 2 on odd sizes, 5x5 and 7x7 kernels.
#[test]
fn emulated_depthwise_kernels_equal_the_cpu_op() {
    for &(b, c, h, w, k, stride, pad) in &[
        (2usize, 3usize, 96usize, 96usize, 3usize, 1usize, 1usize),
        (1, 4, 13, 11, 3, 2, 1),
        (2, 2, 9, 9, 5, 1, 2),
        (1, 2, 7, 7, 7, 1, 3),
    ] {
        for dt in [DType::F32, DType::BF16, DType::F16] {
            let what = format!("{b}x{c}x{h}x{w} k{k} s{stride} p{pad} {dt:?}");
            let x = Var::from_tensor(&random(&[b, c, h, w], dt, 81)).unwrap();
            let wt = Var::from_tensor(&random(&[c, 1, k, k], dt, 82)).unwrap();
            let y = depthwise_conv2d(x.as_tensor(), wt.as_tensor(), stride, pad).unwrap();
            let (ho, wo) = (y.dim(2).unwrap(), y.dim(3).unwrap());
            let gy = random(&[b, c, ho, wo], dt, 83);
            let grads = (&y * &gy).unwrap().to_dtype(DType::F32).unwrap().sum_all().unwrap().backward().unwrap();
            let i = |v: usize| v as i64;
            let g = DwGeom {
                b: i(b),
                c: i(c),
                h: i(h),
                w: i(w),
                ho: i(ho),
                wo: i(wo),
                k: i(k),
                stride: i(stride),
                pad: i(pad),
            };

            let mut s = Script::new("depthwise");
            let (xb, wb, gb) = (s.input(x.as_tensor()), s.input(wt.as_tensor()), s.input(&gy));
            let geom = s.bytes(&geom_bytes(&g));
            let yb = s.output(dt, &[b, c, ho, wo]);
            s.launch(
                &format!("dw_fwd_{}", tag(dt)),
                &elementwise_launch(b * c * ho * wo),
                false,
                &[xb.clone(), wb.clone(), yb, geom.clone()],
            );
            let dxb = s.output(dt, &[b, c, h, w]);
            s.launch(
                &format!("dw_bwd_input_{}", tag(dt)),
                &elementwise_launch(b * c * h * w),
                false,
                &[gb.clone(), wb, dxb, geom.clone()],
            );
            let (launch, splits) = depthwise_weight_launch(&g).unwrap();
            let taps = c * k * k;
            let partial = s.scratch(taps * splits as usize * 4);
            s.launch(&format!("dw_bwd_weight_part_{}", tag(dt)), &launch, true, &[xb, gb, partial.clone(), geom]);
            let dwb = s.output(dt, &[c, 1, k, k]);
            s.launch(
                &format!("dw_bwd_weight_sum_{}", tag(dt)),
                &elementwise_launch(taps),
                false,
                &[partial, dwb, taps.to_string(), splits.to_string()],
            );
            let out = s.run();

            let exact = |name: &str, got: &Tensor, want: &Tensor| {
                let (rel, n) = compare(got, want);
                assert_eq!(n, 0, "{name} {what}: {n} elements differ, worst {rel:e}");
            };
            exact("forward", &out[0], &y);
            exact("input gradient", &out[1], grads.get(x.as_tensor()).unwrap());
            let (rel, _) = compare(&out[2], grads.get(wt.as_tensor()).unwrap());
            let tol = match dt {
                DType::F32 => 1e-5,
                DType::BF16 => 2f64.powi(-7),
                _ => 2f64.powi(-10),
            };
            assert!(rel <= tol, "kernel gradient {what}: worst {rel:e} (splits {splits})");
            if (b, h) == (2, 96) {
                assert_eq!(splits, 2, "the first case is meant to split the kernel gradient's sums");
            }
        }
    }
}

/// Under the thread sanitizer, the kernel gradient's block reduction does not race on its
/// shared per-warp sums.
#[test]
fn emulated_kernel_gradient_has_no_race() {
    let (b, c, h, w, k) = (1usize, 2usize, 20usize, 20usize, 3usize);
    let x = random(&[b, c, h, w], DType::F32, 85);
    let gy = random(&[b, c, h, w], DType::F32, 86);
    let g = DwGeom { b: 1, c: 2, h: 20, w: 20, ho: 20, wo: 20, k: 3, stride: 1, pad: 1 };
    let (launch, splits) = depthwise_weight_launch(&g).unwrap();
    let mut s = Script::with("depthwise", Sanitizer::Thread);
    let (xb, gb, geom) = (s.input(&x), s.input(&gy), s.bytes(&geom_bytes(&g)));
    let partial = s.output(DType::F32, &[c * k * k, splits as usize]);
    s.launch("dw_bwd_weight_part_f32", &launch, true, &[xb, gb, partial, geom]);
    let got = s.run().remove(0).sum(1).unwrap();
    let xv = Var::from_tensor(&x).unwrap();
    let wv = Var::from_tensor(&random(&[c, 1, k, k], DType::F32, 87)).unwrap();
    let y = depthwise_conv2d(xv.as_tensor(), wv.as_tensor(), 1, 1).unwrap();
    let grads = (&y * &gy).unwrap().sum_all().unwrap().backward().unwrap();
    let want = grads.get(wv.as_tensor()).unwrap().flatten_all().unwrap();
    let (rel, _) = compare(&got, &want);
    assert!(rel <= 1e-5, "kernel gradient under TSan: worst {rel:e}");
}
