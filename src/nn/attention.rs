//! Attention that keeps only its output: `dropout(softmax(q kᵀ + bias)) v` over chunks of
//! query rows, as one autograd node. Its backward recomputes each chunk's probabilities
//! (flash attention's trade, with candle's matmuls and our softmax and dropout ops), so no
//! score-sized tensor outlives its chunk, forward or backward, and K and V are read in place by
//! every chunk instead of being copied into each chunk's checkpoint. The mask decoder's
//! attention over its 4096 image tokens is the user: heads x 4096 x 4096 scores per sample.

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor};

use super::checkpoint::with_backward3;
use super::ops::{self, step_seed, EvalMode, TrainingMode};
use super::softmax::{scaled_masked_softmax, scaled_softmax_backward};

/// Query rows per chunk so that one chunk's scores hold at most `max_score_elems` elements.
pub fn chunk_rows(batch_heads: usize, queries: usize, keys: usize, max_score_elems: usize) -> usize {
    (max_score_elems / (batch_heads * keys).max(1)).clamp(1, queries.max(1))
}

/// `q` (B, H, N, D), already scaled; `k`, `v` (B, H, T, D); `bias` an additive mask that
/// broadcasts to (B, H, N, T) (the decoder's is (B, 1, 1, T)), never differentiated. Dropout
/// with probability `dropout` on the probabilities, at sites `{site}.{chunk}`: the same masks
/// as a chunk loop of composite ops, so the output equals that loop's exactly.
pub fn chunked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    dropout: f32,
    site: &str,
    max_score_elems: usize,
) -> Result<Tensor> {
    let (b, h, n, d) = q.dims4()?;
    let (bk, hk, t, dk) = k.dims4()?;
    ensure!(
        (bk, hk, dk) == (b, h, d) && v.dims() == k.dims(),
        "attention: q {:?}, k {:?}, v {:?} do not fit",
        q.dims(),
        k.dims(),
        v.dims()
    );
    let rows = chunk_rows(b * h, n, t, max_score_elems);
    let bias = bias.cloned();
    let site = site.to_string();
    // The step seed the forward drew its dropout masks with (None: evaluation).
    let seed = step_seed();
    let chunk_site = move |i: usize| format!("{site}.{i}");
    let probs = {
        let (bias, chunk_site) = (bias.clone(), chunk_site.clone());
        move |qc: &Tensor, k: &Tensor, i: usize| -> Result<(Tensor, Tensor)> {
            let p = scaled_masked_softmax(&qc.matmul(&k.t()?)?, 1.0, bias.as_ref())?;
            let pd = ops::dropout(&p, dropout, &chunk_site(i))?;
            Ok((p, pd))
        }
    };
    let forward = {
        let probs = probs.clone();
        move |q: &Tensor, k: &Tensor, v: &Tensor| -> Result<Tensor> {
            let mut outs = Vec::with_capacity(n.div_ceil(rows));
            for (i, s) in (0..n).step_by(rows).enumerate() {
                let qc = query_chunk(q, s, rows.min(n - s))?;
                outs.push(probs(&qc, k, i)?.1.matmul(v)?);
            }
            Ok(if outs.len() == 1 { outs.pop().unwrap() } else { Tensor::cat(&outs, 2)? })
        }
    };
    let backward = move |q: &Tensor, k: &Tensor, v: &Tensor, dy: &Tensor, tracked: [bool; 3]| {
        // The forward's dropout masks: the same seed and training mode.
        let _train = seed.map(TrainingMode::enter);
        let _eval = seed.is_none().then(EvalMode::enter);
        // K and V gradients sum over the chunks: in f32, then back to the inputs' dtype.
        let (mut dk, mut dv) = (None::<Tensor>, None::<Tensor>);
        let mut dq = Vec::with_capacity(n.div_ceil(rows));
        let accumulate = |acc: &mut Option<Tensor>, g: Tensor| -> Result<()> {
            let g = g.to_dtype(DType::F32)?;
            *acc = Some(match acc.take() {
                Some(a) => (a + g)?,
                None => g,
            });
            Ok(())
        };
        for (i, s) in (0..n).step_by(rows).enumerate() {
            let len = rows.min(n - s);
            let qc = query_chunk(q, s, len)?;
            let dyc = query_chunk(dy, s, len)?;
            let (p, pd) = probs(&qc, k, i)?;
            if tracked[2] {
                accumulate(&mut dv, pd.t()?.matmul(&dyc)?)?;
            }
            drop(pd);
            // Through the dropout (the same mask scales the gradient), then the softmax.
            let dpd = dyc.matmul(&v.t()?)?;
            let dp = ops::dropout(&dpd, dropout, &chunk_site(i))?;
            let ds = scaled_softmax_backward(&p, &dp.contiguous()?, 1.0, false)?;
            if tracked[0] {
                dq.push(ds.matmul(k)?);
            }
            if tracked[1] {
                accumulate(&mut dk, ds.t()?.matmul(&qc)?)?;
            }
        }
        let dq = match (tracked[0], dq.len()) {
            (false, _) => None,
            (true, 1) => dq.pop(),
            (true, _) => Some(Tensor::cat(&dq, 2)?),
        };
        let back = |g: Option<Tensor>| g.map(|g| g.to_dtype(k.dtype())).transpose();
        Ok([dq, back(dk)?, back(dv)?])
    };
    with_backward3(q, k, v, forward, backward)
}

/// Rows `[s, s + len)` of (B, H, N, D), contiguous for the matmuls.
fn query_chunk(x: &Tensor, s: usize, len: usize) -> Result<Tensor> {
    Ok(if len == x.dim(2)? { x.contiguous()? } else { x.narrow(2, s, len)?.contiguous()? })
}
