//! Where a lesion lies: the five positions of the authors' answers, the rule that derives one
//! from a mask (one implementation, used by the dataset checks, the synthetic data and
//! `prs predict`), and the strict parser for dataset labels. Free-text model answers are parsed
//! leniently by [`crate::metrics::parse_position`] instead.

use std::fmt;
use std::str::FromStr;

use anyhow::{Context, Result};
use image::GrayImage;

/// Where the lesion lies, by the rule of [`position_of_mask`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Position {
    Center,
    TopLeft,
    TopRight,
    BottomLeft,
    BottomRight,
}

impl Position {
    pub const ALL: [Position; 5] =
        [Position::Center, Position::TopLeft, Position::TopRight, Position::BottomLeft, Position::BottomRight];

    /// The words the authors' templates use ("center", "top left", ...).
    pub fn label(self) -> &'static str {
        match self {
            Position::Center => "center",
            Position::TopLeft => "top left",
            Position::TopRight => "top right",
            Position::BottomLeft => "bottom left",
            Position::BottomRight => "bottom right",
        }
    }

    pub fn quadrant(top: bool, left: bool) -> Position {
        match (top, left) {
            (true, true) => Position::TopLeft,
            (true, false) => Position::TopRight,
            (false, true) => Position::BottomLeft,
            (false, false) => Position::BottomRight,
        }
    }

    pub fn index(self) -> usize {
        Position::ALL.iter().position(|&p| p == self).unwrap()
    }

    /// Finds the position named in a label or a template sentence: "top-left", "upper left",
    /// "at the bottom right of the image, near the center" (a quadrant qualified by "near the
    /// center" is still that quadrant), "in the centre", "middle". None when no position or
    /// two different quadrants are named.
    pub fn parse(text: &str) -> Option<Position> {
        let norm: String = text.to_lowercase().chars().map(|c| if c.is_alphanumeric() { c } else { ' ' }).collect();
        let words: Vec<&str> = norm.split_whitespace().collect();
        let vertical =
            |w: &str| matches!(w, "top" | "upper" | "bottom" | "lower").then(|| matches!(w, "top" | "upper"));
        let horizontal = |w: &str| matches!(w, "left" | "right").then(|| w == "left");
        let mut found: Option<Position> = None;
        for (i, w) in words.iter().enumerate() {
            // "top left", "left top", "top and left" are accepted; one filler word at most.
            let Some(top) = vertical(w) else { continue };
            let near = words.iter().skip(i + 1).take(2).chain(words[..i].iter().rev().take(1));
            let Some(left) = near.filter_map(|n| horizontal(n)).next() else {
                continue;
            };
            let p = Position::quadrant(top, left);
            match found {
                Some(q) if q != p => return None,
                _ => found = Some(p),
            }
        }
        if found.is_some() {
            return found;
        }
        words
            .iter()
            .any(|w| matches!(*w, "center" | "centre" | "central" | "middle" | "centered" | "centred"))
            .then_some(Position::Center)
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

impl FromStr for Position {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Position::parse(s).with_context(|| format!("no position (center/top left/...) named in {s:?}"))
    }
}

/// The position rule: bounding box of the foreground (> 127); `Center` when the box contains
/// the image centre (w/2, h/2), else the quadrant of the box centre. None for an empty mask.
/// Integer arithmetic as in the authors' annotation script, so labels agree pixel for pixel.
pub fn position_of_mask(mask: &GrayImage) -> Option<Position> {
    position_and_nearness(mask).map(|(p, _)| p)
}

/// [`position_of_mask`] plus the authors' "near the center" flag (box centre closer to the
/// image centre than 20% of the width), which picks the template family.
pub fn position_and_nearness(mask: &GrayImage) -> Option<(Position, bool)> {
    let (w, h) = (mask.width() as usize, mask.height() as usize);
    position_of_rows(mask.as_raw(), w, h, |&v| v > 127)
}

/// The rule on a row-major `w` x `h` mask whose foreground is where `fg` holds.
pub fn position_of_rows<T>(mask: &[T], w: usize, h: usize, fg: impl Fn(&T) -> bool) -> Option<(Position, bool)> {
    let (mut x0, mut x1, mut y0, mut y1) = (usize::MAX, 0, usize::MAX, 0);
    for (y, row) in mask.chunks_exact(w.max(1)).enumerate().take(h) {
        let Some(first) = row.iter().position(&fg) else {
            continue;
        };
        let last = row.iter().rposition(&fg).expect("a first foreground pixel exists");
        x0 = x0.min(first);
        x1 = x1.max(last);
        y0 = y0.min(y);
        y1 = y;
    }
    if x0 == usize::MAX {
        return None;
    }
    let (cx, cy) = (w / 2, h / 2);
    if (x0..=x1).contains(&cx) && (y0..=y1).contains(&cy) {
        return Some((Position::Center, true));
    }
    let (bx, by) = ((x0 + x1) / 2, (y0 + y1) / 2);
    let (dx, dy) = (bx as f64 - cx as f64, by as f64 - cy as f64);
    let near = (dx * dx + dy * dy).sqrt() < 0.2 * w as f64;
    Some((Position::quadrant(by < cy, bx < cx), near))
}
