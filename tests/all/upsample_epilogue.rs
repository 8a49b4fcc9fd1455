//! CPU reference of the fused upsampling epilogues (the CUDA kernels are checked against these
//! ops by examples/gpu_upsample_check.rs on a GPU).

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use prs::nn::upsample::{upsample_bilinear_ac, upsample_bilinear_ac_wide, upsample_mask, upsample_sigmoid};

fn input(dt: DType) -> Result<Tensor> {
    let v: Vec<f32> = (0..2 * 3 * 5 * 7).map(|i| ((i * 37 % 101) as f32 - 50.0) / 12.5).collect();
    Ok(Tensor::from_vec(v, (2, 3, 5, 7), &Device::Cpu)?.to_dtype(dt)?)
}

fn max_abs(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

#[test]
fn wide_logits_are_the_f32_upsampling() -> Result<()> {
    for dt in [DType::F16, DType::BF16, DType::F32] {
        let x = input(dt)?;
        let wide = upsample_bilinear_ac_wide(&x, 4)?;
        assert_eq!(wide.dtype(), DType::F32);
        assert_eq!(wide.dims(), &[2, 3, 20, 28]);
        // Same arithmetic as the f32 op on the widened input: identical values.
        assert_eq!(max_abs(&wide, &upsample_bilinear_ac(&x.to_dtype(DType::F32)?, 4)?)?, 0.0);
        // Rounding the wide logits gives the input-dtype op's result exactly.
        assert_eq!(max_abs(&wide.to_dtype(dt)?, &upsample_bilinear_ac(&x, 4)?)?, 0.0);
    }
    assert_eq!(upsample_bilinear_ac_wide(&input(DType::F64)?, 3)?.dtype(), DType::F64);
    Ok(())
}

#[test]
fn wide_logits_backward_matches_upsample_backward() -> Result<()> {
    let x = Var::from_tensor(&input(DType::F32)?)?;
    let r = Tensor::randn(0f32, 1., (2, 3, 20, 28), &Device::Cpu)?;
    let g1 = (upsample_bilinear_ac_wide(x.as_tensor(), 4)? * &r)?.sum_all()?.backward()?;
    let g2 = (upsample_bilinear_ac(x.as_tensor(), 4)? * &r)?.sum_all()?.backward()?;
    let (a, b) = (g1.get(x.as_tensor()).unwrap(), g2.get(x.as_tensor()).unwrap());
    assert!(max_abs(a, b)? < 1e-5, "{}", max_abs(a, b)?);
    Ok(())
}

#[test]
fn sigmoid_and_mask_follow_the_logits() -> Result<()> {
    for dt in [DType::F16, DType::F32, DType::F64] {
        let x = input(dt)?;
        let wide = upsample_bilinear_ac_wide(&x, 3)?;
        let p = candle_nn::ops::sigmoid(&wide)?;
        let s = upsample_sigmoid(&x, 3)?;
        assert_eq!(s.dtype(), dt);
        let tol = if dt == DType::F16 { 1e-3 } else { 1e-6 };
        assert!(max_abs(&s, &p)? <= tol, "{dt:?}: {}", max_abs(&s, &p)?);
        for t in [0.3f32, 0.5, 0.9] {
            let m = upsample_mask(&x, 3, t)?;
            assert_eq!(m.dtype(), DType::U8);
            let want = p.ge(t as f64)?;
            let ones = m.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
            assert!(ones > 0.0 && ones < m.elem_count() as f32, "threshold {t} gives a constant mask");
            assert_eq!(max_abs(&m, &want)?, 0.0, "{dt:?} threshold {t}");
        }
    }
    Ok(())
}
