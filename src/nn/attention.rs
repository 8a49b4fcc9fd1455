//! Attention that keeps only its output: `dropout(softmax(q kᵀ + bias)) v` over chunks of
//! query rows, as one autograd node. Its backward recomputes each chunk's probabilities
//! (flash attention's trade, with candle's matmuls and our softmax and dropout ops), so no
//! score-sized tensor outlives its chunk, forward or backward, and K and V are read in place by
//! every chunk instead of being copied into each chunk's checkpoint. The mask decoder's
//! attention over its 4096 image tokens is the user: heads x 4096 x 4096 scores per sample.

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor};

use super::checkpoint::with_backward3;
use super::ops::{self, step_seed, TrainingMode};
use super::softmax::{scaled_masked_softmax, scaled_softmax_backward};

/// The score elements one chunk may materialise (a 128 MiB f32 chunk), the bound every model
/// passes: the mask decoder's 4096 x 4096 self-attention, TinySAM's windows.
pub const SCORE_CHUNK_ELEMS: usize = 1 << 25;

/// Query rows per chunk so that one chunk's scores hold at most `max_score_elems` elements.
pub fn chunk_rows(batch_heads: usize, queries: usize, keys: usize, max_score_elems: usize) -> usize {
    (max_score_elems / (batch_heads * keys).max(1)).clamp(1, queries.max(1))
}

/// `q` (B, H, N, D), already scaled; `k`, `v` (B, H, T, D); `bias` an additive term that
/// broadcasts to the scores (B, H, N, T): a key mask (B, 1, 1, T), or TinySAM's relative
/// position bias (H, N, T), which trains (a tracked bias gets its gradient). Dropout with
/// probability `dropout` on the probabilities, at sites `{site}.{chunk}`: the same masks as a
/// chunk loop of composite ops, so the output equals that loop's exactly.
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
    // The bias at rank 4; its query dimension is 1 (the same for every row) or N (sliced per
    // chunk). Without one, an untracked placeholder keeps the op's three inputs.
    let bias4 = match bias {
        Some(x) => {
            ensure!(x.rank() <= 4, "attention: bias {:?} has more than 4 dimensions", x.dims());
            let mut dims = vec![1; 4 - x.rank()];
            dims.extend_from_slice(x.dims());
            ensure!(dims[2] == 1 || dims[2] == n, "attention: bias {:?} for {n} queries", x.dims());
            x.reshape(dims)?
        }
        None => Tensor::zeros((1, 1, 1, 1), q.dtype(), q.device())?,
    };
    let has_bias = bias.is_some();
    let per_row = bias4.dim(2)? == n && n > 1;
    let rows = chunk_rows(b * h, n, t, max_score_elems);
    let site = site.to_string();
    // The step seed the forward drew its dropout masks with (None: evaluation).
    let seed = step_seed();
    let chunk_site = move |i: usize| format!("{site}.{i}");
    let probs = {
        let chunk_site = chunk_site.clone();
        move |qc: &Tensor, k: &Tensor, bias: &Tensor, s: usize, i: usize| -> Result<(Tensor, Tensor)> {
            let len = qc.dim(2)?;
            let bc = if per_row { Some(bias.narrow(2, s, len)?) } else { has_bias.then(|| bias.clone()) };
            let p = scaled_masked_softmax(&qc.matmul(&k.t()?)?, 1.0, bc.as_ref())?;
            let pd = ops::dropout(&p, dropout, &chunk_site(i))?;
            Ok((p, pd))
        }
    };
    // K and V travel as one input (the op has three: q, [k | v], bias).
    let kv = Tensor::cat(&[k, v], 3)?;
    let split = move |kv: &Tensor| -> Result<(Tensor, Tensor)> {
        Ok((kv.narrow(3, 0, d)?.contiguous()?, kv.narrow(3, d, d)?.contiguous()?))
    };
    // The forward reads K and V as given (detached: the op records the graph), not split back
    // out of [k | v], which only the backward needs.
    let forward = {
        let probs = probs.clone();
        let (k, v) = (k.detach(), v.detach());
        move |q: &Tensor, _kv: &Tensor, bias: &Tensor| -> Result<Tensor> {
            let mut outs = Vec::with_capacity(n.div_ceil(rows));
            for (i, s) in (0..n).step_by(rows).enumerate() {
                let qc = query_chunk(q, s, rows.min(n - s))?;
                outs.push(probs(&qc, &k, bias, s, i)?.1.matmul(&v)?);
            }
            Ok(if outs.len() == 1 { outs.pop().unwrap() } else { Tensor::cat(&outs, 2)? })
        }
    };
    let backward = move |q: &Tensor, kv: &Tensor, bias: &Tensor, dy: &Tensor, tracked: [bool; 3]| {
        // The forward's dropout masks: the same seed and training mode.
        let _mode = TrainingMode::restore(seed);
        let (k, v) = split(kv)?;
        let bias_tracked = tracked[2] && has_bias;
        // Gradients summed over the chunks are summed in f32, then cast to the inputs' dtype.
        let (mut dk, mut dv, mut dbias_sum) = (None::<Tensor>, None::<Tensor>, None::<Tensor>);
        let (mut dq, mut dbias_rows) = (vec![], vec![]);
        let accumulate = |acc: &mut Option<Tensor>, g: Tensor| -> Result<()> {
            let g = g.to_dtype(DType::F32)?;
            *acc = Some(match acc.take() {
                Some(a) => (a + g)?,
                None => g,
            });
            Ok(())
        };
        // The bias broadcasts along its size-1 dimensions: its gradient sums over them.
        let bias_grad = |ds: &Tensor| -> Result<Tensor> {
            let along: Vec<usize> = (0..4).filter(|&i| bias.dims()[i] == 1 && ds.dims()[i] != 1).collect();
            let mut g = ds.to_dtype(DType::F32)?;
            for &i in along.iter().rev() {
                g = g.sum_keepdim(i)?;
            }
            Ok(g)
        };
        for (i, s) in (0..n).step_by(rows).enumerate() {
            let len = rows.min(n - s);
            let qc = query_chunk(q, s, len)?;
            let dyc = query_chunk(dy, s, len)?;
            let (p, pd) = probs(&qc, &k, bias, s, i)?;
            if tracked[1] {
                accumulate(&mut dv, pd.t()?.matmul(&dyc)?)?;
            }
            drop(pd);
            // Through the dropout (the same mask scales the gradient), then the softmax.
            let dpd = dyc.matmul(&v.t()?)?;
            let dp = ops::dropout(&dpd, dropout, &chunk_site(i))?;
            let ds = scaled_softmax_backward(&p, &dp.contiguous()?, 1.0, false)?;
            if tracked[0] {
                dq.push(ds.matmul(&k)?);
            }
            if tracked[1] {
                accumulate(&mut dk, ds.t()?.matmul(&qc)?)?;
            }
            if bias_tracked {
                let g = bias_grad(&ds)?;
                if per_row {
                    dbias_rows.push(g);
                } else {
                    accumulate(&mut dbias_sum, g)?;
                }
            }
        }
        let dq = match (tracked[0], dq.len()) {
            (false, _) => None,
            (true, 1) => dq.pop(),
            (true, _) => Some(Tensor::cat(&dq, 2)?),
        };
        let dkv = match (dk, dv) {
            (Some(dk), Some(dv)) => Some(Tensor::cat(&[dk, dv], 3)?.to_dtype(kv.dtype())?),
            _ => None,
        };
        let dbias = if !bias_tracked {
            None
        } else if per_row {
            Some(Tensor::cat(&dbias_rows, 2)?.to_dtype(bias.dtype())?)
        } else {
            dbias_sum.map(|g| g.to_dtype(bias.dtype())).transpose()?
        };
        Ok([dq, dkv, dbias])
    };
    with_backward3(q, &kv, &bias4, forward, backward)
}

/// Rows `[s, s + len)` of (B, H, N, D), contiguous for the matmuls.
fn query_chunk(x: &Tensor, s: usize, len: usize) -> Result<Tensor> {
    Ok(if len == x.dim(2)? { x.contiguous()? } else { x.narrow(2, s, len)?.contiguous()? })
}
