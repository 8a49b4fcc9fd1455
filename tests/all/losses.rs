//! The segmentation structure loss against a direct f64 transcription of PraNet's formula
//! (avg_pool2d(31, 1, 15) weights, weighted BCE, weighted IoU), and its box filter against a
//! plain loop.

use candle_core::{DType, Device, Tensor};
use prs::model::losses::{box_mean, structure_loss_per_image, LossCompat};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// avg_pool2d(k, stride 1, padding k/2, count_include_pad) of one (h, w) map.
fn box_mean_ref(g: &[f64], h: usize, w: usize, k: usize) -> Vec<f64> {
    let p = (k / 2) as i64;
    let mut out = vec![0.0; h * w];
    for y in 0..h as i64 {
        for x in 0..w as i64 {
            let mut s = 0.0;
            for yy in (y - p).max(0)..=(y + p).min(h as i64 - 1) {
                for xx in (x - p).max(0)..=(x + p).min(w as i64 - 1) {
                    s += g[(yy * w as i64 + xx) as usize];
                }
            }
            out[(y * w as i64 + x) as usize] = s / (k * k) as f64;
        }
    }
    out
}

fn structure_loss_ref(p: &[f64], g: &[f64], h: usize, w: usize, compat: LossCompat) -> f64 {
    let wt: Vec<f64> = box_mean_ref(g, h, w, 31).iter().zip(g).map(|(a, b)| 1.0 + 5.0 * (a - b).abs()).collect();
    let bce: Vec<f64> = p.iter().zip(g).map(|(&x, &y)| x.max(0.0) - x * y + (1.0 + (-x.abs()).exp()).ln()).collect();
    let n = (h * w) as f64;
    let bce_term = match compat {
        LossCompat::Intended => bce.iter().zip(&wt).map(|(b, w)| b * w).sum::<f64>() / wt.iter().sum::<f64>(),
        LossCompat::Authors => bce.iter().sum::<f64>() / n,
    };
    let s: Vec<f64> = p.iter().map(|x| 1.0 / (1.0 + (-x).exp())).collect();
    let inter: f64 = (0..h * w).map(|i| s[i] * g[i] * wt[i]).sum();
    let union: f64 = (0..h * w).map(|i| (s[i] + g[i]) * wt[i]).sum();
    bce_term + 1.0 - (inter + 1.0) / (union - inter + 1.0)
}

#[test]
fn box_mean_equals_zero_padded_average_pooling() {
    let mut rng = StdRng::seed_from_u64(1);
    for (h, w, k, binary) in [(40, 37, 31, true), (9, 12, 5, false), (64, 64, 31, true)] {
        let v: Vec<f32> = (0..2 * h * w)
            .map(|_| if binary { rng.gen_bool(0.3) as u8 as f32 } else { rng.gen_range(-1.0..1.0) })
            .collect();
        let t = Tensor::from_vec(v.clone(), (2, 1, h, w), &Device::Cpu).unwrap();
        let got: Vec<f32> = box_mean(&t, k).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        for i in 0..2 {
            let g: Vec<f64> = v[i * h * w..(i + 1) * h * w].iter().map(|&x| x as f64).collect();
            let want = box_mean_ref(&g, h, w, k);
            for (j, (a, b)) in got[i * h * w..(i + 1) * h * w].iter().zip(&want).enumerate() {
                assert!((*a as f64 - b).abs() < 1e-6, "{h}x{w} k{k}: element {j}: {a} vs {b}");
                if binary {
                    // The window sums are exact integers; only the division rounds.
                    let kk = (k * k) as f64;
                    assert_eq!((*a as f64 * kk).round(), (b * kk).round(), "{h}x{w} k{k}: element {j}");
                }
            }
        }
    }
}

#[test]
fn structure_loss_matches_pranet_formula_in_both_variants() {
    let mut rng = StdRng::seed_from_u64(2);
    let (b, h, w) = (3, 48, 40);
    let p: Vec<f32> = (0..b * h * w).map(|_| rng.gen_range(-6.0..6.0)).collect();
    // A blob per image plus speckle, so the boundary weights vary.
    let g: Vec<f32> = (0..b * h * w)
        .map(|i| {
            let (n, y, x) = (i / (h * w), (i / w) % h, i % w);
            let inside = ((y as f32 - 20.0 - 3.0 * n as f32).powi(2) + (x as f32 - 18.0).powi(2)) < 100.0;
            (inside || rng.gen_bool(0.02)) as u8 as f32
        })
        .collect();
    let pt = Tensor::from_vec(p.clone(), (b, 1, h, w), &Device::Cpu).unwrap();
    let gt = Tensor::from_vec(g.clone(), (b, 1, h, w), &Device::Cpu).unwrap();
    for compat in [LossCompat::Intended, LossCompat::Authors] {
        let got: Vec<f32> =
            structure_loss_per_image(&pt, &gt, compat).unwrap().to_dtype(DType::F32).unwrap().to_vec1().unwrap();
        for n in 0..b {
            let r = n * h * w..(n + 1) * h * w;
            let pf: Vec<f64> = p[r.clone()].iter().map(|&x| x as f64).collect();
            let gf: Vec<f64> = g[r].iter().map(|&x| x as f64).collect();
            let want = structure_loss_ref(&pf, &gf, h, w, compat);
            assert!((got[n] as f64 - want).abs() < 1e-5 * want.max(1.0), "{compat:?} image {n}: {} vs {want}", got[n]);
        }
    }
    // A shape mismatch is an error, not a broadcast.
    let small = Tensor::zeros((b, 1, h, w - 1), DType::F32, &Device::Cpu).unwrap();
    assert!(structure_loss_per_image(&pt, &small, LossCompat::Intended).is_err());
}
