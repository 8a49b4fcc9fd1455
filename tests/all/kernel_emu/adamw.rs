//! `kernels/adamw.cu` under the CPU emulation, with a launch table as `src/kernels/cuda_adamw.rs`
//! builds it (its device pointers are the emulated buffers' addresses): the in-place AdamW
//! update of several tensors in one launch equals the CPU composite bit for bit, and the
//! per-block sums of squares add up to the gradients' sum of squares.

use candle_core::{DType, Tensor, Var};
use prs::kernels::{adamw_blocks, Launch};
use prs::train::fused_adamw::{composite_update, sum_of_squares, SlotUpdate, StepHyper};

use super::{compare, random, Sanitizer, Script};

/// Bytes of one `AdamWTensor` row (repr(C): four u64 pointers, n and first_block as i64, three
/// f32 constants, an i32 flag) with the pointers left at zero, for `Script::address` to fill.
fn row(n: usize, first_block: i64, decay: f32, step: f32, inv_bias2: f32, apply_decay: bool) -> Vec<u8> {
    let mut b = vec![0u8; 32];
    b.extend((n as i64).to_le_bytes());
    b.extend(first_block.to_le_bytes());
    for v in [decay, step, inv_bias2] {
        b.extend(v.to_le_bytes());
    }
    b.extend(i32::from(apply_decay).to_le_bytes());
    b
}

/// Tensors of 5000, 100 and 9000 elements: several blocks of 4096, partial last chunks, a
/// tensor inside one block; two decay, one does not; with a gradient factor, at step 9.
#[test]
fn emulated_adamw_equals_the_composite_bit_for_bit() {
    let h = StepHyper { lr: 3e-4, beta1: 0.9, beta2: 0.999, eps: 1e-6, weight_decay: 0.05, coef: 0.37 };
    let step = 9u64;
    let sizes = [5000usize, 100, 9000];
    let decays = [true, false, true];
    let state: Vec<[Tensor; 4]> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let s = 100 + 10 * i as u64;
            let m = (random(&[n], DType::F32, s + 2) * 0.01).unwrap().relu().unwrap();
            let v = (random(&[n], DType::F32, s + 3).sqr().unwrap() * 1e-4).unwrap();
            [random(&[n], DType::F32, s), random(&[n], DType::F32, s + 1), m, v]
        })
        .collect();

    // The emulated kernel, with the constants as `fused_adamw` rounds them from f64.
    let t = step as i32;
    let step_c = (-h.lr / (1.0 - h.beta1.powi(t))) as f32;
    let inv_bias2 = (1.0 / (1.0 - h.beta2.powi(t)).sqrt()) as f32;
    let decay = (1.0 - h.lr * h.weight_decay) as f32;
    let mut s = Script::new("adamw");
    let (mut table, mut first) = (Vec::new(), 0i64);
    for (&n, &d) in sizes.iter().zip(&decays) {
        table.extend(row(n, first, decay, step_c, inv_bias2, d));
        first += adamw_blocks(n as i64);
    }
    let table_b = s.bytes(&table);
    let mut updated = Vec::new();
    for (i, [p, g, m, v]) in state.iter().enumerate() {
        let bufs = [s.in_out(p), s.input(g), s.in_out(m), s.in_out(v)];
        for (k, b) in bufs.iter().enumerate() {
            s.address(&table_b, 64 * i + 8 * k, b);
        }
        updated.push(bufs);
    }
    let launch = Launch { grid: (first as u32, 1, 1), block: (256, 1, 1), shared_mem_bytes: 0 };
    let f = |v: f32| format!("{v:?}");
    let args = [
        table_b.clone(),
        sizes.len().to_string(),
        f(h.coef as f32),
        "1".into(),
        f((1.0 - h.beta1) as f32),
        f(h.beta2 as f32),
        f((1.0 - h.beta2) as f32),
        f(h.eps as f32),
    ];
    s.launch("adamw_multi", &launch, false, &args);
    let got = s.run();

    // The CPU composite on the same state.
    let mut cpu: Vec<(Var, Tensor, Tensor, Tensor)> =
        state.iter().map(|[p, g, m, v]| (Var::from_tensor(p).unwrap(), g.clone(), m.clone(), v.clone())).collect();
    let mut slots: Vec<SlotUpdate> = cpu
        .iter_mut()
        .zip(&decays)
        .map(|((p, g, m, v), &d)| SlotUpdate { param: p, grad: g.clone(), exp_avg: m, exp_avg_sq: v, decays: d, step })
        .collect();
    composite_update(&mut slots, &h).unwrap();
    drop(slots);
    for (i, (p, _, m, v)) in cpu.iter().enumerate() {
        for (k, (name, want)) in
            [("parameter", p.as_tensor()), ("first moment", m), ("second moment", v)].into_iter().enumerate()
        {
            let (rel, n) = compare(&got[3 * i + k], want);
            assert_eq!(n, 0, "tensor {i} {name}: {n} elements differ, worst {rel:e}");
        }
        assert_ne!(compare(&got[3 * i], &state[i][0]).1, 0, "tensor {i} did not move");
    }
}

/// The per-block f64 sums of squares (a shared-memory tree per block), also under the thread
/// sanitizer, add up to the gradients' sum of squares.
#[test]
fn emulated_sum_of_squares_adds_up() {
    let gs = [random(&[5000], DType::F32, 1), random(&[100], DType::F32, 2)];
    let want = sum_of_squares(&[&gs[0], &gs[1]], true).unwrap();
    for sanitizer in [Sanitizer::Address, Sanitizer::Thread] {
        let mut s = Script::with("adamw", sanitizer);
        let mut table = row(5000, 0, 1.0, 0.0, 1.0, false);
        table.extend(row(100, adamw_blocks(5000), 1.0, 0.0, 1.0, false));
        let table_b = s.bytes(&table);
        for (i, g) in gs.iter().enumerate() {
            let b = s.input(g);
            s.address(&table_b, 64 * i + 8, &b);
        }
        let blocks = (adamw_blocks(5000) + adamw_blocks(100)) as usize;
        let partial = s.output(DType::F64, &[blocks]);
        let launch = Launch { grid: (blocks as u32, 1, 1), block: (256, 1, 1), shared_mem_bytes: 0 };
        s.launch("sumsq_multi", &launch, true, &[table_b, "2".into(), partial]);
        let got: f64 = s.run()[0].to_vec1::<f64>().unwrap().iter().sum();
        assert!((got - want).abs() <= 1e-12 * want, "{sanitizer:?}: {got} vs {want}");
    }
}
