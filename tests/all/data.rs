//! Data side: synthetic dataset round trip, validation of every problem at once, hold-out
//! split, batch plans and the prefetching loader, position parsing.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, Result};
use image::{GrayImage, Luma, Rgb, RgbImage};
use prs::data::dataset::{
    image_candidates, load_mask, modality_class, position_of_mask, read_rows, DatasetOptions, Position, Row, Split,
    ValidationError,
};
use prs::data::loader::{BatchPlan, Loader, LoaderOptions, PlanConfig};
use prs::data::prepare::{check_rows, prepare, train_val, PrepareOptions, ValSource};
use prs::data::synth::{generate, SynthConfig};

fn synth(dir: &Path, seed: u64) -> PathBuf {
    let out = dir.join("ds");
    let cfg = SynthConfig { train: 10, val: 5, test: 5, size: 64, seed };
    generate(&out, &cfg, false).unwrap();
    out
}

#[test]
fn synth_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let root = synth(tmp.path(), 3);
    assert!(!tmp.path().join("ds.tmp").exists(), "temporary folder left behind");

    let read = read_rows(&root, &DatasetOptions::default()).unwrap();
    assert!(read.problems.is_empty(), "{:?}", read.problems);
    assert_eq!(read.rows.len(), 3 * 20);
    let checked = check_rows(read.rows.clone(), vec![], false).unwrap();
    assert_eq!(checked.rows.len(), 60);
    assert!(checked.warnings.is_empty(), "{:?}", checked.warnings);

    let mut seen = HashSet::new();
    for split in [Split::Train, Split::Val, Split::Test] {
        let rows: Vec<&Row> = read.rows.iter().filter(|r| r.split == split).collect();
        assert_eq!(rows.len(), 3 * if split == Split::Train { 10 } else { 5 });
        let mut per_pos = [0usize; 5];
        for r in rows {
            let mask = load_mask(&r.mask).unwrap();
            let p = position_of_mask(&mask).expect("synthetic masks are not empty");
            assert_eq!(r.position, Some(p), "{}", r.location());
            assert_eq!(Position::parse(&r.answer), Some(p), "answer {:?}", r.answer);
            assert!(!r.question.is_empty());
            per_pos[p.index()] += 1;
            seen.insert((r.modality.clone(), r.class_id));
            let img = prs::data::preprocess::decode_image(&r.image).unwrap();
            assert_eq!((img.width(), img.height()), mask.dimensions());
            if r.modality == "skin_rgbimage" {
                let m = r.mask.file_name().unwrap().to_string_lossy().into_owned();
                let i = r.image.file_name().unwrap().to_string_lossy().into_owned();
                assert!(m.ends_with("_Segmentation.png"), "{m}");
                assert_eq!(i, m.replace("_Segmentation.png", ".jpg"));
                assert!(r.image.to_string_lossy().contains(&format!("{split}_images")));
                assert_eq!(img.color().channel_count(), 3);
            } else {
                assert_eq!(img.color().channel_count(), 1);
                assert_eq!(r.image.file_name(), r.mask.file_name());
            }
        }
        // Balanced: per modality the five labels differ by at most one, so overall by three.
        let (lo, hi) = (per_pos.iter().min().unwrap(), per_pos.iter().max().unwrap());
        assert!(*lo > 0 && hi - lo <= 3, "{split}: {per_pos:?}");
    }
    let expect: HashSet<_> =
        [("brain_tumors_ct_scan", 0), ("lung_Xray", 3), ("skin_rgbimage", 4)].map(|(m, c)| (m.to_string(), c)).into();
    assert_eq!(seen, expect);

    // Deterministic by seed: same bytes again, different bytes for another seed.
    let again = tempfile::tempdir().unwrap();
    let root2 = synth(again.path(), 3);
    let other = tempfile::tempdir().unwrap();
    let root3 = synth(other.path(), 4);
    for rel in
        ["annotations/skin_rgbimage.csv", "lung_Xray/train_images/3.png", "skin_rgbimage/val_images/ISIC_2000001.jpg"]
    {
        let a = std::fs::read(root.join(rel)).unwrap();
        assert_eq!(a, std::fs::read(root2.join(rel)).unwrap(), "{rel}");
        assert_ne!(a, std::fs::read(root3.join(rel)).unwrap(), "{rel}");
    }
    // An existing output is not overwritten without force.
    assert!(generate(&root, &SynthConfig::default(), false).is_err());
}

#[test]
fn image_path_derivation() {
    let c = image_candidates(Path::new("skin_rgbimage/train_masks/ISIC_0012_Segmentation.png"));
    assert_eq!(c[0], PathBuf::from("skin_rgbimage/train_images/ISIC_0012.png"));
    assert_eq!(c[1], PathBuf::from("skin_rgbimage/train_images/ISIC_0012.jpg"));
    let c = image_candidates(Path::new("lung_CT/test_masks/7.bmp"));
    assert_eq!(c, ["png", "jpg", "jpeg", "bmp"].map(|e| PathBuf::from(format!("lung_CT/test_images/7.{e}"))).to_vec());
    let none = BTreeMap::new();
    for (name, id) in [
        ("brain_tumors_ct_scan", 0),
        ("Breast_Ultrasound", 1),
        ("lung_CT", 2),
        ("lung_Xray", 3),
        ("LUNG-X-RAY", 3),
        ("skin_rgbimage", 4),
        ("polyp_endoscopy", 5),
    ] {
        assert_eq!(modality_class(name, &none), Some(id), "{name}");
    }
    assert_eq!(modality_class("dental_xray", &none), None);
    let map = BTreeMap::from([("dental_xray".to_string(), 6)]);
    assert_eq!(modality_class("dental_xray", &map), Some(6));
}

#[test]
fn position_rule_and_parsing() {
    let mut m = GrayImage::new(10, 8);
    assert_eq!(position_of_mask(&m), None);
    m.put_pixel(1, 1, Luma([255]));
    assert_eq!(position_of_mask(&m), Some(Position::TopLeft));
    m.put_pixel(5, 4, Luma([255])); // the centre pixel (w/2, h/2) inside the box
    assert_eq!(position_of_mask(&m), Some(Position::Center));
    let mut m = GrayImage::new(10, 8);
    m.put_pixel(9, 7, Luma([200]));
    m.put_pixel(6, 5, Luma([255]));
    assert_eq!(position_of_mask(&m), Some(Position::BottomRight));
    m.put_pixel(9, 0, Luma([100])); // below threshold: not foreground
    assert_eq!(position_of_mask(&m), Some(Position::BottomRight));

    let cases = [
        ("The tumor is located at the top left of the image.", Some(Position::TopLeft)),
        ("The tumor is located at the top-right of the image, near the center.", Some(Position::TopRight)),
        ("It appears in the bottom left area, close to the center.", Some(Position::BottomLeft)),
        ("Lesion in the lower right quadrant", Some(Position::BottomRight)),
        ("upper_left", Some(Position::TopLeft)),
        ("on the left top side", Some(Position::TopLeft)),
        ("The tumor is located near the center of the image.", Some(Position::Center)),
        ("center", Some(Position::Center)),
        ("in the centre", Some(Position::Center)),
        ("BOTTOM RIGHT", Some(Position::BottomRight)),
        ("top left and bottom right", None),
        ("no tumour visible", None),
    ];
    for (text, want) in cases {
        assert_eq!(Position::parse(text), want, "{text:?}");
    }
    for p in Position::ALL {
        assert_eq!(p.to_string().parse::<Position>().unwrap(), p);
    }
}

/// A dataset in the authors' layout with one row per kind of problem.
fn broken_dataset(root: &Path, with_bad_csv: bool) -> PathBuf {
    let d = root.join("brain_tumors_ct_scan");
    std::fs::create_dir_all(d.join("train_images")).unwrap();
    std::fs::create_dir_all(d.join("train_masks")).unwrap();
    std::fs::create_dir_all(root.join("annotations")).unwrap();
    let img = |name: &str, w: u32, h: u32| {
        GrayImage::from_fn(w, h, |x, y| Luma([((x * 7 + y * 3) % 256) as u8]))
            .save(d.join("train_images").join(name))
            .unwrap()
    };
    let mask = |name: &str, w: u32, h: u32, f: &dyn Fn(u32, u32) -> u8| {
        GrayImage::from_fn(w, h, |x, y| Luma([f(x, y)])).save(d.join("train_masks").join(name)).unwrap()
    };
    let blob = |x: u32, y: u32| if x < 8 && y < 8 { 255 } else { 0 };
    img("1.png", 32, 32);
    mask("1.png", 32, 32, &blob); // good
    mask("2.png", 32, 32, &blob); // image missing
    std::fs::write(d.join("train_images/3.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
    mask("3.png", 32, 32, &blob); // corrupt image bytes
    img("4.png", 32, 32);
    mask("4.png", 16, 32, &blob); // size mismatch
    img("5.png", 32, 32);
    // Anti-aliased 0/1-ish edges: binarisable, accepted.
    mask("5.png", 32, 32, &|x, y| {
        if x > 20 && y > 20 {
            250
        } else if x == 20 || y == 20 {
            100
        } else {
            3
        }
    });
    img("6.png", 32, 32);
    mask("6.png", 32, 32, &blob); // empty answer
    img("7.png", 32, 32);
    mask("7.png", 32, 32, &|_, _| 0); // empty mask: a warning
    img("8.png", 32, 32);
    mask("8.png", 32, 32, &|x, y| ((x * 8 + y) % 256) as u8); // a photo, not a mask
    let csv = "image_path,image_name,question,answer,position,split\n\
        brain_tumors_ct_scan/train_masks/1.png,1.png,Where?,At the top left.,top left,train\n\
        brain_tumors_ct_scan/train_masks/2.png,2.png,Where?,At the top left.,top left,train\n\
        brain_tumors_ct_scan/train_masks/3.png,3.png,Where?,At the top left.,top left,train\n\
        brain_tumors_ct_scan/train_masks/4.png,4.png,Where?,At the top left.,top left,train\n\
        brain_tumors_ct_scan/train_masks/5.png,5.png,Where?,Bottom right.,bottom right,train\n\
        brain_tumors_ct_scan/train_masks/6.png,6.png,Where?,,top left,train\n\
        brain_tumors_ct_scan/train_masks/7.png,7.png,Where?,Nothing.,center,train\n\
        brain_tumors_ct_scan/train_masks/8.png,8.png,Where?,At the top left.,top left,train\n";
    std::fs::write(root.join("annotations/brain_tumors_ct_scan.csv"), csv).unwrap();
    if with_bad_csv {
        std::fs::write(root.join("annotations/lung_CT.csv"), "image_path,image_name,question,position,split\n")
            .unwrap();
    }
    root.join("annotations/brain_tumors_ct_scan.csv")
}

#[test]
fn validation_reports_every_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let csv = broken_dataset(tmp.path(), true);
    let err = prepare(tmp.path(), &PrepareOptions { val_fraction: 0.0, ..Default::default() }).unwrap_err();
    let v = err.downcast_ref::<ValidationError>().expect("a ValidationError");
    let lines: Vec<usize> = v.problems.iter().filter(|p| p.csv == csv).map(|p| p.line).collect();
    assert_eq!(lines, vec![3, 4, 5, 7, 9], "{err}");
    let text = err.to_string();
    let has = |line: usize, what: &str| {
        v.problems.iter().any(|p| p.csv == csv && p.line == line && p.message.contains(what))
            && text.contains(&format!("{}:{line}: ", csv.display()))
    };
    assert!(has(3, "image not found"), "{text}");
    assert!(has(4, "cannot load image"), "{text}");
    assert!(has(5, "image is 32x32 but mask is 16x32"), "{text}");
    assert!(has(7, "empty answer"), "{text}");
    assert!(has(9, "not binary"), "{text}");
    let bad_csv = tmp.path().join("annotations/lung_CT.csv");
    assert!(
        v.problems.iter().any(|p| p.csv == bad_csv && p.fatal && p.message.contains("missing column `answer`")),
        "{text}"
    );
    // A missing column cannot be skipped.
    let skip = PrepareOptions { skip_bad_rows: true, val_fraction: 0.0, ..Default::default() };
    assert!(prepare(tmp.path(), &skip).is_err());
}

#[test]
fn skip_bad_rows_drops_and_counts() {
    let tmp = tempfile::tempdir().unwrap();
    let csv = broken_dataset(tmp.path(), false);
    let skip = PrepareOptions { skip_bad_rows: true, val_fraction: 0.0, ..Default::default() };
    let p = prepare(tmp.path(), &skip).unwrap();
    assert_eq!(p.skipped, 5);
    let kept: Vec<usize> = p.train.iter().map(|r| r.line).collect();
    assert_eq!(kept, vec![2, 6, 8]);
    assert!(p.val.is_empty());
    // The binarisable anti-aliased mask is accepted and binarises to its square.
    let m = load_mask(&p.train[1].mask).unwrap();
    assert!(m.as_raw().iter().all(|&v| v == 0 || v == 255));
    assert_eq!(position_of_mask(&m), Some(Position::BottomRight));
    // Empty mask reported as a warning, not an error.
    assert!(p.warnings.iter().any(|w| w.csv == csv && w.line == 8 && w.message.contains("empty")), "{:?}", p.warnings);
}

#[test]
fn plain_csv_and_older_columns() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    std::fs::create_dir_all(root.join("imgs")).unwrap();
    RgbImage::from_pixel(20, 20, Rgb([10, 20, 30])).save(root.join("imgs/a.jpg")).unwrap();
    GrayImage::from_fn(20, 20, |x, _| Luma([if x > 15 { 1 } else { 0 }])).save(root.join("imgs/a_mask.png")).unwrap();
    let plain = root.join("plain.csv");
    std::fs::write(
        &plain,
        "image,mask,question,answer,modality,split\nimgs/a.jpg,imgs/a_mask.png,Where?,On the right.,polyp_endoscopy,\n\
         imgs/a.jpg,imgs/a_mask.png,Where?,On the right.,knee_mri,val\n",
    )
    .unwrap();
    let read = read_rows(&plain, &DatasetOptions::default()).unwrap();
    assert_eq!(read.rows.len(), 1);
    assert_eq!((read.rows[0].class_id, read.rows[0].split), (5, Split::Train));
    assert_eq!(read.rows[0].image, root.join("imgs/a.jpg"));
    assert_eq!(read.problems.len(), 1);
    assert_eq!(read.problems[0].line, 3);
    assert!(read.problems[0].message.contains("knee_mri"), "{}", read.problems[0]);
    let checked = check_rows(read.rows, vec![], false).unwrap();
    assert_eq!(checked.rows.len(), 1, "a 0/1 label mask is accepted");

    // Older authors' columns: description is the prompt, the position sentence the answer.
    let old = root.join("old");
    std::fs::create_dir_all(old.join("annotations")).unwrap();
    std::fs::create_dir_all(old.join("lung_Xray/train_masks")).unwrap();
    std::fs::create_dir_all(old.join("lung_Xray/train_images")).unwrap();
    std::fs::write(
        old.join("annotations/lung_Xray.csv"),
        "image_path,image_name,split,description,position\n\
         lung_Xray\\train_masks\\1.png,1.png,train,Find the opacity.,It is at the bottom left.\n\
         lung_Xray/train_masks/2.png,2.png,train,,The lesion is near the center of the image.\n",
    )
    .unwrap();
    for i in [1, 2] {
        GrayImage::new(8, 8).save(old.join(format!("lung_Xray/train_masks/{i}.png"))).unwrap();
        GrayImage::new(8, 8).save(old.join(format!("lung_Xray/train_images/{i}.jpg"))).unwrap();
    }
    let opts = DatasetOptions { default_question: "Where is it?".into(), ..Default::default() };
    let read = read_rows(&old, &opts).unwrap();
    assert!(read.problems.is_empty(), "{:?}", read.problems);
    let r = &read.rows;
    assert_eq!((r[0].question.as_str(), r[0].answer.as_str()), ("Find the opacity.", "It is at the bottom left."));
    assert_eq!((r[0].position, r[0].class_id, r[0].line), (Some(Position::BottomLeft), 3, 2));
    assert_eq!(r[0].image, old.join("lung_Xray/train_images/1.jpg"));
    assert_eq!((r[1].question.as_str(), r[1].position), ("Where is it?", Some(Position::Center)));
}

fn fake_rows(n: usize, split: Split) -> Vec<Row> {
    (0..n)
        .map(|i| Row {
            csv: PathBuf::from("ann/fake.csv"),
            line: i + 2,
            image: PathBuf::from(format!("img/{}.png", i / 2)),
            // Two questions per image: the hold-out must keep them together.
            mask: PathBuf::from(format!("mask/{}.png", i / 2)),
            question: format!("q{i}"),
            answer: "a".into(),
            position: None,
            modality: "lung_CT".into(),
            class_id: 2,
            split,
            mask_rule: Default::default(),
        })
        .collect()
}

#[test]
fn holdout_is_disjoint_and_deterministic() {
    let rows = fake_rows(200, Split::Train);
    let (t1, v1, src) = train_val(&rows, 0.1, 7);
    assert_eq!(src, ValSource::HeldOut);
    assert_eq!(t1.len() + v1.len(), 200);
    assert!((19..=22).contains(&v1.len()), "{}", v1.len());
    let train_masks: HashSet<_> = t1.iter().map(|r| &r.mask).collect();
    assert!(v1.iter().all(|r| !train_masks.contains(&r.mask)), "an image is on both sides");
    let (t2, v2, _) = train_val(&rows, 0.1, 7);
    assert_eq!((t1.clone(), v1.clone()), (t2, v2));
    let mut reversed = rows.clone();
    reversed.reverse();
    let (_, v3, _) = train_val(&reversed, 0.1, 7);
    let key = |v: &[Row]| v.iter().map(|r| r.line).collect::<HashSet<_>>();
    assert_eq!(key(&v1), key(&v3), "hold-out depends on row order");
    let (_, v4, _) = train_val(&rows, 0.1, 8);
    assert_ne!(key(&v1), key(&v4));

    let mut with_val = rows.clone();
    with_val.extend(fake_rows(5, Split::Val));
    let (t, v, src) = train_val(&with_val, 0.1, 7);
    assert_eq!((t.len(), v.len(), src), (200, 5, ValSource::Csv));
}

#[test]
fn batch_plan_is_pure_and_bucketed() {
    let keys: Vec<usize> = (0..103).map(|i| (i * 37) % 50).collect();
    let cfg = PlanConfig { batch_size: 4, bucket_batches: 5, drop_last: false, seed: 11 };
    let plan = BatchPlan::new(keys.clone(), cfg.clone()).unwrap();
    let e0 = plan.epoch(0);
    assert_eq!(e0.len(), plan.batches_per_epoch());
    assert_eq!(e0, BatchPlan::new(keys.clone(), cfg.clone()).unwrap().epoch(0));
    assert_ne!(e0, plan.epoch(1));
    let mut all: Vec<usize> = e0.iter().flatten().copied().collect();
    all.sort();
    assert_eq!(all, (0..103).collect::<Vec<_>>());
    assert_eq!(plan.epoch_from(0, 7), e0[7..].to_vec());

    let dl = BatchPlan::new(keys.clone(), PlanConfig { drop_last: true, ..cfg.clone() }).unwrap();
    let e = dl.epoch(0);
    assert_eq!(e.len(), 25);
    assert!(e.iter().all(|b| b.len() == 4));

    // Whole-epoch bucketing: batches are consecutive runs of the sorted keys.
    let full = BatchPlan::new(keys.clone(), PlanConfig { bucket_batches: usize::MAX, ..cfg }).unwrap();
    let mut ranges: Vec<(usize, usize)> = full
        .epoch(2)
        .iter()
        .map(|b| (b.iter().map(|&i| keys[i]).min().unwrap(), b.iter().map(|&i| keys[i]).max().unwrap()))
        .collect();
    ranges.sort();
    assert!(ranges.windows(2).all(|w| w[0].1 <= w[1].0), "{ranges:?}");
}

fn collect_lines(
    rows: &Arc<Vec<Row>>,
    batches: Vec<Vec<usize>>,
    first: usize,
    workers: usize,
) -> Vec<(usize, Vec<usize>)> {
    let transform = |r: &Row| -> Result<usize> {
        // Uneven work so that workers finish out of order.
        std::thread::sleep(std::time::Duration::from_micros(((r.line * 7919) % 5) as u64 * 300));
        Ok(r.line)
    };
    let opts = LoaderOptions { workers, prefetch: 3 };
    Loader::new(rows.clone(), batches, first, transform, &opts)
        .unwrap()
        .map(|b| {
            let b = b.unwrap();
            (b.index, b.items)
        })
        .collect()
}

#[test]
fn loader_order_resume_and_errors() {
    let rows = Arc::new(fake_rows(57, Split::Train));
    let keys: Vec<usize> = rows.iter().map(|r| r.question.len()).collect();
    let plan = BatchPlan::new(keys, PlanConfig { batch_size: 4, seed: 5, ..Default::default() }).unwrap();
    let expected: Vec<(usize, Vec<usize>)> =
        plan.epoch(3).into_iter().enumerate().map(|(i, b)| (i, b.iter().map(|&s| rows[s].line).collect())).collect();
    let one = collect_lines(&rows, plan.epoch(3), 0, 1);
    let four = collect_lines(&rows, plan.epoch(3), 0, 4);
    assert_eq!(one, expected);
    assert_eq!(four, expected);
    let resumed = collect_lines(&rows, plan.epoch_from(3, 9), 9, 4);
    assert_eq!(resumed, expected[9..].to_vec());

    // A failing row surfaces with its file and line; later batches still arrive.
    let failing = |r: &Row| -> Result<usize> {
        if r.line == 7 {
            Err(anyhow!("bad pixels"))
        } else if r.line == 9 {
            panic!("boom")
        } else {
            Ok(r.line)
        }
    };
    let out: Vec<_> =
        Loader::new(rows.clone(), plan.epoch(0), 0, failing, &LoaderOptions::default()).unwrap().collect();
    assert_eq!(out.len(), plan.batches_per_epoch());
    let errors: Vec<String> = out.iter().filter_map(|b| b.as_ref().err().map(|e| format!("{e:#}"))).collect();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors.iter().any(|e| e.contains("ann/fake.csv:7") && e.contains("bad pixels")), "{errors:?}");
    assert!(errors.iter().any(|e| e.contains("ann/fake.csv:9") && e.contains("boom")), "{errors:?}");

    // Dropping a loader mid-epoch stops its workers (no hang).
    let mut l = Loader::new(rows.clone(), plan.epoch(1), 0, |r: &Row| Ok(r.line), &LoaderOptions::default()).unwrap();
    assert!(l.next().unwrap().is_ok());
    drop(l);
    assert!(Loader::new(rows, vec![vec![99]], 0, |r: &Row| Ok(r.line), &LoaderOptions::default()).is_err());
}
