//! Parameters: frozen tensors (plain, compute dtype, no gradient ever) and trained tensors
//! (f32 master copies held as `Var`s and registered by component and checkpoint key, so the
//! optimizer and the checkpoint writer find them by name).

use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::VarBuilder;
use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

use super::quant::{BaseQuant, QuantWeight};

/// A weight as a module sees it.
#[derive(Clone, Debug)]
pub enum Param {
    /// Not trained: stored in the compute dtype, never tracked by autograd.
    Frozen(Tensor),
    /// Trained: an f32 master copy; forward casts it to the compute dtype.
    Trained(Var),
}

impl Param {
    /// The stored tensor (f32 master for trained parameters).
    pub fn tensor(&self) -> &Tensor {
        match self {
            Param::Frozen(t) => t,
            Param::Trained(v) => v.as_tensor(),
        }
    }

    /// The tensor in `dtype` (a no-op when it already has it).
    pub fn cast(&self, dtype: DType) -> Result<Tensor> {
        Ok(self.tensor().to_dtype(dtype)?)
    }

    pub fn is_trained(&self) -> bool {
        matches!(self, Param::Trained(_))
    }
}

/// A linear layer's weight: a parameter, or a frozen weight stored quantised.
#[derive(Clone, Debug)]
pub enum LinearWeight {
    Param(Param),
    Quant(QuantWeight),
}

/// What a registered trained tensor is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    /// Optimised by AdamW.
    Weight,
    /// State that is saved and restored but not optimised (BatchNorm running statistics).
    Buffer,
}

#[derive(Clone, Debug)]
pub struct TrainedParam {
    /// Component the tensor belongs to; one checkpoint file per component
    /// (`lora`, `image_encoder`, `mask_decoder`, `classifier`, `mm_projector`).
    pub group: String,
    /// Key inside that component's checkpoint file.
    pub key: String,
    pub kind: ParamKind,
    pub var: Var,
}

/// Registry of every trained tensor of a model, in construction order.
#[derive(Clone, Default, Debug)]
pub struct TrainedParams(Arc<Mutex<Vec<TrainedParam>>>);

impl TrainedParams {
    pub fn new() -> Self {
        Self::default()
    }

    fn push(&self, p: TrainedParam) -> Result<()> {
        let mut v = self.0.lock().unwrap();
        if v.iter().any(|q| q.group == p.group && q.key == p.key) {
            bail!("trained tensor `{}` registered twice in `{}`", p.key, p.group);
        }
        v.push(p);
        Ok(())
    }

    pub fn all(&self) -> Vec<TrainedParam> {
        self.0.lock().unwrap().clone()
    }

    /// Optimised tensors only (no buffers).
    pub fn weights(&self) -> Vec<TrainedParam> {
        self.all().into_iter().filter(|p| p.kind == ParamKind::Weight).collect()
    }

    pub fn group(&self, group: &str) -> Vec<TrainedParam> {
        self.all().into_iter().filter(|p| p.group == group).collect()
    }

    /// A registry of the same tensors (shared `Var`s) of the listed groups only.
    pub fn only(&self, groups: &[&str]) -> TrainedParams {
        let kept = self.all().into_iter().filter(|p| groups.contains(&p.group.as_str())).collect();
        TrainedParams(Arc::new(Mutex::new(kept)))
    }

    pub fn get(&self, group: &str, key: &str) -> Option<Var> {
        self.0.lock().unwrap().iter().find(|p| p.group == group && p.key == key).map(|p| p.var.clone())
    }

    /// Number of optimised scalars.
    pub fn num_weight_elements(&self) -> usize {
        self.weights().iter().map(|p| p.var.elem_count()).sum()
    }
}

/// How a tensor that is absent from the source is initialised (only for fresh sources).
#[derive(Clone, Copy, Debug)]
pub enum Init {
    Zeros,
    Ones,
    Const(f64),
    /// U(-bound, bound).
    Uniform(f64),
    Normal(f64),
}

impl Init {
    /// PyTorch's default for Linear/Conv weights: kaiming_uniform(a = sqrt 5) = U(+-1/sqrt(fan_in)).
    pub fn torch_default(fan_in: usize) -> Init {
        Init::Uniform(1.0 / (fan_in as f64).sqrt())
    }
}

#[derive(Clone)]
enum Source<'a> {
    /// Values come from a checkpoint; a missing tensor is an error.
    Checkpoint { vb: VarBuilder<'a>, what: Arc<String> },
    /// Values are created from `Init` with a seeded host RNG (candle's CPU RNG cannot be seeded).
    Fresh { seed: u64 },
    /// Values are drawn from `Init` by the device's own RNG: fast (a 7B model in seconds on a
    /// GPU, where the host RNG takes minutes) but not reproducible. For frozen weights whose
    /// values do not matter: benchmarks and memory trials.
    DeviceRandom,
}

/// Builds the parameters of one component. Prefixes mirror checkpoint keys (`pp`), the
/// `train` flag decides whether a subtree becomes `Var`s (f32) or frozen tensors (compute dtype).
#[derive(Clone)]
pub struct ParamBuilder<'a> {
    source: Source<'a>,
    path: Vec<String>,
    group: Arc<String>,
    train: bool,
    dtype: DType,
    device: Device,
    registry: TrainedParams,
    /// Storage of frozen linear weights read with `get_linear` (`with_quant`).
    quant: BaseQuant,
}

impl<'a> ParamBuilder<'a> {
    /// Parameters read from `vb` (whose own prefix is the component root in the checkpoint).
    /// `what` names the source in error messages (a file or folder).
    pub fn from_checkpoint(
        vb: VarBuilder<'a>,
        what: impl Into<String>,
        group: &str,
        train: bool,
        dtype: DType,
        registry: &TrainedParams,
    ) -> Self {
        let device = vb.device().clone();
        Self {
            source: Source::Checkpoint { vb, what: Arc::new(what.into()) },
            path: vec![],
            group: Arc::new(group.to_string()),
            train,
            dtype,
            device,
            registry: registry.clone(),
            quant: BaseQuant::None,
        }
    }

    /// Parameters created from their `Init` (a component trained from scratch).
    pub fn fresh(seed: u64, group: &str, train: bool, dtype: DType, device: &Device, registry: &TrainedParams) -> Self {
        Self {
            source: Source::Fresh { seed },
            path: vec![],
            group: Arc::new(group.to_string()),
            train,
            dtype,
            device: device.clone(),
            registry: registry.clone(),
            quant: BaseQuant::None,
        }
    }

    /// Parameters drawn by the device RNG (see `Source::DeviceRandom`).
    pub fn device_random(group: &str, train: bool, dtype: DType, device: &Device, registry: &TrainedParams) -> Self {
        Self { source: Source::DeviceRandom, ..Self::fresh(0, group, train, dtype, device, registry) }
    }

    pub fn pp(&self, s: impl ToString) -> Self {
        let mut b = self.clone();
        b.path.push(s.to_string());
        if let Source::Checkpoint { vb, .. } = &mut b.source {
            *vb = vb.pp(s.to_string());
        }
        b
    }

    /// The same builder with a different trained/frozen decision for the subtree.
    pub fn train(&self, train: bool) -> Self {
        let mut b = self.clone();
        b.train = train;
        b
    }

    /// Registry group for the subtree (LoRA tensors live in their own group).
    pub fn with_group(&self, group: &str) -> Self {
        let mut b = self.clone();
        b.group = Arc::new(group.to_string());
        b
    }

    /// The same builder storing the frozen linear weights of the subtree (those read with
    /// [`ParamBuilder::get_linear`]) in `quant`.
    pub fn with_quant(&self, quant: BaseQuant) -> Self {
        let mut b = self.clone();
        b.quant = quant;
        b
    }

    pub fn quant(&self) -> BaseQuant {
        self.quant
    }

    pub fn is_training(&self) -> bool {
        self.train
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn device(&self) -> &Device {
        &self.device
    }
    pub fn registry(&self) -> &TrainedParams {
        &self.registry
    }

    /// Checkpoint key of `name` under the current prefix.
    pub fn key(&self, name: &str) -> String {
        let mut k = self.path.join(".");
        if !k.is_empty() {
            k.push('.');
        }
        k.push_str(name);
        k
    }

    pub fn contains(&self, name: &str) -> bool {
        match &self.source {
            Source::Checkpoint { vb, .. } => vb.contains_tensor(name),
            Source::Fresh { .. } | Source::DeviceRandom => false,
        }
    }

    /// A parameter that must be in the checkpoint (fresh sources use `init`).
    pub fn get(&self, shape: impl Into<Shape>, name: &str, init: Init) -> Result<Param> {
        let shape = shape.into();
        let dtype = if self.train { DType::F32 } else { self.dtype };
        let t = match &self.source {
            Source::Checkpoint { vb, what } => {
                if !vb.contains_tensor(name) {
                    bail!("missing tensor `{}` in {}", vb.pp(name).prefix(), what);
                }
                let t = vb
                    .get_unchecked_dtype(name, dtype)
                    .with_context(|| format!("reading tensor `{}` from {}", vb.pp(name).prefix(), what))?;
                if t.shape() != &shape {
                    bail!(
                        "tensor `{}` in {} has shape {:?}, expected {:?}",
                        vb.pp(name).prefix(),
                        what,
                        t.dims(),
                        shape.dims()
                    );
                }
                t
            }
            Source::Fresh { seed } => init_tensor(&shape, init, seed_for(*seed, &self.key(name)), dtype, &self.device)?,
            Source::DeviceRandom => device_init_tensor(&shape, init, dtype, &self.device)?,
        };
        self.wrap(name, t, ParamKind::Weight)
    }

    /// A linear layer's (out, in) weight: `get`, then quantised when the subtree is frozen and
    /// has a quantisation (`with_quant`); a weight whose in-features are not a multiple of the
    /// format's block stays dense (see `QuantWeight::quantize`).
    pub fn get_linear(&self, out_dim: usize, in_dim: usize, name: &str, init: Init) -> Result<LinearWeight> {
        let p = self.get((out_dim, in_dim), name, init)?;
        if self.train || self.quant == BaseQuant::None {
            return Ok(LinearWeight::Param(p));
        }
        let q = QuantWeight::quantize(p.tensor(), self.quant)
            .with_context(|| format!("quantising `{}` to {}", self.key(name), self.quant))?;
        Ok(match q {
            Some(q) => LinearWeight::Quant(q),
            None => LinearWeight::Param(p),
        })
    }

    /// A non-optimised state tensor (BatchNorm running statistics): a `Var` registered as a
    /// buffer when the subtree trains (so it can be updated and saved), frozen otherwise.
    pub fn buffer(&self, shape: impl Into<Shape>, name: &str, init: Init) -> Result<Param> {
        let p = self.train(false).get(shape, name, init)?;
        if self.train {
            let t = p.tensor().to_dtype(DType::F32)?;
            return self.wrap(name, t, ParamKind::Buffer);
        }
        Ok(p)
    }

    fn wrap(&self, name: &str, t: Tensor, kind: ParamKind) -> Result<Param> {
        if !self.train && kind == ParamKind::Weight {
            return Ok(Param::Frozen(t));
        }
        let var = Var::from_tensor(&t)?;
        self.registry.push(TrainedParam {
            group: self.group.to_string(),
            key: self.key(name),
            kind,
            var: var.clone(),
        })?;
        Ok(Param::Trained(var))
    }
}

/// A tensor drawn by the device's RNG (curand on CUDA); f32 first, as candle's RNG kernels
/// are f32, then cast.
fn device_init_tensor(shape: &Shape, init: Init, dtype: DType, device: &Device) -> Result<Tensor> {
    let t = match init {
        Init::Uniform(bound) => Tensor::rand(-bound as f32, bound as f32, shape, device)?,
        Init::Normal(std) => Tensor::randn(0f32, std as f32, shape, device)?,
        other => return init_tensor(shape, other, 0, dtype, device),
    };
    Ok(t.to_dtype(dtype)?)
}

/// Per-tensor seed: stable under construction order changes.
pub fn seed_for(seed: u64, key: &str) -> u64 {
    use crate::hash::{fnv1a, FNV_OFFSET, GOLDEN};
    fnv1a(FNV_OFFSET ^ seed.wrapping_mul(GOLDEN), key.as_bytes())
}

/// A tensor drawn on the host from a seeded RNG (reproducible on every device).
pub fn init_tensor(shape: &Shape, init: Init, seed: u64, dtype: DType, device: &Device) -> Result<Tensor> {
    let n = shape.elem_count();
    let t = match init {
        Init::Zeros => Tensor::zeros(shape, DType::F32, device)?,
        Init::Ones => Tensor::ones(shape, DType::F32, device)?,
        Init::Const(c) => (Tensor::ones(shape, DType::F32, device)? * c)?,
        Init::Uniform(bound) => {
            let mut rng = StdRng::seed_from_u64(seed);
            let v: Vec<f32> = (0..n).map(|_| rng.gen_range(-bound..bound) as f32).collect();
            Tensor::from_vec(v, shape, device)?
        }
        Init::Normal(std) => {
            let mut rng = StdRng::seed_from_u64(seed);
            let d = Normal::new(0.0, std).context("normal init")?;
            let v: Vec<f32> = (0..n).map(|_| d.sample(&mut rng) as f32).collect();
            Tensor::from_vec(v, shape, device)?
        }
    };
    Ok(t.to_dtype(dtype)?)
}
