//! GPU check of `kernels/fused.cu` and `kernels/depthwise.cu` (run by scripts/gpu_check.sh, step `fused`): each fused
//! kernel against candle's composite of the same function on CUDA (full training shapes) and
//! against the CPU reference (a slice of them), value and gradient, bf16 and f32; then timings,
//! kernel vs composite, median of 20, with the bytes each must move and the achieved GB/s.
//! Exits non-zero when a comparison fails. Needs `--features cuda`.
//!
//! Shapes: the LLM's attention scores (b 8, 32 heads, 640 x 640, causal, key padding), the mask
//! decoder's (16 heads x 4096 x 4096 per sample, key mask), and the LLM's rows for RMSNorm
//! (8 x 640 x 4096), the SwiGLU gate (8 x 640 x 14336) and GELU's backward (TinySAM's MBConv map). Last, the Mistral attention core with
//! grouped K/V and the fused softmax against the repeat_kv + composite form it replaced, and the
//! depthwise convolution (`kernels/depthwise.cu`) at TinySAM's 1024 px shapes, and the rotary
//! head split at the 7B's q shape, the multi-tensor AdamW (`kernels/adamw.cu`) over the 7B's
//! ~550 trained tensors, the frozen base's dequantisation (`kernels/dequant.cu`), and a LoRA-adapted
//! projection as one node against the separate ops.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var};
use prs::nn::fused::{rms_normalize, rms_normalize_composite, silu_mul, silu_mul_composite};
use prs::nn::softmax::{scaled_masked_softmax_causal, scaled_masked_softmax_composite, scaled_softmax_backward};
use std::time::Instant;

/// Uniform values in (-range, range), drawn on `dev` (curand on the GPU: the full shapes have
/// up to 268 M elements).
fn random(dims: &[usize], dt: DType, range: f32, dev: &Device) -> Result<Tensor> {
    Ok(Tensor::rand(-range, range, dims, dev)?.to_dtype(dt)?)
}

/// Key mask (B, 1, ..., 1, K) of `rank` dims in `dt`: the last `k / 8 * (b % 3)` keys of sample
/// b hidden with `mask_min(F32)`, as the LLM's padding and the decoder's key mask do.
fn key_mask(b: usize, k: usize, rank: usize, dt: DType, dev: &Device) -> Result<Tensor> {
    let neg = prs::nn::softmax::mask_min(DType::F32) as f32;
    let v: Vec<f32> = (0..b * k).map(|i| if i % k >= k - k / 8 * ((i / k) % 3) { neg } else { 0.0 }).collect();
    let mut dims = vec![1; rank];
    (dims[0], dims[rank - 1]) = (b, k);
    Ok(Tensor::from_vec(v, dims, &Device::Cpu)?.to_dtype(dt)?.to_device(dev)?)
}

/// Unit roundoff of the stored dtype.
fn eps(dt: DType) -> f64 {
    match dt {
        DType::F16 => 2f64.powi(-11),
        DType::BF16 => 2f64.powi(-8),
        _ => 2f64.powi(-24),
    }
}

struct Report {
    failures: usize,
}

impl Report {
    /// Max |a - b| and that relative to max |b|, against `tol` (relative): a few roundings of the
    /// output, more in f32 where sums of thousands of terms run in another order.
    fn check(&mut self, what: &str, a: &Tensor, b: &Tensor) -> Result<()> {
        self.check_as(what, a, b, b.dtype())
    }

    /// `check` with the tolerance of `dt` (a reference computed in a wider dtype).
    fn check_as(&mut self, what: &str, a: &Tensor, b: &Tensor, dt: DType) -> Result<()> {
        // On `b`'s device: the GPU for GPU-vs-GPU pairs (no transfer of the full shapes).
        let a = a.to_device(b.device())?.to_dtype(DType::F32)?;
        let b = b.to_dtype(DType::F32)?;
        let max = |t: Tensor| -> Result<f64> { Ok(t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? as f64) };
        let abs = max((&a - &b)?)?;
        let nans = a.ne(&a)?.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
        let scale = max(b)?;
        let rel = abs / scale.max(1e-30);
        let tol = 4.0 * eps(dt).max(2f64.powi(-18));
        let ok = rel <= tol && abs.is_finite() && nans == 0.0;
        if !ok {
            self.failures += 1;
        }
        let verdict = if ok { "ok" } else { "FAIL" };
        println!("{what:<64} max abs {abs:>9.2e}  rel {rel:>9.2e} (tol {tol:.1e}) NaN {nans}  {verdict}");
        Ok(())
    }
}

/// Output and input gradient of `f` at `x` for the upstream gradient `r` (dtype of the output).
fn value_and_grad(x: &Tensor, r: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<(Tensor, Tensor)> {
    let v = Var::from_tensor(x)?;
    let y = f(v.as_tensor())?;
    let g = (&y * r)?.sum_all()?.backward()?;
    Ok((y, g.get(v.as_tensor()).expect("gradient").clone()))
}

/// One attention-softmax case: the kernel (`scaled_masked_softmax_causal` or plain) against the
/// composite on CUDA at `dims`, and against the CPU at `cpu_dims` (a slice of them).
struct SoftmaxCase {
    name: &'static str,
    dims: Vec<usize>,
    cpu_dims: Vec<usize>,
    causal: bool,
    /// The key mask's dtype relative to the scores: f32 exercises the widened-mask variant.
    mask_f32: bool,
}

impl SoftmaxCase {
    fn scale(&self) -> f64 {
        if self.causal {
            1.0 / (128f64).sqrt()
        } else {
            1.0
        }
    }

    fn inputs(&self, dims: &[usize], dt: DType, dev: &Device) -> Result<(Tensor, Tensor, Tensor)> {
        let (r, k) = (dims.len(), dims[dims.len() - 1]);
        // Scores of a few units after scaling: peaked rows, as trained attention has.
        let s = random(dims, dt, if self.causal { 30.0 } else { 8.0 }, dev)?;
        let g = random(dims, dt, 1.0, dev)?;
        let m = key_mask(dims[0], k, r, if self.mask_f32 { DType::F32 } else { dt }, dev)?;
        Ok((s, g, m))
    }

    fn run(&self, s: &Tensor, m: &Tensor, composite: bool) -> Result<Tensor> {
        let past = if self.causal { Some(s.dim(s.rank() - 1)? - s.dim(s.rank() - 2)?) } else { None };
        match (composite, past) {
            (false, Some(p)) => scaled_masked_softmax_causal(s, self.scale(), Some(m), p),
            (false, None) => prs::nn::softmax::scaled_masked_softmax(s, self.scale(), Some(m)),
            (true, _) => scaled_masked_softmax_composite(s, self.scale(), Some(m), past),
        }
    }

    fn check(&self, gpu: &Device, rep: &mut Report) -> Result<()> {
        for dt in [DType::BF16, DType::F32] {
            let (s, g, m) = self.inputs(&self.dims, dt, gpu)?;
            let (y, dx) = value_and_grad(&s, &g, |t| self.run(t, &m, false))?;
            let (yc, dxc) = value_and_grad(&s, &g, |t| self.run(t, &m, true))?;
            let tag = format!("{} {:?} {dt:?}", self.name, self.dims);
            rep.check(&format!("softmax kernel vs CUDA composite {tag}"), &y, &yc)?;
            rep.check(&format!("softmax kernel vs CUDA composite dX {tag}"), &dx, &dxc)?;
            drop((y, dx, yc, dxc));
            let (s, g, m) = self.inputs(&self.cpu_dims, dt, &Device::Cpu)?;
            let (yc, dxc) = value_and_grad(&s, &g, |t| self.run(t, &m, false))?;
            let (y, dx) =
                value_and_grad(&s.to_device(gpu)?, &g.to_device(gpu)?, |t| self.run(t, &m.to_device(gpu)?, false))?;
            let tag = format!("{} {:?} {dt:?}", self.name, self.cpu_dims);
            rep.check(&format!("softmax kernel vs CPU {tag}"), &y, &yc)?;
            rep.check(&format!("softmax kernel vs CPU dX {tag}"), &dx, &dxc)?;
        }
        Ok(())
    }

    fn bench(&self, gpu: &Device) -> Result<()> {
        for dt in [DType::BF16, DType::F32] {
            let (s, g, m) = self.inputs(&self.dims, dt, gpu)?;
            let p = self.run(&s, &m, false)?;
            let bytes = (s.elem_count() * dt.size_in_bytes()) as f64;
            let tag = format!("{} {dt:?}", self.name);
            // Forward reads the scores and writes the output; backward reads p and g, writes dx.
            timing_pair(
                gpu,
                &format!("softmax fwd {tag}"),
                2.0 * bytes,
                || self.run(&s, &m, false),
                || self.run(&s, &m, true),
            )?;
            timing_pair(
                gpu,
                &format!("softmax bwd {tag}"),
                3.0 * bytes,
                || scaled_softmax_backward(&p, &g, self.scale(), false),
                || scaled_softmax_backward(&p, &g, self.scale(), true),
            )?;
        }
        Ok(())
    }
}

/// Median seconds of 20 runs of `f` (after 3 warm-ups), synchronising around each.
fn time(dev: &Device, mut f: impl FnMut() -> Result<Tensor>) -> Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    dev.synchronize()?;
    let mut t = Vec::with_capacity(20);
    for _ in 0..20 {
        let s = Instant::now();
        let y = f()?;
        dev.synchronize()?;
        t.push(s.elapsed().as_secs_f64());
        drop(y);
    }
    t.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Ok(t[10])
}

/// One timing line: kernel and composite medians, GB/s of the bytes the kernel must move, and
/// the speed-up.
fn timing_pair(
    dev: &Device,
    what: &str,
    bytes: f64,
    kernel: impl FnMut() -> Result<Tensor>,
    composite: impl FnMut() -> Result<Tensor>,
) -> Result<()> {
    let (k, c) = (time(dev, kernel)?, time(dev, composite)?);
    println!(
        "{what:<44} kernel {:>8.3} ms {:>7.1} GB/s | composite {:>8.3} ms {:>7.1} GB/s | x{:.2}",
        k * 1e3,
        bytes / k / 1e9,
        c * 1e3,
        bytes / c / 1e9,
        c / k
    );
    Ok(())
}

/// Output and the gradients of every input of `f` for the upstream gradient `r`.
fn value_and_grads(xs: &[Tensor], r: &Tensor, f: OpFn) -> Result<(Tensor, Vec<Tensor>)> {
    let vars: Vec<Var> = xs.iter().map(Var::from_tensor).collect::<candle_core::Result<_>>()?;
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts)?;
    let g = (&y * r)?.sum_all()?.backward()?;
    Ok((y, ts.iter().map(|t| g.get(t).expect("gradient").clone()).collect()))
}

type OpFn = fn(&[Tensor]) -> Result<Tensor>;

/// A row-wise or element-wise fused op: kernel and composite of the same function of `inputs`
/// tensors of `dims`; `fwd_bytes` / `bwd_bytes` elements moved per output element.
struct OpCase {
    name: &'static str,
    dims: Vec<usize>,
    cpu_dims: Vec<usize>,
    inputs: usize,
    kernel: OpFn,
    composite: OpFn,
    fwd_bytes: usize,
    bwd_bytes: usize,
}

impl OpCase {
    fn inputs(&self, dims: &[usize], dt: DType, dev: &Device) -> Result<(Vec<Tensor>, Tensor)> {
        let xs = (0..self.inputs).map(|_| random(dims, dt, 4.0, dev)).collect::<Result<Vec<_>>>()?;
        Ok((xs, random(dims, dt, 1.0, dev)?))
    }

    fn check(&self, gpu: &Device, rep: &mut Report) -> Result<()> {
        for dt in [DType::BF16, DType::F32] {
            let (xs, r) = self.inputs(&self.dims, dt, gpu)?;
            let (y, g) = value_and_grads(&xs, &r, self.kernel)?;
            let (yc, gc) = value_and_grads(&xs, &r, self.composite)?;
            let tag = format!("{} {:?} {dt:?}", self.name, self.dims);
            rep.check(&format!("{tag} kernel vs CUDA composite"), &y, &yc)?;
            for (i, (a, b)) in g.iter().zip(&gc).enumerate() {
                rep.check(&format!("{tag} kernel vs CUDA composite d{i}"), a, b)?;
            }
            let (xs, r) = self.inputs(&self.cpu_dims, dt, &Device::Cpu)?;
            let (yc, gc) = value_and_grads(&xs, &r, self.composite)?;
            let on_gpu = xs.iter().map(|x| x.to_device(gpu)).collect::<candle_core::Result<Vec<_>>>()?;
            let (y, g) = value_and_grads(&on_gpu, &r.to_device(gpu)?, self.kernel)?;
            let tag = format!("{} {:?} {dt:?}", self.name, self.cpu_dims);
            rep.check(&format!("{tag} kernel vs CPU"), &y, &yc)?;
            for (i, (a, b)) in g.iter().zip(&gc).enumerate() {
                rep.check(&format!("{tag} kernel vs CPU d{i}"), a, b)?;
            }
        }
        Ok(())
    }

    fn bench(&self, gpu: &Device) -> Result<()> {
        for dt in [DType::BF16, DType::F32] {
            let (xs, r) = self.inputs(&self.dims, dt, gpu)?;
            let bytes = (r.elem_count() * dt.size_in_bytes()) as f64;
            let tag = format!("{} {dt:?}", self.name);
            timing_pair(
                gpu,
                &format!("{tag} fwd"),
                self.fwd_bytes as f64 * bytes,
                || (self.kernel)(&xs),
                || (self.composite)(&xs),
            )?;
            // Forward and backward through autograd: the backward alone is the difference.
            let both = (self.fwd_bytes + self.bwd_bytes) as f64 * bytes;
            timing_pair(
                gpu,
                &format!("{tag} fwd+bwd"),
                both,
                || Ok(value_and_grads(&xs, &r, self.kernel)?.0),
                || Ok(value_and_grads(&xs, &r, self.composite)?.0),
            )?;
        }
        Ok(())
    }
}

fn op_cases() -> Vec<OpCase> {
    vec![
        OpCase {
            name: "rms normalise 8x640x4096",
            dims: vec![8, 640, 4096],
            cpu_dims: vec![2, 64, 4096],
            inputs: 1,
            kernel: |x| rms_normalize(&x[0], 1e-5),
            composite: |x| rms_normalize_composite(&x[0], 1e-5),
            fwd_bytes: 2,
            bwd_bytes: 3,
        },
        OpCase {
            name: "gelu_erf (TinySAM MBConv) 8x256x256x256",
            dims: vec![8, 256, 256, 256],
            cpu_dims: vec![1, 16, 64, 64],
            inputs: 1,
            kernel: |x| prs::nn::ops::gelu_erf(&x[0]),
            composite: |x| Ok(x[0].gelu_erf()?),
            fwd_bytes: 2,
            bwd_bytes: 3,
        },
        OpCase {
            name: "silu(gate) * up 8x640x14336",
            dims: vec![8, 640, 14336],
            cpu_dims: vec![2, 64, 14336],
            inputs: 2,
            kernel: |x| silu_mul(&x[0], &x[1]),
            composite: |x| silu_mul_composite(&x[0], &x[1]),
            fwd_bytes: 3,
            bwd_bytes: 5,
        },
    ]
}

/// The Mistral attention core at the 7B's shape (b 8, 32 query heads on 8 kv heads, 640
/// tokens, head dim 128, key padding), forward and backward through autograd: grouped-query
/// attention (K/V shared per group, the fused softmax) against K/V copied per head with
/// candle's composite softmax, the form before session 10.
fn gqa(gpu: &Device, rep: &mut Report, bench: bool) -> Result<()> {
    use prs::model::mistral::grouped_attention;
    let (b, nh, nkv, t, d) = (8, 32, 8, 640, 128);
    let scale = 1.0 / (d as f64).sqrt();
    let dt = DType::BF16;
    let xs = [(nh, 3.0), (nkv, 3.0), (nkv, 1.0)]
        .iter()
        .map(|&(h, r)| random(&[b, h, t, d], dt, r, gpu))
        .collect::<Result<Vec<_>>>()?;
    let r = random(&[b, nh, t, d], dt, 1.0, gpu)?;
    let pad = key_mask(b, t, 4, dt, gpu)?;
    let grouped = |x: &[Tensor]| grouped_attention(&x[0], &x[1], &x[2], Some(&pad), 0, scale);
    let copied = |x: &[Tensor]| -> Result<Tensor> {
        let rep = |y: &Tensor| -> Result<Tensor> {
            Ok(y.unsqueeze(2)?.expand((b, nkv, nh / nkv, t, d))?.reshape((b, nh, t, d))?)
        };
        let s = x[0].matmul(&rep(&x[1])?.t()?)?;
        Ok(scaled_masked_softmax_composite(&s, scale, Some(&pad), Some(0))?.matmul(&rep(&x[2])?)?)
    };
    let run = |f: &dyn Fn(&[Tensor]) -> Result<Tensor>| -> Result<(Tensor, Vec<Tensor>)> {
        let vars: Vec<Var> = xs.iter().map(Var::from_tensor).collect::<candle_core::Result<_>>()?;
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&ts)?;
        let g = (&y * &r)?.sum_all()?.backward()?;
        Ok((y, ts.iter().map(|t| g.get(t).expect("gradient").clone()).collect()))
    };
    if !bench {
        let ((y, g), (yc, gc)) = (run(&grouped)?, run(&copied)?);
        let tag = "attention 8x32(8 kv)x640x128 BF16 grouped vs repeat_kv";
        rep.check(tag, &y, &yc)?;
        for (name, (a, c)) in ["dq", "dk", "dv"].iter().zip(g.iter().zip(&gc)) {
            rep.check(&format!("{tag} {name}"), a, c)?;
        }
        return Ok(());
    }
    // Bytes: q, k, v, the output and the scores once each way; a floor, not what either moves.
    let scores = (b * nh * t * t * 2) as f64;
    let qkv = ((b * nh * t * d + 2 * b * nkv * t * d + b * nh * t * d) * 2) as f64;
    timing_pair(
        gpu,
        "attention fwd+bwd 8x32x640 BF16 (grouped | copies)",
        3.0 * (qkv + scores),
        || Ok(run(&grouped)?.0),
        || Ok(run(&copied)?.0),
    )
}

/// A LoRA-adapted projection at the 7B's q_proj shape (8 x 640 rows, 4096 -> 4096, rank 16,
/// bf16) as one node (`lora_linear`: keeps x, A, B; recomputes x A^T in backward) against the
/// separate ops it replaced, forward and backward (dx, dA, dB).
fn lora(gpu: &Device, rep: &mut Report, bench: bool) -> Result<()> {
    use prs::nn::linear::{frozen_matmul, lora_linear, FrozenWeight};
    let (m, k, n, r, scale) = (8 * 640, 4096, 4096, 16, 2.0);
    let dt = DType::BF16;
    let w = random(&[n, k], dt, 0.02, gpu)?;
    let xs = [random(&[8, 640, k], dt, 1.0, gpu)?, random(&[r, k], dt, 0.02, gpu)?, random(&[n, r], dt, 0.02, gpu)?];
    let dy = random(&[8, 640, n], dt, 1.0, gpu)?;
    type Proj<'a> = &'a dyn Fn(&[Tensor]) -> Result<Tensor>;
    let fused = |x: &[Tensor]| lora_linear(&x[0], FrozenWeight::Dense(w.clone()), &x[1], &x[2], scale, 0.0, "q");
    let separate = |x: &[Tensor]| -> Result<Tensor> {
        let h = x[0].broadcast_matmul(&x[1].t()?)?.broadcast_matmul(&x[2].t()?)?;
        Ok((frozen_matmul(&x[0], &w)? + (h * scale)?)?)
    };
    let run = |f: Proj| -> Result<Vec<Tensor>> {
        let vars: Vec<Var> = xs.iter().map(Var::from_tensor).collect::<candle_core::Result<_>>()?;
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&ts)?;
        let g = (&y * &dy)?.sum_all()?.backward()?;
        Ok([y].into_iter().chain(ts.iter().map(|t| g.get(t).expect("gradient").clone())).collect())
    };
    if !bench {
        let (a, c) = (run(&fused)?, run(&separate)?);
        for (name, (a, c)) in ["y", "dx", "dA", "dB"].iter().zip(a.iter().zip(&c)) {
            rep.check(&format!("LoRA q_proj 5120x4096 r16 BF16 one node vs separate ops {name}"), a, c)?;
        }
        return Ok(());
    }
    // Bytes: x, the weight, y and dy, dx; the adapter is small. A floor for both.
    let bytes = ((2 * m * k + n * k + 2 * m * n) * 2) as f64;
    timing_pair(
        gpu,
        "LoRA projection fwd+bwd 5120x4096 r16 BF16 (one node | separate)",
        bytes,
        || Ok(run(&fused)?.remove(0)),
        || Ok(run(&separate)?.remove(0)),
    )
}

/// The depthwise convolution kernels (`kernels/depthwise.cu`) at TinySAM's 1024 px shapes
/// (batch 8): the MBConv's 256 channels at 256 x 256 and PatchMerging's stride 2. Checked
/// against candle's composite of shifted views on CUDA, in f32 from the same values (so a bf16
/// kernel is judged at bf16's rounding against an exact-enough reference), and against the CPU
/// op on a slice, where f32 output and input gradient must agree bit for bit (same products,
/// same order). Timed against the composite, forward and forward + backward.
fn depthwise(gpu: &Device, rep: &mut Report, bench: bool) -> Result<()> {
    use prs::nn::conv::depthwise_conv2d_composite;
    use prs::nn::depthwise::depthwise_conv2d;
    type Conv = fn(&Tensor, &Tensor, usize, usize) -> anyhow::Result<Tensor>;
    let run = |f: Conv, x: &Tensor, w: &Tensor, r: &Tensor, s: usize| -> Result<Vec<Tensor>> {
        let (xv, wv) = (Var::from_tensor(x)?, Var::from_tensor(w)?);
        let y = f(xv.as_tensor(), wv.as_tensor(), s, 1)?;
        let g = (&y * r)?.sum_all()?.backward()?;
        let grad = |v: &Var| g.get(v.as_tensor()).expect("gradient").clone();
        Ok(vec![y, grad(&xv), grad(&wv)])
    };
    for (c, side, s) in [(256, 256, 1), (128, 256, 2)] {
        let (b, ho) = (8, (side - 1) / s + 1);
        for dt in [DType::BF16, DType::F32] {
            let tag = format!("depthwise 3x3 s{s} 8x{c}x{side}x{side} {dt:?}");
            let x = random(&[b, c, side, side], dt, 2.0, gpu)?;
            let w = random(&[c, 1, 3, 3], dt, 0.5, gpu)?;
            let r = random(&[b, c, ho, ho], dt, 1.0, gpu)?;
            if bench {
                if dt != DType::BF16 {
                    continue;
                }
                let bytes = ((x.elem_count() + r.elem_count()) * 2) as f64;
                timing_pair(
                    gpu,
                    &format!("{tag} fwd"),
                    bytes,
                    || depthwise_conv2d(&x, &w, s, 1),
                    || depthwise_conv2d_composite(&x, &w, s, 1),
                )?;
                timing_pair(
                    gpu,
                    &format!("{tag} fwd+bwd"),
                    4.0 * bytes,
                    || Ok(run(depthwise_conv2d, &x, &w, &r, s)?.remove(0)),
                    || Ok(run(depthwise_conv2d_composite, &x, &w, &r, s)?.remove(0)),
                )?;
                continue;
            }
            let wide = |t: &Tensor| t.to_dtype(DType::F32);
            let got = run(depthwise_conv2d, &x, &w, &r, s)?;
            let want = run(depthwise_conv2d_composite, &wide(&x)?, &wide(&w)?, &wide(&r)?, s)?;
            for (name, (a, e)) in ["y", "dx", "dw"].iter().zip(got.iter().zip(&want)) {
                rep.check_as(&format!("{tag} kernel vs CUDA composite (f32) {name}"), a, e, dt)?;
            }
            // A slice on the CPU: the same op's CPU kernels.
            let cut = |t: &Tensor, n: usize| -> Result<Tensor> {
                Ok(t.narrow(0, 0, 1)?.narrow(1, 0, 16)?.narrow(2, 0, n)?.narrow(3, 0, n)?.contiguous()?)
            };
            let (xc, rc) = (cut(&x, 64)?, cut(&r, (64 - 1) / s + 1)?);
            let wc = w.narrow(0, 0, 16)?.contiguous()?;
            let on_gpu = run(depthwise_conv2d, &xc, &wc, &rc, s)?;
            let on_cpu = run(
                depthwise_conv2d,
                &xc.to_device(&Device::Cpu)?,
                &wc.to_device(&Device::Cpu)?,
                &rc.to_device(&Device::Cpu)?,
                s,
            )?;
            for (name, (a, e)) in ["y", "dx", "dw"].iter().zip(on_gpu.iter().zip(&on_cpu)) {
                rep.check(&format!("{tag} kernel vs CPU op 1x16x64x64 {name}"), a, e)?;
                if dt == DType::F32 && *name != "dw" {
                    let same = a
                        .to_device(&Device::Cpu)?
                        .flatten_all()?
                        .to_vec1::<f32>()?
                        .iter()
                        .zip(e.flatten_all()?.to_vec1::<f32>()?)
                        .all(|(p, q)| p.to_bits() == q.to_bits());
                    if !same {
                        rep.failures += 1;
                    }
                    println!("{tag} {name}: CUDA and CPU bit-identical: {}", if same { "yes  ok" } else { "no  FAIL" });
                }
            }
        }
    }
    Ok(())
}

/// The rotary head split (`nn::rope::rope_heads`) at the 7B's q shape (b 8, 640 tokens, 32
/// heads of 128): against the composite it replaced (head split, `apply_rope`) on CUDA, and
/// against the CPU op on a slice, where f32 must agree bit for bit (same operations); then
/// timed, forward and forward + backward.
fn rope(gpu: &Device, rep: &mut Report, bench: bool) -> Result<()> {
    use prs::nn::rope::{apply_rope, rope_heads, rope_tables};
    let (h, d) = (32, 128);
    let inputs = |b: usize, t: usize, dt: DType, dev: &Device| -> Result<(Tensor, Tensor, Tensor, Tensor)> {
        let pos: Vec<u32> = (0..b * t).map(|i| (i % t + 3 * (i / t)) as u32).collect();
        let (cos, sin) = rope_tables(&Tensor::from_vec(pos, (b, t), dev)?, d, 1e6, dt)?;
        Ok((random(&[b, t, h * d], dt, 3.0, dev)?, cos, sin, random(&[b, h, t, d], dt, 1.0, dev)?))
    };
    let fused = |x: &Tensor, c: &Tensor, s: &Tensor| rope_heads(x, c, s, h);
    let composite = |x: &Tensor, c: &Tensor, s: &Tensor| -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        apply_rope(&x.reshape((b, t, h, d))?.transpose(1, 2)?.contiguous()?, c, s)
    };
    for dt in [DType::BF16, DType::F32] {
        let tag = format!("rope head split 8x640x32x128 {dt:?}");
        let (x, c, s, r) = inputs(8, 640, dt, gpu)?;
        if bench {
            let bytes = (2 * x.elem_count() * dt.size_in_bytes()) as f64;
            timing_pair(gpu, &format!("{tag} fwd"), bytes, || fused(&x, &c, &s), || composite(&x, &c, &s))?;
            timing_pair(
                gpu,
                &format!("{tag} fwd+bwd"),
                2.0 * bytes,
                || Ok(value_and_grad(&x, &r, |x| fused(x, &c, &s))?.0),
                || Ok(value_and_grad(&x, &r, |x| composite(x, &c, &s))?.0),
            )?;
            continue;
        }
        let (y, g) = value_and_grad(&x, &r, |x| fused(x, &c, &s))?;
        let (yc, gc) = value_and_grad(&x, &r, |x| composite(x, &c, &s))?;
        rep.check(&format!("{tag} kernel vs CUDA composite"), &y, &yc)?;
        rep.check(&format!("{tag} kernel vs CUDA composite dx"), &g, &gc)?;
        let (x, c, s, r) = inputs(2, 64, dt, &Device::Cpu)?;
        let (yc, gc) = value_and_grad(&x, &r, |x| fused(x, &c, &s))?;
        let (cg, sg) = (c.to_device(gpu)?, s.to_device(gpu)?);
        let (y, g) = value_and_grad(&x.to_device(gpu)?, &r.to_device(gpu)?, |x| fused(x, &cg, &sg))?;
        for (name, a, e) in [("y", &y, &yc), ("dx", &g, &gc)] {
            rep.check(&format!("{tag} kernel vs CPU op 2x64 {name}"), a, e)?;
            if dt == DType::F32 {
                let same =
                    a.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()? == e.flatten_all()?.to_vec1::<f32>()?;
                if !same {
                    rep.failures += 1;
                }
                println!("{tag} {name}: CUDA and CPU bit-identical: {}", if same { "yes  ok" } else { "no  FAIL" });
            }
        }
    }
    Ok(())
}

/// The frozen base's dequantisation (`kernels/dequant.cu`) at the 7B's MLP shape (14336 x 4096):
/// f32 and bf16 against the CPU bit for bit, then timed against candle's path (f32, then a cast).
fn dequant(gpu: &Device, rep: &mut Report, bench: bool) -> Result<()> {
    use candle_core::quantized::{QStorage, QTensor};
    use prs::config::BaseQuant;
    use prs::nn::quant::QuantWeight;
    let w = random(&[14336, 4096], DType::F32, 0.05, &Device::Cpu)?;
    for mode in [BaseQuant::Int4, BaseQuant::Int8] {
        let tag = format!("dequantise {mode} 14336x4096");
        let cpu = QuantWeight::quantize(&w, mode)?.expect("4096 is a multiple of the block");
        let bytes = cpu.blocks()?;
        let cuda = QuantWeight::quantize(&w.to_device(gpu)?, mode)?.expect("same shape");
        if bench {
            let storage = QStorage::from_data(std::borrow::Cow::Borrowed(&bytes), gpu, cpu.format())?;
            let candle = QTensor::new(storage, (14336, 4096))?;
            // Reads the blocks, writes bf16.
            let b = (bytes.len() + 2 * w.elem_count()) as f64;
            timing_pair(
                gpu,
                &format!("{tag} to bf16"),
                b,
                || Ok(cuda.dequantize(DType::BF16)?),
                || Ok(candle.dequantize(gpu)?.to_dtype(DType::BF16)?),
            )?;
            continue;
        }
        for dt in [DType::F32, DType::BF16] {
            let (a, e) = (cuda.dequantize(dt)?, cpu.dequantize(dt)?);
            let bits = |t: &Tensor| -> Result<Vec<u32>> {
                Ok(t.to_device(&Device::Cpu)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    .iter()
                    .map(|v| v.to_bits())
                    .collect())
            };
            let same = bits(&a)? == bits(&e)?;
            if !same {
                rep.failures += 1;
            }
            println!("{tag} {dt:?}: CUDA and CPU bit-identical: {}", if same { "yes  ok" } else { "no  FAIL" });
        }
    }
    Ok(())
}

/// The trained tensors of the 7B's step, roughly: LoRA A and B of q, k, v, o in 32 layers, and
/// TinySAM's and the decoder's weights as 200 matrices of 256 x 256 and 100 vectors.
fn adamw_shapes() -> Vec<Vec<usize>> {
    let mut v = vec![];
    for _ in 0..32 {
        v.extend([vec![16, 4096], vec![4096, 16], vec![16, 4096], vec![1024, 16]]);
        v.extend([vec![16, 4096], vec![1024, 16], vec![16, 4096], vec![4096, 16]]);
    }
    v.extend(std::iter::repeat_n(vec![256, 256], 200));
    v.extend(std::iter::repeat_n(vec![1024], 100));
    v
}

/// Multi-tensor AdamW (`kernels/adamw.cu`): one launch against the CPU's fused pass (bit for
/// bit) and the CUDA composite, the norm's sum of squares against the CPU, and timings.
fn adamw(gpu: &Device, rep: &mut Report, bench: bool) -> Result<()> {
    use prs::train::fused_adamw::{composite_update, fused_update, sum_of_squares, SlotUpdate, StepHyper};
    let shapes = adamw_shapes();
    let h = StepHyper { lr: 2e-4, beta1: 0.9, beta2: 0.999, eps: 1e-6, weight_decay: 1e-5, coef: 0.73 };
    // (param, grad, m, v) per tensor, drawn on the CPU so both devices start from the same bits.
    let host: Vec<[Tensor; 4]> = shapes
        .iter()
        .map(|d| {
            let r = |range: f32| random(d, DType::F32, range, &Device::Cpu);
            Ok([r(0.05)?, r(1e-3)?, r(1e-4)?, r(1e-7)?.abs()?])
        })
        .collect::<Result<_>>()?;
    let on = |dev: &Device| -> Result<Vec<(Var, Tensor, Tensor, Tensor)>> {
        host.iter()
            .map(|[p, g, m, v]| {
                Ok((
                    Var::from_tensor(&p.to_device(dev)?)?,
                    g.to_device(dev)?,
                    m.to_device(dev)?.copy()?,
                    v.to_device(dev)?.copy()?,
                ))
            })
            .collect()
    };
    let step = |state: &mut Vec<(Var, Tensor, Tensor, Tensor)>, fused: bool| -> Result<()> {
        let mut u: Vec<SlotUpdate> = state
            .iter_mut()
            .enumerate()
            .map(|(i, (p, g, m, v))| SlotUpdate {
                param: p,
                grad: g.clone(),
                exp_avg: m,
                exp_avg_sq: v,
                decays: i % 3 != 2,
                step: 5,
            })
            .collect();
        if fused {
            fused_update(&mut u, &h)
        } else {
            composite_update(&mut u, &h)
        }
    };
    let elems: usize = shapes.iter().map(|d| d.iter().product::<usize>()).sum();
    let tag = format!("AdamW {} tensors, {:.1} M elements", shapes.len(), elems as f64 / 1e6);
    if bench {
        let mut fused_state = on(gpu)?;
        let mut composite_state = on(gpu)?;
        let one = Tensor::zeros(1, DType::F32, gpu)?;
        // Reads p, g, m, v and writes p, m, v: 7 x 4 bytes per element.
        timing_pair(
            gpu,
            &format!("{tag} step"),
            28.0 * elems as f64,
            || step(&mut fused_state, true).map(|_| one.clone()),
            || step(&mut composite_state, false).map(|_| one.clone()),
        )?;
        let grads: Vec<Tensor> = fused_state.iter().map(|s| s.1.clone()).collect();
        let refs: Vec<&Tensor> = grads.iter().collect();
        let composite_norm = || -> Result<f64> {
            let sq = refs.iter().map(|g| g.sqr()?.sum_all()).collect::<candle_core::Result<Vec<_>>>()?;
            Ok(Tensor::stack(&sq, 0)?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?)
        };
        timing_pair(
            gpu,
            &format!("{tag} gradient sum of squares (with the read)"),
            4.0 * elems as f64,
            || Ok(Tensor::new(sum_of_squares(&refs, false)? as f32, gpu)?),
            || Ok(Tensor::new(composite_norm()? as f32, gpu)?),
        )?;
        return Ok(());
    }
    let (mut cpu, mut cuda, mut cuda_composite) = (on(&Device::Cpu)?, on(gpu)?, on(gpu)?);
    for _ in 0..3 {
        step(&mut cpu, true)?;
        step(&mut cuda, true)?;
        step(&mut cuda_composite, false)?;
    }
    let bits = |t: &Tensor| -> Result<Vec<u32>> {
        Ok(t.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?.iter().map(|x| x.to_bits()).collect())
    };
    let mut differing = 0;
    for (a, b) in cpu.iter().zip(&cuda) {
        for (x, y) in [(a.0.as_tensor(), b.0.as_tensor()), (&a.2, &b.2), (&a.3, &b.3)] {
            differing += usize::from(bits(x)? != bits(y)?);
        }
    }
    if differing > 0 {
        rep.failures += 1;
    }
    let verdict = if differing == 0 { "yes  ok" } else { "no  FAIL" };
    println!("{tag}, 3 steps: CUDA kernel and CPU fused pass bit-identical: {verdict} ({differing} tensors differ)");
    let cat = |s: &[(Var, Tensor, Tensor, Tensor)]| -> Result<Tensor> {
        let flat = s.iter().map(|x| x.0.as_tensor().flatten_all()).collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&flat, 0)?)
    };
    rep.check(&format!("{tag} kernel vs CUDA composite, parameters"), &cat(&cuda)?, &cat(&cuda_composite)?)?;
    let (gc, gg): (Vec<&Tensor>, Vec<&Tensor>) =
        (cpu.iter().map(|s| &s.1).collect(), cuda.iter().map(|s| &s.1).collect());
    let (nc, ng) = (sum_of_squares(&gc, true)?, sum_of_squares(&gg, false)?);
    let rel = (ng - nc).abs() / nc;
    let ok = rel < 1e-5;
    if !ok {
        rep.failures += 1;
    }
    println!(
        "{tag} gradient sum of squares: CUDA {ng:.6e} CPU {nc:.6e} rel {rel:.1e}  {}",
        if ok { "ok" } else { "FAIL" }
    );
    Ok(())
}

fn softmax_cases() -> Vec<SoftmaxCase> {
    vec![
        SoftmaxCase {
            name: "LLM causal + padding",
            dims: vec![8, 32, 640, 640],
            cpu_dims: vec![2, 4, 640, 640],
            causal: true,
            mask_f32: false,
        },
        SoftmaxCase {
            name: "decoder key mask (f32 mask)",
            dims: vec![1, 16, 4096, 4096],
            cpu_dims: vec![1, 1, 256, 4096],
            causal: false,
            mask_f32: true,
        },
    ]
}

fn main() -> Result<()> {
    let gpu = Device::new_cuda(0)?;
    let mut rep = Report { failures: 0 };
    let softmax = softmax_cases();
    let ops = op_cases();
    for c in &softmax {
        c.check(&gpu, &mut rep)?;
    }
    for c in &ops {
        c.check(&gpu, &mut rep)?;
    }
    gqa(&gpu, &mut rep, false)?;
    lora(&gpu, &mut rep, false)?;
    depthwise(&gpu, &mut rep, false)?;
    rope(&gpu, &mut rep, false)?;
    adamw(&gpu, &mut rep, false)?;
    dequant(&gpu, &mut rep, false)?;
    if rep.failures == 0 {
        println!("all comparisons passed");
    }
    // Timings even after a failed comparison: they are independent of it.
    if !std::env::args().any(|a| a == "--no-bench") {
        println!("\ntimings, median of 20 (GB/s of the bytes the fused kernel must move)");
        for c in &softmax {
            c.bench(&gpu)?;
        }
        for c in &ops {
            c.bench(&gpu)?;
        }
        gqa(&gpu, &mut rep, true)?;
        lora(&gpu, &mut rep, true)?;
        depthwise(&gpu, &mut rep, true)?;
        rope(&gpu, &mut rep, true)?;
        adamw(&gpu, &mut rep, true)?;
        dequant(&gpu, &mut rep, true)?;
    }
    if rep.failures > 0 {
        bail!("{} comparison(s) failed", rep.failures);
    }
    Ok(())
}
