//! Gradient checkpointing: a block's activations are not kept for backward; backward re-runs the
//! block with the graph and backpropagates through that copy.
//!
//! candle has no such facility. The forward runs the block on a detached input and keeps only a
//! copy of its output (the block's graph is freed at once); the output is a custom op over the
//! input whose backward makes the input a fresh `Var`, re-runs the block, backpropagates the
//! incoming gradient and returns dX. The block's trained-parameter gradients of that inner
//! backward cannot enter the outer `GradStore` from inside an op, so they are collected in a side
//! store that the trainer merges after `backward()` (`Checkpointer::merge_into`).
//!
//! The recomputation must see what the forward saw: the training mode and step seed are captured
//! at forward time and restored (dropout masks are functions of (seed, site)), and
//! `is_recomputing()` lets stateful modules (BatchNorm running statistics) skip their update.
//! A block must not touch a KV cache.

use std::cell::Cell;
use std::sync::{Arc, Mutex};

use anyhow::Result;
use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::backprop::GradStore;
use candle_core::{CustomOp2, CustomOp3, Shape, Tensor, Var};

use super::ops::{step_seed, TrainingMode};
use super::param::TrainedParams;
use super::OnBackend;

thread_local! {
    static RECOMPUTING: Cell<bool> = const { Cell::new(false) };
}

/// True while a checkpointed block is being re-run for its backward on this thread.
pub fn is_recomputing() -> bool {
    RECOMPUTING.with(|r| r.get())
}

struct RecomputeGuard(bool);

impl RecomputeGuard {
    fn enter() -> Self {
        Self(RECOMPUTING.with(|r| r.replace(true)))
    }
}

impl Drop for RecomputeGuard {
    fn drop(&mut self) {
        RECOMPUTING.with(|r| r.set(self.0));
    }
}

type Block = Arc<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;

/// Runs blocks with checkpointing and holds their parameter gradients until merged.
#[derive(Clone)]
pub struct Checkpointer {
    trained: TrainedParams,
    side: Arc<Mutex<GradStore>>,
    enabled: bool,
}

impl Checkpointer {
    /// `trained` is the model's registry: only gradients of its optimised tensors are kept.
    pub fn new(trained: &TrainedParams) -> Self {
        Self { trained: trained.clone(), side: Arc::default(), enabled: true }
    }

    /// A checkpointer whose `run` just calls the block (checkpointing switched off by config).
    pub fn disabled(trained: &TrainedParams) -> Self {
        Self { enabled: false, ..Self::new(trained) }
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// `block(x)`, without keeping the block's activations for backward. `block` captures the
    /// block's parameters (and any constant inputs: rope tables, masks) and must be
    /// deterministic given the training mode and step seed.
    pub fn run<F>(&self, x: &Tensor, block: F) -> Result<Tensor>
    where
        F: Fn(&Tensor) -> Result<Tensor> + Send + Sync + 'static,
    {
        if !self.enabled {
            return block(x);
        }
        let x_tracked = x.track_op();
        let y = block(&x.detach())?;
        if !x_tracked && !y.track_op() {
            // Nothing to differentiate: no trained parameter and no tracked input.
            return Ok(y);
        }
        let out = y.detach();
        drop(y); // frees the block's graph now
                 // The op must be tracked even when x is not (the first layer's input): a one-element
                 // anchor Var that never receives a gradient makes it so.
        let anchor = Var::zeros(1, x.dtype(), x.device())?;
        let op = CheckpointOp {
            block: Arc::new(block),
            out: HeldOutput::new(out),
            seed: step_seed(),
            x_tracked,
            trained: self.trained.clone(),
            side: self.side.clone(),
        };
        Ok(x.apply_op2(anchor.as_tensor(), op)?)
    }

    /// Number of parameter gradients waiting to be merged.
    pub fn pending(&self) -> usize {
        self.side.lock().unwrap().get_ids().count()
    }

    /// Moves the collected parameter gradients into `grads`, summing on collision
    /// (`GradStore::extend`). Call after every `backward()` of a graph that used `run`.
    pub fn merge_into(&self, grads: &mut GradStore) -> Result<()> {
        let side = std::mem::take(&mut *self.side.lock().unwrap());
        grads.extend(side)?;
        Ok(())
    }

    /// Drops collected gradients (e.g. after a skipped step whose store is discarded).
    pub fn clear(&self) {
        *self.side.lock().unwrap() = GradStore::default();
    }
}

/// The gradients of everything `y` depends on, for `grad` as the gradient of `y`: what
/// `sum(y * grad).backward()` gives, without the product. The root is a one-element op over `y`
/// whose backward hands `grad` on unchanged.
pub fn backward_from(y: &Tensor, grad: &Tensor) -> Result<GradStore> {
    anyhow::ensure!(
        y.dims() == grad.dims() && y.dtype() == grad.dtype(),
        "backward from {:?} {:?} with a gradient {:?} {:?}",
        y.dims(),
        y.dtype(),
        grad.dims(),
        grad.dtype()
    );
    Ok(y.apply_op1(SeedGradient { grad: grad.detach() })?.backward()?)
}

/// A one-element zero on `s`'s device, in its dtype.
fn one_zero<S>(s: &S) -> candle_core::Result<(S, Shape)>
where
    S: BackendStorage,
    S::Device: BackendDevice<Storage = S>,
{
    Ok((s.device().zeros_impl(&Shape::from(1), s.dtype())?, Shape::from(1)))
}

struct SeedGradient {
    grad: Tensor,
}

impl candle_core::CustomOp1 for SeedGradient {
    fn name(&self) -> &'static str {
        "seed-gradient"
    }

    same_forward_on_every_backend!(|_op: &Self, s, _l| one_zero(s));

    fn bwd(&self, _y: &Tensor, _res: &Tensor, _grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.grad.clone()))
    }
}

/// Detaches every gradient in `grads`. candle leaves a variable's gradient attached to the
/// backward ops that produced it, so the store keeps the forward's activations alive (through
/// those ops' inputs) until it is dropped: through an optimizer step, across accumulated
/// micro-batches, and across every checkpointed block's recomputation.
pub fn detach_grads(grads: &mut GradStore) {
    let ids: Vec<_> = grads.get_ids().copied().collect();
    for id in ids {
        if let Some(g) = grads.get_id(id) {
            let g = g.detach();
            grads.insert_id(id, g);
        }
    }
}

struct CheckpointOp {
    block: Block,
    /// The block's output from the forward.
    out: HeldOutput,
    /// Training-mode step seed at forward time (None = eval mode).
    seed: Option<u64>,
    x_tracked: bool,
    trained: TrainedParams,
    side: Arc<Mutex<GradStore>>,
}

/// An op's output computed before the op was applied (by a block run on detached inputs); the
/// op's forward hands a copy over once (the checkpoint op and `with_backward2`).
struct HeldOutput(Mutex<Option<Tensor>>);

impl HeldOutput {
    fn new(y: Tensor) -> Self {
        Self(Mutex::new(Some(y)))
    }

    fn take(&self) -> candle_core::Result<Tensor> {
        self.0
            .lock()
            .unwrap()
            .take()
            .ok_or_else(|| candle_core::Error::Msg("output-only op: output already taken".into()))
    }

    /// The output, copied into storage of the op's own (the held tensor is dropped).
    fn hand_over<S>(&self) -> candle_core::Result<(S, Shape)>
    where
        S: OnBackend,
        S::Device: BackendDevice<Storage = S>,
    {
        let y = self.take()?;
        let (ys, yl) = y.storage_and_layout();
        let ys = S::of(&ys)?;
        // SAFETY: every element of `dst` is written by the strided copy below.
        let mut dst = unsafe { ys.device().alloc_uninit(yl.shape(), ys.dtype())? };
        ys.copy_strided_src(&mut dst, 0, yl)?;
        Ok((dst, yl.shape().clone()))
    }
}

impl CheckpointOp {
    /// Re-runs the block with the graph and backpropagates `grad`; returns dX.
    fn recompute(&self, x: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dev = x.device().clone();
        let part = crate::phases::BackwardPart::current();
        crate::phases::mark(&dev, part.backward_phase());
        let out = self.recompute_inner(x, grad);
        crate::phases::mark(&dev, part.recomputation_phase());
        out
    }

    fn recompute_inner(&self, x: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let _mode = TrainingMode::restore(self.seed);
        let _re = RecomputeGuard::enter();
        let xv = if self.x_tracked { Some(Var::from_tensor(&x.detach())?) } else { None };
        let input = xv.as_ref().map(|v| v.as_tensor().clone()).unwrap_or_else(|| x.detach());
        let y = (self.block)(&input)?;
        if !y.track_op() {
            return Ok(None);
        }
        let mut inner = backward_from(&y, grad)?;
        drop(y);
        // Detached, or each gradient would keep this recomputation's activations alive.
        detach_grads(&mut inner);
        let dx = xv.and_then(|v| inner.remove(v.as_tensor()));
        let mut side = self.side.lock().unwrap();
        for p in self.trained.weights() {
            let t = p.var.as_tensor();
            if let Some(g) = inner.remove(t) {
                let g = match side.remove(t) {
                    Some(prev) => (prev + g)?,
                    None => g,
                };
                side.insert(t, g);
            }
        }
        Ok(dx)
    }
}

impl CustomOp2 for CheckpointOp {
    fn name(&self) -> &'static str {
        "checkpoint"
    }

    same_forward_on_every_backend!(two: |op: &Self, _a, _b| op.out.hand_over());

    fn bwd(
        &self,
        x: &Tensor,
        _anchor: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dx =
            self.recompute(x, grad).map_err(|e| candle_core::Error::Msg(format!("checkpoint recompute: {e:#}")))?;
        Ok((dx, None))
    }
}

/// The gradients of a two-input op: `(a, b, dy, [a tracked, b tracked]) -> (da, db)`, `None`
/// for an untracked input.
pub type Backward2 =
    dyn Fn(&Tensor, &Tensor, &Tensor, [bool; 2]) -> Result<(Option<Tensor>, Option<Tensor>)> + Send + Sync;

/// `f(a, b)` as one autograd node that keeps only its output, with a hand-written backward
/// (`backward` gets detached inputs). For ops whose candle backward keeps large intermediates
/// or takes a slow path (`nn::conv::conv2d`'s input gradient).
pub fn with_backward2<F, B>(a: &Tensor, b: &Tensor, f: F, backward: B) -> Result<Tensor>
where
    F: Fn(&Tensor, &Tensor) -> Result<Tensor>,
    B: Fn(&Tensor, &Tensor, &Tensor, [bool; 2]) -> Result<(Option<Tensor>, Option<Tensor>)> + Send + Sync + 'static,
{
    let y = f(&a.detach(), &b.detach())?;
    if !a.track_op() && !b.track_op() {
        return Ok(y);
    }
    let op = OutputOnly2 { backward: Box::new(backward), out: HeldOutput::new(y.detach()) };
    drop(y);
    Ok(a.apply_op2(b, op)?)
}

struct OutputOnly2 {
    backward: Box<Backward2>,
    out: HeldOutput,
}

impl CustomOp2 for OutputOnly2 {
    fn name(&self) -> &'static str {
        "output-only"
    }

    same_forward_on_every_backend!(two: |op: &Self, _a, _b| op.out.hand_over());

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        (self.backward)(&a.detach(), &b.detach(), &grad.detach(), [a.track_op(), b.track_op()])
            .map_err(|e| candle_core::Error::Msg(format!("{} backward: {e:#}", self.name())))
    }
}

/// The gradients of a three-input op: `(a, b, c, dy, [tracked; 3]) -> (da, db, dc)`, `None` for
/// an untracked input.
pub type Backward3 = dyn Fn(&Tensor, &Tensor, &Tensor, &Tensor, [bool; 3]) -> Result<[Option<Tensor>; 3]> + Send + Sync;

/// [`with_backward2`] for three inputs (attention's q, k and v).
pub fn with_backward3<F, B>(a: &Tensor, b: &Tensor, c: &Tensor, f: F, backward: B) -> Result<Tensor>
where
    F: Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    B: Fn(&Tensor, &Tensor, &Tensor, &Tensor, [bool; 3]) -> Result<[Option<Tensor>; 3]> + Send + Sync + 'static,
{
    let y = f(&a.detach(), &b.detach(), &c.detach())?;
    if !a.track_op() && !b.track_op() && !c.track_op() {
        return Ok(y);
    }
    let op = OutputOnly3 { backward: Box::new(backward), out: HeldOutput::new(y.detach()) };
    drop(y);
    Ok(a.apply_op3(b, c, op)?)
}

struct OutputOnly3 {
    backward: Box<Backward3>,
    out: HeldOutput,
}

impl CustomOp3 for OutputOnly3 {
    fn name(&self) -> &'static str {
        "output-only3"
    }

    same_forward_on_every_backend!(three: |op: &Self, _a, _b, _c| op.out.hand_over());

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let tracked = [a.track_op(), b.track_op(), c.track_op()];
        let [da, db, dc] = (self.backward)(&a.detach(), &b.detach(), &c.detach(), &grad.detach(), tracked)
            .map_err(|e| candle_core::Error::Msg(format!("{} backward: {e:#}", self.name())))?;
        Ok((da, db, dc))
    }
}
