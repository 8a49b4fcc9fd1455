//! The attention softmax with causal masking computed from indices (`scaled_masked_softmax_causal`,
//! what the CUDA kernel does) against the same softmax with the mask written out by hand,
//! grouped-query attention without repeated K/V against the repeat_kv form, and the chunked
//! attention op that keeps only its output against the plain autograd graph.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use half::{bf16, f16};
use prs::nn::softmax::{
    mask_min, scaled_masked_softmax, scaled_masked_softmax_causal, scaled_masked_softmax_composite,
};

const CPU: Device = Device::Cpu;

fn randn(shape: &[usize], seed: u64) -> Result<Tensor> {
    use rand::{rngs::StdRng, SeedableRng};
    use rand_distr::{Distribution, StandardNormal};
    let mut rng = StdRng::seed_from_u64(seed);
    let v: Vec<f32> = (0..shape.iter().product()).map(|_| StandardNormal.sample(&mut rng)).collect();
    Ok(Tensor::from_vec(v, shape, &CPU)?)
}

fn bits(t: &Tensor) -> Result<Vec<u32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).collect())
}

/// `mask_min(F32)` as a mask of dtype `dt` stores it.
fn hidden_value(dt: DType) -> f32 {
    let v = mask_min(DType::F32) as f32;
    match dt {
        DType::BF16 => bf16::from_f32(v).to_f32(),
        DType::F16 => f16::from_f32(v).to_f32(),
        _ => v,
    }
}

/// Key padding (B, 1, ..., 1, K) in `dt`: the last `pads[b]` keys of sample b hidden.
fn padding(b: usize, k: usize, rank: usize, pads: &[usize], dt: DType) -> Result<Tensor> {
    let neg = mask_min(DType::F32) as f32;
    let v: Vec<f32> = (0..b * k).map(|i| if i % k >= k - pads[i / k] { neg } else { 0.0 }).collect();
    let mut dims = vec![1; rank];
    (dims[0], dims[rank - 1]) = (b, k);
    Ok(Tensor::from_vec(v, dims, &CPU)?.to_dtype(dt)?)
}

/// The causal mask with padding written out, as `Mistral` built it before causal masking moved
/// into the softmax: `pad` where key j <= i + past, the hidden value elsewhere.
fn explicit_mask(pad: &Tensor, q: usize, past: usize) -> Result<Tensor> {
    let dims = pad.dims().to_vec();
    let (b, k, r) = (dims[0], dims[dims.len() - 1], dims.len());
    let p = pad.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let neg = hidden_value(pad.dtype());
    let v: Vec<f32> = (0..b * q * k)
        .map(|n| {
            let (bi, i, j) = (n / (q * k), (n / k) % q, n % k);
            if j <= i + past {
                p[bi * k + j]
            } else {
                neg
            }
        })
        .collect();
    let mut out = vec![1; r];
    (out[0], out[r - 2], out[r - 1]) = (b, q, k);
    Ok(Tensor::from_vec(v, out, &CPU)?.to_dtype(pad.dtype())?)
}

/// Value and gradient of the causal softmax equal, bit for bit, the softmax with the mask
/// written out: 4-D (B, H, Q, K) and the grouped 5-D (B, KV, G, Q, K) layout, with and without
/// cached keys, in every dtype (f16's hidden value is -inf).
#[test]
fn causal_softmax_equals_the_written_out_mask() -> Result<()> {
    let scale = 0.3;
    for dims in [vec![2, 3, 4, 7], vec![2, 2, 3, 4, 7]] {
        let (r, q, k) = (dims.len(), dims[dims.len() - 2], dims[dims.len() - 1]);
        let w = randn(&dims, 2)?;
        for dt in [DType::F32, DType::BF16, DType::F16] {
            let s = (randn(&dims, 1)? * 3.0)?.to_dtype(dt)?;
            for (past, pads) in [(k - q, [0, 2]), (k - q, [0, 0]), (1, [1, 3])] {
                for with_pad in [true, false] {
                    let pad = padding(2, k, r, &pads, dt)?;
                    let zero = pad.zeros_like()?;
                    let want_mask = explicit_mask(if with_pad { &pad } else { &zero }, q, past)?;
                    let run = |f: &dyn Fn(&Tensor) -> Result<Tensor>| -> Result<(Tensor, Tensor)> {
                        let v = Var::from_tensor(&s)?;
                        let y = f(v.as_tensor())?;
                        let g = (y.to_dtype(DType::F32)? * &w)?.sum_all()?.backward()?;
                        Ok((y, g.get(v.as_tensor()).expect("gradient").clone()))
                    };
                    let pad_arg = with_pad.then_some(&pad);
                    let (y, g) = run(&|t| scaled_masked_softmax_causal(t, scale, pad_arg, past))?;
                    let (y2, g2) = run(&|t| scaled_masked_softmax(t, scale, Some(&want_mask)))?;
                    let (y3, _) = run(&|t| scaled_masked_softmax_composite(t, scale, pad_arg, Some(past)))?;
                    let tag = format!("{dims:?} {dt:?} past {past} pads {pads:?} pad {with_pad}");
                    assert_eq!(y.dtype(), dt);
                    assert_eq!(bits(&y)?, bits(&y2)?, "values {tag}");
                    assert_eq!(bits(&g)?, bits(&g2)?, "gradients {tag}");
                    assert_eq!(bits(&y)?, bits(&y3)?, "composite {tag}");
                    // Hidden keys get no probability (each row sees at least one key).
                    let p = y.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                    for (n, v) in p.iter().enumerate() {
                        let (i, j) = ((n / k) % q, n % k);
                        assert!(v.is_finite(), "{tag}: non-finite probability at {n}");
                        if j > i + past {
                            assert_eq!(*v, 0.0, "{tag}: causally hidden key {j} of query {i} has {v}");
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// Grouped-query attention with K/V shared across each group equals the repeat_kv form (K/V
/// copied per query head, the 4-D softmax with the causal mask written out), value and the
/// gradients of q, k and v, with and without cached positions.
#[test]
fn grouped_attention_equals_the_repeat_kv_form() -> Result<()> {
    use prs::model::mistral::grouped_attention;
    let (b, nh, nkv, d) = (2, 6, 2, 8);
    let scale = 1.0 / (d as f64).sqrt();
    for (t, past) in [(5, 0), (3, 4), (1, 6)] {
        let tk = t + past;
        let q = randn(&[b, nh, t, d], 10)?;
        let k = randn(&[b, nkv, tk, d], 11)?;
        let v = randn(&[b, nkv, tk, d], 12)?;
        let r = randn(&[b, nh, t, d], 13)?;
        let pad = padding(b, tk, 4, &[0, 2.min(past)], DType::F32)?;
        let vars = [&q, &k, &v].map(|x| Var::from_tensor(x).unwrap());
        let [qv, kv, vv] = [0, 1, 2].map(|i| vars[i].as_tensor().clone());
        let grouped = grouped_attention(&qv, &kv, &vv, Some(&pad), past, scale)?;
        let rep = |x: &Tensor| -> Result<Tensor> {
            let (_, n, s, dd) = x.dims4()?;
            Ok(x.unsqueeze(2)?.expand((b, n, nh / nkv, s, dd))?.reshape((b, nh, s, dd))?)
        };
        let scores = qv.matmul(&rep(&kv)?.t()?)?;
        let probs = scaled_masked_softmax(&scores, scale, Some(&explicit_mask(&pad, t, past)?))?;
        let want = probs.matmul(&rep(&vv)?)?;
        let tag = format!("t {t} past {past}");
        let close = |a: &Tensor, b: &Tensor, what: &str| -> Result<()> {
            let e = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            let s = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert!(e <= 1e-5 * s.max(1.0), "{tag}: {what} differs by {e} (scale {s})");
            Ok(())
        };
        close(&grouped, &want, "value")?;
        let g1 = (&grouped * &r)?.sum_all()?.backward()?;
        let g2 = (&want * &r)?.sum_all()?.backward()?;
        for (name, x) in [("dq", &qv), ("dk", &kv), ("dv", &vv)] {
            close(g1.get(x).expect("gradient"), g2.get(x).expect("gradient"), name)?;
        }
    }
    Ok(())
}

/// The plain graph the op replaces: per chunk of query rows, scores, masked softmax, dropout at
/// `{site}.{chunk}`, times V; candle's autograd keeps every chunk's probabilities.
fn composite_attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, p: f32, rows: usize) -> Result<Tensor> {
    let n = q.dim(2)?;
    let mut outs = vec![];
    for (i, s) in (0..n).step_by(rows).enumerate() {
        let qc = q.narrow(2, s, rows.min(n - s))?.contiguous()?;
        let probs = scaled_masked_softmax(&qc.matmul(&k.t()?)?, 1.0, Some(bias))?;
        outs.push(prs::nn::ops::dropout(&probs, p, &format!("site.{i}"))?.matmul(v)?);
    }
    Ok(Tensor::cat(&outs, 2)?)
}

#[test]
fn chunked_attention_equals_the_plain_graph_in_value_and_gradient() -> Result<()> {
    use prs::nn::attention::{chunk_rows, chunked_attention};
    use prs::nn::ops::TrainingMode;
    let (b, h, n, t, d) = (2, 4, 64, 40, 8);
    let q = Var::from_tensor(&(randn(&[b, h, n, d], 1)? * 0.5)?)?;
    let k = Var::from_tensor(&randn(&[b, h, t, d], 2)?)?;
    let v = Var::from_tensor(&randn(&[b, h, t, d], 3)?)?;
    // Sample 0 ignores its last 15 keys.
    let keep: Vec<f32> =
        (0..b * t).map(|i| if i < t && i % t >= 25 { mask_min(DType::F32) as f32 } else { 0.0 }).collect();
    let bias = Tensor::from_vec(keep, (b, 1, 1, t), &CPU)?;
    let budget = b * h * t * 16; // 16 query rows per chunk: 4 chunks
    assert_eq!(chunk_rows(b * h, n, t, budget), 16);
    let w = randn(&[b, h, n, d], 4)?;
    for (dropout, seed) in [(0.0, None), (0.2, Some(7))] {
        let _train = seed.map(TrainingMode::enter);
        let fast =
            chunked_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), Some(&bias), dropout, "site", budget)?;
        let plain = composite_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &bias, dropout, 16)?;
        let bits = |x: &Tensor| -> Result<Vec<u32>> {
            Ok(x.flatten_all()?.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).collect())
        };
        assert_eq!(bits(&fast)?, bits(&plain)?, "dropout {dropout}: outputs differ");
        let gf = (&fast * &w)?.sum_all()?.backward()?;
        let gp = (&plain * &w)?.sum_all()?.backward()?;
        for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
            let (a, e) = (gf.get(x.as_tensor()).unwrap(), gp.get(x.as_tensor()).unwrap());
            let err = ((a - e)?.abs()?.max_all()?.to_scalar::<f32>()? / e.abs()?.max_all()?.to_scalar::<f32>()?).abs();
            println!("dropout {dropout}: d{name} max rel err {err:.2e}");
            assert!(err < 1e-5, "dropout {dropout}: d{name} rel err {err}");
        }
        // Masked keys get no gradient.
        let dk0: Vec<f32> =
            gf.get(k.as_tensor()).unwrap().narrow(0, 0, 1)?.narrow(2, 25, 15)?.flatten_all()?.to_vec1()?;
        assert!(dk0.iter().all(|&x| x == 0.0), "a masked key has a gradient");
    }
    // A trained bias with a row per query (TinySAM's relative position bias, (H, N, T)),
    // broadcast over the batch: its gradient sums over the batch, row by row across chunks.
    let pos = Var::from_tensor(&(randn(&[h, n, t], 5)? * 0.3)?)?;
    let fast = chunked_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), Some(pos.as_tensor()), 0.0, "p", budget)?;
    let plain = {
        let mut outs = vec![];
        for s in (0..n).step_by(16) {
            let qc = q.as_tensor().narrow(2, s, 16)?.contiguous()?;
            let scores = qc.matmul(&k.as_tensor().t()?)?.broadcast_add(&pos.as_tensor().narrow(1, s, 16)?)?;
            outs.push(prs::nn::ops::softmax_last_dim(&scores)?.matmul(v.as_tensor())?);
        }
        Tensor::cat(&outs, 2)?
    };
    let e = (&fast - &plain)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(e < 1e-5, "with a trained bias the outputs differ by {e}");
    let gf = (&fast * &w)?.sum_all()?.backward()?;
    let gp = (&plain * &w)?.sum_all()?.backward()?;
    for (name, x) in [("q", &q), ("k", &k), ("v", &v), ("bias", &pos)] {
        let (a, e) = (gf.get(x.as_tensor()).unwrap(), gp.get(x.as_tensor()).unwrap());
        assert_eq!(a.dims(), e.dims(), "d{name}");
        let err = ((a - e)?.abs()?.max_all()?.to_scalar::<f32>()? / e.abs()?.max_all()?.to_scalar::<f32>()?).abs();
        println!("trained bias: d{name} max rel err {err:.2e}");
        assert!(err < 1e-4, "trained bias: d{name} rel err {err}");
    }
    // Only the tracked inputs get gradients.
    let y = chunked_attention(
        &q.as_tensor().detach(),
        k.as_tensor(),
        &v.as_tensor().detach(),
        Some(&bias),
        0.0,
        "s",
        budget,
    )?;
    let g = y.sum_all()?.backward()?;
    assert!(g.get(k.as_tensor()).is_some() && g.get(q.as_tensor()).is_none() && g.get(v.as_tensor()).is_none());
    Ok(())
}
