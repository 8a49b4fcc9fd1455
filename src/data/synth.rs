//! A synthetic dataset in the authors' exact layout, for smoke tests and pipeline checks:
//! three modality folders (grey PNG brain CT, grey PNG chest X-ray, RGB JPEG skin with
//! `ISIC_xxx_Segmentation.png` masks), one or two irregular blobs per image over textured,
//! graded backgrounds, binary masks, and CSVs whose answers and `position` sentences name the
//! position by the rule of [`position_of_mask`]. Target positions cycle through the five
//! labels, so every modality and split is balanced to within one sample.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use image::codecs::jpeg::JpegEncoder;
use image::{GrayImage, RgbImage};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use rayon::prelude::*;

use super::dataset::{position_and_nearness, Position, Split};
use crate::hash::mix64;

#[derive(Clone, Debug)]
pub struct SynthConfig {
    /// Images per modality in each split.
    pub train: usize,
    pub val: usize,
    pub test: usize,
    /// Side of the square images, in pixels (at least 32).
    pub size: u32,
    pub seed: u64,
}

impl Default for SynthConfig {
    fn default() -> Self {
        Self { train: 40, val: 10, test: 10, size: 128, seed: 0 }
    }
}

#[derive(Clone, Debug)]
pub struct SynthSummary {
    pub out: PathBuf,
    pub rows: usize,
    /// Rows per position, in [`Position::ALL`] order.
    pub per_position: [usize; 5],
}

#[derive(Clone, Copy)]
enum Look {
    BrainCt,
    ChestXray,
    Skin,
}

struct Modality {
    folder: &'static str,
    look: Look,
    lesion: &'static str,
    scan: &'static str,
}

const MODALITIES: [Modality; 3] = [
    Modality { folder: "brain_tumors_ct_scan", look: Look::BrainCt, lesion: "tumor", scan: "brain CT scan" },
    Modality { folder: "lung_Xray", look: Look::ChestXray, lesion: "opacity", scan: "chest X-ray" },
    Modality { folder: "skin_rgbimage", look: Look::Skin, lesion: "skin lesion", scan: "dermoscopy image" },
];

const QUESTIONS: [&str; 6] = [
    "Where is the {lesion} located in this {scan}?",
    "Can you segment the {lesion} in this {scan} and describe its position?",
    "Please identify the {lesion} and tell me where it is.",
    "In which part of the image does the {lesion} appear?",
    "Segment the {lesion}. Where is it?",
    "What is the location of the abnormal region in this {scan}?",
];
const ANSWERS_FAR: [&str; 4] = [
    "The {lesion} is located at the {pos} of the image.",
    "The {lesion} appears in the {pos} region of the {scan}.",
    "It lies in the {pos} area of the image.",
    "A {lesion} can be seen at the {pos}.",
];
const ANSWERS_NEAR: [&str; 3] = [
    "The {lesion} is at the {pos}, near the center of the image.",
    "It appears in the {pos} area, close to the center.",
    "The {lesion} lies toward the {pos}, near the center.",
];
const ANSWERS_CENTER: [&str; 3] = [
    "The {lesion} is located at the center of the image.",
    "It lies in the center of the {scan}.",
    "A {lesion} can be seen around the center.",
];

fn fill(t: &str, m: &Modality, pos: Position) -> String {
    t.replace("{lesion}", m.lesion).replace("{scan}", m.scan).replace("{pos}", pos.label())
}

/// Writes the dataset into `out` (through `out.tmp`, renamed at the end, so an interrupted
/// run never leaves something that looks like a dataset). `force` replaces an existing `out`.
pub fn generate(out: &Path, cfg: &SynthConfig, force: bool) -> Result<SynthSummary> {
    if cfg.size < 32 {
        bail!("--size must be at least 32 pixels, got {}", cfg.size);
    }
    if out.exists() && !force {
        bail!("{} exists; pass --force to replace it", out.display());
    }
    let name = out.file_name().with_context(|| format!("{} has no folder name", out.display()))?;
    let tmp = out.with_file_name(format!("{}.tmp", name.to_string_lossy()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing stale {}", tmp.display()))?;
    }
    let splits = [(Split::Train, cfg.train), (Split::Val, cfg.val), (Split::Test, cfg.test)];
    for m in &MODALITIES {
        for (s, _) in &splits {
            for kind in ["images", "masks"] {
                let d = tmp.join(m.folder).join(format!("{s}_{kind}"));
                std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
            }
        }
    }
    std::fs::create_dir_all(tmp.join("annotations"))?;

    let jobs: Vec<(usize, usize, Split, usize)> = (0..MODALITIES.len())
        .flat_map(|m| splits.iter().enumerate().flat_map(move |(si, &(s, n))| (0..n).map(move |i| (m, si, s, i))))
        .collect();
    let records: Vec<[String; 6]> = jobs
        .par_iter()
        .map(|&(m, si, split, i)| {
            let sample_seed = mix64(cfg.seed ^ mix64(((m as u64) << 40) | ((si as u64) << 32) | i as u64));
            write_sample(&tmp, &MODALITIES[m], split, i, (i + m) % 5, cfg.size, sample_seed)
        })
        .collect::<Result<_>>()?;

    let mut per_position = [0usize; 5];
    for (mi, m) in MODALITIES.iter().enumerate() {
        let csv_path = tmp.join("annotations").join(format!("{}.csv", m.folder));
        let mut w = csv::Writer::from_path(&csv_path).with_context(|| format!("creating {}", csv_path.display()))?;
        w.write_record(["image_path", "image_name", "question", "answer", "position", "split"])?;
        for (_, rec) in jobs.iter().zip(&records).filter(|(j, _)| j.0 == mi) {
            per_position[Position::parse(&rec[4]).expect("generated sentence names a position").index()] += 1;
            w.write_record(rec)?;
        }
        w.flush()?;
    }
    if out.exists() {
        std::fs::remove_dir_all(out).with_context(|| format!("removing {}", out.display()))?;
    }
    std::fs::rename(&tmp, out).with_context(|| format!("renaming {} to {}", tmp.display(), out.display()))?;
    Ok(SynthSummary { out: out.to_owned(), rows: records.len(), per_position })
}

/// One irregular blob: a rotated ellipse whose radius wobbles with two harmonics.
struct Blob {
    cx: f32,
    cy: f32,
    rx: f32,
    ry: f32,
    angle: f32,
    wobble: [(f32, f32, f32); 2],
}

impl Blob {
    /// Radius bound over all angles, for placement.
    fn reach(&self) -> f32 {
        self.rx.max(self.ry) * (1.0 + self.wobble.iter().map(|w| w.0).sum::<f32>())
    }

    /// Signed inside-ness at a pixel centre: > 0 inside, in units of the normalised radius.
    fn inside(&self, x: f32, y: f32) -> f32 {
        let (s, c) = self.angle.sin_cos();
        let (dx, dy) = (x - self.cx, y - self.cy);
        let (u, v) = ((c * dx + s * dy) / self.rx, (-s * dx + c * dy) / self.ry);
        let theta = v.atan2(u);
        let edge = 1.0 + self.wobble.iter().map(|(a, k, ph)| a * (k * theta + ph).sin()).sum::<f32>();
        edge - (u * u + v * v).sqrt()
    }
}

// 6.28 below is a range bound of the random draws, not 2 pi: kept so the generated data stays
// the same.
#[allow(clippy::approx_constant)]
fn random_blob(rng: &mut StdRng, max_reach: f32) -> Blob {
    let r_hi = (max_reach / 1.3).max(2.0);
    let rx = rng.gen_range((0.35 * r_hi).max(1.5)..=r_hi);
    let ry = (rx * rng.gen_range(0.55..1.0f32)).max(1.5);
    let wobble = [
        (rng.gen_range(0.0..0.15), rng.gen_range(2..5) as f32, rng.gen_range(0.0..6.28)),
        (rng.gen_range(0.0..0.08), rng.gen_range(5..9) as f32, rng.gen_range(0.0..6.28)),
    ];
    Blob { cx: 0.0, cy: 0.0, rx, ry, angle: rng.gen_range(0.0..std::f32::consts::PI), wobble }
}

/// Gap between a quadrant lesion's box and the centre lines, as a fraction of the image size.
const QUADRANT_GAP: f32 = 0.08;

/// Blobs whose union box obeys the position rule for `target` (checked by the caller).
fn place_blobs(rng: &mut StdRng, size: u32, target: Position) -> Vec<Blob> {
    let s = size as f32;
    let half = (size / 2) as f32;
    let n = if rng.gen_bool(0.3) { 2 } else { 1 };
    let mut blobs = Vec::with_capacity(n);
    for k in 0..n {
        if target == Position::Center && k == 0 {
            // The first blob covers the centre pixel: offset below its smallest inner radius.
            let mut b = random_blob(rng, 0.22 * s);
            let r_in = b.rx.min(b.ry) * (1.0 - b.wobble.iter().map(|w| w.0).sum::<f32>());
            let off = 0.6 * r_in;
            b.cx = half + 0.5 + rng.gen_range(-off..=off);
            b.cy = half + 0.5 + rng.gen_range(-off..=off);
            blobs.push(b);
            continue;
        }
        // Quadrant boxes keep a gap off the centre lines, so the union never reaches the centre
        // and no label hinges on a few pixels: at CLIP's patch grid (8x8 in the tiny model, 24x24
        // in the 7B) a box 2 px from the centre and one covering it look the same.
        let gap = (QUADRANT_GAP * s).max(2.0);
        let (x_lo, x_hi, y_lo, y_hi) = match target {
            Position::TopLeft => (1.0, half - gap, 1.0, half - gap),
            Position::TopRight => (half + gap, s - 1.0, 1.0, half - gap),
            Position::BottomLeft => (1.0, half - gap, half + gap, s - 1.0),
            Position::BottomRight => (half + gap, s - 1.0, half + gap, s - 1.0),
            Position::Center => (1.0, s - 1.0, 1.0, s - 1.0),
        };
        let room = ((x_hi - x_lo).min(y_hi - y_lo) / 2.0).min(0.2 * s);
        let mut b = random_blob(rng, room);
        let r = b.reach();
        b.cx = rng.gen_range(x_lo + r..=(x_hi - r).max(x_lo + r));
        b.cy = rng.gen_range(y_lo + r..=(y_hi - r).max(y_lo + r));
        blobs.push(b);
    }
    blobs
}

/// Low-frequency texture: a sum of three random plane waves, about in [-1, 1].
#[allow(clippy::approx_constant)]
fn texture(rng: &mut StdRng, s: f32) -> impl Fn(f32, f32) -> f32 {
    let waves: Vec<(f32, f32, f32)> = (0..3)
        .map(|_| {
            let (a, f) = (rng.gen_range(0.0..6.28f32), rng.gen_range(1.5..6.0f32) / s * 6.28);
            (f * a.cos(), f * a.sin(), rng.gen_range(0.0..6.28))
        })
        .collect();
    move |x, y| waves.iter().map(|(kx, ky, ph)| (kx * x + ky * y + ph).sin()).sum::<f32>() / 3.0
}

fn write_sample(
    root: &Path,
    m: &Modality,
    split: Split,
    i: usize,
    target_index: usize,
    size: u32,
    seed: u64,
) -> Result<[String; 6]> {
    let mut rng = StdRng::seed_from_u64(seed);
    let target = Position::ALL[target_index];
    let n = size as usize;
    let s = size as f32;
    // Rasterise; retry the (rare) draw whose pixels miss the target label.
    let (blobs, mask, near) = (0..50)
        .find_map(|_| {
            let blobs = place_blobs(&mut rng, size, target);
            let mut mask = GrayImage::new(size, size);
            for (idx, px) in mask.as_mut().iter_mut().enumerate() {
                let (x, y) = ((idx % n) as f32 + 0.5, (idx / n) as f32 + 0.5);
                if blobs.iter().any(|b| b.inside(x, y) > 0.0) {
                    *px = 255;
                }
            }
            match position_and_nearness(&mask) {
                Some((p, near)) if p == target => Some((blobs, mask, near)),
                _ => None,
            }
        })
        .with_context(|| format!("could not place a {target} blob in a {size}px image"))?;

    let tex = texture(&mut rng, s);
    let noise = Normal::new(0.0f32, rng.gen_range(3.0..9.0)).expect("valid sigma");
    // Clearly visible lesions: with fainter ones (0.5-1.2, one in five darker than its
    // surroundings) the tiny model's frozen random CLIP features did not tell where they were
    // (position accuracy 0.25 against 0.38; BENCHMARKS.md, tiny-model tuning).
    let contrast = rng.gen_range(1.2..1.6f32);
    let (gx, gy) = (rng.gen_range(-0.5..0.5f32), rng.gen_range(-0.5..0.5f32));
    let brightness = rng.gen_range(-20.0..20.0f32);
    let lesion_tex = texture(&mut rng, s / 3.0);
    // Lesion opacity: 1 well inside, 0.5 on the mask edge, fading over a few pixels outside.
    let alpha = |x: f32, y: f32| {
        let d = blobs.iter().map(|b| b.inside(x, y)).fold(f32::MIN, f32::max);
        (d * 6.0 + 0.5).clamp(0.0, 1.0)
    };
    let (image_file, mask_file) = match m.look {
        Look::Skin => {
            let id = format!("ISIC_{:07}", 1_000_000 * (split as usize + 1) + i);
            (format!("{id}.jpg"), format!("{id}_Segmentation.png"))
        }
        _ => (format!("{i}.png"), format!("{i}.png")),
    };
    let image_path = root.join(m.folder).join(format!("{split}_images")).join(&image_file);
    let mask_rel = format!("{}/{split}_masks/{mask_file}", m.folder);
    match m.look {
        Look::Skin => {
            let base = [rng.gen_range(190.0..235.0f32), rng.gen_range(140.0..185.0), rng.gen_range(110.0..160.0)];
            let spot = [rng.gen_range(70.0..140.0f32), rng.gen_range(40.0..90.0), rng.gen_range(25.0..70.0)];
            let mut img = RgbImage::new(size, size);
            for (idx, px) in img.pixels_mut().enumerate() {
                let (x, y) = ((idx % n) as f32 + 0.5, (idx / n) as f32 + 0.5);
                let shade = brightness + 25.0 * (gx * (x / s - 0.5) + gy * (y / s - 0.5)) + 8.0 * tex(x, y);
                let a = alpha(x, y) * contrast.min(1.0);
                let t = 15.0 * lesion_tex(x, y);
                for c in 0..3 {
                    let v = (1.0 - a) * base[c] + a * (spot[c] + t) + shade + noise.sample(&mut rng);
                    px.0[c] = v.clamp(0.0, 255.0) as u8;
                }
            }
            let file =
                std::fs::File::create(&image_path).with_context(|| format!("creating {}", image_path.display()))?;
            JpegEncoder::new_with_quality(std::io::BufWriter::new(file), 92)
                .encode_image(&img)
                .with_context(|| format!("writing {}", image_path.display()))?;
        }
        look => {
            let mut img = GrayImage::new(size, size);
            for (idx, px) in img.as_mut().iter_mut().enumerate() {
                let (x, y) = ((idx % n) as f32 + 0.5, (idx / n) as f32 + 0.5);
                let (u, v) = (x / s - 0.5, y / s - 0.5);
                let body = match look {
                    // Head: bright skull ring around a mid-grey brain on a dark field.
                    Look::BrainCt => {
                        let r = ((u / 0.46).powi(2) + (v / 0.48).powi(2)).sqrt();
                        if r > 1.0 {
                            15.0
                        } else if r > 0.9 {
                            210.0
                        } else {
                            95.0
                        }
                    }
                    // Chest: bright mediastinum and soft tissue, two darker lung fields.
                    _ => {
                        let lung = |cx: f32| ((u - cx) / 0.2).powi(2) + (v / 0.36).powi(2) < 1.0;
                        let base = 150.0 + 60.0 * v;
                        if lung(-0.22) || lung(0.22) {
                            base - 70.0
                        } else {
                            base
                        }
                    }
                };
                // Hyperdense / opaque: brighter than the tissue around it.
                let lesion = alpha(x, y) * 70.0 * contrast * (1.0 + 0.3 * lesion_tex(x, y));
                let v =
                    body + brightness + 40.0 * (gx * u + gy * v) + 10.0 * tex(x, y) + lesion + noise.sample(&mut rng);
                *px = v.clamp(0.0, 255.0) as u8;
            }
            img.save(&image_path).with_context(|| format!("writing {}", image_path.display()))?;
        }
    }
    let mask_path = root.join(&mask_rel);
    mask.save(&mask_path).with_context(|| format!("writing {}", mask_path.display()))?;

    let pick = |rng: &mut StdRng, list: &[&str]| list[rng.gen_range(0..list.len())].to_owned();
    let question = fill(&pick(&mut rng, &QUESTIONS), m, target);
    let answers: &[&str] = match (target, near) {
        (Position::Center, _) => &ANSWERS_CENTER,
        (_, true) => &ANSWERS_NEAR,
        _ => &ANSWERS_FAR,
    };
    let answer = fill(&pick(&mut rng, answers), m, target);
    let position = match (target, near) {
        (Position::Center, _) => format!("The {} is located at the center of the image.", m.lesion),
        (p, true) => format!("The {} is located at the {p} of the image, near the center.", m.lesion),
        (p, false) => format!("The {} is located at the {p} of the image.", m.lesion),
    };
    Ok([mask_rel, mask_file, question, answer, position, split.to_string()])
}
