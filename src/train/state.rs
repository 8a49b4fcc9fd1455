//! What a run folder holds besides checkpoints: the trainer's position and counters
//! (`trainer_state.json` inside each checkpoint) and the `last` pointer.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::files;

pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const LAST_FILE: &str = "last";
pub const CONFIG_FILE: &str = "config.toml";
pub const BEST_LINK: &str = "best";

/// Where training stands, saved with every checkpoint. The data order and the dropout masks
/// are pure functions of (seed, epoch, batch), so this is all a resumed run needs besides the
/// weights and the optimizer moments.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimizer steps taken.
    pub step: u64,
    pub epoch: u64,
    /// Next micro-batch of `epoch` to run.
    pub batch_in_epoch: usize,
    pub best_dice: Option<f64>,
    pub best_step: Option<u64>,
    /// Evaluations since the best one (early stopping).
    pub evals_since_best: u64,
    pub skipped_steps: u64,
    /// Skipped steps in a row (non-finite, or a spike the divergence guard rejected).
    #[serde(alias = "consecutive_nonfinite")]
    pub consecutive_skipped: u32,
    pub samples_seen: u64,
    /// The batch plan the run follows; a resume with another one would change the data order
    /// mid-epoch, so it is refused (None in states written before this was recorded).
    #[serde(default)]
    pub plan: Option<PlanRecord>,
    /// Running levels of the divergence guard (`train::guard`).
    #[serde(default)]
    pub applied_steps: u64,
    #[serde(default)]
    pub loss_level: Option<f64>,
    #[serde(default)]
    pub lowest_loss_level: Option<f64>,
    #[serde(default)]
    pub grad_norm_level: Option<f64>,
    #[serde(default)]
    pub weight_norm_level: Option<f64>,
}

/// What fixes the order of micro-batches: rows, batch size, accumulation (over all ranks:
/// micro-batches per optimizer step), seed.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct PlanRecord {
    pub train_rows: usize,
    pub batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub seed: u64,
}

impl PlanRecord {
    /// Refuses to continue a run under another plan, naming what changed.
    pub fn check_resume(&self, now: &PlanRecord) -> Result<()> {
        let mut changed = vec![];
        let mut cmp = |what: &str, was: u64, is: u64| {
            if was != is {
                changed.push(format!("{what} {was} -> {is}"));
            }
        };
        cmp("training rows", self.train_rows as u64, now.train_rows as u64);
        cmp("batch size", self.batch_size as u64, now.batch_size as u64);
        // Micro-batches per step over all ranks: a run may resume on another number of ranks.
        cmp(
            "gradient accumulation x ranks",
            self.gradient_accumulation_steps as u64,
            now.gradient_accumulation_steps as u64,
        );
        cmp("seed", self.seed, now.seed);
        anyhow::ensure!(
            changed.is_empty(),
            "cannot resume with a different batch plan ({}): the data order, the position in the epoch and the \
             learning-rate schedule all depend on it. Resume with the run's own settings (drop the overriding \
             flags), or start a new run",
            changed.join(", ")
        );
        Ok(())
    }
}

impl TrainerState {
    pub fn read(dir: &Path) -> Result<Self> {
        let p = dir.join(STATE_FILE);
        let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        files::write_atomic(&dir.join(STATE_FILE), |f| Ok(serde_json::to_writer_pretty(f, self)?))
    }
}

/// Paths inside a run folder, and the two pointers into `checkpoints/`:
/// - `last`, a small file naming the newest checkpoint (resume reads it);
/// - `best`, a symbolic link to the checkpoint with the best validation Dice, so
///   `--checkpoint RUN/best` works as a folder.
///
/// Each pointer moves by one rename, after its checkpoint is complete on disk, and a checkpoint
/// is pruned only when neither pointer names it: whenever the process dies, `last` and `best`
/// (once written) name complete, loadable checkpoints.
#[derive(Clone, Debug)]
pub struct RunDir(pub PathBuf);

impl RunDir {
    pub fn checkpoints(&self) -> PathBuf {
        self.0.join("checkpoints")
    }
    pub fn checkpoint(&self, step: u64) -> PathBuf {
        self.checkpoints().join(format!("step-{step:07}"))
    }
    pub fn best(&self) -> PathBuf {
        self.0.join(BEST_LINK)
    }
    pub fn config(&self) -> PathBuf {
        self.0.join(CONFIG_FILE)
    }
    pub fn metrics(&self) -> PathBuf {
        self.0.join("metrics.jsonl")
    }
    pub fn curves(&self) -> PathBuf {
        self.0.join("curves.png")
    }

    /// Whether the folder holds a run (a `last` pointer).
    pub fn has_run(&self) -> bool {
        self.0.join(LAST_FILE).exists()
    }

    /// Removes what a killed process left half-written (temporary checkpoint folders, files
    /// and links, checkpoints moved aside for pruning). Call with the run's lock held.
    pub fn remove_stale_temporaries(&self) -> Result<usize> {
        Ok(files::remove_stale_temporaries(&self.0)? + files::remove_stale_temporaries(&self.checkpoints())?)
    }

    /// Points `last` at a checkpoint folder (relative path, written atomically).
    pub fn set_last(&self, ckpt: &Path) -> Result<()> {
        let rel = ckpt.strip_prefix(&self.0).unwrap_or(ckpt);
        files::write_bytes_atomic(&self.0.join(LAST_FILE), rel.to_string_lossy().as_bytes())?;
        files::crash_point("last:written");
        Ok(())
    }

    /// The checkpoint `last` points at.
    pub fn last(&self) -> Result<PathBuf> {
        let p = self.0.join(LAST_FILE);
        let rel = std::fs::read_to_string(&p)
            .with_context(|| format!("{} has no `last` checkpoint pointer: nothing to resume", self.0.display()))?;
        let ckpt = self.0.join(rel.trim());
        anyhow::ensure!(
            ckpt.is_dir(),
            "`last` in {} points at {}, which does not exist",
            self.0.display(),
            ckpt.display()
        );
        Ok(ckpt)
    }

    /// Points `best` at a step checkpoint: a new link made under a temporary name, renamed
    /// over the old one (rename replaces a link atomically).
    #[cfg(unix)]
    pub fn set_best(&self, ckpt: &Path) -> Result<()> {
        let best = self.best();
        let name = ckpt.file_name().with_context(|| format!("bad checkpoint path {}", ckpt.display()))?;
        let target = Path::new("checkpoints").join(name);
        if best.is_dir() && !best.is_symlink() {
            // A run folder from before `best` was a link: keep its copy as a checkpoint.
            let keep = self.checkpoints().join(format!("best-before-{}", name.to_string_lossy()));
            std::fs::rename(&best, &keep).with_context(|| format!("moving the old {} aside", best.display()))?;
        }
        let tmp = self.0.join(format!(".{BEST_LINK}.tmp-{}", std::process::id()));
        if tmp.is_symlink() || tmp.exists() {
            std::fs::remove_file(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
        }
        std::os::unix::fs::symlink(&target, &tmp).with_context(|| format!("creating the link {}", tmp.display()))?;
        files::crash_point("best:linked");
        std::fs::rename(&tmp, &best).with_context(|| format!("moving {} onto {}", tmp.display(), best.display()))?;
        files::crash_point("best:switched");
        Ok(())
    }

    /// The checkpoint `best` points at, if any.
    pub fn best_target(&self) -> Option<PathBuf> {
        let t = std::fs::read_link(self.best()).ok()?;
        Some(self.0.join(t))
    }

    /// Removes all but the newest `keep` step checkpoints, never one that `last` or `best`
    /// names. Each is renamed aside before it is deleted, so a kill mid-deletion leaves a
    /// temporary that the next start removes, not a half checkpoint under a step name.
    pub fn prune(&self, keep: usize) -> Result<()> {
        let dir = self.checkpoints();
        let Ok(rd) = std::fs::read_dir(&dir) else { return Ok(()) };
        let mut steps: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("step-")))
            .collect();
        steps.sort();
        let pinned = [self.last().ok(), self.best_target()];
        let n = steps.len();
        for p in steps.into_iter().take(n.saturating_sub(keep)) {
            if pinned.iter().flatten().any(|q| same_dir(q, &p)) {
                continue;
            }
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let aside = dir.join(format!(".{name}.old-{}", std::process::id()));
            std::fs::rename(&p, &aside).with_context(|| format!("moving old checkpoint {} aside", p.display()))?;
            files::crash_point("prune:moved");
            std::fs::remove_dir_all(&aside).with_context(|| format!("removing old checkpoint {}", p.display()))?;
        }
        Ok(())
    }
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}
