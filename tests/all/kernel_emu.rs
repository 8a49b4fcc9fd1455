//! The CUDA mask-upsampling kernels (`kernels/mask_upsample.cu`) on a machine without a GPU:
//! compiled as host C++ against an emulation of the CUDA constructs they use
//! (`tests/kernel_emu/`), run with exactly the launches the Rust host code gives a GPU
//! (`nn::upsample::kernel_plans`: names, grids, blocks, shared memory, table sizes), under the
//! address sanitizer. Every output must equal the CPU op's, bit for bit (the sigmoid within a
//! few ulps of the host's expf): this checks the kernels' indexing, tiling, tap tables and
//! shared-memory use, not the card's arithmetic, which `examples/gpu_upsample_check` does.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};
use prs::kernels::{axis_scale, Epilogue, Launch};
use prs::nn::upsample::{
    kernel_plans, upsample_bilinear_ac, upsample_bilinear_ac_backward, upsample_bilinear_ac_wide, upsample_mask,
    upsample_sigmoid,
};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Builds the emulated kernels once per test run (a C++20 compiler with the address sanitizer
/// is needed: the machine's g++).
fn emulator() -> &'static Path {
    static BUILT: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, exe) = BUILT.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("mask_upsample");
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kernel_emu");
        let out = Command::new("c++")
            .args(["-std=c++20", "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"])
            .args(["-ffp-contract=off", "-pthread", "-Wall", "-Wno-unknown-pragmas", "-Werror", "-I"])
            .arg(root.join("include"))
            .arg(root.join("mask_upsample.cpp"))
            .arg("-o")
            .arg(&exe)
            .output()
            .expect("running c++ (a C++20 compiler is needed for this test)");
        assert!(out.status.success(), "building the kernel emulation: {}", String::from_utf8_lossy(&out.stderr));
        (dir, exe)
    });
    exe
}

fn random(shape: (usize, usize, usize, usize), dt: DType, seed: u64) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    let v: Vec<f32> = (0..n).map(|_| rng.gen_range(-4.0f32..4.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap().to_dtype(dt).unwrap()
}

/// A tensor's raw little-endian elements, as the kernels read them.
fn raw(t: &Tensor) -> Vec<u8> {
    let t = t.flatten_all().unwrap();
    match t.dtype() {
        DType::F16 => t.to_vec1::<f16>().unwrap().iter().flat_map(|v| v.to_bits().to_le_bytes()).collect(),
        DType::BF16 => t.to_vec1::<bf16>().unwrap().iter().flat_map(|v| v.to_bits().to_le_bytes()).collect(),
        DType::F32 => t.to_vec1::<f32>().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::F64 => t.to_vec1::<f64>().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect(),
        other => panic!("no raw form for {other:?}"),
    }
}

fn dims(l: &Launch) -> [String; 6] {
    let (g, b) = (l.grid, l.block);
    [g.0, g.1, g.2, b.0, b.1, b.2].map(|v| v.to_string())
}

/// Runs the emulator and reads its output back as a tensor of `shape` and `dt`.
fn run(args: Vec<String>, input: &Tensor, dt: DType, shape: &[usize]) -> Tensor {
    let dir = tempfile::tempdir().unwrap();
    let (inp, outp) = (dir.path().join("in"), dir.path().join("out"));
    std::fs::write(&inp, raw(input)).unwrap();
    let out = Command::new(emulator())
        .args(&args)
        .arg(&inp)
        .arg(&outp)
        .env("ASAN_OPTIONS", "detect_leaks=0")
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Tensor::from_raw_buffer(&std::fs::read(&outp).unwrap(), dt, shape, &Device::Cpu).unwrap()
}

/// Geometry arguments shared by both directions: planes h w ho wo sy sx.
fn geometry(x: (usize, usize, usize, usize), f: usize) -> Vec<String> {
    let (b, c, h, w) = x;
    let (ho, wo) = (h * f, w * f);
    let mut v: Vec<String> = [b * c, h, w, ho, wo].iter().map(|n| n.to_string()).collect();
    v.extend([format!("{:?}", axis_scale(h, ho)), format!("{:?}", axis_scale(w, wo))]);
    v
}

fn emulate_forward(x: &Tensor, f: usize, ep: Epilogue) -> Tensor {
    let shape = x.dims4().unwrap();
    let (plan, _) = kernel_plans(shape, f, x.dtype(), ep).unwrap();
    let thr = if let Epilogue::Threshold(t) = ep { t } else { 0.0 };
    let mut args = vec!["fwd".to_string(), plan.name.clone()];
    args.extend(dims(&plan.launch));
    args.extend(geometry(shape, f));
    args.push(format!("{thr:?}"));
    let (b, c, h, w) = shape;
    run(args, x, ep.out_dtype(x.dtype()), &[b, c, h * f, w * f])
}

fn emulate_backward(g: &Tensor, f: usize) -> Tensor {
    let (b, c, ho, wo) = g.dims4().unwrap();
    let shape = (b, c, ho / f, wo / f);
    let (_, plan) = kernel_plans(shape, f, g.dtype(), Epilogue::Logits).unwrap();
    let plan = plan.expect("these cases fit the backward kernel");
    let mut args = vec![
        "bwd".to_string(),
        plan.taps_name.to_string(),
        plan.taps.grid.0.to_string(),
        plan.taps.block.0.to_string(),
        plan.table_bytes.to_string(),
        plan.name.clone(),
    ];
    args.extend(dims(&plan.launch));
    args.push(plan.launch.shared_mem_bytes.to_string());
    args.extend(geometry(shape, f));
    args.push(plan.tile.to_string());
    run(args, g, g.dtype(), &[b, c, ho / f, wo / f])
}

/// (largest |a - b| / max(|b|, 1), elements that differ at all).
fn compare(a: &Tensor, b: &Tensor) -> (f64, usize) {
    assert_eq!(a.dims(), b.dims());
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let differ: Vec<(f64, f64)> = a.iter().zip(&b).filter(|(x, y)| x != y).map(|(x, y)| (*x, *y)).collect();
    let worst = differ.iter().map(|(x, y)| (x - y).abs() / y.abs().max(1.0)).fold(0.0, f64::max);
    (worst, differ.len())
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
            let x = random((b, c, h, w), dt, 7 + i as u64);
            let (rel, n) = compare(&emulate_forward(&x, f, Epilogue::Logits), &upsample_bilinear_ac(&x, f).unwrap());
            assert_eq!(n, 0, "logits {tag}: {n} elements differ, worst {rel:e}");
            let (rel, n) =
                compare(&emulate_forward(&x, f, Epilogue::LogitsWide), &upsample_bilinear_ac_wide(&x, f).unwrap());
            assert_eq!(n, 0, "wide logits {tag}: {n} elements differ, worst {rel:e}");
            let (rel, _) = compare(&emulate_forward(&x, f, Epilogue::Sigmoid), &upsample_sigmoid(&x, f).unwrap());
            // One rounding of the stored dtype, or a few f32 ulps of expf.
            let rounding = match dt {
                DType::F16 => 2f64.powi(-11),
                DType::BF16 => 2f64.powi(-8),
                _ => 0.0,
            };
            assert!(rel <= rounding.max(4.0 * 2f64.powi(-24)), "sigmoid {tag}: {rel:e}");
            // A mask bit may only flip where the logit is within float error of 0.
            let got = emulate_forward(&x, f, Epilogue::Threshold(0.5)).flatten_all().unwrap().to_vec1::<u8>().unwrap();
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
            let g = random((b, c, h * f, w * f), dt, 100 + i as u64);
            let (rel, n) = compare(&emulate_backward(&g, f), &upsample_bilinear_ac_backward(&g, f).unwrap());
            assert_eq!(n, 0, "backward {b}x{c}x{h}x{w} x{f} {dt:?}: {n} elements differ, worst {rel:e}");
        }
    }
}
