//! What a run folder holds besides checkpoints: the trainer's position and counters
//! (`trainer_state.json` inside each checkpoint) and the `last` pointer.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::weights::shards::write_atomic;

pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const LAST_FILE: &str = "last";
pub const CONFIG_FILE: &str = "config.toml";

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
    pub consecutive_nonfinite: u32,
    pub samples_seen: u64,
}

impl TrainerState {
    pub fn read(dir: &Path) -> Result<Self> {
        let p = dir.join(STATE_FILE);
        let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        write_atomic(&dir.join(STATE_FILE), |f| Ok(serde_json::to_writer_pretty(f, self)?))
    }
}

/// Paths inside a run folder.
#[derive(Clone, Debug)]
pub struct RunDir(pub PathBuf);

impl RunDir {
    pub fn checkpoint(&self, step: u64) -> PathBuf {
        self.0.join("checkpoints").join(format!("step-{step:07}"))
    }
    pub fn best(&self) -> PathBuf {
        self.0.join("best")
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

    /// Points `last` at a checkpoint folder (relative path, written atomically).
    pub fn set_last(&self, ckpt: &Path) -> Result<()> {
        let rel = ckpt.strip_prefix(&self.0).unwrap_or(ckpt);
        write_atomic(&self.0.join(LAST_FILE), |f| Ok(std::io::Write::write_all(f, rel.to_string_lossy().as_bytes())?))
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

    /// Removes all but the newest `keep` step checkpoints (never the one `last` names).
    pub fn prune(&self, keep: usize) -> Result<()> {
        let dir = self.0.join("checkpoints");
        let Ok(rd) = std::fs::read_dir(&dir) else { return Ok(()) };
        let mut steps: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("step-")))
            .collect();
        steps.sort();
        let last = self.last().ok();
        let n = steps.len();
        for p in steps.into_iter().take(n.saturating_sub(keep)) {
            if Some(&p) != last.as_ref() {
                std::fs::remove_dir_all(&p).with_context(|| format!("removing old checkpoint {}", p.display()))?;
            }
        }
        Ok(())
    }
}
