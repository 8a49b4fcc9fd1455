//! GPU check of `kernels/mask_upsample.cu` (run by scripts/gpu_check.sh on a machine with a GPU):
//! 1. correctness: every CUDA path of `nn::upsample` against its CPU op on random inputs (odd
//!    sizes, batch > 1, vector and scalar store variants, each dtype), including an autograd
//!    round trip; 2. timing: kernel vs the matmul composite vs an on-device copy of the output.
//! Exits non-zero when a comparison fails. Needs `--features cuda`.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var};
use prs::nn::upsample::{
    upsample_bilinear_ac, upsample_bilinear_ac_backward, upsample_bilinear_ac_composite, upsample_bilinear_ac_wide,
    upsample_mask, upsample_sigmoid,
};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::time::Instant;

fn random(shape: (usize, usize, usize, usize), dt: DType, seed: u64, dev: &Device) -> Result<Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    let v: Vec<f32> = (0..n).map(|_| rng.gen_range(-4.0f32..4.0)).collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dt)?.to_device(dev)?)
}

/// Unit roundoff of the stored dtype: the tolerance is one rounding of the output.
fn eps(dt: DType) -> f64 {
    match dt {
        DType::F16 => 2f64.powi(-11),
        DType::BF16 => 2f64.powi(-8),
        DType::F32 => 2f64.powi(-24),
        _ => 2f64.powi(-53),
    }
}

/// (max |a-b| / max(|b|, 1), number of elements that differ at all).
fn compare(gpu: &Tensor, cpu: &Tensor) -> Result<(f64, usize)> {
    let a = gpu.to_device(&Device::Cpu)?.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let b = cpu.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    if a.len() != b.len() {
        bail!("length {} vs {}", a.len(), b.len());
    }
    let mut worst = 0f64;
    let mut differ = 0;
    for (x, y) in a.iter().zip(&b) {
        if x != y {
            differ += 1;
            worst = worst.max((x - y).abs() / y.abs().max(1.0));
        }
    }
    Ok((worst, differ))
}

struct Report {
    failures: usize,
}

impl Report {
    fn check(&mut self, what: &str, (rel, differ): (f64, usize), tol: f64) {
        let ok = rel <= tol;
        if !ok {
            self.failures += 1;
        }
        println!(
            "{:<58} max rel {:>9.2e} (tol {:.1e}), {:>8} differ  {}",
            what,
            rel,
            tol,
            differ,
            if ok { "ok" } else { "FAIL" }
        );
    }
}

fn correctness(gpu: &Device, rep: &mut Report) -> Result<()> {
    // (b, c, h, w, factor): the mask head's case, odd sizes, batch/channels > 1, widths whose
    // output is not a whole number of 16-byte vectors (scalar kernels), a single pixel; then
    // forward threads that write several rows each with a partly idle column block (18 planes
    // of 61 x 45), backward rows split into several tiles (w 600 > 256 columns), and a factor
    // whose widest tile's column sums overflow shared memory (the tile halves).
    let cases = [
        (2, 1, 64, 64, 16),
        (3, 2, 7, 5, 16),
        (1, 1, 9, 13, 3),
        (2, 3, 5, 11, 5),
        (1, 1, 1, 1, 16),
        (4, 1, 33, 17, 2),
        (2, 9, 61, 45, 16),
        (1, 2, 20, 600, 2),
        (1, 1, 2, 300, 64),
    ];
    for (i, &(b, c, h, w, f)) in cases.iter().enumerate() {
        for dt in [DType::F16, DType::BF16, DType::F32, DType::F64] {
            let tag = format!("{b}x{c}x{h}x{w} f{f} {dt:?}");
            let xc = random((b, c, h, w), dt, 7 + i as u64, &Device::Cpu)?;
            let xg = xc.to_device(gpu)?;
            let tol = eps(dt);
            rep.check(
                &format!("forward {tag}"),
                compare(&upsample_bilinear_ac(&xg, f)?, &upsample_bilinear_ac(&xc, f)?)?,
                tol,
            );
            let gc = random((b, c, h * f, w * f), dt, 100 + i as u64, &Device::Cpu)?;
            let gg = gc.to_device(gpu)?;
            rep.check(
                &format!("backward {tag}"),
                compare(&upsample_bilinear_ac_backward(&gg, f)?, &upsample_bilinear_ac_backward(&gc, f)?)?,
                tol,
            );
            let wide_tol = eps(DType::F32).max(if dt == DType::F64 { eps(dt) } else { 0.0 });
            rep.check(
                &format!("wide logits {tag}"),
                compare(&upsample_bilinear_ac_wide(&xg, f)?, &upsample_bilinear_ac_wide(&xc, f)?)?,
                wide_tol,
            );
            // expf differs from the host libm by a few ulp before the final rounding.
            rep.check(
                &format!("sigmoid {tag}"),
                compare(&upsample_sigmoid(&xg, f)?, &upsample_sigmoid(&xc, f)?)?,
                tol.max(4.0 * eps(DType::F32)),
            );
            // A mask bit may only flip where the probability is within float error of 0.5.
            let mg = upsample_mask(&xg, f, 0.5)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<u8>()?;
            let mc = upsample_mask(&xc, f, 0.5)?.flatten_all()?.to_vec1::<u8>()?;
            let p = upsample_bilinear_ac_wide(&xc, f)?.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
            let bad = mg.iter().zip(&mc).zip(&p).filter(|((a, b), v)| a != b && v.abs() > 1e-5).count();
            let flips = mg.iter().zip(&mc).filter(|(a, b)| a != b).count();
            rep.check(&format!("mask >= 0.5 {tag} (flips away from 0.5)"), (bad as f64, flips), 0.0);
        }
    }
    // Autograd through the op on the GPU: d/dx sum(upsample(x) * r) against the CPU.
    for dt in [DType::F32, DType::F16] {
        let xc = random((2, 1, 16, 16), dt, 3, &Device::Cpu)?;
        let r = random((2, 1, 256, 256), dt, 4, &Device::Cpu)?;
        let mut grads = Vec::new();
        for dev in [&Device::Cpu, gpu] {
            let x = Var::from_tensor(&xc.to_device(dev)?)?;
            let y = upsample_bilinear_ac(x.as_tensor(), 16)?;
            let loss = (y * r.to_device(dev)?)?.to_dtype(DType::F32)?.sum_all()?;
            let g = loss.backward()?;
            grads.push(g.get(x.as_tensor()).expect("gradient of x").clone());
        }
        rep.check(&format!("autograd dX 2x1x16x16 x16 {dt:?}"), compare(&grads[1], &grads[0])?, eps(dt));
    }
    Ok(())
}

/// The fused attention softmax, RMS normalisation, training BatchNorm and SiLU gate (src/nn/fused.rs), value and gradient,
/// CUDA against CPU: the same candle kernels in the same order, so one rounding of the output
/// apart at most (reductions may sum in another order).
fn fused_ops(gpu: &Device, rep: &mut Report) -> Result<()> {
    use prs::nn::fused::rms_normalize;
    use prs::nn::softmax::scaled_masked_softmax;
    for dt in [DType::F32, DType::BF16, DType::F16] {
        let s = random((2, 4, 33, 37), dt, 11, &Device::Cpu)?;
        let r = random((2, 4, 33, 37), DType::F32, 12, &Device::Cpu)?;
        // (B,1,Q,K) causal mask broadcast over the heads.
        let m: Vec<f32> = (0..2 * 33 * 37).map(|i| if i % 37 > (i / 37) % 33 { -1e4 } else { 0.0 }).collect();
        let mask = Tensor::from_vec(m, (2, 1, 33, 37), &Device::Cpu)?;
        let (mut outs, mut grads) = (vec![], vec![]);
        for dev in [&Device::Cpu, gpu] {
            let x = Var::from_tensor(&s.to_device(dev)?)?;
            let p = scaled_masked_softmax(x.as_tensor(), 0.25, Some(&mask.to_device(dev)?))?;
            let g = (p.to_dtype(DType::F32)? * r.to_device(dev)?)?.sum_all()?.backward()?;
            grads.push(g.get(x.as_tensor()).expect("gradient").clone());
            outs.push(p);
        }
        let tol = 4.0 * eps(dt).max(eps(DType::F32));
        rep.check(&format!("fused softmax 2x4x33x37 {dt:?}"), compare(&outs[1], &outs[0])?, tol);
        rep.check(&format!("fused softmax dX {dt:?}"), compare(&grads[1], &grads[0])?, tol);
        let x = random((3, 5, 1, 4096), dt, 13, &Device::Cpu)?;
        let r = random((3, 5, 1, 4096), DType::F32, 14, &Device::Cpu)?;
        let (mut outs, mut grads) = (vec![], vec![]);
        for dev in [&Device::Cpu, gpu] {
            let v = Var::from_tensor(&x.to_device(dev)?)?;
            let y = rms_normalize(v.as_tensor(), 1e-5)?;
            let g = (y.to_dtype(DType::F32)? * r.to_device(dev)?)?.sum_all()?.backward()?;
            grads.push(g.get(v.as_tensor()).expect("gradient").clone());
            outs.push(y);
        }
        rep.check(&format!("fused rms normalise 15x4096 {dt:?}"), compare(&outs[1], &outs[0])?, tol);
        rep.check(&format!("fused rms normalise dX {dt:?}"), compare(&grads[1], &grads[0])?, tol);
    }
    // Gated MLP product silu(gate) * up, in the LLM's dtypes.
    for dt in [DType::BF16, DType::F32] {
        let (gate, up) = (random((2, 7, 1, 300), dt, 19, &Device::Cpu)?, random((2, 7, 1, 300), dt, 20, &Device::Cpu)?);
        let r = random((2, 7, 1, 300), DType::F32, 21, &Device::Cpu)?;
        let mut runs = vec![];
        for dev in [&Device::Cpu, gpu] {
            let (g, u) = (Var::from_tensor(&gate.to_device(dev)?)?, Var::from_tensor(&up.to_device(dev)?)?);
            let y = prs::nn::fused::silu_mul(g.as_tensor(), u.as_tensor())?;
            let grads = (y.to_dtype(DType::F32)? * r.to_device(dev)?)?.sum_all()?.backward()?;
            let (dg, du) = (
                grads.get(g.as_tensor()).expect("gradient").clone(),
                grads.get(u.as_tensor()).expect("gradient").clone(),
            );
            runs.push((y, dg, du));
        }
        // silu's backward goes through exp, whose CUDA and CPU versions differ by an ulp or two.
        let tol = 8.0 * eps(dt).max(eps(DType::F32));
        rep.check(&format!("fused silu * up {dt:?}"), compare(&runs[1].0, &runs[0].0)?, tol);
        rep.check(&format!("fused silu * up dGate {dt:?}"), compare(&runs[1].1, &runs[0].1)?, tol);
        rep.check(&format!("fused silu * up dUp {dt:?}"), compare(&runs[1].2, &runs[0].2)?, tol);
    }
    // Training BatchNorm (TinySAM runs it in f32): output and the three gradients.
    let x = random((4, 8, 33, 35), DType::F32, 15, &Device::Cpu)?;
    let w = random((1, 8, 1, 1), DType::F32, 16, &Device::Cpu)?;
    let b = random((1, 8, 1, 1), DType::F32, 17, &Device::Cpu)?;
    let r = random((4, 8, 33, 35), DType::F32, 18, &Device::Cpu)?;
    let mut runs = vec![];
    for dev in [&Device::Cpu, gpu] {
        let vars = [&x, &w, &b].map(|t| Var::from_tensor(&t.to_device(dev).unwrap()).unwrap());
        let y = prs::nn::fused::batch_norm_train(vars[0].as_tensor(), vars[1].as_tensor(), vars[2].as_tensor(), 1e-5)?;
        let g = (&y * r.to_device(dev)?)?.sum_all()?.backward()?;
        let grads: Vec<Tensor> = vars.iter().map(|v| g.get(v.as_tensor()).expect("gradient").clone()).collect();
        runs.push((y, grads));
    }
    // Per-channel sums over n = 4 x 33 x 35 values, in another order on each backend: the
    // rounding error of a sum grows like sqrt(n) ulps, and dW / dB are such sums themselves.
    let tol = 8.0 * eps(DType::F32) * (4.0f64 * 33.0 * 35.0).sqrt();
    rep.check("fused batch norm 4x8x33x35 f32", compare(&runs[1].0, &runs[0].0)?, tol);
    for (i, name) in ["dX", "dW", "dB"].iter().enumerate() {
        rep.check(&format!("fused batch norm {name}"), compare(&runs[1].1[i], &runs[0].1[i])?, tol);
    }
    // Dropout: the counter-based mask must be the CPU's bit for bit, in every dtype.
    for dt in [DType::F32, DType::BF16, DType::F16, DType::F64] {
        let x = random((3, 7, 129, 65), dt, 22, &Device::Cpu)?;
        let cpu = prs::nn::dropout::dropout_seeded(&x, 0.1, 1234)?;
        let cuda = prs::nn::dropout::dropout_seeded(&x.to_device(gpu)?, 0.1, 1234)?;
        rep.check(&format!("dropout p 0.1 3x7x129x65 {dt:?} (exact)"), compare(&cuda, &cpu)?, 0.0);
    }
    Ok(())
}

/// Median seconds of `iters` runs of `f` (after warm-up), synchronising around each.
fn time(dev: &Device, iters: usize, mut f: impl FnMut() -> Result<Tensor>) -> Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    dev.synchronize()?;
    let mut t = Vec::with_capacity(iters);
    for _ in 0..iters {
        let s = Instant::now();
        let y = f()?;
        dev.synchronize()?;
        t.push(s.elapsed().as_secs_f64());
        drop(y);
    }
    t.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Ok(t[iters / 2])
}

fn bench(gpu: &Device) -> Result<()> {
    println!("\n{:<44} {:>10} {:>10} {:>9}", "timing (median of 20)", "ms", "GB/s", "% copy");
    // The mask head (B x 1 x 64 x 64 -> 1024 x 1024, f16) and gpu.md's earlier naive-kernel case.
    for &(b, h, w, f, dt) in
        &[(64, 64, 64, 16, DType::F16), (64, 512, 512, 2, DType::F16), (16, 64, 64, 16, DType::F32)]
    {
        let x = random((b, 1, h, w), dt, 1, gpu)?;
        let y = upsample_bilinear_ac(&x, f)?;
        let g = random((b, 1, h * f, w * f), dt, 2, gpu)?;
        let (in_b, out_b) =
            ((x.elem_count() * dt.size_in_bytes()) as f64, (y.elem_count() * dt.size_in_bytes()) as f64);
        let copy = time(gpu, 20, || Ok(y.copy()?))?;
        let copy_bw = 2.0 * out_b / copy;
        let row = |name: &str, secs: f64, bytes: f64| {
            let bw = bytes / secs;
            println!("{:<44} {:>10.3} {:>10.1} {:>8.1}%", name, secs * 1e3, bw / 1e9, 100.0 * bw / copy_bw);
        };
        let tag = format!("{b}x1x{h}x{w} f{f} {dt:?}");
        row(&format!("copy of output {tag}"), copy, 2.0 * out_b);
        row(&format!("kernel fwd {tag}"), time(gpu, 20, || upsample_bilinear_ac(&x, f))?, in_b + out_b);
        row(&format!("composite fwd {tag}"), time(gpu, 20, || upsample_bilinear_ac_composite(&x, f))?, in_b + out_b);
        let wide_b = in_b + (y.elem_count() * 4) as f64;
        row(&format!("kernel fwd -> f32 {tag}"), time(gpu, 20, || upsample_bilinear_ac_wide(&x, f))?, wide_b);
        row(&format!("kernel fwd + sigmoid {tag}"), time(gpu, 20, || upsample_sigmoid(&x, f))?, in_b + out_b);
        row(
            &format!("kernel fwd + mask u8 {tag}"),
            time(gpu, 20, || upsample_mask(&x, f, 0.5))?,
            in_b + y.elem_count() as f64,
        );
        row(&format!("kernel bwd {tag}"), time(gpu, 20, || upsample_bilinear_ac_backward(&g, f))?, in_b + out_b);
    }
    // Dropout of a LoRA input at batch 8 (8 x 640 x 4096 bf16): one read, one write.
    let x = random((8, 1, 640, 4096), DType::BF16, 3, gpu)?;
    let bytes = 2.0 * (x.elem_count() * 2) as f64;
    let copy = time(gpu, 20, || Ok(x.copy()?))?;
    let drop = time(gpu, 20, || prs::nn::dropout::dropout_seeded(&x, 0.05, 5))?;
    for (name, secs) in [("copy 8x640x4096 bf16", copy), ("dropout 8x640x4096 bf16", drop)] {
        println!("{:<44} {:>10.3} {:>10.1} {:>8.1}%", name, secs * 1e3, bytes / secs / 1e9, 100.0 * copy / secs);
    }
    Ok(())
}

fn main() -> Result<()> {
    let gpu = Device::new_cuda(0)?;
    let mut rep = Report { failures: 0 };
    correctness(&gpu, &mut rep)?;
    fused_ops(&gpu, &mut rep)?;
    if rep.failures == 0 {
        println!("all comparisons passed");
    }
    // Timings even after a failed comparison: they are independent of it.
    if !std::env::args().any(|a| a == "--no-bench") {
        bench(&gpu)?;
    }
    if rep.failures > 0 {
        bail!("{} comparison(s) failed", rep.failures);
    }
    Ok(())
}
