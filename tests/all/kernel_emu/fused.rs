//! `kernels/fused.cu` under the CPU emulation, with the launches of `prs::kernels::row_launch`
//! and `elementwise_launch` and the arguments `src/kernels/cuda_fused.rs` passes: each kernel
//! against the CPU composite it replaces. The row kernels reduce in another order than the
//! CPU, so they agree to a few roundings of the stored dtype, not bit for bit; a wrong index or
//! a broken reduction is off by far more. The rotary kernels repeat the CPU op's arithmetic and
//! must agree bit for bit.

use candle_core::{DType, Device, Tensor, Var};
use prs::kernels::{elementwise_launch, row_launch, RowMap};
use prs::nn::fused::{rms_normalize_composite, silu_mul_composite};
use prs::nn::rope::rope_heads;
use prs::nn::softmax::{
    causal_fill, mask_min, scaled_masked_softmax, scaled_masked_softmax_causal, scaled_softmax_backward,
};

use super::{compare, random, tag, Sanitizer, Script};

const DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

/// A few roundings of the stored dtype (f32: a few more, for the reductions' order).
fn tolerance(dt: DType) -> f64 {
    match dt {
        DType::F32 => 4e-6,
        DType::BF16 => 2.0 * 2f64.powi(-8),
        _ => 2.0 * 2f64.powi(-11),
    }
}

fn rows(t: &Tensor) -> (usize, usize) {
    let n = *t.dims().last().unwrap();
    (t.elem_count() / n, n)
}

fn row_map_bytes(m: &RowMap) -> Vec<u8> {
    m.dims.iter().chain(&m.strides).chain([&m.last]).flat_map(|v| v.to_le_bytes()).collect()
}

fn check(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    let (rel, n) = compare(got, want);
    assert!(rel <= tol, "{what}: {n} elements differ, worst {rel:e} (tolerance {tol:e})");
}

/// softmax(scale x + mask) with a key-padding mask (in the scores' dtype and in f32), with
/// causal masking (past 0 and 2), and rows of 3 and 1100 keys (one warp mostly idle; 256
/// threads striding).
#[test]
fn emulated_softmax_kernels_agree_with_the_composite() {
    for dt in DTYPES {
        for (case, &(shape, causal)) in [
            ([2usize, 3, 5, 37], None),
            ([2, 3, 5, 37], Some(0usize)),
            ([1, 2, 6, 9], Some(2)),
            ([2, 1, 2, 1100], None),
            ([3, 1, 4, 3], None),
        ]
        .iter()
        .enumerate()
        {
            for mask_dt in [None, Some(dt), Some(DType::F32)] {
                if mask_dt == Some(DType::F32) && dt == DType::F32 {
                    continue;
                }
                let what = format!("softmax {shape:?} causal {causal:?} mask {mask_dt:?} {dt:?}");
                let x = random(&shape, dt, 11 + case as u64);
                let mask = mask_dt.map(|mdt| {
                    // The last keys of each sample hidden; at least one key stays visible.
                    let k = shape[3];
                    let v: Vec<f32> = (0..shape[0] * k)
                        .map(|i| if i % k >= k - (i / k + 1).min(k - 1) { mask_min(mdt) as f32 } else { 0.0 })
                        .collect();
                    Tensor::from_vec(v, (shape[0], 1, 1, k), &Device::Cpu).unwrap().to_dtype(mdt).unwrap()
                });
                let scale = 0.125;
                let want = match causal {
                    Some(past) => scaled_masked_softmax_causal(&x, scale, mask.as_ref(), past).unwrap(),
                    None => scaled_masked_softmax(&x, scale, mask.as_ref()).unwrap(),
                };
                let (r, n) = rows(&x);
                let mut s = Script::new("fused");
                let xb = s.input(&x);
                let (mb, map, name) = match &mask {
                    Some(m) => {
                        let map = RowMap::new(x.dims(), m.dims()).unwrap();
                        let suffix = if m.dtype() == dt { String::new() } else { "_mf32".into() };
                        (s.input(m), map, format!("softmax_fwd_{}{suffix}", tag(dt)))
                    }
                    None => (
                        xb.clone(),
                        RowMap { dims: [1; 4], strides: [0; 4], last: 0 },
                        format!("softmax_fwd_{}", tag(dt)),
                    ),
                };
                let map_b = s.bytes(&row_map_bytes(&map));
                let y = s.output(dt, x.dims());
                let fill = causal_fill(mask.as_ref().map_or(dt, |m| m.dtype()));
                let args = [
                    xb,
                    mb,
                    y,
                    n.to_string(),
                    format!("{:?}", scale as f32),
                    u8::from(mask.is_some()).to_string(),
                    map_b,
                    u8::from(causal.is_some()).to_string(),
                    shape[2].to_string(),
                    causal.unwrap_or(0).to_string(),
                    format!("{fill:?}"),
                ];
                s.launch(&name, &row_launch(r, n).unwrap(), true, &args);
                check(&what, &s.run()[0], &want, tolerance(dt));
            }
        }
        // The backward: dx = scale p (g - sum(g p)), against candle's kernels on the CPU.
        for (case, shape) in [[2usize, 3, 5, 37], [1, 1, 3, 1100]].iter().enumerate() {
            let p = scaled_masked_softmax(&random(shape, dt, 21 + case as u64), 1.0, None).unwrap();
            let g = random(shape, dt, 31 + case as u64);
            let want = scaled_softmax_backward(&p, &g, 0.125, true).unwrap();
            let (r, n) = rows(&p);
            let mut s = Script::new("fused");
            let args = [s.input(&p), s.input(&g), s.output(dt, shape), n.to_string(), format!("{:?}", 0.125f32)];
            s.launch(&format!("softmax_bwd_{}", tag(dt)), &row_launch(r, n).unwrap(), true, &args);
            check(&format!("softmax backward {shape:?} {dt:?}"), &s.run()[0], &want, tolerance(dt));
        }
    }
}

/// The f32 gradients of `f` at `inputs` (widened to f32) against the output gradient `g`.
fn f32_grads(inputs: &[&Tensor], g: &Tensor, f: impl Fn(&[Tensor]) -> Tensor) -> Vec<Tensor> {
    let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(&t.to_dtype(DType::F32).unwrap()).unwrap()).collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let loss = (f(&ts) * g.to_dtype(DType::F32).unwrap()).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    vars.iter().map(|v| grads.get(v.as_tensor()).unwrap().clone()).collect()
}

/// RMS normalisation forward and backward over rows of 300 and 1100, SiLU gate and GELU
/// backward over 3 x 333 elements (a partial last block).
#[test]
fn emulated_norm_and_gate_kernels_agree_with_the_composite() {
    let eps = 1e-5;
    for dt in DTYPES {
        for (case, shape) in [[3usize, 7, 300], [2, 1, 1100]].iter().enumerate() {
            let x = random(shape, dt, 41 + case as u64);
            let g = random(shape, dt, 51 + case as u64);
            let (r, n) = rows(&x);
            let scalars = [n.to_string(), format!("{:?}", (1.0 / n as f64) as f32), format!("{:?}", eps as f32)];
            let mut s = Script::new("fused");
            let mut args = vec![s.input(&x), s.output(dt, shape)];
            args.extend(scalars.clone());
            s.launch(&format!("rms_fwd_{}", tag(dt)), &row_launch(r, n).unwrap(), true, &args);
            let want = rms_normalize_composite(&x, eps).unwrap();
            check(&format!("rms {shape:?} {dt:?}"), &s.run()[0], &want, tolerance(dt));

            let mut s = Script::new("fused");
            let mut args = vec![s.input(&x), s.input(&g), s.output(dt, shape)];
            args.extend(scalars);
            s.launch(&format!("rms_bwd_{}", tag(dt)), &row_launch(r, n).unwrap(), true, &args);
            let want = f32_grads(&[&x], &g, |t| rms_normalize_composite(&t[0], eps).unwrap()).remove(0);
            check(&format!("rms backward {shape:?} {dt:?}"), &s.run()[0], &want, 4.0 * tolerance(dt));
        }

        let shape = [3usize, 333];
        let n = 3 * 333;
        let (a, u, g) = (random(&shape, dt, 61), random(&shape, dt, 62), random(&shape, dt, 63));
        let launch = elementwise_launch(n);
        let mut s = Script::new("fused");
        let args = [s.input(&a), s.input(&u), s.output(dt, &shape), n.to_string()];
        s.launch(&format!("silu_mul_fwd_{}", tag(dt)), &launch, false, &args);
        // Against the composite in f32: the kernel rounds once, the composite in bf16 at every step.
        let wide = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let want = silu_mul_composite(&wide(&a), &wide(&u)).unwrap();
        check(&format!("silu gate {dt:?}"), &s.run()[0], &want, tolerance(dt));

        let mut s = Script::new("fused");
        let args = [s.input(&a), s.input(&u), s.input(&g), s.output(dt, &[2, 3, 333]), n.to_string()];
        s.launch(&format!("silu_mul_bwd_{}", tag(dt)), &launch, false, &args);
        let got = s.run().remove(0);
        let want = f32_grads(&[&a, &u], &g, |t| silu_mul_composite(&t[0], &t[1]).unwrap());
        check(&format!("silu gate d_gate {dt:?}"), &got.get(0).unwrap(), &want[0], 4.0 * tolerance(dt));
        check(&format!("silu gate d_up {dt:?}"), &got.get(1).unwrap(), &want[1], 4.0 * tolerance(dt));

        let mut s = Script::new("fused");
        let args = [s.input(&a), s.input(&g), s.output(dt, &shape), n.to_string()];
        s.launch(&format!("gelu_erf_bwd_{}", tag(dt)), &launch, false, &args);
        let want = f32_grads(&[&a], &g, |t| t[0].gelu_erf().unwrap()).remove(0);
        check(&format!("gelu backward {dt:?}"), &s.run()[0], &want, 4.0 * tolerance(dt).max(1e-5));
    }
}

/// The rotary head split (B, T, H*D) -> (B, H, T, D) and its transpose, bit for bit with the
/// CPU op (B 2, T 5, H 3, D 8).
#[test]
fn emulated_rope_kernels_equal_the_cpu_op() {
    let (b, t, h, d) = (2usize, 5usize, 3usize, 8usize);
    for dt in DTYPES {
        let x = random(&[b, t, h * d], dt, 71);
        let cos = random(&[b, 1, t, d], dt, 72);
        let sin = random(&[b, 1, t, d], dt, 73);
        let g = random(&[b, h, t, d], dt, 74);
        let n = b * t * h * d;
        let scalars = [n.to_string(), h.to_string(), t.to_string(), d.to_string()];
        let mut s = Script::new("fused");
        let mut args = vec![s.input(&x), s.input(&cos), s.input(&sin), s.output(dt, &[b, h, t, d])];
        args.extend(scalars.clone());
        s.launch(&format!("rope_heads_fwd_{}", tag(dt)), &elementwise_launch(n), false, &args);
        let (rel, differ) = compare(&s.run()[0], &rope_heads(&x, &cos, &sin, h).unwrap());
        assert_eq!(differ, 0, "rope forward {dt:?}: {differ} differ, worst {rel:e}");

        let mut s = Script::new("fused");
        let mut args = vec![s.input(&g), s.input(&cos), s.input(&sin), s.output(dt, &[b, t, h * d])];
        args.extend(scalars);
        s.launch(&format!("rope_heads_bwd_{}", tag(dt)), &elementwise_launch(n), false, &args);
        let xv = Var::from_tensor(&x).unwrap();
        let loss = (rope_heads(xv.as_tensor(), &cos, &sin, h).unwrap() * &g).unwrap();
        let grads = loss.to_dtype(DType::F32).unwrap().sum_all().unwrap().backward().unwrap();
        let want = grads.get(xv.as_tensor()).unwrap();
        let (rel, differ) = compare(&s.run()[0], want);
        assert_eq!(differ, 0, "rope backward {dt:?}: {differ} differ, worst {rel:e}");
    }
}

/// Under the thread sanitizer, the row kernels' block reductions (two in a row in the RMS
/// backward, one after another in the softmax) do not race on their shared partial sums: rows
/// of 1000 run 256 threads, eight warps.
#[test]
fn emulated_row_kernels_have_no_race() {
    let (x, g) = (random(&[2, 1000], DType::F32, 95), random(&[2, 1000], DType::F32, 96));
    let p = scaled_masked_softmax(&x, 1.0, None).unwrap();
    let launch = row_launch(2, 1000).unwrap();
    let rms = ["1000".to_string(), format!("{:?}", 1e-3f32), format!("{:?}", 1e-5f32)];
    let no_mask = RowMap { dims: [1; 4], strides: [0; 4], last: 0 };
    let mut s = Script::with("fused", Sanitizer::Thread);
    let (xb, gb, pb) = (s.input(&x), s.input(&g), s.input(&p));
    let map = s.bytes(&row_map_bytes(&no_mask));
    let outs: Vec<String> = (0..4).map(|_| s.output(DType::F32, &[2, 1000])).collect();
    let f = |v: f32| format!("{v:?}");
    let softmax = [&xb, &xb, &outs[0]].map(|b| b.to_string());
    let tail = ["1000".into(), f(0.5), "0".into(), map, "0".into(), "1".into(), "0".into(), f(0.0)];
    s.launch("softmax_fwd_f32", &launch, true, &[softmax.to_vec(), tail.to_vec()].concat());
    s.launch("softmax_bwd_f32", &launch, true, &[pb, gb.clone(), outs[1].clone(), "1000".into(), f(0.5)]);
    s.launch("rms_fwd_f32", &launch, true, &[vec![xb.clone(), outs[2].clone()], rms.to_vec()].concat());
    s.launch("rms_bwd_f32", &launch, true, &[vec![xb, gb, outs[3].clone()], rms.to_vec()].concat());
    let out = s.run();
    check("softmax under TSan", &out[0], &scaled_masked_softmax(&x, 0.5, None).unwrap(), 4e-6);
    check("softmax backward under TSan", &out[1], &scaled_softmax_backward(&p, &g, 0.5, true).unwrap(), 4e-6);
    check("rms under TSan", &out[2], &rms_normalize_composite(&x, 1e-5).unwrap(), 4e-6);
}
