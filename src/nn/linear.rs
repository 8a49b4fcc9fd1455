//! Linear layers that never produce dead gradients, with optional LoRA (PEFT semantics).
//!
//! candle's matmul backward computes the gradient of BOTH inputs as soon as one is tracked, so a
//! frozen weight would cost one extra GEMM and a weight-sized gradient per projection. The custom
//! op below returns only the input gradient (see also `consts` for frozen elementwise operands).

use anyhow::Result;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Storage, Tensor, D};

use super::checkpoint::with_backward3;
use super::consts::add_any;
pub use super::consts::masked_add;
use super::ops;
use super::param::{Init, LinearWeight, Param, ParamBuilder};
use super::quant::QuantWeight;

/// A frozen weight as a matmul reads it: a dense tensor, or a quantised one that each matmul
/// dequantises to its compute dtype and drops when done (forward and backward alike), so the
/// graph holds the blocks, never a dense copy.
#[derive(Clone, Debug)]
pub enum FrozenWeight {
    Dense(Tensor),
    Quant(QuantWeight),
}

impl FrozenWeight {
    fn dims2(&self) -> candle_core::Result<(usize, usize)> {
        match self {
            Self::Dense(w) => w.dims2(),
            Self::Quant(q) => q.dims2().map_err(|e| candle_core::Error::Msg(format!("{e:#}"))),
        }
    }

    /// The weight as a dense tensor in `dtype` (a transient copy for a quantised weight).
    pub fn dense(&self, dtype: DType) -> candle_core::Result<Tensor> {
        match self {
            Self::Dense(w) => w.to_dtype(dtype),
            Self::Quant(q) => q.dequantize(dtype),
        }
    }
}

/// The weight in the input's dtype, (m, n, k), the input's and the weight's layouts, the output shape.
type MatmulPlan = (Tensor, (usize, usize, usize), Layout, Layout, Shape);

/// `x @ w^T` for a frozen `w` of shape (out, in); backward gives dX only.
struct FrozenMatmul {
    w: FrozenWeight,
}

impl FrozenMatmul {
    /// The weight in `dtype` and the matmul's dimensions and layouts for an input `layout`.
    fn prepare(&self, dtype: DType, layout: &Layout) -> candle_core::Result<MatmulPlan> {
        let (n, k) = self.w.dims2()?;
        let dims = layout.dims();
        let kx = *dims.last().unwrap_or(&0);
        if kx != k {
            candle_core::bail!("frozen linear: input last dim {kx} != weight in-features {k}");
        }
        if !layout.is_contiguous() {
            candle_core::bail!("frozen linear: input must be contiguous");
        }
        let m = layout.shape().elem_count() / k;
        let lhs = Layout::contiguous_with_offset((m, k), layout.start_offset());
        let w = self.w.dense(dtype)?;
        let rhs = w.layout().transpose(0, 1)?;
        let mut out = dims.to_vec();
        *out.last_mut().unwrap() = n;
        Ok((w, (m, n, k), lhs, rhs, Shape::from(out)))
    }
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (w, (m, n, k), lhs, rhs, shape) = self.prepare(s.dtype(), l)?;
        let (ws, _) = w.storage_and_layout();
        let Storage::Cpu(ws) = &*ws else { candle_core::bail!("frozen linear: weight not on the cpu") };
        Ok((s.matmul(ws, (1, m, n, k), &lhs, &rhs)?, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (w, (m, n, k), lhs, rhs, shape) = self.prepare(s.dtype(), l)?;
        let (ws, _) = w.storage_and_layout();
        let Storage::Cuda(ws) = &*ws else { candle_core::bail!("frozen linear: weight not on the gpu") };
        Ok((s.matmul(ws, (1, m, n, k), &lhs, &rhs)?, shape))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (n, k) = self.w.dims2()?;
        let m = grad.elem_count() / n;
        // Detached: dX needs no graph of its own, and an op node would keep a dequantised
        // weight alive until the gradients are detached after backward.
        let g = grad.detach().reshape((m, n))?.matmul(&self.w.dense(grad.dtype())?)?; // (m, k)
        debug_assert_eq!(g.dim(1)?, k);
        Ok(Some(g.reshape(arg.shape())?))
    }
}

/// `x @ w^T` where `w` is frozen (not tracked). Plain matmul when `x` is not tracked either.
pub fn frozen_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    frozen_matmul_any(x, &FrozenWeight::Dense(w.clone()))
}

/// [`frozen_matmul`] for a dense or quantised weight.
pub fn frozen_matmul_any(x: &Tensor, w: &FrozenWeight) -> Result<Tensor> {
    let x = x.contiguous()?;
    if x.track_op() {
        Ok(x.apply_op1(FrozenMatmul { w: w.clone() })?)
    } else {
        Ok(x.broadcast_matmul(&w.dense(x.dtype())?.t()?)?)
    }
}

/// `x @ w^T` for a trained `w` and an untracked input `x` (the first layer's input, a frozen
/// layer's output): the op is over `w` only, so no gradient is computed or stored for `x`.
struct ConstInputMatmul {
    x: Tensor,
}

impl ConstInputMatmul {
    fn dims(&self, wl: &Layout) -> candle_core::Result<(usize, usize, usize, Layout, Layout, Shape)> {
        let (n, k) = wl.shape().dims2()?;
        let dims = self.x.dims();
        if *dims.last().unwrap_or(&0) != k {
            candle_core::bail!("linear: input last dim {:?} != weight in-features {k}", dims.last());
        }
        let m = self.x.elem_count() / k;
        let (_, xl) = self.x.storage_and_layout();
        let lhs = Layout::contiguous_with_offset((m, k), xl.start_offset());
        let rhs = wl.transpose(0, 1)?;
        let mut out = dims.to_vec();
        *out.last_mut().unwrap() = n;
        Ok((m, n, k, lhs, rhs, Shape::from(out)))
    }
}

impl CustomOp1 for ConstInputMatmul {
    fn name(&self) -> &'static str {
        "const-input-matmul"
    }

    fn cpu_fwd(&self, ws: &CpuStorage, wl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, n, k, lhs, rhs, shape) = self.dims(wl)?;
        let (xs, _) = self.x.storage_and_layout();
        let Storage::Cpu(xs) = &*xs else { candle_core::bail!("linear: input not on the cpu") };
        Ok((xs.matmul(ws, (1, m, n, k), &lhs, &rhs)?, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (m, n, k, lhs, rhs, shape) = self.dims(wl)?;
        let (xs, _) = self.x.storage_and_layout();
        let Storage::Cuda(xs) = &*xs else { candle_core::bail!("linear: input not on the gpu") };
        Ok((xs.matmul(ws, (1, m, n, k), &lhs, &rhs)?, shape))
    }

    fn bwd(&self, w: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (n, k) = w.dims2()?;
        let m = grad.elem_count() / n;
        let dw = grad.reshape((m, n))?.t()?.matmul(&self.x.reshape((m, k))?)?;
        Ok(Some(dw))
    }
}

/// `x @ w^T` with a trained `w`: plain autograd when `x` is tracked, else an op that
/// differentiates `w` only.
pub fn trained_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if x.track_op() {
        Ok(x.broadcast_matmul(&w.t()?)?)
    } else {
        Ok(w.apply_op1(ConstInputMatmul { x: x.contiguous()? })?)
    }
}

/// LoRA adapter of one projection: y += dropout(x) A^T B^T * alpha / r (PEFT).
#[derive(Clone, Debug)]
pub struct Lora {
    pub a: Param,
    pub b: Param,
    pub scale: f64,
    pub dropout: f32,
    /// Dropout call-site name (the projection's key), so recomputation draws the same mask.
    site: String,
}

impl Lora {
    /// Both matrices train.
    fn trains(&self) -> bool {
        self.a.is_trained() && self.b.is_trained()
    }
}

/// An f32 written as its shortest decimal (0.05, not 0.05000000074505806 as the f64 widening
/// gives), for configuration files people read.
pub fn serialize_f32_short<S: serde::Serializer>(v: &f32, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(v.to_string().parse::<f64>().unwrap_or(*v as f64))
}

/// LoRA hyper-parameters (PEFT's `adapter_config.json` fields we use).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    #[serde(serialize_with = "serialize_f32_short")]
    pub dropout: f32,
    pub target_modules: Vec<String>,
}

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        self.alpha / self.r as f64
    }
    pub fn targets(&self, module: &str) -> bool {
        self.target_modules.iter().any(|m| m == module)
    }

    /// Errors when an entry of `target_modules` names none of the model's projections `valid`
    /// (a typo such as `qproj` would otherwise train without LoRA there), or when `r` is 0
    /// (the scale alpha / r would be infinite).
    pub fn check(&self, valid: &[&str]) -> Result<()> {
        anyhow::ensure!(self.r >= 1, "model.lora.r must be at least 1 (got 0)");
        let unknown: Vec<String> = self
            .target_modules
            .iter()
            .filter(|m| !valid.contains(&m.as_str()))
            .map(|m| match closest(m, valid) {
                Some(v) => format!("`{m}` (did you mean `{v}`?)"),
                None => format!("`{m}`"),
            })
            .collect();
        anyhow::ensure!(
            unknown.is_empty(),
            "model.lora.target_modules: {} name(s) no module of the model; valid names: {}",
            unknown.join(", "),
            valid.join(", ")
        );
        Ok(())
    }
}

/// The entry of `valid` within edit distance 2 of `name`, if exactly one is closest.
fn closest<'a>(name: &str, valid: &[&'a str]) -> Option<&'a str> {
    let dist = |a: &str, b: &str| -> usize {
        let b: Vec<char> = b.chars().collect();
        let mut row: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut prev = row[0];
            row[0] = i + 1;
            for j in 0..b.len() {
                let cur = row[j + 1];
                row[j + 1] = (prev + usize::from(ca != b[j])).min(row[j] + 1).min(cur + 1);
                prev = cur;
            }
        }
        row[b.len()]
    };
    let lower = name.to_lowercase();
    let mut scored: Vec<(usize, &str)> = valid.iter().map(|v| (dist(&lower, v), *v)).collect();
    scored.sort();
    match scored.as_slice() {
        [(d, v), rest @ ..] if *d <= 2 && rest.first().is_none_or(|(d2, _)| d2 > d) => Some(v),
        _ => None,
    }
}

#[derive(Clone, Debug)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Param>,
    lora: Option<Lora>,
    in_dim: usize,
    out_dim: usize,
}

impl Linear {
    /// Reads `weight` (out, in) and optionally `bias` under `pb`'s prefix; a frozen weight is
    /// stored quantised when `pb` says so (`ParamBuilder::with_quant`).
    pub fn new(pb: &ParamBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let init = Init::torch_default(in_dim);
        let weight = pb.get_linear(out_dim, in_dim, "weight", init)?;
        let bias = if bias { Some(pb.get(out_dim, "bias", init)?) } else { None };
        Ok(Self { weight, bias, lora: None, in_dim, out_dim })
    }

    /// Builds from explicit parameters (e.g. a slice of a fused in_proj).
    pub fn from_params(weight: Param, bias: Option<Param>) -> Result<Self> {
        let (out_dim, in_dim) = weight.tensor().dims2()?;
        Ok(Self { weight: LinearWeight::Param(weight), bias, lora: None, in_dim, out_dim })
    }

    /// Attaches LoRA A (r, in) and B (out, r). `lora_pb` is rooted at the PEFT key of this
    /// projection (`base_model.model.<key>`); values come from an adapter (every tensor must be there) or,
    /// for a fresh builder, PEFT's initialisation (A kaiming-uniform a=sqrt 5, B zeros).
    pub fn with_lora(mut self, lora_pb: &ParamBuilder, cfg: &LoraConfig) -> Result<Self> {
        let a = lora_pb.pp("lora_A").get((cfg.r, self.in_dim), "weight", Init::torch_default(self.in_dim))?;
        let b = lora_pb.pp("lora_B").get((self.out_dim, cfg.r), "weight", Init::Zeros)?;
        self.lora = Some(Lora { a, b, scale: cfg.scale(), dropout: cfg.dropout, site: lora_pb.key("lora") });
        Ok(self)
    }

    /// The weight as read (None when it is stored quantised).
    pub fn weight(&self) -> Option<&Param> {
        match &self.weight {
            LinearWeight::Param(p) => Some(p),
            LinearWeight::Quant(_) => None,
        }
    }
    /// The quantised weight, when it is stored so.
    pub fn quantized(&self) -> Option<&QuantWeight> {
        match &self.weight {
            LinearWeight::Quant(q) => Some(q),
            LinearWeight::Param(_) => None,
        }
    }
    pub fn bias(&self) -> Option<&Param> {
        self.bias.as_ref()
    }
    pub fn lora(&self) -> Option<&Lora> {
        self.lora.as_ref()
    }
    /// (in, out) features.
    pub fn dims(&self) -> (usize, usize) {
        (self.in_dim, self.out_dim)
    }

    /// Folds a frozen adapter into a dense frozen weight for inference: W + scale * B A, computed
    /// in f32 and stored in W's dtype (the arithmetic of `prs export --merge-lora` and PEFT's
    /// `merge_and_unload`), so each decoding step runs one matmul here instead of three plus a
    /// scale and an add. Returns false, changing nothing, when there is no adapter, the adapter
    /// is trained, or the weight is quantised (its blocks cannot take the update).
    pub fn merge_lora(&mut self) -> Result<bool> {
        let (Some(l), LinearWeight::Param(Param::Frozen(w))) = (&self.lora, &self.weight) else {
            return Ok(false);
        };
        if l.a.is_trained() || l.b.is_trained() {
            return Ok(false);
        }
        let merged = lora_merged(w, l.a.tensor(), l.b.tensor(), l.scale)?.to_dtype(w.dtype())?;
        self.weight = LinearWeight::Param(Param::Frozen(merged));
        self.lora = None;
        Ok(true)
    }

    /// `x W^T (+ bias) + scale * dropout(x) A^T B^T`. A frozen projection whose adapter
    /// trains runs as one node ([`lora_linear`]); anything else as separate ops.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dt = x.dtype();
        if let (Some(l), None) = (self.lora.as_ref().filter(|l| l.trains()), &self.bias) {
            let w = match &self.weight {
                LinearWeight::Param(Param::Frozen(w)) => Some(FrozenWeight::Dense(w.to_dtype(dt)?)),
                LinearWeight::Quant(q) => Some(FrozenWeight::Quant(q.clone())),
                LinearWeight::Param(Param::Trained(_)) => None,
            };
            if let Some(w) = w {
                let (a, b) = (l.a.tensor().to_dtype(dt)?, l.b.tensor().to_dtype(dt)?);
                return lora_linear(x, w, &a, &b, l.scale, l.dropout, &l.site);
            }
        }
        let mut y = match &self.weight {
            LinearWeight::Param(p) => linear_no_bias(x, p, dt)?,
            LinearWeight::Quant(q) => frozen_matmul_any(x, &FrozenWeight::Quant(q.clone()))?,
        };
        if let Some(b) = &self.bias {
            y = add_any(&y, &b.cast(dt)?)?;
        }
        if let Some(l) = &self.lora {
            let xi = ops::dropout(x, l.dropout, &l.site)?;
            let h = linear_no_bias(&xi, &l.a, dt)?;
            let h = linear_no_bias(&h, &l.b, dt)?;
            y = add_any(&y, &(h * l.scale)?)?;
        }
        Ok(y)
    }
}

/// `x W^T + scale * dropout(x) A^T B^T` for a frozen `w` (out, in) and a trained adapter `a`
/// (r, in), `b` (out, r) in the input's dtype, as one autograd node that keeps only x, A and B.
/// Separate ops keep the frozen product, B's output and its scaled copy (three more
/// output-sized tensors per projection: about a sixth of a 7B layer's activations with q, k, v
/// and o adapted), A's output and, with dropout, the dropped input. The
/// backward recomputes dropout(x) A^T (r wide) and the dropout mask (a function of the step
/// seed and the site), and gives no gradient to W.
pub fn lora_linear(
    x: &Tensor,
    w: FrozenWeight,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    p: f32,
    site: &str,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    // The step seed the forward drew its dropout mask with (None: evaluation).
    let seed = ops::step_seed();
    let site = site.to_string();
    let forward = {
        let (w, site) = (w.clone(), site.clone());
        move |x: &Tensor, a: &Tensor, b: &Tensor| -> Result<Tensor> {
            let y = x.apply_op1(FrozenMatmul { w: w.clone() })?;
            let h = ops::dropout(x, p, &site)?.broadcast_matmul(&a.t()?)?.broadcast_matmul(&b.t()?)?;
            Ok((y + (h * scale)?)?)
        }
    };
    let backward = move |x: &Tensor, a: &Tensor, b: &Tensor, dy: &Tensor, tracked: [bool; 3]| {
        let _mode = ops::TrainingMode::restore(seed);
        let (n, k) = w.dims2()?;
        let m = x.elem_count() / k;
        // Rows of every sample at once: one product each, no broadcast batch to sum over.
        let xi = ops::dropout(&x.reshape((m, k))?, p, &site)?;
        let dy = dy.reshape((m, n))?;
        let h = xi.matmul(&a.t()?)?; // (m, r)
        let dh = (dy.matmul(b)? * scale)?; // (m, r)
        let db = if tracked[2] { Some((dy.t()?.matmul(&h)? * scale)?) } else { None };
        let da = if tracked[1] { Some(dh.t()?.matmul(&xi)?) } else { None };
        let dx = if tracked[0] {
            let through_adapter = ops::dropout(&dh.matmul(a)?, p, &site)?;
            Some((dy.matmul(&w.dense(dy.dtype())?)? + through_adapter)?.reshape(x.shape())?)
        } else {
            None
        };
        Ok([dx, da, db])
    };
    with_backward3(&x, a, b, forward, backward)
}

/// W + scale * B A in f32 (W (out, in), A (r, in), B (out, r)): what merging an adapter stores,
/// rounded by the caller to the weight's dtype. One formula for `Linear::merge_lora` and
/// `prs export --merge-lora`, so the two agree bit for bit.
pub fn lora_merged(w: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    let f32 = |t: &Tensor| t.to_dtype(DType::F32);
    Ok((f32(w)? + (f32(b)?.matmul(&f32(a)?)? * scale)?)?)
}

fn linear_no_bias(x: &Tensor, w: &Param, dt: candle_core::DType) -> Result<Tensor> {
    Ok(match w {
        Param::Frozen(w) => frozen_matmul(x, &w.to_dtype(dt)?)?,
        Param::Trained(w) => trained_matmul(x, &w.as_tensor().to_dtype(dt)?)?,
    })
}

/// Helper for `x.dims()` where the last dim is features.
pub fn last_dim(x: &Tensor) -> Result<usize> {
    Ok(x.dim(D::Minus1)?)
}
