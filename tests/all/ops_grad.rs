//! Gradient checks of the custom ops: the bilinear upsampling op (and its adjoint op),
//! `frozen_matmul` and masked attention (`masked_add` + softmax), against central finite
//! differences in f64 and against closed forms / the composite autograd path. Also the
//! upsampling forward: custom op vs matmul composite vs PyTorch's `F.interpolate`.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use prs::nn::fused::rms_normalize;
use prs::nn::linear::{frozen_matmul, masked_add};
use prs::nn::ops::softmax_last_dim;
use prs::nn::softmax::mask_min;
use prs::nn::softmax::scaled_masked_softmax;
use prs::nn::upsample::{upsample_bilinear_ac, upsample_bilinear_ac_backward, upsample_bilinear_ac_composite};

const CPU: Device = Device::Cpu;

fn randn(shape: &[usize], seed: u64) -> Result<Tensor> {
    // Host-seeded so failures reproduce.
    use rand::{rngs::StdRng, SeedableRng};
    use rand_distr::{Distribution, StandardNormal};
    let mut rng = StdRng::seed_from_u64(seed);
    let n = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| StandardNormal.sample(&mut rng)).collect();
    Ok(Tensor::from_vec(v, shape, &CPU)?)
}

fn vec64(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?)
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

fn max_abs(a: &[f64]) -> f64 {
    a.iter().fold(0.0, |m, x| m.max(x.abs()))
}

/// Central differences of a scalar function of `x`.
fn numeric_grad(x: &Tensor, eps: f64, f: impl Fn(&Tensor) -> Result<f64>) -> Result<Vec<f64>> {
    let base = vec64(x)?;
    let mut g = Vec::with_capacity(base.len());
    for i in 0..base.len() {
        let mut p = base.clone();
        p[i] += eps;
        let fp = f(&Tensor::from_vec(p.clone(), x.shape(), &CPU)?)?;
        p[i] -= 2.0 * eps;
        let fm = f(&Tensor::from_vec(p, x.shape(), &CPU)?)?;
        g.push((fp - fm) / (2.0 * eps));
    }
    Ok(g)
}

/// max |autograd - central differences| of the gradient of the scalar `loss` at `x`.
fn autograd_vs_numeric(x: &Tensor, eps: f64, loss: impl Fn(&Tensor) -> Result<Tensor>) -> Result<f64> {
    let xv = Var::from_tensor(x)?;
    let g = vec64(loss(xv.as_tensor())?.backward()?.get(xv.as_tensor()).expect("gradient"))?;
    let g_num = numeric_grad(x, eps, |t| Ok(loss(t)?.to_dtype(DType::F64)?.to_scalar::<f64>()?))?;
    Ok(max_abs_diff(&g, &g_num))
}

fn dot(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok((a * b)?.sum_all()?)
}

#[test]
fn upsample_backward_matches_finite_differences_and_composite() -> Result<()> {
    for (i, (shape, f)) in [([1usize, 2, 3, 5], 3usize), ([2, 1, 1, 3], 2), ([1, 1, 4, 2], 16)].into_iter().enumerate()
    {
        let x = randn(&shape, 10 + i as u64)?;
        let out_shape = [shape[0], shape[1], shape[2] * f, shape[3] * f];
        let r = randn(&out_shape, 20 + i as u64)?;
        let xv = Var::from_tensor(&x)?;

        let y = upsample_bilinear_ac(xv.as_tensor(), f)?;
        assert!(y.track_op(), "the CPU op must record a backward");
        let g_op = vec64(dot(&y, &r)?.backward()?.get(xv.as_tensor()).unwrap())?;

        let yc = upsample_bilinear_ac_composite(xv.as_tensor(), f)?;
        let g_comp = vec64(dot(&yc, &r)?.backward()?.get(xv.as_tensor()).unwrap())?;

        let g_num = numeric_grad(&x, 1e-6, |t| Ok(dot(&upsample_bilinear_ac(t, f)?, &r)?.to_scalar::<f64>()?))?;
        let (e_num, e_comp) = (max_abs_diff(&g_op, &g_num), max_abs_diff(&g_op, &g_comp));
        println!("upsample {shape:?} x{f}: |op - numeric| {e_num:.2e}, |op - composite| {e_comp:.2e}");
        assert!(e_num <= 1e-7 * max_abs(&g_num).max(1.0), "{e_num}");
        assert!(e_comp <= 1e-12 * max_abs(&g_comp).max(1.0), "{e_comp}");
    }
    Ok(())
}

#[test]
fn upsample_grad_op_is_the_adjoint_in_f32_and_half() -> Result<()> {
    // <up(x), g> == <x, up^T(g)> for odd sizes at the real factor.
    let x = randn(&[2, 3, 7, 5], 1)?.to_dtype(DType::F32)?;
    let g = randn(&[2, 3, 7 * 16, 5 * 16], 2)?.to_dtype(DType::F32)?;
    let lhs = dot(&upsample_bilinear_ac(&x, 16)?, &g)?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    let gt = upsample_bilinear_ac_backward(&g, 16)?;
    assert_eq!(gt.dims(), &[2, 3, 7, 5]);
    let rhs = dot(&x, &gt)?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    assert!((lhs - rhs).abs() <= 1e-4 * lhs.abs().max(1.0), "{lhs} vs {rhs}");

    // The op's adjoint equals the composite path's autograd (ordinary matmuls).
    let xv = Var::from_tensor(&x)?;
    let grads = dot(&upsample_bilinear_ac_composite(xv.as_tensor(), 16)?, &g)?.backward()?;
    let via_autograd = vec64(grads.get(xv.as_tensor()).unwrap())?;
    let e = max_abs_diff(&vec64(&gt)?, &via_autograd);
    assert!(e <= 1e-5 * max_abs(&via_autograd), "{e}");

    // The adjoint op's own backward is the forward upsampling (second derivatives).
    let gv = Var::from_tensor(&g)?;
    let grads = dot(&upsample_bilinear_ac_backward(gv.as_tensor(), 16)?, &x)?.backward()?;
    let up = vec64(&upsample_bilinear_ac(&x, 16)?)?;
    assert!(max_abs_diff(&vec64(grads.get(gv.as_tensor()).unwrap())?, &up) <= 1e-6 * max_abs(&up));

    // Half types run the same kernel in f32: only the storage rounding differs.
    let g32 = vec64(&gt)?;
    for dt in [DType::F16, DType::BF16] {
        let h = upsample_bilinear_ac_backward(&g.to_dtype(dt)?, 16)?;
        assert_eq!(h.dtype(), dt);
        let e = max_abs_diff(&vec64(&h)?, &g32) / max_abs(&g32);
        assert!(e < 1e-2, "{dt:?}: {e}");
    }
    Ok(())
}

#[test]
fn frozen_matmul_gives_dx_and_no_weight_gradient() -> Result<()> {
    let x = randn(&[4, 5], 3)?;
    let w = randn(&[6, 5], 4)?; // (out, in), frozen
    let r = randn(&[4, 6], 5)?;
    let xv = Var::from_tensor(&x)?;
    let grads = dot(&frozen_matmul(xv.as_tensor(), &w)?, &r)?.backward()?;
    let gx = vec64(grads.get(xv.as_tensor()).expect("dX"))?;
    let g_num = numeric_grad(&x, 1e-6, |t| Ok(dot(&frozen_matmul(t, &w)?, &r)?.to_scalar::<f64>()?))?;
    // Closed form: dX = R W.
    let g_exact = vec64(&r.matmul(&w)?)?;
    assert!(max_abs_diff(&gx, &g_exact) <= 1e-12, "{}", max_abs_diff(&gx, &g_exact));
    assert!(max_abs_diff(&gx, &g_num) <= 1e-8);
    assert!(grads.get(&w).is_none(), "the frozen weight must have no GradStore entry");

    // A plain matmul against the same (untracked) weight does store a dead weight gradient:
    // the check above could fail.
    let wt = w.t()?.contiguous()?;
    let plain = dot(&xv.as_tensor().matmul(&wt)?, &r)?.backward()?;
    assert!(plain.get(&wt).is_some());
    assert_eq!(grads.get_ids().count() + 1, plain.get_ids().count());

    // Batched input (B, T, in) goes through the same op.
    let x3 = Var::from_tensor(&randn(&[2, 3, 5], 6)?)?;
    let r3 = randn(&[2, 3, 6], 7)?;
    let g3 = dot(&frozen_matmul(x3.as_tensor(), &w)?, &r3)?.backward()?;
    let exact = vec64(&r3.reshape((6, 6))?.matmul(&w)?)?;
    assert!(max_abs_diff(&vec64(g3.get(x3.as_tensor()).unwrap())?, &exact) <= 1e-12);
    assert!(g3.get(&w).is_none());
    Ok(())
}

#[test]
fn masked_attention_gradient_is_correct_and_mask_has_none() -> Result<()> {
    let (b, h, q, k) = (2, 2, 3, 4);
    let s = randn(&[b, h, q, k], 8)?;
    let r = randn(&[b, h, q, k], 9)?;
    // Full-shape additive mask: key 3 hidden for sample 0, keys 1 and 2 for sample 1.
    let neg = mask_min(DType::F32);
    let mut m = vec![0.0f64; b * h * q * k];
    for (i, v) in m.iter_mut().enumerate() {
        let (bi, ki) = (i / (h * q * k), i % k);
        if (bi == 0 && ki == 3) || (bi == 1 && (ki == 1 || ki == 2)) {
            *v = neg;
        }
    }
    let mask = Tensor::from_vec(m.clone(), (b, h, q, k), &CPU)?;
    let loss = |t: &Tensor| -> Result<Tensor> { dot(&softmax_last_dim(&masked_add(t, &mask)?)?, &r) };

    let sv = Var::from_tensor(&s)?;
    let probs = vec64(&softmax_last_dim(&masked_add(sv.as_tensor(), &mask)?)?)?;
    let grads = loss(sv.as_tensor())?.backward()?;
    let g = vec64(grads.get(sv.as_tensor()).expect("gradient to scores"))?;
    assert!(grads.get(&mask).is_none(), "the mask must have no GradStore entry");

    // Closed form per row: dL/ds = p * (r - sum(p r)); zero at masked keys.
    let rv = vec64(&r)?;
    let mut exact = vec![0.0; g.len()];
    for row in 0..b * h * q {
        let idx = row * k..(row + 1) * k;
        let pr: f64 = idx.clone().map(|i| probs[i] * rv[i]).sum();
        for i in idx {
            exact[i] = probs[i] * (rv[i] - pr);
        }
    }
    // Softmax runs in f32 whatever the input dtype.
    let e = max_abs_diff(&g, &exact);
    assert!(e <= 1e-6, "analytic: {e}");
    for (i, &mv) in m.iter().enumerate() {
        if mv != 0.0 {
            assert_eq!(g[i], 0.0, "masked position {i} got a gradient");
        }
    }
    let g_num = numeric_grad(&s, 1e-3, |t| Ok(loss(t)?.to_dtype(DType::F64)?.to_scalar::<f64>()?))?;
    let e_num = max_abs_diff(&g, &g_num);
    println!("masked softmax: |autograd - closed form| {e:.2e}, |autograd - numeric| {e_num:.2e}");
    assert!(e_num <= 2e-3, "numeric: {e_num}");

    // A plain add would store a (dead) gradient for the mask: the check above could fail.
    let plain = dot(&softmax_last_dim(&(sv.as_tensor() + &mask)?)?, &r)?.backward()?;
    assert!(plain.get(&mask).is_some());
    Ok(())
}

fn upsample_fixture() -> Result<HashMap<String, Tensor>> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/decoder/upsample.safetensors");
    Ok(candle_core::safetensors::load(p, &CPU)?)
}

#[test]
fn upsample_forward_op_vs_composite_vs_pytorch() -> Result<()> {
    let fx = upsample_fixture()?;
    let mut n = 0;
    while let Some(x) = fx.get(&format!("case{n}.input")) {
        let want = vec64(&fx[&format!("case{n}.output")])?;
        let f = fx[&format!("case{n}.factor")].to_vec1::<i64>()?[0] as usize;
        let op = upsample_bilinear_ac(x, f)?;
        let comp = upsample_bilinear_ac_composite(x, f)?;
        assert_eq!(op.dims(), fx[&format!("case{n}.output")].dims());
        let (opv, compv) = (vec64(&op)?, vec64(&comp)?);
        let (e_torch, e_comp) = (max_abs_diff(&opv, &want), max_abs_diff(&opv, &compv));
        println!("case{n} {:?} x{f}: |op - torch| {e_torch:.2e}, |op - composite| {e_comp:.2e}", x.dims());
        assert!(e_torch <= 1e-5 * max_abs(&want).max(1.0), "case{n}: {e_torch}");
        assert!(e_comp <= 1e-5 * max_abs(&want).max(1.0), "case{n}: {e_comp}");

        // f64 in, f64 out; half types within their rounding; non-contiguous input accepted.
        let op64 = upsample_bilinear_ac(&x.to_dtype(DType::F64)?, f)?;
        assert_eq!(op64.dtype(), DType::F64);
        assert!(max_abs_diff(&vec64(&op64)?, &want) <= 1e-5 * max_abs(&want).max(1.0));
        for dt in [DType::F16, DType::BF16] {
            let h = upsample_bilinear_ac(&x.to_dtype(dt)?, f)?;
            assert_eq!(h.dtype(), dt);
            assert!(max_abs_diff(&vec64(&h)?, &want) <= 2e-2 * max_abs(&want).max(1.0), "{dt:?}");
        }
        let xt = x.transpose(2, 3)?.contiguous()?.transpose(2, 3)?;
        assert!(!xt.is_contiguous() || x.dim(2)? == 1 || x.dim(3)? == 1);
        assert_eq!(vec64(&upsample_bilinear_ac(&xt, f)?)?, opv);
        n += 1;
    }
    assert_eq!(n, 4, "fixture cases");
    Ok(())
}

#[test]
fn upsample_rejects_bad_input() {
    let x = Tensor::zeros((2, 3, 4), DType::F32, &CPU).unwrap();
    assert!(upsample_bilinear_ac(&x, 16).is_err());
    let x = Tensor::zeros((1, 1, 2, 2), DType::F32, &CPU).unwrap();
    assert!(upsample_bilinear_ac(&x, 0).is_err());
    assert!(upsample_bilinear_ac(&x.to_dtype(DType::U8).unwrap(), 2).is_err());
    let g = Tensor::zeros((1, 1, 5, 4), DType::F32, &CPU).unwrap();
    assert!(upsample_bilinear_ac_backward(&g, 2).is_err());
}

#[test]
fn fused_attention_softmax_matches_the_composite_in_value_and_gradient() -> Result<()> {
    let (b, h, q, k, scale) = (2, 3, 4, 5, 0.37);
    let neg = mask_min(DType::F32);
    // (B,1,Q,K) causal-style mask broadcast over heads, as the LLM builds it.
    let m: Vec<f32> =
        (0..b * q * k).map(|i| if (i % k) > (i / k) % q + (i / (q * k)) { neg as f32 } else { 0.0 }).collect();
    let mask = Tensor::from_vec(m, (b, 1, q, k), &CPU)?;
    let r = randn(&[b, h, q, k], 21)?.to_dtype(DType::F32)?;
    for (dtype, tol) in [(DType::F32, 1e-6), (DType::BF16, 2e-2)] {
        let s = randn(&[b, h, q, k], 20)?.to_dtype(dtype)?;
        for with_mask in [true, false] {
            let mk = with_mask.then_some(&mask);
            let composite = |t: &Tensor| -> Result<Tensor> {
                let x = (t.to_dtype(DType::F32)? * scale)?;
                let x = match mk {
                    Some(m) => masked_add(&x, &m.broadcast_as(x.shape())?.contiguous()?)?,
                    None => x,
                };
                softmax_last_dim(&x)
            };
            let sv = Var::from_tensor(&s)?;
            let fused = scaled_masked_softmax(sv.as_tensor(), scale, mk)?;
            assert_eq!(fused.dtype(), dtype);
            let want = composite(sv.as_tensor())?;
            let e = max_abs_diff(&vec64(&fused)?, &vec64(&want)?);
            assert!(e <= tol, "{dtype:?} mask {with_mask}: values differ by {e}");
            let g_fused = dot(&fused.to_dtype(DType::F32)?, &r)?.backward()?;
            let g_comp = dot(&want, &r)?.backward()?;
            let (gf, gc) =
                (g_fused.get(sv.as_tensor()).expect("gradient"), g_comp.get(sv.as_tensor()).expect("gradient"));
            assert_eq!(gf.dtype(), dtype);
            let e = max_abs_diff(&vec64(gf)?, &vec64(gc)?) / max_abs(&vec64(gc)?).max(1e-12);
            assert!(e <= tol * 5.0, "{dtype:?} mask {with_mask}: gradients differ by {e} (relative)");
            assert!(g_fused.get(&mask).is_none(), "the mask must have no gradient");
        }
    }
    // Against central differences (f64 input; the op computes in f32).
    let s = randn(&[1, 2, 3, 4], 22)?;
    let r = randn(&[1, 2, 3, 4], 23)?;
    let small = mask.narrow(0, 0, 1)?.narrow(2, 0, 3)?.narrow(3, 0, 4)?;
    let e = autograd_vs_numeric(&s, 1e-3, |t| dot(&scaled_masked_softmax(t, scale, Some(&small))?, &r))?;
    println!("fused softmax: |autograd - numeric| {e:.2e}");
    assert!(e <= 2e-3, "numeric: {e}");
    Ok(())
}

#[test]
fn fused_rms_normalize_matches_the_composite_in_value_and_gradient() -> Result<()> {
    let eps = 1e-5;
    let composite = |t: &Tensor| -> Result<Tensor> {
        let x = t.to_dtype(DType::F32)?;
        let var = x.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
        Ok(x.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(t.dtype())?)
    };
    let r = randn(&[2, 3, 16], 31)?.to_dtype(DType::F32)?;
    for (dtype, tol) in [(DType::F32, 1e-6), (DType::BF16, 1e-2)] {
        let x = (randn(&[2, 3, 16], 30)? * 3.0)?.to_dtype(dtype)?;
        let xv = Var::from_tensor(&x)?;
        let fused = rms_normalize(xv.as_tensor(), eps)?;
        let want = composite(xv.as_tensor())?;
        assert_eq!(fused.dtype(), dtype);
        let e = max_abs_diff(&vec64(&fused)?, &vec64(&want)?);
        assert!(e <= tol, "{dtype:?}: values differ by {e}");
        let gf = dot(&fused.to_dtype(DType::F32)?, &r)?.backward()?;
        let gc = dot(&want.to_dtype(DType::F32)?, &r)?.backward()?;
        let (gf, gc) = (gf.get(xv.as_tensor()).expect("gradient"), gc.get(xv.as_tensor()).expect("gradient"));
        assert_eq!(gf.dtype(), dtype);
        let e = max_abs_diff(&vec64(gf)?, &vec64(gc)?) / max_abs(&vec64(gc)?);
        assert!(e <= tol * 5.0, "{dtype:?}: gradients differ by {e} (relative)");
    }
    let x = randn(&[2, 5], 32)?;
    let r = randn(&[2, 5], 33)?;
    let e = autograd_vs_numeric(&x, 1e-3, |t| dot(&rms_normalize(t, eps)?, &r))?;
    println!("fused rms normalise: |autograd - numeric| {e:.2e}");
    assert!(e <= 2e-3, "numeric: {e}");
    Ok(())
}

/// A fused normalisation against its composite form: values, and the gradients of x, w and b.
fn assert_affine_norm_matches(
    xv: &Var,
    wv: &Var,
    bv: &Var,
    r: &Tensor,
    fused: impl Fn(&Tensor, &Tensor, &Tensor) -> anyhow::Result<Tensor>,
    composite: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
) -> Result<()> {
    let (x, w, b) = (xv.as_tensor(), wv.as_tensor(), bv.as_tensor());
    let (got, want) = (fused(x, w, b)?, composite(x, w, b)?);
    let e = max_abs_diff(&vec64(&got)?, &vec64(&want)?);
    assert!(e <= 1e-5, "values differ by {e}");
    let (gf, gc) = (dot(&got, r)?.backward()?, dot(&want, r)?.backward()?);
    for (name, v) in [("x", xv), ("w", wv), ("b", bv)] {
        let (a, c) = (gf.get(v.as_tensor()).expect("gradient"), gc.get(v.as_tensor()).expect("gradient"));
        assert_eq!(a.dims(), c.dims(), "d{name} shape");
        let e = max_abs_diff(&vec64(a)?, &vec64(c)?) / max_abs(&vec64(c)?);
        assert!(e <= 1e-5, "d{name} differs by {e} (relative)");
    }
    Ok(())
}

#[test]
fn fused_batch_norm_matches_the_composite_and_frozen_affine_gets_no_gradient() -> Result<()> {
    use prs::nn::fused::batch_norm_train;
    let eps = 1e-5;
    let composite = |x: &Tensor, w: &Tensor, b: &Tensor| -> Result<Tensor> {
        let mean = x.mean_keepdim((0, 2, 3))?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim((0, 2, 3))?;
        Ok(xc.broadcast_div(&(var + eps)?.sqrt()?)?.broadcast_mul(w)?.broadcast_add(b)?)
    };
    let x = randn(&[3, 4, 5, 6], 40)?.affine(2.0, 1.0)?.to_dtype(DType::F32)?;
    let w = randn(&[1, 4, 1, 1], 41)?.to_dtype(DType::F32)?;
    let b = randn(&[1, 4, 1, 1], 42)?.to_dtype(DType::F32)?;
    let r = randn(&[3, 4, 5, 6], 43)?.to_dtype(DType::F32)?;
    let (xv, wv, bv) = (Var::from_tensor(&x)?, Var::from_tensor(&w)?, Var::from_tensor(&b)?);
    assert_affine_norm_matches(&xv, &wv, &bv, &r, |x, w, b| batch_norm_train(x, w, b, eps), composite)?;
    // Against central differences in x (f64 input; the op computes in f32).
    let x64 = randn(&[2, 2, 2, 3], 44)?;
    let r64 = randn(&[2, 2, 2, 3], 45)?;
    let (w2, b2) = (
        Tensor::new(&[1.5f32, -0.5], &CPU)?.reshape((1, 2, 1, 1))?,
        Tensor::new(&[0.1f32, 0.2], &CPU)?.reshape((1, 2, 1, 1))?,
    );
    let loss = |t: &Tensor| -> Result<Tensor> { dot(&batch_norm_train(t, &w2, &b2, eps)?.to_dtype(DType::F64)?, &r64) };
    let g = loss(Var::from_tensor(&x64)?.as_tensor())?.backward()?;
    assert_eq!(g.get(&w2).map(|_| ()), None, "a frozen weight got a gradient");
    assert_eq!(g.get(&b2).map(|_| ()), None, "a frozen bias got a gradient");
    let e = autograd_vs_numeric(&x64, 1e-3, loss)?;
    println!("fused batch norm: |autograd - numeric| {e:.2e}");
    assert!(e <= 2e-3, "numeric: {e}");
    // Half precision in, half precision out (statistics in f32 inside), and dx in the input's
    // dtype: nothing f32 outlives the op. Close to the f32 op on the same values.
    let x16 = x.to_dtype(DType::F16)?;
    let xv16 = Var::from_tensor(&x16)?;
    let y16 = batch_norm_train(xv16.as_tensor(), &w, &b, eps)?;
    assert_eq!(y16.dtype(), DType::F16);
    let y32 = batch_norm_train(&x16.to_dtype(DType::F32)?, &w, &b, eps)?;
    let e = max_abs_diff(&vec64(&y16)?, &vec64(&y32)?) / max_abs(&vec64(&y32)?);
    assert!(e <= 2e-3, "f16 batch norm differs from f32 by {e} (relative)");
    let g = dot(&y16.to_dtype(DType::F32)?, &r)?.backward()?;
    let dx = g.get(xv16.as_tensor()).expect("gradient");
    assert_eq!(dx.dtype(), DType::F16);
    let x32v = Var::from_tensor(&x16.to_dtype(DType::F32)?)?;
    let g32 = dot(&batch_norm_train(x32v.as_tensor(), &w, &b, eps)?, &r)?.backward()?;
    let e = max_abs_diff(&vec64(dx)?, &vec64(g32.get(x32v.as_tensor()).unwrap())?)
        / max_abs(&vec64(g32.get(x32v.as_tensor()).unwrap())?);
    assert!(e <= 1e-2, "f16 dx differs from f32 by {e} (relative)");
    Ok(())
}

#[test]
fn fused_layer_norm_matches_the_composite_in_value_and_all_gradients() -> Result<()> {
    use prs::nn::fused::layer_norm_fused;
    let eps = 1e-5;
    let composite = |x: &Tensor, w: &Tensor, b: &Tensor| -> Result<Tensor> {
        let mean = x.mean_keepdim(candle_core::D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
        Ok(xc.broadcast_div(&(var + eps)?.sqrt()?)?.broadcast_mul(w)?.broadcast_add(b)?)
    };
    let x = randn(&[2, 7, 24], 50)?.affine(3.0, -1.0)?.to_dtype(DType::F32)?;
    let w = randn(&[24], 51)?.to_dtype(DType::F32)?;
    let b = randn(&[24], 52)?.to_dtype(DType::F32)?;
    let r = randn(&[2, 7, 24], 53)?.to_dtype(DType::F32)?;
    let (xv, wv, bv) = (Var::from_tensor(&x)?, Var::from_tensor(&w)?, Var::from_tensor(&b)?);
    assert_affine_norm_matches(&xv, &wv, &bv, &r, |x, w, b| layer_norm_fused(x, w, b, eps), composite)?;
    // Frozen weight and bias: gradient for x only.
    let g = dot(&layer_norm_fused(xv.as_tensor(), &w, &b, eps)?, &r)?.backward()?;
    assert!(g.get(&w).is_none() && g.get(&b).is_none(), "frozen LayerNorm parameters got gradients");
    assert!(g.get(xv.as_tensor()).is_some());
    Ok(())
}

#[test]
fn fused_silu_mul_matches_the_composite_in_value_and_gradient() -> Result<()> {
    use prs::nn::fused::silu_mul;
    let r = randn(&[3, 4, 10], 62)?.to_dtype(DType::F32)?;
    for (dtype, tol) in [(DType::F32, 1e-6), (DType::BF16, 2e-2)] {
        let gate = randn(&[3, 4, 10], 60)?.affine(2.0, 0.0)?.to_dtype(dtype)?;
        let up = randn(&[3, 4, 10], 61)?.to_dtype(dtype)?;
        let (gv, uv) = (Var::from_tensor(&gate)?, Var::from_tensor(&up)?);
        let fused = silu_mul(gv.as_tensor(), uv.as_tensor())?;
        let want = (gv.as_tensor().silu()? * uv.as_tensor())?;
        assert_eq!(fused.dtype(), dtype);
        let e = max_abs_diff(&vec64(&fused)?, &vec64(&want)?);
        assert!(e <= tol, "{dtype:?}: values differ by {e}");
        let gf = dot(&fused.to_dtype(DType::F32)?, &r)?.backward()?;
        let gc = dot(&want.to_dtype(DType::F32)?, &r)?.backward()?;
        for (name, v) in [("gate", &gv), ("up", &uv)] {
            let (a, c) = (gf.get(v.as_tensor()).expect("gradient"), gc.get(v.as_tensor()).expect("gradient"));
            assert_eq!(a.dtype(), dtype);
            let e = max_abs_diff(&vec64(a)?, &vec64(c)?) / max_abs(&vec64(c)?);
            assert!(e <= tol * 5.0, "{dtype:?}: d{name} differs by {e} (relative)");
        }
    }
    let (gate, up, r) = (randn(&[2, 5], 63)?, randn(&[2, 5], 64)?, randn(&[2, 5], 65)?);
    let e = autograd_vs_numeric(&gate, 1e-4, |t| dot(&silu_mul(t, &up)?, &r))?;
    assert!(e <= 1e-6, "numeric: {e}");
    Ok(())
}

/// The fast-path reductions equal candle's `sum_keepdim` / `mean_keepdim` for every subset of
/// dimensions (leading, middle, trailing, mixed), and the BatchNorm op built on them still has
/// the finite-difference gradient.
#[test]
fn fast_path_reductions_equal_candles_over_every_dimension_subset() -> Result<()> {
    use prs::nn::fused::{batch_norm_train, mean_keepdims, sum_keepdims};
    let x = randn(&[3, 4, 5, 6], 7)?.to_dtype(DType::F32)?;
    for mask in 1u32..16 {
        let dims: Vec<usize> = (0..4).filter(|d| mask & (1 << d) != 0).collect();
        let fast = vec64(&sum_keepdims(&x, &dims)?)?;
        let plain = vec64(&x.sum_keepdim(dims.clone())?)?;
        assert_eq!(sum_keepdims(&x, &dims)?.dims(), x.sum_keepdim(dims.clone())?.dims(), "{dims:?}");
        assert!(max_abs_diff(&fast, &plain) <= 1e-4 * max_abs(&plain).max(1.0), "sum over {dims:?}");
        let m = vec64(&mean_keepdims(&x, &dims)?)?;
        assert!(max_abs_diff(&m, &vec64(&x.mean_keepdim(dims.clone())?)?) <= 1e-5, "mean over {dims:?}");
    }
    // Differentiable: the gradient of a weighted sum is the weight broadcast back.
    let v = Var::from_tensor(&x)?;
    let w = randn(&[1, 4, 1, 6], 8)?.to_dtype(DType::F32)?;
    let g = sum_keepdims(v.as_tensor(), &[0, 2])?.broadcast_mul(&w)?.sum_all()?.backward()?;
    let dx = vec64(g.get(v.as_tensor()).unwrap())?;
    assert!(max_abs_diff(&dx, &vec64(&w.broadcast_as(x.shape())?.contiguous()?)?) < 1e-6);
    // BatchNorm (statistics over N, H, W; computed in f32) against candle's autograd of the
    // plain formula in f64: the input, weight and bias gradients.
    let (xb, wb, bb) = (randn(&[2, 3, 4, 5], 9)?, randn(&[1, 3, 1, 1], 10)?, randn(&[1, 3, 1, 1], 11)?);
    let r = randn(&[2, 3, 4, 5], 12)?;
    let grads = |fused: bool| -> Result<Vec<Vec<f64>>> {
        let vars = [Var::from_tensor(&xb)?, Var::from_tensor(&wb)?, Var::from_tensor(&bb)?];
        let [x, w, b] = [0, 1, 2].map(|i| vars[i].as_tensor().clone());
        let y = if fused {
            batch_norm_train(&x, &w, &b, 1e-5)?.to_dtype(DType::F64)?
        } else {
            let xc = x.broadcast_sub(&x.mean_keepdim((0, 2, 3))?)?;
            let var = xc.sqr()?.mean_keepdim((0, 2, 3))?;
            xc.broadcast_div(&(var + 1e-5)?.sqrt()?)?.broadcast_mul(&w)?.broadcast_add(&b)?
        };
        let g = y.mul(&r)?.sum_all()?.backward()?;
        vars.iter().map(|v| vec64(g.get(v.as_tensor()).expect("gradient"))).collect()
    };
    for (i, (a, b)) in grads(true)?.iter().zip(grads(false)?.iter()).enumerate() {
        assert!(
            max_abs_diff(a, b) <= 1e-4 * max_abs(b).max(1.0),
            "BatchNorm gradient {i} off by {}",
            max_abs_diff(a, b)
        );
    }
    Ok(())
}

/// `add_any` / `mul_any` of two tracked operands where one broadcasts (a trained bias, a layer
/// scale, a per-sample gate): the same values as candle's broadcast ops, bit for bit, and the
/// same gradients for both operands, whichever side the smaller one is on.
#[test]
fn tracked_broadcast_ops_match_candles_values_and_gradients() -> Result<()> {
    use prs::nn::{add_any, mul_any};
    let x = randn(&[3, 5, 6], 20)?.to_dtype(DType::F32)?;
    for (small, seed) in [(vec![6usize], 21u64), (vec![1, 5, 1], 22), (vec![3, 1, 6], 23), (vec![5, 6], 24)] {
        let y = randn(&small, seed)?.to_dtype(DType::F32)?;
        for mul in [false, true] {
            for swap in [false, true] {
                let run = |ours: bool| -> Result<(Vec<u32>, Vec<f64>, Vec<f64>)> {
                    let (xv, yv) = (Var::from_tensor(&x)?, Var::from_tensor(&y)?);
                    let (a, b) = if swap { (yv.as_tensor(), xv.as_tensor()) } else { (xv.as_tensor(), yv.as_tensor()) };
                    let out = match (ours, mul) {
                        (true, false) => add_any(a, b)?,
                        (true, true) => mul_any(a, b)?,
                        (false, false) => a.broadcast_add(b)?,
                        (false, true) => a.broadcast_mul(b)?,
                    };
                    let bits = out.flatten_all()?.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).collect();
                    let r = randn(&[3, 5, 6], 25)?.to_dtype(DType::F32)?;
                    let g = (out * r)?.sum_all()?.backward()?;
                    Ok((bits, vec64(g.get(xv.as_tensor()).unwrap())?, vec64(g.get(yv.as_tensor()).unwrap())?))
                };
                let ((vo, gxo, gyo), (vc, gxc, gyc)) = (run(true)?, run(false)?);
                let what = format!("y {small:?} mul {mul} swap {swap}");
                assert_eq!(vo, vc, "{what}: values");
                assert!(max_abs_diff(&gxo, &gxc) < 1e-5, "{what}: dx");
                assert!(max_abs_diff(&gyo, &gyc) < 1e-4, "{what}: dy {}", max_abs_diff(&gyo, &gyc));
            }
        }
    }
    Ok(())
}

/// The rotary head split (`nn::rope::rope_heads`, one op) equals the composite it replaces (a
/// reshape, a transpose and `apply_rope`'s negation, concat, products and sum): in f32 the
/// output and the input gradient bit for bit, in f64 within 1e-12, in f16/bf16 within the
/// storage's rounding of the f32 op and never further from it than the half-precision
/// composite. Position ids differ per sample (padding shifts them); one head and several, and
/// one token (decoding).
#[test]
fn rope_head_split_equals_the_composite() -> Result<()> {
    use prs::nn::rope::{apply_rope, rope_heads, rope_tables};
    for (b, t, h, d) in [(2usize, 5usize, 3usize, 8usize), (1, 1, 4, 16), (3, 7, 1, 4)] {
        let what = format!("b{b} t{t} h{h} d{d}");
        let pos: Vec<u32> = (0..b * t).map(|i| (i % t + 2 * (i / t)) as u32).collect();
        let pos = Tensor::from_vec(pos, (b, t), &Device::Cpu)?;
        let x32 = randn(&[b, t, h * d], 31)?;
        let r32 = randn(&[b, h, t, d], 32)?;
        let run = |dt: DType, fused: bool| -> Result<[Vec<f64>; 2]> {
            let (cos, sin) = rope_tables(&pos, d, 10000.0, dt)?;
            let x = Var::from_tensor(&x32.to_dtype(dt)?)?;
            let y = if fused {
                rope_heads(x.as_tensor(), &cos, &sin, h)?
            } else {
                let split = x.as_tensor().reshape((b, t, h, d))?.transpose(1, 2)?.contiguous()?;
                apply_rope(&split, &cos, &sin)?
            };
            assert_eq!((y.dims(), y.dtype()), (&[b, h, t, d][..], dt));
            let g = dot(&y.to_dtype(DType::F64)?, &r32.to_dtype(DType::F64)?)?.backward()?;
            let gx = g.get(x.as_tensor()).expect("input gradient");
            assert_eq!(gx.dtype(), dt);
            Ok([vec64(&y)?, vec64(gx)?])
        };
        let names = ["output", "input gradient"];
        for (a, c) in run(DType::F32, true)?.iter().zip(run(DType::F32, false)?) {
            assert_eq!(a, &c, "{what}: f32 op and composite differ");
        }
        for ((a, c), n) in run(DType::F64, true)?.iter().zip(run(DType::F64, false)?).zip(names) {
            assert!(max_abs_diff(a, &c) <= 1e-12 * max_abs(&c).max(1.0), "{what}: f64 {n}");
        }
        let f32s = run(DType::F32, true)?;
        for (dt, tol) in [(DType::F16, 2e-3), (DType::BF16, 1.6e-2)] {
            let (op, comp) = (run(dt, true)?, run(dt, false)?);
            for (((a, c), want), n) in op.iter().zip(&comp).zip(&f32s).zip(names) {
                let scale = max_abs(want).max(1.0);
                let (e_op, e_comp) = (max_abs_diff(a, want) / scale, max_abs_diff(c, want) / scale);
                assert!(e_op <= tol, "{what}: {dt:?} {n} {e_op} from f32");
                assert!(e_op <= e_comp + 1e-9, "{what}: {dt:?} {n}: op {e_op} vs composite {e_comp}");
            }
        }
    }
    Ok(())
}

/// GELU (erf form) as one node (`nn::ops::gelu_erf`): the same values and gradients as candle's
/// `gelu_erf` and its backward bit for bit on the CPU (f32 and f16), with a gradient that holds
/// no autograd history, where candle's keeps about ten input-sized temporaries as history.
#[test]
fn gelu_op_equals_candles_and_its_gradient_holds_no_graph() -> Result<()> {
    for dt in [DType::F32, DType::F16] {
        let x = Var::from_tensor(&(randn(&[3, 5, 7], 41)? * 2.0)?.to_dtype(dt)?)?;
        let r = randn(&[3, 5, 7], 42)?.to_dtype(dt)?;
        let ours = prs::nn::ops::gelu_erf(x.as_tensor())?;
        let theirs = x.as_tensor().gelu_erf()?;
        assert_eq!(vec64(&ours)?, vec64(&theirs)?, "{dt:?}: values");
        let go = (&ours * &r)?.sum_all()?.backward()?;
        let gt = (&theirs * &r)?.sum_all()?.backward()?;
        let (a, b) = (go.get(x.as_tensor()).unwrap(), gt.get(x.as_tensor()).unwrap());
        assert_eq!(vec64(a)?, vec64(b)?, "{dt:?}: gradients");
        assert!(!a.track_op(), "{dt:?}: our gradient holds a graph");
        assert!(b.track_op(), "{dt:?}: candle's gradient was expected to hold its history");
    }
    let plain = randn(&[4], 43)?;
    assert!(!prs::nn::ops::gelu_erf(&plain)?.track_op());
    Ok(())
}

/// A frozen projection with a trained LoRA adapter as one node (`lora_linear`) equals the
/// separate ops it replaces: the forward bit for bit, the gradients of x, A and B within f32
/// rounding (bf16's in bf16), with dropout (the same mask in the backward, which runs after the
/// training region ended, so the op must restore the step seed itself) and without, for a dense
/// and a 4-bit frozen weight, x of rank 3, rank 2 or transposed, and x untracked (no input
/// gradient computed).
#[test]
fn lora_linear_equals_the_separate_ops() -> Result<()> {
    use prs::config::BaseQuant;
    use prs::nn::linear::{lora_linear, FrozenWeight};
    use prs::nn::ops::{dropout, TrainingMode};
    use prs::nn::quant::QuantWeight;
    let to = |t: Tensor, dt: DType| t.to_dtype(dt).unwrap();
    let (m, k, n, r, scale) = (10, 256, 24, 4, 0.37);
    let w32 = to(randn(&[n, k], 2)?, DType::F32);
    let q4 = QuantWeight::quantize(&w32, BaseQuant::Int4)?.expect("in-features are a multiple of 256");
    let q4_dense = q4.dequantize(DType::F32)?;
    let cases = [
        ("dense f32", DType::F32, false, "rank 3"),
        ("dense f32", DType::F32, false, "rank 2"),
        ("dense f32", DType::F32, false, "transposed"),
        ("4bit f32", DType::F32, true, "rank 3"),
        ("dense bf16", DType::BF16, false, "rank 3"),
    ];
    for (name, dt, quant, layout) in cases {
        let x = match layout {
            "rank 3" => to(randn(&[2, m / 2, k], 1)?, dt),
            "rank 2" => to(randn(&[m, k], 1)?, dt),
            _ => to(randn(&[k, m], 1)?, dt).t()?,
        };
        let x = Var::from_tensor(&x)?;
        let a = Var::from_tensor(&to((randn(&[r, k], 3)? * 0.1)?, dt))?;
        let bm = Var::from_tensor(&to((randn(&[n, r], 4)? * 0.1)?, dt))?;
        let mut out_dims = x.dims().to_vec();
        *out_dims.last_mut().unwrap() = n;
        let dy = to(randn(&out_dims, 5)?, dt);
        let (frozen, dense) = if quant {
            (FrozenWeight::Quant(q4.clone()), q4_dense.clone())
        } else {
            (FrozenWeight::Dense(to(w32.clone(), dt)), to(w32.clone(), dt))
        };
        let tol = if dt == DType::BF16 { 2e-2 } else { 1e-5 };
        for (p, seed) in [(0.0f32, 3u64), (0.3, 9)] {
            for x_tracked in [true, false] {
                let xin = if x_tracked { x.as_tensor().clone() } else { x.as_tensor().detach() };
                let (fused, plain) = {
                    let _train = TrainingMode::enter(seed);
                    let fused = lora_linear(&xin, frozen.clone(), a.as_tensor(), bm.as_tensor(), scale, p, "site")?;
                    let xi = dropout(&xin, p, "site")?;
                    let branch = xi.broadcast_matmul(&a.as_tensor().t()?)?.broadcast_matmul(&bm.as_tensor().t()?)?;
                    (fused, (frozen_matmul(&xin, &dense)? + (branch * scale)?)?)
                };
                let tag = format!("{name} {layout} dropout {p} x tracked {x_tracked}");
                let (f, e) = (vec64(&fused)?, vec64(&plain)?);
                if !quant && x_tracked {
                    assert_eq!(f, e, "{tag}: forward differs");
                } else {
                    assert!(max_abs_diff(&f, &e) <= tol * max_abs(&e), "{tag}: forward differs");
                }
                // Outside the training region: the op's backward restores the forward's seed.
                let gf = (&fused * &dy)?.sum_all()?.backward()?;
                let gp = {
                    let _train = TrainingMode::enter(seed);
                    (&plain * &dy)?.sum_all()?.backward()?
                };
                for (what, v) in [("x", &x), ("A", &a), ("B", &bm)] {
                    let (f, e) = (gf.get(v.as_tensor()), gp.get(v.as_tensor()));
                    if what == "x" && !x_tracked {
                        assert!(f.is_none() && e.is_none(), "{tag}: a gradient for an untracked x");
                        continue;
                    }
                    let (f, e) = (f.expect("fused gradient"), e.expect("plain gradient"));
                    assert_eq!((f.dims(), f.dtype()), (e.dims(), e.dtype()), "{tag}: d{what} shape or dtype");
                    let (f, e) = (vec64(f)?, vec64(e)?);
                    let err = max_abs_diff(&f, &e) / max_abs(&e);
                    println!("{tag}: d{what} max rel err {err:.1e}");
                    assert!(err < tol, "{tag}: d{what} rel err {err}");
                }
            }
        }
    }
    Ok(())
}
