//! Run reporting for `prs finetune`: the `metrics.jsonl` log and training-curve pictures,
//! drawn with a built-in bitmap font so no system fonts or plotting stack are needed.
//!
//! * [`metrics_log`]: append-per-line JSON log, truncated on resume, tolerant reader.
//! * [`chart`]: line charts into an `RgbImage`, atomic PNG saving.
//! * [`font`]: the 5x7 bitmap font.
//! * [`tfevents`]: `metrics.csv` and the TensorBoard event file written beside the log.

pub mod chart;
pub mod font;
pub mod metrics_log;
pub mod overlay;
pub mod tfevents;

use std::path::Path;

use anyhow::Result;
use image::RgbImage;

pub use chart::{Axis, Frame, LineChart, Rect, Series, PALETTE};
pub use font::{draw_text, draw_text_vertical, text_height, text_width};
pub use metrics_log::{read_metrics, read_metrics_file, Kind, MetricsFile, MetricsLog, Record, METRICS_FILE};

/// Default size of the training-curves picture (two panels stacked).
pub const CURVES_WIDTH: u32 = 900;
pub const CURVES_HEIGHT: u32 = 1000;

/// (step, value) of every record of `kind` that has the field.
fn points(records: &[Record], kind: Kind, field: impl Fn(&Record) -> Option<f64>) -> Vec<(f64, f64)> {
    records.iter().filter(|r| r.kind == kind).filter_map(|r| field(r).map(|v| (r.step as f64, v))).collect()
}

/// The two panels of the training-curves picture: losses (train total, its parts, validation
/// loss) and validation scores (Dice, IoU, position accuracy), sharing the step axis. Series
/// with no values in the log are left out of the legend.
pub fn training_charts(records: &[Record]) -> (LineChart, LineChart) {
    // Shared step axis, widened to nice ticks once so both panels get the same one.
    let x_range = records
        .iter()
        .map(|r| r.step as f64)
        .fold(None, |acc: Option<(f64, f64)>, s| Some(acc.map_or((s, s), |(a, b)| (a.min(s), b.max(s)))))
        .map(|(a, b)| {
            let ax = Axis::linear(a, b, false);
            (ax.lo, ax.hi)
        });

    type Field = fn(&Record) -> Option<f64>;
    let add = |chart: &mut LineChart, name: &str, kind: Kind, f: Field, colour| {
        let pts = points(records, kind, f);
        if !pts.is_empty() {
            chart.series.push(Series::new(name, colour, pts));
        }
    };

    let mut loss = LineChart::new("Loss", "step");
    loss.x_range = x_range;
    add(&mut loss, "train total", Kind::Train, |r| r.loss, PALETTE[0]);
    add(&mut loss, "train seg", Kind::Train, |r| r.loss_seg, PALETTE[5]);
    add(&mut loss, "train lm", Kind::Train, |r| r.loss_lm, PALETTE[4]);
    add(&mut loss, "train cls", Kind::Train, |r| r.loss_cls, PALETTE[6]);
    add(&mut loss, "val total", Kind::Eval, |r| r.val_loss, PALETTE[3]);
    let ys: Vec<f64> = loss.series.iter().flat_map(|s| s.points.iter().map(|p| p.1)).collect();
    loss.y_log = wants_log_scale(&ys);
    loss.y_label = if loss.y_log { "loss (log scale)" } else { "loss" }.into();

    let mut val = LineChart::new("Validation", "step");
    val.x_range = x_range;
    val.y_range = Some((0.0, 1.0));
    add(&mut val, "val Dice", Kind::Eval, |r| r.dice, PALETTE[0]);
    add(&mut val, "val IoU", Kind::Eval, |r| r.iou, PALETTE[1]);
    add(&mut val, "position acc", Kind::Eval, |r| r.position_acc, PALETTE[2]);
    (loss, val)
}

/// Whether a loss panel reads better on a log y-scale: the largest value dwarfs the typical
/// one (max / median > [`LOG_SCALE_RATIO`]: the first steps of a run), and every finite
/// value is positive (a log axis cannot show the others).
pub fn wants_log_scale(values: &[f64]) -> bool {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.len() < 3 || v.iter().any(|&x| x <= 0.0) {
        return false;
    }
    v.sort_by(f64::total_cmp);
    let median = v[v.len() / 2];
    v[v.len() - 1] / median > LOG_SCALE_RATIO
}

/// See [`wants_log_scale`].
pub const LOG_SCALE_RATIO: f64 = 20.0;

/// Renders both panels stacked into one `width` x `height` image.
pub fn training_curves_image(records: &[Record], width: u32, height: u32) -> RgbImage {
    training_curves_render(records, width, height).0
}

/// `training_curves_image` plus the frames of the loss (top) and validation (bottom) panels.
pub fn training_curves_render(records: &[Record], width: u32, height: u32) -> (RgbImage, Frame, Frame) {
    let (mut loss, mut val) = training_charts(records);
    let mut img = RgbImage::new(width, height);
    let top = Rect { x: 0, y: 0, w: width, h: height / 2 };
    let bottom = Rect { x: 0, y: top.h as i32, w: width, h: height - top.h };
    // Draw once to learn each panel's label width, then again with a shared left margin so
    // the two step axes line up.
    let left = loss.draw(&mut img, top).outer.x.max(val.draw(&mut img, bottom).outer.x);
    loss.left_margin = Some(left as u32);
    val.left_margin = Some(left as u32);
    let (ft, fb) = (loss.draw(&mut img, top), val.draw(&mut img, bottom));
    (img, ft, fb)
}

/// Writes the training-curves PNG (see [`training_charts`]) atomically to `path`.
pub fn training_curves(records: &[Record], path: &Path) -> Result<()> {
    crate::files::write_png_atomic(&training_curves_image(records, CURVES_WIDTH, CURVES_HEIGHT), path)
}
