//! Position labels: parsing free-text answers, the dataset's mask rule, and a confusion matrix.
//!
//! Parsing rules ([`parse_position`]), on lower-cased words (every non-alphanumeric character
//! is a separator, so "top-left", "Top left." and "upper_left" read alike):
//! 1. a statement of absence ("no lesion", "no visible tumor", "none", "not detected",
//!    "absent", "nothing") gives `None`, even if a position is also named;
//! 2. a vertical word (top/upper/superior, bottom/lower/inferior) within two words of a
//!    horizontal word (left, right), in either order, gives that quadrant (first such pair);
//!    this wins over centre words, so "top left, near the center" is TopLeft;
//! 3. otherwise a centre word (center, centre, central, centrally, middle, centered, centred)
//!    gives Center;
//! 4. otherwise a vertical and a horizontal word anywhere ("upper part ... on the left side")
//!    give the quadrant of the first of each;
//! 5. otherwise `None` (no recognised position).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::data::position::{position_of_rows, Position};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PositionLabel {
    Center,
    TopLeft,
    TopRight,
    BottomLeft,
    BottomRight,
    None,
}

impl PositionLabel {
    pub const ALL: [PositionLabel; 6] = [
        PositionLabel::Center,
        PositionLabel::TopLeft,
        PositionLabel::TopRight,
        PositionLabel::BottomLeft,
        PositionLabel::BottomRight,
        PositionLabel::None,
    ];

    /// Row/column index in [`PositionConfusion::counts`].
    pub fn index(self) -> usize {
        Self::ALL.iter().position(|&l| l == self).expect("label in ALL")
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Center => "center",
            Self::TopLeft => "top left",
            Self::TopRight => "top right",
            Self::BottomLeft => "bottom left",
            Self::BottomRight => "bottom right",
            Self::None => "none",
        }
    }
}

/// A dataset position is one of the first five labels.
impl From<Position> for PositionLabel {
    fn from(p: Position) -> Self {
        match p {
            Position::Center => Self::Center,
            Position::TopLeft => Self::TopLeft,
            Position::TopRight => Self::TopRight,
            Position::BottomLeft => Self::BottomLeft,
            Position::BottomRight => Self::BottomRight,
        }
    }
}

impl fmt::Display for PositionLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Word {
    Top,
    Bottom,
    Left,
    Right,
    Center,
    Other,
}

fn classify(w: &str) -> Word {
    match w {
        "top" | "upper" | "superior" | "uppermost" | "topmost" => Word::Top,
        "bottom" | "lower" | "inferior" | "lowermost" | "bottommost" => Word::Bottom,
        "left" | "leftmost" | "lefthand" => Word::Left,
        "right" | "rightmost" | "righthand" => Word::Right,
        "center" | "centre" | "central" | "centrally" | "middle" | "centered" | "centred" | "midline" => Word::Center,
        _ => Word::Other,
    }
}

const LESION_WORDS: &[&str] = &[
    "lesion",
    "lesions",
    "tumor",
    "tumors",
    "tumour",
    "tumours",
    "polyp",
    "polyps",
    "abnormality",
    "abnormalities",
    "mass",
    "masses",
    "nodule",
    "nodules",
    "finding",
    "findings",
    "anomaly",
    "anomalies",
    "object",
    "region",
    "sign",
    "signs",
    "evidence",
    "target",
    "visible",
    "detectable",
    "apparent",
    "obvious",
    "abnormal",
    "suspicious",
];
const FOUND_WORDS: &[&str] =
    &["detected", "found", "present", "visible", "seen", "identified", "observed", "detectable", "shown"];

fn states_absence(words: &[&str]) -> bool {
    words.iter().enumerate().any(|(i, &w)| match w {
        "none" | "absent" | "absence" | "nothing" => true,
        "no" => words[i + 1..].iter().take(3).any(|n| LESION_WORDS.contains(n)),
        "not" => words[i + 1..].iter().take(2).any(|n| FOUND_WORDS.contains(n)),
        _ => false,
    })
}

/// `v` is a vertical word, `h` a horizontal one.
fn quadrant(v: Word, h: Word) -> PositionLabel {
    Position::quadrant(v == Word::Top, h == Word::Left).into()
}

/// Parses an answer (or the dataset's `position` sentence) into a label; rules in module docs.
pub fn parse_position(text: &str) -> PositionLabel {
    let lower = text.to_lowercase();
    let words: Vec<&str> = lower.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).collect();
    if states_absence(&words) {
        return PositionLabel::None;
    }
    let kinds: Vec<Word> = words.iter().map(|w| classify(w)).collect();
    let is_v = |k: Word| matches!(k, Word::Top | Word::Bottom);
    let is_h = |k: Word| matches!(k, Word::Left | Word::Right);
    for (i, &k) in kinds.iter().enumerate() {
        if !is_v(k) {
            continue;
        }
        let lo = i.saturating_sub(2);
        let hi = (i + 3).min(kinds.len());
        // Nearest horizontal word within two words, preferring the one after on equal distance.
        let near =
            (1..=2).find_map(|d| [i + d, i.wrapping_sub(d)].into_iter().find(|&j| j >= lo && j < hi && is_h(kinds[j])));
        if let Some(j) = near {
            return quadrant(k, kinds[j]);
        }
    }
    if kinds.contains(&Word::Center) {
        return PositionLabel::Center;
    }
    match (kinds.iter().find(|&&k| is_v(k)), kinds.iter().find(|&&k| is_h(k))) {
        (Some(&v), Some(&h)) => quadrant(v, h),
        _ => PositionLabel::None,
    }
}

/// The dataset's position rule (section 5, [`crate::data::position::position_and_nearness`])
/// on a row-major `h` x `w` boolean mask: the label (`None` for an empty mask) and the "near
/// the center" flag.
pub fn position_from_mask(mask: &[bool], h: usize, w: usize) -> (PositionLabel, bool) {
    assert_eq!(mask.len(), h * w, "position_from_mask: mask length != h*w");
    match position_of_rows(mask, w, h, |&m| m) {
        Some((p, near)) => (p.into(), near),
        None => (PositionLabel::None, false),
    }
}

/// Confusion matrix over the six labels: `counts[truth][predicted]` in [`PositionLabel::ALL`] order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PositionConfusion {
    pub counts: [[u64; 6]; 6],
}

/// Per-label summary (NaN recall/precision when undefined).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LabelCounts {
    pub label: PositionLabel,
    /// Samples whose truth is this label.
    pub support: u64,
    /// Samples predicted as this label.
    pub predicted: u64,
    pub correct: u64,
    pub recall: f64,
    pub precision: f64,
}

/// Serialisable report: accuracy, totals, per-label counts and the raw matrix.
#[derive(Debug, Clone, Serialize)]
pub struct PositionReport {
    pub accuracy: f64,
    pub total: u64,
    pub correct: u64,
    pub labels: Vec<LabelCounts>,
    pub counts: [[u64; 6]; 6],
}

impl PositionConfusion {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, truth: PositionLabel, predicted: PositionLabel) {
        self.counts[truth.index()][predicted.index()] += 1;
    }

    /// Parses both texts and records the pair; returns (truth, predicted).
    pub fn add_texts(&mut self, truth: &str, answer: &str) -> (PositionLabel, PositionLabel) {
        let (t, p) = (parse_position(truth), parse_position(answer));
        self.add(t, p);
        (t, p)
    }

    pub fn merge(&mut self, other: &PositionConfusion) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            for (x, y) in a.iter_mut().zip(b) {
                *x += y;
            }
        }
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().flatten().sum()
    }

    pub fn correct(&self) -> u64 {
        (0..6).map(|i| self.counts[i][i]).sum()
    }

    /// Fraction on the diagonal; NaN when empty.
    pub fn accuracy(&self) -> f64 {
        self.correct() as f64 / self.total() as f64
    }

    pub fn per_label(&self) -> Vec<LabelCounts> {
        PositionLabel::ALL
            .iter()
            .enumerate()
            .map(|(i, &label)| {
                let support: u64 = self.counts[i].iter().sum();
                let predicted: u64 = self.counts.iter().map(|row| row[i]).sum();
                let correct = self.counts[i][i];
                LabelCounts {
                    label,
                    support,
                    predicted,
                    correct,
                    recall: correct as f64 / support as f64,
                    precision: correct as f64 / predicted as f64,
                }
            })
            .collect()
    }

    pub fn report(&self) -> PositionReport {
        PositionReport {
            accuracy: self.accuracy(),
            total: self.total(),
            correct: self.correct(),
            labels: self.per_label(),
            counts: self.counts,
        }
    }
}
