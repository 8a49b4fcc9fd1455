//! Line charts drawn straight into an `RgbImage`: axes with "nice" ticks (linear or log y),
//! grid, labelled ticks, a legend placed in the emptiest corner, lines with gaps at
//! non-finite points, and markers on sparse series. Text uses the built-in bitmap font.

use std::path::Path;

use anyhow::Result;
use image::{Rgb, RgbImage};

use super::font::{draw_text, draw_text_vertical, text_height, text_width, CAP_H};

/// Distinct, print-safe series colours.
pub const PALETTE: [Rgb<u8>; 8] = [
    Rgb([30, 100, 200]),  // blue
    Rgb([230, 120, 20]),  // orange
    Rgb([40, 150, 60]),   // green
    Rgb([200, 40, 40]),   // red
    Rgb([130, 80, 180]),  // violet
    Rgb([20, 160, 170]),  // teal
    Rgb([150, 100, 60]),  // brown
    Rgb([110, 110, 110]), // grey
];

const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
const GRID: Rgb<u8> = Rgb([228, 228, 228]);
const AXIS: Rgb<u8> = Rgb([60, 60, 60]);
const TEXT: Rgb<u8> = Rgb([20, 20, 20]);

/// A series with at most this many drawable points gets a marker on every point.
const MARKER_MAX_POINTS: usize = 40;

#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub name: String,
    pub colour: Rgb<u8>,
    /// (x, y) in order of drawing; non-finite points (and y <= 0 on a log axis) leave gaps.
    pub points: Vec<(f64, f64)>,
}

impl Series {
    pub fn new(name: impl Into<String>, colour: Rgb<u8>, points: Vec<(f64, f64)>) -> Self {
        Self { name: name.into(), colour, points }
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct LineChart {
    pub title: String,
    pub x_label: String,
    /// Drawn vertically left of the tick labels; empty = none.
    pub y_label: String,
    pub series: Vec<Series>,
    pub y_log: bool,
    /// Fixed axis ranges; None = fitted to the data and widened to nice tick values.
    pub x_range: Option<(f64, f64)>,
    pub y_range: Option<(f64, f64)>,
    /// Pixels left of the plot area; None = just enough for the labels. Set it to line up
    /// the plot areas of stacked charts.
    pub left_margin: Option<u32>,
}

/// A pixel rectangle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rect {
    pub x: i32,
    pub y: i32,
    pub w: u32,
    pub h: u32,
}

impl Rect {
    pub fn contains(&self, x: i64, y: i64) -> bool {
        x >= self.x as i64
            && y >= self.y as i64
            && x < self.x as i64 + self.w as i64
            && y < self.y as i64 + self.h as i64
    }
}

/// One axis: its range, scale and labelled ticks.
#[derive(Clone, Debug, PartialEq)]
pub struct Axis {
    pub lo: f64,
    pub hi: f64,
    pub log: bool,
    pub ticks: Vec<f64>,
    pub labels: Vec<String>,
}

impl Axis {
    /// Position of `v` along the axis, 0 at `lo` and 1 at `hi`; None where it cannot be drawn.
    pub fn frac(&self, v: f64) -> Option<f64> {
        if !v.is_finite() || (self.log && v <= 0.0) {
            return None;
        }
        let t = if self.log {
            (v.log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10())
        } else {
            (v - self.lo) / (self.hi - self.lo)
        };
        t.is_finite().then_some(t)
    }

    /// Linear axis covering [min, max], widened to multiples of a 1/2/5 x 10^k step.
    pub fn linear(min: f64, max: f64, fixed: bool) -> Self {
        let (mut min, mut max) = if min.is_finite() && max.is_finite() && min <= max { (min, max) } else { (0.0, 1.0) };
        if max - min <= 1e-12 * min.abs().max(max.abs()) {
            // Constant data: give it some room so the line sits mid-plot.
            let pad = if min == 0.0 { 1.0 } else { min.abs() * 0.1 };
            (min, max) = (min - pad, max + pad);
        }
        let step = nice_step(max - min, 5.0);
        let (lo, hi) = if fixed { (min, max) } else { ((min / step).floor() * step, (max / step).ceil() * step) };
        let first = (lo / step - 1e-9).ceil() as i64;
        let last = (hi / step + 1e-9).floor() as i64;
        let ticks: Vec<f64> = (first..=last).take(100).map(|i| i as f64 * step).collect();
        let labels = linear_labels(&ticks, step);
        Self { lo, hi, log: false, ticks, labels }
    }

    /// Log10 axis covering [min, max] (both > 0), widened to whole decades unless fixed.
    pub fn log(min: f64, max: f64, fixed: bool) -> Self {
        let (min, max) = if min > 0.0 && max.is_finite() && min <= max { (min, max) } else { (1.0, 10.0) };
        let (mut e0, mut e1) = (min.log10().floor() as i32, max.log10().ceil() as i32);
        if e1 <= e0 {
            e1 = e0 + 1;
        }
        let (lo, hi) = if fixed && min < max { (min, max) } else { (10f64.powi(e0), 10f64.powi(e1)) };
        let decades = e1 - e0;
        // Few decades: label 1, 2, 5 within each; many: thin out whole decades.
        let mults: &[f64] = if decades <= 2 { &[1.0, 2.0, 5.0] } else { &[1.0] };
        let every = (decades + 5) / 6;
        e0 -= e0.rem_euclid(every.max(1));
        let mut ticks = Vec::new();
        let mut e = e0;
        while e <= e1 {
            for m in mults {
                let v = m * 10f64.powi(e);
                if v >= lo * (1.0 - 1e-9) && v <= hi * (1.0 + 1e-9) {
                    ticks.push(v);
                }
            }
            e += every.max(1);
        }
        let labels = ticks.iter().map(|&v| fmt_log(v)).collect();
        Self { lo, hi, log: true, ticks, labels }
    }
}

/// A 1, 2 or 5 x 10^k step giving about `target` intervals over `span`.
fn nice_step(span: f64, target: f64) -> f64 {
    let raw = span / target;
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let nice = if f < 1.5 {
        1.0
    } else if f < 3.0 {
        2.0
    } else if f < 7.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

fn linear_labels(ticks: &[f64], step: f64) -> Vec<String> {
    let big = ticks.iter().fold(0f64, |m, v| m.max(v.abs()));
    let step_exp = step.log10().floor() as i32;
    if big >= 1e5 || step < 1e-3 {
        // Enough significant digits to tell neighbouring ticks apart.
        let sig = (big.log10().floor() as i32 - step_exp + 1).clamp(1, 10) as usize;
        ticks.iter().map(|&v| fmt_sci(v, sig)).collect()
    } else {
        let decimals = (-step_exp).max(0) as usize;
        ticks
            .iter()
            .map(|&v| {
                let s = format!("{v:.decimals$}");
                // "-0.0" reads badly at the origin.
                if s.trim_start_matches('-').chars().all(|c| c == '0' || c == '.') {
                    s.trim_start_matches('-').to_string()
                } else {
                    s
                }
            })
            .collect()
    }
}

/// `v` as "m.mmme-k" with at most `sig` significant digits, trailing zeros dropped.
pub fn fmt_sci(v: f64, sig: usize) -> String {
    if v == 0.0 || !v.is_finite() {
        return if v == 0.0 { "0".into() } else { format!("{v}") };
    }
    let s = format!("{:.*e}", sig.saturating_sub(1), v);
    let (mant, exp) = s.split_once('e').unwrap_or((&s, "0"));
    let mant = if mant.contains('.') { mant.trim_end_matches('0').trim_end_matches('.') } else { mant };
    format!("{mant}e{exp}")
}

fn fmt_log(v: f64) -> String {
    if (1e-3..1e5).contains(&v) {
        let s = format!("{v:.4}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        fmt_sci(v, 2)
    }
}

/// Where a drawn chart put its plot area and how data maps into it.
#[derive(Clone, Debug, PartialEq)]
pub struct Frame {
    /// The framed box, and inside it (a few pixels in) the area data maps onto.
    pub outer: Rect,
    pub plot: Rect,
    pub x: Axis,
    pub y: Axis,
}

impl Frame {
    /// Pixel position (unrounded) of a data point, or None when it cannot be drawn.
    pub fn to_pixel(&self, x: f64, y: f64) -> Option<(f64, f64)> {
        let (fx, fy) = (self.x.frac(x)?, self.y.frac(y)?);
        let p = self.plot;
        Some((p.x as f64 + fx * (p.w as f64 - 1.0), p.y as f64 + (1.0 - fy) * (p.h as f64 - 1.0)))
    }
}

impl LineChart {
    pub fn new(title: impl Into<String>, x_label: impl Into<String>) -> Self {
        Self { title: title.into(), x_label: x_label.into(), ..Self::default() }
    }

    /// Renders the chart into a fresh `width` x `height` image.
    pub fn render(&self, width: u32, height: u32) -> RgbImage {
        self.render_with_frame(width, height).0
    }

    pub fn render_with_frame(&self, width: u32, height: u32) -> (RgbImage, Frame) {
        let mut img = RgbImage::from_pixel(width, height, WHITE);
        let frame = self.draw(&mut img, Rect { x: 0, y: 0, w: width, h: height });
        (img, frame)
    }

    /// Renders and writes a PNG atomically.
    pub fn save_png(&self, path: &Path, width: u32, height: u32) -> Result<()> {
        crate::files::write_png_atomic(&self.render(width, height), path)
    }

    /// Data bounds over drawable points: x over all, y over those inside a fixed x range.
    fn bounds(&self) -> Option<(f64, f64, f64, f64)> {
        let mut b: Option<(f64, f64, f64, f64)> = None;
        for &(x, y) in self.series.iter().flat_map(|s| s.points.iter()) {
            if !x.is_finite() || !y.is_finite() || (self.y_log && y <= 0.0) {
                continue;
            }
            if let Some((lo, hi)) = self.x_range {
                if x < lo.min(hi) || x > hi.max(lo) {
                    continue;
                }
            }
            b = Some(match b {
                None => (x, x, y, y),
                Some((x0, x1, y0, y1)) => (x0.min(x), x1.max(x), y0.min(y), y1.max(y)),
            });
        }
        b
    }

    fn axes(&self) -> (Axis, Axis) {
        let data = self.bounds();
        let fixed = |r: Option<(f64, f64)>| r.filter(|(a, b)| a.is_finite() && b.is_finite() && a < b);
        let x = match (fixed(self.x_range), data) {
            (Some((a, b)), _) => Axis::linear(a, b, true),
            (None, Some((x0, x1, _, _))) => Axis::linear(x0, x1, false),
            (None, None) => Axis::linear(0.0, 1.0, false),
        };
        let y_fixed = fixed(self.y_range).filter(|(a, _)| !self.y_log || *a > 0.0);
        let (y0, y1, is_fixed) = match (y_fixed, data) {
            (Some((a, b)), _) => (a, b, true),
            (None, Some((_, _, y0, y1))) => (y0, y1, false),
            (None, None) => {
                if self.y_log {
                    (1.0, 10.0, false)
                } else {
                    (0.0, 1.0, false)
                }
            }
        };
        let y = if self.y_log { Axis::log(y0, y1, is_fixed) } else { Axis::linear(y0, y1, is_fixed) };
        (x, y)
    }

    /// Draws the chart into `area` of `img` (clearing it first) and returns its frame.
    pub fn draw(&self, img: &mut RgbImage, area: Rect) -> Frame {
        fill_rect(img, area, WHITE, area);
        let ts = if area.w >= 640 && area.h >= 400 { 2 } else { 1 };
        let th = text_height(ts) as i32;
        let pad = 6 * ts as i32;
        let tick = 4 * ts as i32;
        let (xa, ya) = self.axes();

        let y_lab_w = ya.labels.iter().map(|l| text_width(l, ts)).max().unwrap_or(0) as i32;
        let x_last_w = xa.labels.last().map(|l| text_width(l, ts)).unwrap_or(0) as i32;
        let left = self
            .left_margin
            .map_or(pad + if self.y_label.is_empty() { 0 } else { th + pad } + y_lab_w + tick + pad / 2, |m| m as i32);
        let top = pad + if self.title.is_empty() { 0 } else { text_height(ts + 1) as i32 + pad };
        let bottom = tick + pad / 2 + th + if self.x_label.is_empty() { 0 } else { pad + th } + pad;
        let right = (x_last_w / 2 + pad).max(3 * pad);
        let outer = Rect {
            x: area.x + left,
            y: area.y + top,
            w: (area.w as i32 - left - right).max(8) as u32,
            h: (area.h as i32 - top - bottom).max(8) as u32,
        };
        // Data maps a few pixels inside the frame so points at the axis limits stay visible.
        let gap = 3 * ts as i32 + 1;
        let plot = Rect {
            x: outer.x + gap,
            y: outer.y + gap,
            w: (outer.w as i32 - 2 * gap).max(2) as u32,
            h: (outer.h as i32 - 2 * gap).max(2) as u32,
        };
        let frame = Frame { outer, plot, x: xa, y: ya };
        let (px0, py0) = (outer.x, outer.y);
        let (px1, py1) = (outer.x + outer.w as i32 - 1, outer.y + outer.h as i32 - 1);

        // Grid, ticks and tick labels.
        for (v, label) in frame.x.ticks.iter().zip(&frame.x.labels) {
            let Some(f) = frame.x.frac(*v) else { continue };
            let x = (plot.x as f64 + f * (plot.w as f64 - 1.0)).round() as i32;
            vline(img, x, py0, py1, GRID, area);
            vline(img, x, py1, py1 + tick, AXIS, area);
            let w = text_width(label, ts) as i32;
            draw_text(img, x - w / 2, py1 + tick + pad / 2, label, TEXT, ts);
        }
        for (v, label) in frame.y.ticks.iter().zip(&frame.y.labels) {
            let Some(f) = frame.y.frac(*v) else { continue };
            let y = (plot.y as f64 + (1.0 - f) * (plot.h as f64 - 1.0)).round() as i32;
            hline(img, px0, px1, y, GRID, area);
            hline(img, px0 - tick, px0, y, AXIS, area);
            let w = text_width(label, ts) as i32;
            let ty = y - (CAP_H * ts) as i32 / 2;
            draw_text(img, px0 - tick - pad / 2 - w, ty, label, TEXT, ts);
        }
        // Plot frame.
        hline(img, px0, px1, py0, AXIS, area);
        hline(img, px0, px1, py1, AXIS, area);
        vline(img, px0, py0, py1, AXIS, area);
        vline(img, px1, py0, py1, AXIS, area);

        // Titles.
        if !self.title.is_empty() {
            let w = text_width(&self.title, ts + 1) as i32;
            let cx = plot.x + plot.w as i32 / 2;
            draw_text(img, cx - w / 2, area.y + pad, &self.title, TEXT, ts + 1);
        }
        if !self.x_label.is_empty() {
            let w = text_width(&self.x_label, ts) as i32;
            let y = py1 + tick + pad / 2 + th + pad;
            draw_text(img, plot.x + plot.w as i32 / 2 - w / 2, y, &self.x_label, TEXT, ts);
        }
        if !self.y_label.is_empty() {
            let h = text_width(&self.y_label, ts) as i32;
            let y = plot.y + plot.h as i32 / 2 - h / 2;
            draw_text_vertical(img, area.x + pad, y, &self.y_label, TEXT, ts);
        }

        // Series, clipped to the inside of the plot frame.
        let clip = Rect { x: px0 + 1, y: py0 + 1, w: outer.w - 2, h: outer.h - 2 };
        let lw = ts as i32;
        let mut any = false;
        for s in &self.series {
            let pix: Vec<Option<(f64, f64)>> = s.points.iter().map(|&(x, y)| frame.to_pixel(x, y)).collect();
            let n_ok = pix.iter().flatten().count();
            any |= n_ok > 0;
            for w in pix.windows(2) {
                if let [Some(a), Some(b)] = w {
                    draw_line(img, *a, *b, lw, s.colour, clip);
                }
            }
            for (i, p) in pix.iter().enumerate() {
                let Some(p) = p else { continue };
                let isolated = (i == 0 || pix[i - 1].is_none()) && pix.get(i + 1).is_none_or(|q| q.is_none());
                if n_ok <= MARKER_MAX_POINTS || isolated {
                    draw_disc(img, *p, 2 + lw, s.colour, clip);
                }
            }
        }
        if !any {
            let msg = "no data";
            let w = text_width(msg, ts + 1) as i32;
            let cx = plot.x + plot.w as i32 / 2 - w / 2;
            let cy = plot.y + plot.h as i32 / 2 - text_height(ts + 1) as i32 / 2;
            draw_text(img, cx, cy, msg, AXIS, ts + 1);
        }
        self.draw_legend(img, clip, ts);
        frame
    }

    /// Legend box in whichever inside corner covers the fewest already-drawn series pixels.
    fn draw_legend(&self, img: &mut RgbImage, clip: Rect, ts: u32) {
        let named: Vec<&Series> = self.series.iter().filter(|s| !s.name.is_empty()).collect();
        if named.is_empty() {
            return;
        }
        let th = text_height(ts) as i32;
        let pad = 5 * ts as i32;
        let swatch = 18 * ts as i32;
        let row_h = th + 3 * ts as i32;
        let name_w = named.iter().map(|s| text_width(&s.name, ts)).max().unwrap_or(0) as i32;
        let w = pad + swatch + pad + name_w + pad;
        let h = pad + named.len() as i32 * row_h - 3 * ts as i32 + pad;
        let inset = 6 * ts as i32;
        let (l, t) = (clip.x + inset, clip.y + inset);
        let (r, b) = (clip.x + clip.w as i32 - inset - w, clip.y + clip.h as i32 - inset - h);
        let corners = [(r, t), (l, t), (r, b), (l, b)];
        let busy = |img: &RgbImage, x: i32, y: i32| {
            let mut n = 0usize;
            for yy in y.max(0)..(y + h).min(img.height() as i32) {
                for xx in x.max(0)..(x + w).min(img.width() as i32) {
                    let p = *img.get_pixel(xx as u32, yy as u32);
                    n += usize::from(p != WHITE && p != GRID);
                }
            }
            n
        };
        let &(x, y) = corners.iter().min_by_key(|(x, y)| busy(img, *x, *y)).unwrap_or(&corners[0]);
        let bx = Rect { x, y, w: w.max(1) as u32, h: h.max(1) as u32 };
        fill_rect(img, bx, WHITE, clip);
        hline(img, x, x + w - 1, y, AXIS, clip);
        hline(img, x, x + w - 1, y + h - 1, AXIS, clip);
        vline(img, x, y, y + h - 1, AXIS, clip);
        vline(img, x + w - 1, y, y + h - 1, AXIS, clip);
        for (i, s) in named.iter().enumerate() {
            let ry = y + pad + i as i32 * row_h;
            let mid = ry + (CAP_H * ts) as i32 / 2;
            let sx = x + pad;
            let (a, b) = ((sx as f64, mid as f64), ((sx + swatch) as f64, mid as f64));
            draw_line(img, a, b, ts as i32 + 1, s.colour, clip);
            draw_text(img, sx + swatch + pad, ry, &s.name, TEXT, ts);
        }
    }
}

fn put(img: &mut RgbImage, x: i64, y: i64, c: Rgb<u8>, clip: Rect) {
    if clip.contains(x, y) && x >= 0 && y >= 0 && x < img.width() as i64 && y < img.height() as i64 {
        img.put_pixel(x as u32, y as u32, c);
    }
}

fn fill_rect(img: &mut RgbImage, r: Rect, c: Rgb<u8>, clip: Rect) {
    for y in r.y as i64..r.y as i64 + r.h as i64 {
        for x in r.x as i64..r.x as i64 + r.w as i64 {
            put(img, x, y, c, clip);
        }
    }
}

fn hline(img: &mut RgbImage, x0: i32, x1: i32, y: i32, c: Rgb<u8>, clip: Rect) {
    for x in x0.min(x1)..=x0.max(x1) {
        put(img, x as i64, y as i64, c, clip);
    }
}

fn vline(img: &mut RgbImage, x: i32, y0: i32, y1: i32, c: Rgb<u8>, clip: Rect) {
    for y in y0.min(y1)..=y0.max(y1) {
        put(img, x as i64, y as i64, c, clip);
    }
}

/// Clips the segment a-b to `r` (Liang-Barsky) so far-off points cannot make Bresenham walk
/// millions of pixels.
fn clip_segment(a: (f64, f64), b: (f64, f64), r: Rect) -> Option<((f64, f64), (f64, f64))> {
    let (x0, y0) = (r.x as f64 - 1.0, r.y as f64 - 1.0);
    let (x1, y1) = (x0 + r.w as f64 + 2.0, y0 + r.h as f64 + 2.0);
    let (dx, dy) = (b.0 - a.0, b.1 - a.1);
    let (mut t0, mut t1) = (0f64, 1f64);
    for (p, q) in [(-dx, a.0 - x0), (dx, x1 - a.0), (-dy, a.1 - y0), (dy, y1 - a.1)] {
        if p == 0.0 {
            if q < 0.0 {
                return None;
            }
        } else {
            let t = q / p;
            if p < 0.0 {
                t0 = t0.max(t);
            } else {
                t1 = t1.min(t);
            }
        }
    }
    (t0 <= t1).then_some(((a.0 + t0 * dx, a.1 + t0 * dy), (a.0 + t1 * dx, a.1 + t1 * dy)))
}

/// Bresenham line with a square brush `width` pixels wide, centred on the ideal line.
fn draw_line(img: &mut RgbImage, a: (f64, f64), b: (f64, f64), width: i32, c: Rgb<u8>, clip: Rect) {
    let Some((a, b)) = clip_segment(a, b, clip) else {
        return;
    };
    let (mut x, mut y) = (a.0.round() as i64, a.1.round() as i64);
    let (x1, y1) = (b.0.round() as i64, b.1.round() as i64);
    let (dx, dy) = ((x1 - x).abs(), -(y1 - y).abs());
    let (sx, sy) = (if x < x1 { 1 } else { -1 }, if y < y1 { 1 } else { -1 });
    let mut err = dx + dy;
    let (lo, hi) = (-(width as i64 - 1) / 2, width as i64 / 2);
    loop {
        for oy in lo..=hi {
            for ox in lo..=hi {
                put(img, x + ox, y + oy, c, clip);
            }
        }
        if x == x1 && y == y1 {
            break;
        }
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x += sx;
        }
        if e2 <= dx {
            err += dx;
            y += sy;
        }
    }
}

fn draw_disc(img: &mut RgbImage, p: (f64, f64), r: i32, c: Rgb<u8>, clip: Rect) {
    let (cx, cy) = (p.0.round() as i64, p.1.round() as i64);
    let r = r as i64;
    for dy in -r..=r {
        for dx in -r..=r {
            if dx * dx + dy * dy <= r * r + r / 2 {
                put(img, cx + dx, cy + dy, c, clip);
            }
        }
    }
}
