//! The counter-based dropout op (`nn::dropout`): mask statistics, reproducibility, dtype
//! agreement, the backward, and non-contiguous inputs.

use candle_core::{DType, Device, Tensor, Var};
use prs::nn::dropout::dropout_seeded;

fn ramp(n: usize) -> Tensor {
    // Distinct non-zero values, so a kept element is recognisable.
    Tensor::arange(1u32, n as u32 + 1, &Device::Cpu).unwrap().to_dtype(DType::F32).unwrap()
}

fn kept(y: &Tensor) -> Vec<bool> {
    y.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| *v != 0.0).collect()
}

#[test]
fn keeps_the_requested_fraction_and_scales_kept_values_exactly() {
    let n = 200_000;
    let x = ramp(n);
    for p in [0.05f32, 0.1, 0.5] {
        let y = dropout_seeded(&x, p, 42).unwrap();
        let mask = kept(&y);
        let k = mask.iter().filter(|m| **m).count() as f64;
        let keep = 1.0 - p as f64;
        let sd = (n as f64 * keep * (1.0 - keep)).sqrt();
        assert!(
            (k - n as f64 * keep).abs() < 6.0 * sd,
            "p {p}: kept {k} of {n}, expected {} +- {sd:.0}",
            n as f64 * keep
        );
        let (xv, yv) = (x.to_vec1::<f32>().unwrap(), y.to_vec1::<f32>().unwrap());
        let scale = (1.0 / keep) as f32;
        for i in (0..n).filter(|&i| mask[i]).take(1000) {
            assert_eq!(yv[i], xv[i] * scale, "element {i}");
        }
        // Neighbouring elements are not correlated: runs of drops look geometric.
        let both = (1..n).filter(|&i| !mask[i] && !mask[i - 1]).count() as f64;
        let expect = (n - 1) as f64 * (p as f64).powi(2);
        assert!(
            (both - expect).abs() < 6.0 * expect.sqrt() + 10.0,
            "p {p}: {both} adjacent drop pairs, expected ~{expect:.0}"
        );
    }
}

#[test]
fn the_mask_is_a_function_of_the_seed_alone() {
    let x = ramp(10_000);
    let a = kept(&dropout_seeded(&x, 0.3, 7).unwrap());
    assert_eq!(a, kept(&dropout_seeded(&x, 0.3, 7).unwrap()), "same seed, same mask");
    assert_ne!(a, kept(&dropout_seeded(&x, 0.3, 8).unwrap()), "another seed, another mask");
    // Same mask in every floating dtype, and values rounded once from the f32 product.
    for dt in [DType::BF16, DType::F16, DType::F64] {
        let y = dropout_seeded(&x.to_dtype(dt).unwrap(), 0.3, 7).unwrap();
        assert_eq!(a, kept(&y), "{dt:?} mask");
        if dt != DType::F64 {
            let in_f32 = dropout_seeded(&x.to_dtype(dt).unwrap().to_dtype(DType::F32).unwrap(), 0.3, 7).unwrap();
            let expect = in_f32.to_dtype(dt).unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
            let got = y.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(got, expect, "{dt:?}: x * scale in f32, rounded once");
        }
    }
    assert!(dropout_seeded(&x, 1.0, 7).is_err(), "p = 1 is refused");
    assert_eq!(dropout_seeded(&x, 0.0, 7).unwrap().to_vec1::<f32>().unwrap(), x.to_vec1::<f32>().unwrap());
}

#[test]
fn backward_applies_the_same_mask_and_scale() {
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 50, 40), &Device::Cpu).unwrap()).unwrap();
    let r = Tensor::randn(0f32, 1.0, (3, 50, 40), &Device::Cpu).unwrap();
    let y = dropout_seeded(x.as_tensor(), 0.25, 99).unwrap();
    let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let dx = g.get(x.as_tensor()).expect("gradient for x");
    // d/dx sum(r * m * x / keep) = r * m / keep = the op applied to r.
    let expect = dropout_seeded(&r, 0.25, 99).unwrap();
    assert_eq!(
        dx.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        expect.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    assert_eq!(kept(dx), kept(&y), "the gradient flows exactly where x was kept");
}

#[test]
fn non_contiguous_inputs_use_the_logical_order() {
    let x = Tensor::randn(0f32, 1.0, (30, 20), &Device::Cpu).unwrap();
    let xt = x.t().unwrap();
    assert!(!xt.is_contiguous());
    let a = dropout_seeded(&xt, 0.4, 3).unwrap();
    let b = dropout_seeded(&xt.contiguous().unwrap(), 0.4, 3).unwrap();
    assert_eq!(a.flatten_all().unwrap().to_vec1::<f32>().unwrap(), b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
}
