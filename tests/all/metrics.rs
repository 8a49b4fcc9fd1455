//! Metrics: hand-computed seg scores and empty-mask policies, pooled vs per-image, the prsmed
//! protocol against scripts/fixtures/gen_metrics.py, HD95 and the feature transform against
//! brute force, position parsing and the confusion matrix.

use std::path::PathBuf;

use prs::metrics::hd95::{boundary, feature_transform, hausdorff_percentile, hd95, hd95_batch, Hd95Summary, MaskPair};
use prs::metrics::position::{parse_position, position_from_mask, PositionConfusion, PositionLabel as L};
use prs::metrics::prsmed::{self, PrsmedImage, U8Pair, CSV_HEADER};
use prs::metrics::seg::{evaluate_batch, Confusion, EmptyPolicy, ImageScores, SegAccumulator, SegPair, Stats};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde_json::Value;

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= tol * b.abs().max(1.0)
}

fn mask(bits: &[u8]) -> Vec<bool> {
    bits.iter().map(|&b| b != 0).collect()
}

// ------------------------------------------------------------------------------------ seg

fn scores(pred: &[u8], gt: &[u8], policy: EmptyPolicy) -> ImageScores {
    ImageScores::from_confusion(&Confusion::from_masks(&mask(pred), &mask(gt)).unwrap(), policy)
}

#[test]
fn seg_hand_computed_at_threshold() {
    // pred (>= 0.5): 1 0 1 / 0 1 0 / 1 0 1 (0.5 itself counts as foreground, as MONAI)
    let prob = [0.9, 0.2, 0.6, 0.4, 0.7, 0.1, 0.5, 0.3, 0.8];
    let gt = mask(&[1, 1, 0, 0, 1, 0, 0, 0, 1]);
    let c = Confusion::from_prob(&prob, &gt, 0.5).unwrap();
    assert_eq!(c, Confusion { tp: 3, fp: 2, fn_: 1, tn: 3 });
    let s = ImageScores::from_confusion(&c, EmptyPolicy::Ignore);
    assert!(close(s.dice, 2.0 / 3.0, 1e-15) && close(s.iou, 0.5, 1e-15));
    assert!(close(s.precision, 0.6, 1e-15) && close(s.recall, 0.75, 1e-15));
    // A higher threshold drops 0.5 and 0.6: TP 3, FP 0, FN 1.
    let s = ImageScores::from_confusion(&Confusion::from_prob(&prob, &gt, 0.65).unwrap(), EmptyPolicy::One);
    assert!(close(s.dice, 6.0 / 7.0, 1e-15) && close(s.iou, 0.75, 1e-15) && s.precision == 1.0);
    assert!(Confusion::from_prob(&prob, &gt[..8], 0.5).is_err());
}

#[test]
fn seg_empty_mask_policies() {
    let z = [0u8; 4];
    let some = [0u8, 1, 1, 0];
    let full = [1u8; 4];
    for (policy, both_empty, fp_on_empty) in
        [(EmptyPolicy::Ignore, f64::NAN, f64::NAN), (EmptyPolicy::One, 1.0, 0.0), (EmptyPolicy::Zero, 0.0, 0.0)]
    {
        let s = scores(&z, &z, policy);
        assert!(s.empty_gt && s.empty_pred);
        for v in [s.dice, s.iou, s.precision, s.recall] {
            assert!(close(v, both_empty, 0.0), "{policy} both empty: {v}");
        }
        let s = scores(&some, &z, policy);
        for v in [s.dice, s.iou, s.precision, s.recall] {
            assert!(close(v, fp_on_empty, 0.0), "{policy} prediction on empty GT: {v}");
        }
        // Empty prediction, non-empty GT: 0 whatever the policy (precision 0/0 taken as 0).
        let s = scores(&z, &some, policy);
        assert!(!s.empty_gt && s.empty_pred);
        assert_eq!([s.dice, s.iou, s.precision, s.recall], [0.0; 4]);
        // Full image on both sides.
        let s = scores(&full, &full, policy);
        assert_eq!([s.dice, s.iou, s.precision, s.recall], [1.0; 4]);
        // Full prediction, half GT: Dice 2*2/(4+2), IoU 2/4.
        let s = scores(&full, &some, policy);
        assert!(close(s.dice, 2.0 / 3.0, 1e-15) && s.iou == 0.5 && s.precision == 0.5 && s.recall == 1.0);
    }
    assert_eq!("one".parse::<EmptyPolicy>().unwrap(), EmptyPolicy::One);
    assert_eq!("Ignore".parse::<EmptyPolicy>().unwrap(), EmptyPolicy::Ignore);
    assert!("maybe".parse::<EmptyPolicy>().is_err());
    assert_eq!(serde_json::to_string(&EmptyPolicy::Zero).unwrap(), "\"zero\"");
    assert_eq!(EmptyPolicy::Zero.to_string(), "zero");
}

#[test]
fn seg_summary_policy_and_pooled_vs_per_image() {
    // A: large object predicted exactly (100 px); B: 4-px object missed; C: empty GT and pred.
    let mut a_gt = vec![false; 400];
    a_gt[..100].iter_mut().for_each(|v| *v = true);
    let a_prob: Vec<f32> = a_gt.iter().map(|&g| if g { 0.9 } else { 0.1 }).collect();
    let mut b_gt = vec![false; 400];
    b_gt[200..204].iter_mut().for_each(|v| *v = true);
    let b_prob = vec![0.2f32; 400];
    let c_gt = vec![false; 400];
    let c_prob = vec![0.0f32; 400];
    let pairs = [
        SegPair { prob: &a_prob, gt: &a_gt },
        SegPair { prob: &b_prob, gt: &b_gt },
        SegPair { prob: &c_prob, gt: &c_gt },
    ];

    let (per, sum) = evaluate_batch(&pairs, 0.5, EmptyPolicy::Ignore).unwrap();
    assert_eq!(per.len(), 3);
    assert_eq!((sum.n_images, sum.n_empty_gt, sum.n_excluded), (3, 1, 1));
    assert_eq!(sum.dice.n, 2);
    assert!(close(sum.dice.mean, 0.5, 1e-15) && close(sum.iou.mean, 0.5, 1e-15));
    assert!(close(sum.dice.std, 0.5, 1e-15) && close(sum.dice.median, 0.5, 1e-15));
    // Pooled: 2*100 / (100 + 104), IoU 100 / 104: far above the per-image mean.
    assert!(close(sum.pooled_dice, 200.0 / 204.0, 1e-15));
    assert!(close(sum.pooled_iou, 100.0 / 104.0, 1e-15));
    assert_eq!(sum.pooled, Confusion { tp: 100, fp: 0, fn_: 4, tn: 1096 });

    let (_, one) = evaluate_batch(&pairs, 0.5, EmptyPolicy::One).unwrap();
    assert_eq!((one.n_excluded, one.dice.n), (0, 3));
    assert!(close(one.dice.mean, 2.0 / 3.0, 1e-15) && one.dice.median == 1.0);
    let (_, zero) = evaluate_batch(&pairs, 0.5, EmptyPolicy::Zero).unwrap();
    assert!(close(zero.dice.mean, 1.0 / 3.0, 1e-15) && zero.dice.median == 0.0);
    assert_eq!(zero.pooled_iou, sum.pooled_iou, "pooled values do not depend on the policy");

    // The streaming accumulator gives the same summary.
    let mut acc = SegAccumulator::new(EmptyPolicy::One, 0.5);
    for p in &pairs {
        acc.push_prob(p.prob, p.gt).unwrap();
    }
    let s = acc.summary();
    assert_eq!((s.dice, s.pooled), (one.dice, one.pooled));
    let json = serde_json::to_value(&s).unwrap();
    assert_eq!(json["policy"], "one");

    // All-empty dataset: pooled ratio decided by the policy.
    let (_, e) = evaluate_batch(&pairs[2..], 0.5, EmptyPolicy::Ignore).unwrap();
    assert!(e.pooled_dice.is_nan() && e.dice.n == 0 && e.dice.mean.is_nan());
    let (_, e) = evaluate_batch(&pairs[2..], 0.5, EmptyPolicy::One).unwrap();
    assert_eq!(e.pooled_iou, 1.0);
}

#[test]
fn stats_mean_std_median() {
    let s = Stats::of(&[3.0, 1.0, f64::NAN, 4.0, 2.0, f64::INFINITY]);
    assert_eq!(s.n, 4);
    assert!(close(s.mean, 2.5, 1e-15) && close(s.median, 2.5, 1e-15));
    assert!(close(s.std, 1.25f64.sqrt(), 1e-15));
    let s = Stats::of(&[5.0, 1.0, 3.0]);
    assert_eq!((s.median, s.n), (3.0, 3));
}

// ------------------------------------------------------------------------------------ prsmed

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/metrics").join(name)
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN) // null = NaN
}

fn nums(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(num).collect()
}

fn bytes(v: &Value) -> Vec<u8> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u8).collect()
}

/// Relative-or-absolute tolerance: the Rust side sums by histogram / separable filter, numpy
/// per pixel with pairwise summation, so only rounding (~1e-15) may differ.
const PRSMED_TOL: f64 = 1e-10;

#[test]
fn prsmed_matches_python_reference() {
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(fixture("prsmed.json")).unwrap()).unwrap();
    let imgs = doc["images"].as_array().unwrap();
    let data: Vec<(Vec<u8>, (usize, usize), Vec<u8>, (usize, usize))> = imgs
        .iter()
        .map(|im| {
            let hw = |h: &str, w: &str| (im[h].as_u64().unwrap() as usize, im[w].as_u64().unwrap() as usize);
            (bytes(&im["pred"]), hw("pred_h", "pred_w"), bytes(&im["gt"]), hw("gt_h", "gt_w"))
        })
        .collect();
    let pairs: Vec<U8Pair> =
        data.iter().map(|(p, phw, g, ghw)| U8Pair { pred: p, pred_hw: *phw, gt: g, gt_hw: *ghw }).collect();
    let got = prsmed::evaluate_dataset(&pairs).unwrap();

    let mut worst = 0.0f64;
    for ((im, g), (p, (ph, pw), _, (gh, gw))) in imgs.iter().zip(&got).zip(&data) {
        let name = im["name"].as_str().unwrap();
        assert_eq!(prsmed::resize_nearest_u8(p, *ph, *pw, *gh, *gw), bytes(&im["resized"]), "{name}: resize");
        let curves: [(&str, &Vec<f64>); 5] =
            [("dice", &g.dice), ("iou", &g.iou), ("sen", &g.sen), ("spe", &g.spe), ("em", &g.em)];
        for (key, ours) in curves {
            let want = nums(&im[key]);
            assert_eq!(ours.len(), 256);
            for (j, (&a, &b)) in ours.iter().zip(&want).enumerate() {
                assert!(close(a, b, PRSMED_TOL), "{name} {key}[{j}]: {a} vs {b}");
                if b.is_finite() {
                    worst = worst.max((a - b).abs() / b.abs().max(1.0));
                }
            }
        }
        for (key, a) in [("sm", g.sm), ("wfm", g.wfm), ("mae", g.mae)] {
            let b = num(&im[key]);
            assert!(close(a, b, PRSMED_TOL), "{name} {key}: {a} vs {b}");
            if b.is_finite() {
                worst = worst.max((a - b).abs() / b.abs().max(1.0));
            }
        }
    }
    eprintln!("prsmed: max relative error vs python reference {worst:.3e}");

    let header: Vec<&str> = CSV_HEADER.split(", ").skip(1).collect();
    assert_eq!(CSV_HEADER, doc["csv_header"].as_str().unwrap());
    let check = |summary: &prsmed::PrsmedSummary, want: &Value| {
        for (k, v) in header.iter().zip(summary.values()) {
            assert!(close(v, num(&want[*k]), PRSMED_TOL), "{k}: {v} vs {}", want[*k]);
        }
    };
    // All images: NaN where the authors' code gives NaN (empty GT wFm, full GT Spe, row-0 Sm).
    let all = prsmed::summarize(&got);
    check(&all, &doc["aggregate_all"]);
    assert!(all.wFm.is_nan() && all.Sm.is_nan() && all.meanSpe.is_nan() && all.maxSpe.is_nan());
    let regular: Vec<PrsmedImage> =
        doc["regular"].as_array().unwrap().iter().map(|i| got[i.as_u64().unwrap() as usize].clone()).collect();
    let reg = prsmed::summarize(&regular);
    check(&reg, &doc["aggregate_regular"]);
    assert_eq!(reg.csv_row("fixture"), doc["csv_row_regular"].as_str().unwrap());
    assert!(all.csv_row("x").contains(",nan,"));
}

#[test]
fn prsmed_thresholds_resize_and_hand_cases() {
    let t = prsmed::thresholds();
    assert_eq!((t[0], t[255]), (1.0, 0.0));
    assert!(t.windows(2).all(|w| w[0] > w[1]));
    let cut = prsmed::threshold_cut();
    assert_eq!((cut[0], cut[255]), (255, 0));
    assert!(cut.windows(2).all(|w| w[0] >= w[1]));

    // cv2 nearest: 2 -> 4 repeats, 3 -> 2 picks floor(x * 1.5) = 0, 1.
    assert_eq!(prsmed::resize_nearest_u8(&[1, 2, 3, 4], 2, 2, 4, 4)[..4], [1, 1, 2, 2]);
    assert_eq!(prsmed::resize_nearest_u8(&[1, 2, 3], 1, 3, 1, 2), [1, 2]);
    assert_eq!(prsmed::binarize_gt_u8(&[0, 127, 128, 255]), [false, false, true, true]);

    // Both empty: Dice/IoU/Sen/Spe 0 at every threshold (their I = 0 rule), Sm = 1, wFm NaN,
    // E-measure N/(N-1) while nothing is predicted and 0 at t = 0 (everything predicted).
    let g = prsmed::evaluate_image(&[0; 6], &[false; 6], 2, 3).unwrap();
    assert!(g.dice.iter().chain(&g.iou).chain(&g.sen).chain(&g.spe).all(|&v| v == 0.0));
    assert_eq!((g.sm, g.mae), (1.0, 0.0));
    assert!(g.wfm.is_nan());
    assert!(close(g.em[0], 6.0 / 5.0, 1e-15) && g.em[255] == 0.0);

    // Perfect binary prediction: Dice 1 until t = 0 where everything is foreground: 2*2/(2+6).
    let gt = [true, true, false, false, false, false];
    let pred: Vec<u8> = gt.iter().map(|&g| if g { 255 } else { 0 }).collect();
    let g = prsmed::evaluate_image(&pred, &gt, 2, 3).unwrap();
    assert!(g.dice[..255].iter().all(|&d| d == 1.0) && close(g.dice[255], 0.5, 1e-15));
    assert!(close(g.iou[255], 1.0 / 3.0, 1e-15) && g.spe[255] == 0.0 && g.spe[0] == 1.0);
    assert_eq!(g.mae, 0.0);
    assert!(close(g.wfm, 1.0, 1e-12), "wFm of a perfect map {}", g.wfm);
}

// ------------------------------------------------------------------------------------ hd95

fn random_mask(rng: &mut StdRng, h: usize, w: usize) -> Vec<bool> {
    let p = [0.05, 0.2, 0.5, 0.8][rng.gen_range(0..4)];
    (0..h * w).map(|_| rng.gen_bool(p)).collect()
}

/// Independent boundary: a foreground pixel with any 4-neighbour off-image or background.
fn brute_boundary(m: &[bool], h: usize, w: usize) -> Vec<(usize, usize)> {
    let at =
        |r: isize, c: isize| r >= 0 && c >= 0 && (r as usize) < h && (c as usize) < w && m[r as usize * w + c as usize];
    let mut out = Vec::new();
    for r in 0..h as isize {
        for c in 0..w as isize {
            if at(r, c) && !(at(r - 1, c) && at(r + 1, c) && at(r, c - 1) && at(r, c + 1)) {
                out.push((r as usize, c as usize));
            }
        }
    }
    out
}

fn brute_hd(pred: &[bool], gt: &[bool], h: usize, w: usize, sp: [f64; 2], q: f64) -> f64 {
    let (bp, bg) = (brute_boundary(pred, h, w), brute_boundary(gt, h, w));
    if bp.is_empty() && bg.is_empty() {
        return f64::NAN;
    }
    if bp.is_empty() || bg.is_empty() {
        return f64::INFINITY;
    }
    let directed = |from: &[(usize, usize)], to: &[(usize, usize)]| {
        let mut d: Vec<f64> = from
            .iter()
            .map(|&(r, c)| {
                to.iter()
                    .map(|&(r2, c2)| {
                        let (dy, dx) = ((r as f64 - r2 as f64) * sp[0], (c as f64 - c2 as f64) * sp[1]);
                        (dy * dy + dx * dx).sqrt()
                    })
                    .fold(f64::INFINITY, f64::min)
            })
            .collect();
        d.sort_by(f64::total_cmp);
        let pos = q / 100.0 * (d.len() - 1) as f64;
        let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
        d[lo] + (d[hi] - d[lo]) * (pos - lo as f64)
    };
    directed(&bp, &bg).max(directed(&bg, &bp))
}

#[test]
fn hd95_matches_brute_force() {
    let mut rng = StdRng::seed_from_u64(7);
    let mut worst = 0.0f64;
    let mut cases = 0;
    for it in 0..300 {
        let (h, w) = (rng.gen_range(1..14), rng.gen_range(1..16));
        let (p, g) = (random_mask(&mut rng, h, w), random_mask(&mut rng, h, w));
        let sp = if it % 2 == 0 { [1.0, 1.0] } else { [0.5, 2.0] };
        for q in [95.0, 100.0, 50.0] {
            let got = hausdorff_percentile(&p, &g, h, w, Some(sp), q);
            let want = brute_hd(&p, &g, h, w, sp, q);
            assert!(close(got, want, 1e-12), "{h}x{w} q{q}: {got} vs {want}");
            if want.is_finite() {
                worst = worst.max((got - want).abs());
                cases += 1;
            }
        }
        let b = boundary(&p, h, w);
        let bb = brute_boundary(&p, h, w);
        assert_eq!(b.iter().filter(|&&x| x).count(), bb.len());
        assert!(bb.iter().all(|&(r, c)| b[r * w + c]));
    }
    assert!(cases > 500);
    eprintln!("hd95: {cases} finite cases, max abs error {worst:.3e}");
}

#[test]
fn feature_transform_matches_brute_force_with_scipy_ties() {
    let mut rng = StdRng::seed_from_u64(11);
    for _ in 0..200 {
        let (h, w) = (rng.gen_range(1..18), rng.gen_range(1..18));
        let sites = random_mask(&mut rng, h, w);
        let ft = feature_transform(&sites, h, w, [1.0, 1.0]);
        let list: Vec<(usize, usize)> = (0..h * w).filter(|&i| sites[i]).map(|i| (i / w, i % w)).collect();
        for i in 0..h * w {
            let (r, c) = (i / w, i % w);
            // min over (d², column, row): scipy's tie rule
            let best = list
                .iter()
                .map(|&(r2, c2)| {
                    let d2 = (r as i64 - r2 as i64).pow(2) + (c as i64 - c2 as i64).pow(2);
                    (d2, c2, r2)
                })
                .min();
            match best {
                None => assert!(ft.dist_sq[i].is_infinite() && ft.nearest[i] == u32::MAX),
                Some((d2, c2, r2)) => {
                    assert_eq!(ft.dist_sq[i], d2 as f64, "{h}x{w} pixel {r},{c}");
                    assert_eq!(ft.nearest[i] as usize, r2 * w + c2, "{h}x{w} pixel {r},{c}: tie rule");
                }
            }
        }
    }
}

#[test]
fn hd95_conventions_and_batch() {
    let (h, w) = (8, 8);
    let empty = vec![false; 64];
    let mut a = vec![false; 64];
    a[0] = true; // (0,0)
    let mut b = vec![false; 64];
    b[3 * 8 + 4] = true; // (3,4): distance 5
    assert!(hd95(&empty, &empty, h, w, None).is_nan(), "both empty -> NaN (MONAI)");
    assert_eq!(hd95(&a, &empty, h, w, None), f64::INFINITY);
    assert_eq!(hd95(&empty, &a, h, w, None), f64::INFINITY);
    assert_eq!(hd95(&a, &a, h, w, None), 0.0);
    assert_eq!(hd95(&a, &b, h, w, None), 5.0);
    assert_eq!(hd95(&a, &b, h, w, Some([2.0, 0.5])), (36.0f64 + 4.0).sqrt());
    // Filled square vs the same square shifted right by 2: every boundary distance is <= 2.
    let sq =
        |c0: usize| (0..64).map(|i| (2..6).contains(&(i / 8)) && (c0..c0 + 4).contains(&(i % 8))).collect::<Vec<_>>();
    let (s0, s2) = (sq(1), sq(3));
    assert_eq!(hd95(&s0, &s2, h, w, None), 2.0);

    let pairs = [
        MaskPair { pred: &a, gt: &b, h, w, spacing: None },
        MaskPair { pred: &s0, gt: &s2, h, w, spacing: None },
        MaskPair { pred: &empty, gt: &empty, h, w, spacing: None },
        MaskPair { pred: &a, gt: &empty, h, w, spacing: None },
    ];
    let v = hd95_batch(&pairs);
    assert_eq!(v[..2], [5.0, 2.0]);
    let s = Hd95Summary::of(&v);
    assert_eq!((s.stats.n, s.n_both_empty, s.n_one_empty), (2, 1, 1));
    assert_eq!(s.stats.mean, 3.5);
}

// ------------------------------------------------------------------------------------ position

#[test]
fn position_parser_variants() {
    let cases: &[(&str, L)] = &[
        ("The tumor is located at the top left of the image.", L::TopLeft),
        ("top-left", L::TopLeft),
        ("Upper left.", L::TopLeft),
        ("It lies in the LEFT UPPER region", L::TopLeft),
        ("in the upper-left quadrant", L::TopLeft),
        ("top right", L::TopRight),
        ("The lesion appears in the upper right area", L::TopRight),
        ("right-upper quadrant", L::TopRight),
        ("bottom left", L::BottomLeft),
        ("It is in the lower left part.", L::BottomLeft),
        ("left lower", L::BottomLeft),
        ("lower right", L::BottomRight),
        ("At the bottom right corner", L::BottomRight),
        ("right lower", L::BottomRight),
        ("Bottom-Right!", L::BottomRight),
        ("The polyp is near the center of the image.", L::Center),
        ("central", L::Center),
        ("in the centre", L::Center),
        ("It is in the middle.", L::Center),
        ("The mass is located at the top left, near the center.", L::TopLeft),
        ("The lesion is in the upper part of the image, on the left side.", L::TopLeft),
        ("No lesion.", L::None),
        ("There is no visible tumor.", L::None),
        ("none", L::None),
        ("The tumor was not detected.", L::None),
        ("The image looks normal.", L::None),
        ("on the left side", L::None),
        ("", L::None),
    ];
    for (text, want) in cases {
        assert_eq!(parse_position(text), *want, "{text:?}");
    }
}

#[test]
fn position_confusion_and_mask_rule() {
    let mut cm = PositionConfusion::new();
    let pairs = [
        (L::TopLeft, L::TopLeft),
        (L::TopLeft, L::Center),
        (L::Center, L::Center),
        (L::BottomRight, L::None),
        (L::BottomRight, L::BottomRight),
    ];
    for (t, p) in pairs {
        cm.add(t, p);
    }
    assert_eq!(
        cm.add_texts("The tumour is at the bottom right.", "lower right corner"),
        (L::BottomRight, L::BottomRight)
    );
    assert_eq!((cm.total(), cm.correct()), (6, 4));
    assert!(close(cm.accuracy(), 4.0 / 6.0, 1e-15));
    let per = cm.per_label();
    let tl = &per[L::TopLeft.index()];
    assert_eq!((tl.support, tl.predicted, tl.correct), (2, 1, 1));
    assert_eq!((tl.recall, tl.precision), (0.5, 1.0));
    let c = &per[L::Center.index()];
    assert_eq!((c.support, c.predicted, c.correct, c.precision), (1, 2, 1, 0.5));
    let br = &per[L::BottomRight.index()];
    assert!(close(br.recall, 2.0 / 3.0, 1e-15) && br.precision == 1.0);
    assert!(per[L::TopRight.index()].recall.is_nan());
    let mut merged = PositionConfusion::new();
    merged.merge(&cm);
    merged.merge(&cm);
    assert_eq!((merged.total(), merged.accuracy()), (12, cm.accuracy()));
    let json = serde_json::to_value(cm.report()).unwrap();
    assert_eq!(json["total"], 6);
    assert_eq!(json["labels"][1]["label"], "top_left");
    let back: PositionConfusion = serde_json::from_str(&serde_json::to_string(&cm).unwrap()).unwrap();
    assert_eq!(back, cm);

    // Dataset mask rule: box containing (w/2, h/2) -> center, else quadrant of the box centre.
    let (h, w) = (10, 10);
    let boxed = |r0: usize, r1: usize, c0: usize, c1: usize| {
        (0..h * w).map(|i| (r0..=r1).contains(&(i / w)) && (c0..=c1).contains(&(i % w))).collect::<Vec<_>>()
    };
    assert_eq!(position_from_mask(&boxed(4, 6, 3, 5), h, w).0, L::Center);
    assert_eq!(position_from_mask(&boxed(0, 1, 0, 1), h, w), (L::TopLeft, false));
    assert_eq!(position_from_mask(&boxed(0, 2, 7, 9), h, w).0, L::TopRight);
    assert_eq!(position_from_mask(&boxed(6, 7, 0, 3), h, w).0, L::BottomLeft);
    assert_eq!(position_from_mask(&boxed(6, 7, 6, 7), h, w), (L::BottomRight, true));
    assert_eq!(position_from_mask(&[false; 100], h, w).0, L::None);
}

#[test]
fn dataset_positions_map_onto_answer_labels() {
    use prs::data::position::{position_and_nearness, Position};
    // Every dataset position is the answer label its words parse to, under the same name.
    for p in Position::ALL {
        let label = L::from(p);
        assert_eq!(label.as_str(), p.label());
        assert_eq!(parse_position(&format!("The lesion is at the {p} of the image.")), label);
    }
    // The boolean-mask and image forms of the position rule agree on random boxes,
    // nearness flag included (one implementation behind both).
    let mut rng = StdRng::seed_from_u64(7);
    let (h, w) = (23, 31);
    for _ in 0..200 {
        let (r0, c0) = (rng.gen_range(0..h), rng.gen_range(0..w));
        let (r1, c1) = (rng.gen_range(r0..h), rng.gen_range(c0..w));
        let mask: Vec<bool> =
            (0..h * w).map(|i| (r0..=r1).contains(&(i / w)) && (c0..=c1).contains(&(i % w))).collect();
        let img = image::GrayImage::from_fn(w as u32, h as u32, |x, y| {
            image::Luma([if mask[y as usize * w + x as usize] { 255 } else { 0 }])
        });
        let (p, near) = position_and_nearness(&img).unwrap();
        assert_eq!(position_from_mask(&mask, h, w), (L::from(p), near));
    }
}

#[test]
fn prsmed_load_gray_u8() {
    let dir = tempfile::tempdir().unwrap();
    let grey: Vec<u8> = (0..12).map(|i| (i * 20) as u8).collect();
    let p1 = dir.path().join("grey.png");
    image::GrayImage::from_raw(4, 3, grey.clone()).unwrap().save(&p1).unwrap();
    assert_eq!(prsmed::load_gray_u8(&p1).unwrap(), (grey.clone(), 3, 4));
    // An RGB mask with equal channels reads back exactly.
    let rgb: Vec<u8> = grey.iter().flat_map(|&v| [v, v, v]).collect();
    let p2 = dir.path().join("rgb.png");
    image::RgbImage::from_raw(4, 3, rgb).unwrap().save(&p2).unwrap();
    assert_eq!(prsmed::load_gray_u8(&p2).unwrap(), (grey, 3, 4));
    assert!(prsmed::load_gray_u8(&dir.path().join("missing.png")).is_err());
}
