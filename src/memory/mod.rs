//! Training-memory profiling (`prs profile-memory`): an analytic model of a training step's peak
//! memory (`estimate`), real trial steps in child processes (`measure`), and the batch-size
//! search and recommendation (`search`).

pub mod estimate;
pub mod measure;
pub mod search;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

pub use crate::config::Precision;

/// Token layout of the worst-case training sample: `before` (BOS + text before the image
/// marker), the image vectors, `after` (prompt text), `answer`, and the EOS the trainer appends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeqShape {
    pub before: usize,
    pub after: usize,
    pub answer: usize,
}

impl SeqShape {
    /// LLM sequence length with `image_tokens` image vectors.
    pub fn total(&self, image_tokens: usize) -> usize {
        self.before + image_tokens + self.after + self.answer + 1
    }

    /// A layout of `seq_len` positions in all: BOS, the image, then the text split two thirds
    /// prompt, one third answer (+ EOS).
    pub fn from_total(seq_len: usize, image_tokens: usize) -> Result<Self> {
        let fixed = 1 + image_tokens + 1;
        if seq_len < fixed + 2 {
            bail!(
                "sequence length {seq_len} is too short: BOS + {image_tokens} image tokens + EOS leave no room \
                 for a prompt and an answer (need at least {})",
                fixed + 2
            );
        }
        let text = seq_len - fixed;
        let answer = (text / 3).max(1);
        Ok(Self { before: 1, after: text - answer, answer })
    }
}

/// Bytes as GB (10^9), as the tables print them.
pub fn gb(bytes: u64) -> f64 {
    bytes as f64 / 1e9
}

/// Parses "24GiB", "80GB", "512MiB", "1.5e9" (bytes). A bare number under 1 MiB is refused:
/// `--gpu-memory 80` means 80 GB to a person, and 80 bytes would silently fit nothing.
pub fn parse_bytes(s: &str) -> Result<u64> {
    let t = s.trim();
    if let Ok(v) = t.parse::<f64>() {
        if v.is_finite() && v > 0.0 && v < (1u64 << 20) as f64 {
            bail!("memory size `{s}` has no unit and would be {v} bytes: write e.g. {s}GB or {s}GiB");
        }
    }
    // The unit is the trailing run of letters (so an exponent like 1.5e9 stays in the number).
    let split = t.trim_end_matches(|c: char| c.is_ascii_alphabetic()).len();
    let (num, unit) = t.split_at(split);
    let v: f64 = num.trim().parse().map_err(|_| anyhow::anyhow!("cannot parse memory size `{s}`"))?;
    let mul = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => 1024.0 * 1024.0,
        "g" | "gb" => 1e9,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tb" => 1e12,
        "tib" => 1024f64.powi(4),
        u => bail!("unknown memory unit `{u}` in `{s}` (B, KB, KiB, MB, MiB, GB, GiB, TB, TiB)"),
    };
    if !(v.is_finite() && v > 0.0) {
        bail!("memory size `{s}` must be positive");
    }
    Ok((v * mul) as u64)
}
