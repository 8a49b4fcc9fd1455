//! `kernels/mask_upsample.cu` under the CPU emulation, with the launches of
//! `nn::upsample::kernel_plans`: every output equals the CPU op's bit for bit (the sigmoid within
//! a few ulps of the host's expf).

use candle_core::{DType, Tensor};
use prs::kernels::{axis_scale, upsample_bwd_plan, upsample_fwd_plan, Epilogue, Launch, UpsampleDims};
use prs::nn::upsample::{
    kernel_plans, upsample_bilinear_ac, upsample_bilinear_ac_backward, upsample_bilinear_ac_wide, upsample_mask,
    upsample_sigmoid,
};

use super::{compare, random, Sanitizer, Script};

/// The geometry arguments of both directions: planes h w ho wo (and the scales sy sx).
fn geometry((b, c, h, w): (usize, usize, usize, usize), f: usize, scales: bool) -> Vec<String> {
    let mut v: Vec<String> = [b * c, h, w, h * f, w * f].iter().map(|n| n.to_string()).collect();
    if scales {
        v.extend([format!("{:?}", axis_scale(h, h * f)), format!("{:?}", axis_scale(w, w * f))]);
    }
    v
}

/// How to run a case: the plan's launch as is, or with its grid cut to `grid` (the kernels
/// stride over rows and planes, so any grid must give the same result), under `sanitizer`.
#[derive(Clone, Copy)]
struct Run {
    grid: Option<(u32, u32, u32)>,
    sanitizer: Sanitizer,
}

const AS_PLANNED: Run = Run { grid: None, sanitizer: Sanitizer::Address };

fn with_grid(l: &Launch, run: Run) -> Launch {
    let mut l = *l;
    if let Some((x, y, z)) = run.grid {
        l.grid = (l.grid.0.min(x), l.grid.1.min(y), l.grid.2.min(z));
    }
    l
}

fn emulate_forward(x: &Tensor, f: usize, ep: Epilogue, run: Run) -> Tensor {
    let shape = x.dims4().unwrap();
    let (plan, _) = kernel_plans(shape, f, x.dtype(), ep).unwrap();
    let thr = if let Epilogue::Threshold(t) = ep { t } else { 0.0 };
    let (b, c, h, w) = shape;
    let mut s = Script::with("mask_upsample", run.sanitizer);
    let mut args = vec![s.input(x), s.output(ep.out_dtype(x.dtype()), &[b, c, h * f, w * f])];
    args.extend(geometry(shape, f, true));
    args.push(format!("{thr:?}"));
    s.launch(&plan.name, &with_grid(&plan.launch, run), false, &args);
    s.run().remove(0)
}

fn emulate_backward(g: &Tensor, f: usize, run: Run) -> Tensor {
    let (b, c, ho, wo) = g.dims4().unwrap();
    let shape = (b, c, ho / f, wo / f);
    let (_, plan) = kernel_plans(shape, f, g.dtype(), Epilogue::Logits).unwrap();
    let plan = plan.expect("these cases fit the backward kernel");
    let mut s = Script::with("mask_upsample", run.sanitizer);
    let tabs = s.scratch(plan.table_bytes);
    let mut args = vec![tabs.clone()];
    args.extend(geometry(shape, f, true).into_iter().skip(1));
    s.launch(plan.taps_name, &plan.taps, false, &args);
    let mut args = vec![s.input(g), s.output(g.dtype(), &[b, c, ho / f, wo / f]), tabs];
    args.extend(geometry(shape, f, false));
    args.push(plan.tile.to_string());
    s.launch(&plan.name, &with_grid(&plan.launch, run), true, &args);
    s.run().remove(0)
}

/// (b, c, h, w, factor): the mask head's shape; odd sizes with vector and scalar stores; 18
/// planes whose forward threads write several rows each beside a partly idle column block;
/// rows of 600 low-res columns, which the backward splits into three tiles; and a factor of
/// 64, whose widest tile's column sums overflow shared memory until the tile halves (twice in f64).
const CASES: [(usize, usize, usize, usize, usize); 6] = [
    (2, 1, 64, 64, 16),
    (3, 2, 7, 5, 16),
    (1, 1, 9, 13, 3),
    (2, 9, 61, 45, 16),
    (1, 2, 20, 600, 2),
    (1, 1, 2, 300, 64),
];

fn dtypes(case: usize) -> Vec<DType> {
    // Every dtype on the small cases; the large ones in the two the model trains in.
    if matches!(case, 0 | 3) {
        vec![DType::F16, DType::BF16]
    } else {
        vec![DType::F16, DType::BF16, DType::F32, DType::F64]
    }
}

#[test]
fn emulated_forward_kernels_equal_the_cpu_op() {
    for (i, &(b, c, h, w, f)) in CASES.iter().enumerate() {
        for dt in dtypes(i) {
            let tag = format!("{b}x{c}x{h}x{w} x{f} {dt:?}");
            let x = random(&[b, c, h, w], dt, 7 + i as u64);
            let (rel, n) =
                compare(&emulate_forward(&x, f, Epilogue::Logits, AS_PLANNED), &upsample_bilinear_ac(&x, f).unwrap());
            assert_eq!(n, 0, "logits {tag}: {n} elements differ, worst {rel:e}");
            let (rel, n) = compare(
                &emulate_forward(&x, f, Epilogue::LogitsWide, AS_PLANNED),
                &upsample_bilinear_ac_wide(&x, f).unwrap(),
            );
            assert_eq!(n, 0, "wide logits {tag}: {n} elements differ, worst {rel:e}");
            let (rel, _) =
                compare(&emulate_forward(&x, f, Epilogue::Sigmoid, AS_PLANNED), &upsample_sigmoid(&x, f).unwrap());
            // One rounding of the stored dtype, or a few f32 ulps of expf.
            let rounding = match dt {
                DType::F16 => 2f64.powi(-11),
                DType::BF16 => 2f64.powi(-8),
                _ => 0.0,
            };
            assert!(rel <= rounding.max(4.0 * 2f64.powi(-24)), "sigmoid {tag}: {rel:e}");
            // A mask bit may only flip where the logit is within float error of 0.
            let got = emulate_forward(&x, f, Epilogue::Threshold(0.5), AS_PLANNED)
                .flatten_all()
                .unwrap()
                .to_vec1::<u8>()
                .unwrap();
            let want = upsample_mask(&x, f, 0.5).unwrap().flatten_all().unwrap().to_vec1::<u8>().unwrap();
            let logit = upsample_bilinear_ac_wide(&x, f).unwrap().to_dtype(DType::F64).unwrap();
            let logit = logit.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let bad = got.iter().zip(&want).zip(&logit).filter(|((a, b), v)| a != b && v.abs() > 1e-5).count();
            assert_eq!(bad, 0, "mask {tag}: {bad} bits differ away from the threshold");
        }
    }
}

#[test]
fn emulated_backward_kernels_equal_the_cpu_op() {
    for (i, &(b, c, h, w, f)) in CASES.iter().enumerate() {
        for dt in dtypes(i) {
            let g = random(&[b, c, h * f, w * f], dt, 100 + i as u64);
            let (rel, n) =
                compare(&emulate_backward(&g, f, AS_PLANNED), &upsample_bilinear_ac_backward(&g, f).unwrap());
            assert_eq!(n, 0, "backward {b}x{c}x{h}x{w} x{f} {dt:?}: {n} elements differ, worst {rel:e}");
        }
    }
}

/// The kernels stride over rows and planes, so a grid smaller than planned gives the same
/// result: each forward thread then writes every row of every plane, and each backward block
/// several low-res rows (its shared column sums rewritten between them).
#[test]
fn emulated_kernels_give_the_same_result_on_a_smaller_grid() {
    for &(b, c, h, w, f) in &[(2usize, 3usize, 5usize, 11usize, 5usize), (2, 1, 9, 13, 3)] {
        for dt in [DType::F16, DType::F32] {
            let what = format!("{b}x{c}x{h}x{w} x{f} {dt:?}");
            let x = random(&[b, c, h, w], dt, 5);
            let run = Run { grid: Some((u32::MAX, 1, 1)), sanitizer: Sanitizer::Address };
            let (rel, n) =
                compare(&emulate_forward(&x, f, Epilogue::Logits, run), &upsample_bilinear_ac(&x, f).unwrap());
            assert_eq!(n, 0, "forward {what} on one row block: {n} differ, worst {rel:e}");
            let g = random(&[b, c, h * f, w * f], dt, 6);
            let run = Run { grid: Some((u32::MAX, 2, 1)), sanitizer: Sanitizer::Address };
            let want = upsample_bilinear_ac_backward(&g, f).unwrap();
            let (rel, n) = compare(&emulate_backward(&g, f, run), &want);
            assert_eq!(n, 0, "backward {what} on two row blocks: {n} differ, worst {rel:e}");
        }
    }
}

/// Under the thread sanitizer, the backward's threads do not race on their shared column sums,
/// with each block going through several rows.
#[test]
fn emulated_backward_has_no_race() {
    let g = random(&[2, 1, 5 * 16, 7 * 16], DType::F32, 8);
    let run = Run { grid: Some((u32::MAX, 2, 1)), sanitizer: Sanitizer::Thread };
    let (rel, n) = compare(&emulate_backward(&g, 16, run), &upsample_bilinear_ac_backward(&g, 16).unwrap());
    assert_eq!(n, 0, "{n} differ, worst {rel:e}");
}

/// The plans stay inside CUDA's launch limits for shapes past them (more than 65535 planes or
/// rows): the kernels stride over what the grid does not cover.
#[test]
fn plans_respect_the_launch_limits() {
    for d in [
        UpsampleDims { planes: 70_000, h: 2, w: 2, factor: 16 },
        UpsampleDims { planes: 1, h: 70_000, w: 3, factor: 2 },
        UpsampleDims { planes: 3, h: 64, w: 64, factor: 16 },
    ] {
        for dt in [DType::F16, DType::F64] {
            let f = upsample_fwd_plan(d, dt, Epilogue::Threshold(0.5)).unwrap().launch;
            let b = upsample_bwd_plan(d, dt, d.w.min(256), 16 * d.w.min(256) + 16).unwrap().launch;
            for l in [f, b] {
                assert!(l.grid.1 <= 65_535 && l.grid.2 <= 65_535 && l.grid.0 <= i32::MAX as u32, "{d:?}: {l:?}");
                let threads = l.block.0 * l.block.1 * l.block.2;
                assert!(threads <= 1024 && threads % 32 == 0, "{d:?}: {l:?}");
            }
        }
    }
}
