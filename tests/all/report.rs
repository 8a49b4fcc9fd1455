//! Reporting: metrics log (append, resume truncation, partial lines), bitmap font, line
//! charts (pixels where the data says), atomic PNG saving and the training-curves picture.

use std::io::Write;
use std::path::Path;

use image::{Rgb, RgbImage};
use prs::report::{
    self, draw_text, draw_text_vertical, font, read_metrics, read_metrics_file, text_height, text_width, Axis, Kind,
    LineChart, MetricsLog, Record, Series, METRICS_FILE, PALETTE,
};

const WHITE: Rgb<u8> = Rgb([255, 255, 255]);

fn train_rec(step: u64) -> Record {
    let mut r = Record::train(step);
    r.epoch = Some(step / 4);
    r.loss = Some(2.0 / (1.0 + step as f64));
    r.loss_seg = Some(1.0 / (1.0 + step as f64));
    r.lr = Some(1e-4);
    r.grad_norm = Some(0.5);
    r.peak_mem_bytes = Some(1 << 30);
    r
}

fn eval_rec(step: u64) -> Record {
    let mut r = Record::eval(step);
    r.val_loss = Some(1.5 / (1.0 + step as f64));
    r.dice = Some(0.5 + step as f64 / 40.0);
    r.iou = Some(0.4 + step as f64 / 40.0);
    r.position_acc = Some(0.6);
    r
}

/// The log of a run of `steps` steps with an evaluation every 5 steps.
fn run_records(from: u64, to: u64) -> Vec<Record> {
    let mut out = Vec::new();
    for s in from..=to {
        out.push(train_rec(s));
        if s % 5 == 0 {
            out.push(eval_rec(s));
        }
    }
    out
}

#[test]
fn log_appends_and_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let mut log = MetricsLog::create(&run).unwrap();
    assert_eq!(log.path(), run.join(METRICS_FILE));
    let mut recs = run_records(1, 6);
    recs[0].extra.insert("custom".into(), serde_json::json!({"a": 1}));
    for r in &recs {
        log.append(r).unwrap();
    }
    // Written lines are visible to another reader at once (no buffering).
    let text = std::fs::read_to_string(run.join(METRICS_FILE)).unwrap();
    assert_eq!(text.lines().count(), recs.len());
    assert!(text.lines().next().unwrap().contains("\"custom\":{\"a\":1}"));
    assert!(!text.contains("dice\":null"), "absent fields must not be written");
    assert_eq!(read_metrics(log.path()).unwrap(), recs);

    // NaN has no JSON form: it is written as null and read back as None.
    let mut r = Record::train(7);
    r.loss = Some(f64::NAN);
    log.append(&r).unwrap();
    let back = read_metrics(log.path()).unwrap();
    assert_eq!(back.last().unwrap().loss, None);
    assert_eq!(back.last().unwrap().kind, Kind::Train);

    // Arbitrary objects need a step.
    assert!(log.append_value(&serde_json::json!({"kind": "train"})).is_err());
    log.append_value(&serde_json::json!({"kind": "note", "step": 8, "msg": "x"})).unwrap();
    let back = read_metrics(log.path()).unwrap();
    assert_eq!(back.last().unwrap().kind, Kind::Other);
    assert_eq!(back.last().unwrap().extra["msg"], "x");

    // A fresh run in the same directory starts an empty log.
    drop(log);
    let log = MetricsLog::create(&run).unwrap();
    assert!(read_metrics(log.path()).unwrap().is_empty());
}

#[test]
fn resume_truncates_to_the_checkpoint_step() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));

    // Uninterrupted run.
    let mut log = MetricsLog::create(&a).unwrap();
    for r in run_records(1, 12) {
        log.append(&r).unwrap();
    }
    let want = std::fs::read(a.join(METRICS_FILE)).unwrap();

    // Interrupted run: checkpoint after step 6, killed during step 9 mid-line.
    let mut log = MetricsLog::create(&b).unwrap();
    for r in run_records(1, 8) {
        log.append(&r).unwrap();
    }
    drop(log);
    let mut f = std::fs::OpenOptions::new().append(true).open(b.join(METRICS_FILE)).unwrap();
    f.write_all(b"{\"kind\":\"train\",\"step\":9,\"lo").unwrap();
    drop(f);
    let mut log = MetricsLog::resume(&b, 6).unwrap();
    let kept = read_metrics_file(log.path()).unwrap();
    assert_eq!(kept.skipped, 0);
    assert_eq!(kept.records, run_records(1, 6));
    for r in run_records(7, 12) {
        log.append(&r).unwrap();
    }
    assert_eq!(std::fs::read(b.join(METRICS_FILE)).unwrap(), want);
    // The rewrite leaves no temp file: the log, its CSV and its TensorBoard event file only.
    let mut names: Vec<String> =
        std::fs::read_dir(&b).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names.len(), 3, "{names:?}");
    assert!(names[0].starts_with("events.out.tfevents.") && names[1..] == ["metrics.csv", "metrics.jsonl"]);

    // Resuming where no log exists starts one; open() dispatches.
    let c = dir.path().join("c");
    let log = MetricsLog::open(&c, Some(3)).unwrap();
    assert!(read_metrics(log.path()).unwrap().is_empty());
}

#[test]
fn reader_skips_a_partial_last_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = MetricsLog::create(dir.path()).unwrap();
    for r in run_records(1, 5) {
        log.append(&r).unwrap();
    }
    let path = log.path().to_path_buf();
    drop(log);
    let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
    f.write_all(b"{\"kind\":\"eval\",\"step\":6,\"dice\":0.").unwrap();
    drop(f);
    let got = read_metrics_file(&path).unwrap();
    assert_eq!(got.skipped, 1);
    assert_eq!(got.records, run_records(1, 5));
    assert_eq!(read_metrics(&path).unwrap().len(), 6);
}

/// Bounding box (x0, y0, x1, y1 inclusive) of pixels that are not white, and their count.
fn ink_box(img: &RgbImage) -> Option<(u32, u32, u32, u32, usize)> {
    let mut b: Option<(u32, u32, u32, u32, usize)> = None;
    for (x, y, p) in img.enumerate_pixels() {
        if *p != WHITE {
            b = Some(match b {
                None => (x, y, x, y, 1),
                Some((a, c, d, e, n)) => (a.min(x), c.min(y), d.max(x), e.max(y), n + 1),
            });
        }
    }
    b
}

#[test]
fn text_draws_inside_its_box() {
    let black = Rgb([0, 0, 0]);
    for (text, scale) in [("1e-4", 2), ("val dice 0.85", 1), ("Wg|_", 3)] {
        let mut img = RgbImage::from_pixel(300, 80, WHITE);
        draw_text(&mut img, 10, 20, text, black, scale);
        let (x0, y0, x1, y1, n) = ink_box(&img).expect("text drew nothing");
        assert!(n > 10);
        assert!(x0 >= 10 && y0 >= 20, "{text}: ink starts at ({x0}, {y0})");
        assert!(x1 < 10 + text_width(text, scale), "{text}: ink ends at x {x1}");
        assert!(y1 < 20 + text_height(scale), "{text}: ink ends at y {y1}");
        // The first and last characters both reach the box edges (no clipped glyphs).
        assert_eq!(x0, 10 + if text.starts_with('1') { scale } else { 0 });
    }
    // Vertical text fills a box text_height wide and text_width tall.
    let mut img = RgbImage::from_pixel(80, 300, WHITE);
    draw_text_vertical(&mut img, 20, 10, "loss", black, 2);
    let (x0, y0, x1, y1, _) = ink_box(&img).unwrap();
    assert!(x0 >= 20 && x1 < 20 + text_height(2));
    assert!(y0 >= 10 && y1 < 10 + text_width("loss", 2));
    assert!(y1 - y0 > x1 - x0, "vertical text should be taller than wide");
    // Drawing off the image edges is clipped, not a panic.
    draw_text(&mut img, -7, 295, "clipped", black, 2);
    draw_text(&mut img, 75, -3, "x", black, 1);
}

#[test]
fn glyphs_are_distinct_and_inked() {
    let printable: Vec<char> = (33u8..=126).map(char::from).collect();
    for (i, a) in printable.iter().enumerate() {
        assert!(font::glyph(*a).iter().any(|r| *r != 0), "{a:?} has no ink");
        for b in &printable[i + 1..] {
            assert_ne!(font::glyph(*a), font::glyph(*b), "{a:?} and {b:?} look the same");
        }
    }
    assert!(font::glyph(' ').iter().all(|r| *r == 0));
    assert_eq!(font::glyph('é'), font::glyph('?'));
}

/// True when a pixel of `colour` lies within `r` pixels of (x, y).
fn colour_near(img: &RgbImage, (x, y): (f64, f64), r: i64, colour: Rgb<u8>) -> bool {
    let (cx, cy) = (x.round() as i64, y.round() as i64);
    (-r..=r).any(|dy| {
        (-r..=r).any(|dx| {
            let (px, py) = (cx + dx, cy + dy);
            px >= 0
                && py >= 0
                && (px as u32) < img.width()
                && (py as u32) < img.height()
                && *img.get_pixel(px as u32, py as u32) == colour
        })
    })
}

#[test]
fn chart_line_passes_through_its_data() {
    // 200 points (no markers) on a parabola; the line must hit the pixel of intermediate x
    // values too, since it joins consecutive points.
    let pts: Vec<(f64, f64)> = (0..200).map(|i| (i as f64 * 5.0, (i as f64 / 20.0).powi(2))).collect();
    let mut chart = LineChart::new("parabola", "step");
    chart.y_label = "loss".into();
    chart.series.push(Series::new("y = x^2", PALETTE[0], pts.clone()));
    let (img, frame) = chart.render_with_frame(800, 500);
    assert_eq!(img.dimensions(), (800, 500));
    assert!(frame.x.lo <= 0.0 && frame.x.hi >= 995.0);
    assert!(frame.y.lo <= 0.0 && frame.y.hi >= pts[199].1);
    for &(x, y) in pts.iter().step_by(7) {
        let p = frame.to_pixel(x, y).unwrap();
        assert!(colour_near(&img, p, 1, PALETTE[0]), "no line at data ({x}, {y}) = pixel {p:?}");
    }
    // Far from the curve (top-left of the plot, y high while x small) stays clear.
    let p = frame.to_pixel(100.0, 80.0).unwrap();
    assert!(!colour_near(&img, p, 3, PALETTE[0]));
    // Ticks: increasing, inside the axis, labels parse back to the tick values.
    for ax in [&frame.x, &frame.y] {
        assert!(ax.ticks.len() >= 3, "{:?}", ax.ticks);
        assert!(ax.ticks.windows(2).all(|w| w[0] < w[1]));
        for (t, l) in ax.ticks.iter().zip(&ax.labels) {
            let v: f64 = l.parse().unwrap_or_else(|_| panic!("label {l:?}"));
            assert!((v - t).abs() <= 1e-9 * t.abs().max(1.0), "{l} vs {t}");
        }
    }
}

#[test]
fn nice_ticks_and_number_labels() {
    let ax = Axis::linear(0.13, 0.87, false);
    assert!(ax.lo <= 0.13 && ax.hi >= 0.87 && ax.hi - ax.lo <= 1.0);
    assert!(ax.labels.iter().any(|l| l == "0.2" || l == "0.4"), "{:?}", ax.labels);
    let ax = Axis::linear(0.0, 1.0, true);
    assert_eq!((ax.lo, ax.hi), (0.0, 1.0));
    assert_eq!(ax.labels.first().unwrap(), "0.0");
    assert_eq!(ax.labels.last().unwrap(), "1.0");
    let ax = Axis::linear(-3e-4, 1e-4, false);
    assert!(ax.labels.contains(&"1e-4".to_string()), "{:?}", ax.labels);
    assert!(ax.labels.contains(&"0".to_string()), "{:?}", ax.labels);
    let ax = Axis::linear(0.0, 250_000.0, false);
    assert!(ax.labels.contains(&"1e5".to_string()), "{:?}", ax.labels);
    let ax = Axis::log(2e-5, 3e-2, false);
    assert!(ax.lo <= 2e-5 && ax.hi >= 3e-2);
    assert!(ax.labels.contains(&"1e-4".to_string()), "{:?}", ax.labels);
    assert!(ax.labels.contains(&"0.01".to_string()), "{:?}", ax.labels);
    assert_eq!(report::chart::fmt_sci(0.00015, 3), "1.5e-4");
}

#[test]
fn nan_points_leave_gaps_and_odd_data_renders() {
    let c = PALETTE[3];
    let pts = vec![(0.0, 0.0), (1.0, 1.0), (2.0, f64::NAN), (3.0, 3.0), (4.0, 4.0), (f64::INFINITY, 2.0)];
    let mut chart = LineChart::new("gaps", "x");
    chart.series.push(Series::new("s", c, pts));
    let (img, frame) = chart.render_with_frame(800, 500);
    assert!(frame.y.hi < 1e300, "infinite points must not set the range");
    let on = frame.to_pixel(0.5, 0.5).unwrap();
    assert!(colour_near(&img, on, 1, c));
    let gap = frame.to_pixel(2.0, 2.0).unwrap();
    assert!(!colour_near(&img, gap, 2, c), "the NaN point must break the line");
    // Sparse series get markers: a disc around each point, wider than the line.
    let p = frame.to_pixel(4.0, 4.0).unwrap();
    assert!(colour_near(&img, (p.0 - 3.0, p.1 + 3.0), 0, c));

    // Empty chart, empty series, all-NaN series, one point, constant values, log with zeros:
    // no panics, and the drawable data shows.
    let blank = LineChart::new("empty", "step").render(400, 300);
    assert_eq!(blank.dimensions(), (400, 300));
    let mut chart = LineChart::new("odd", "step");
    chart.series.push(Series::new("none", PALETTE[0], vec![]));
    chart.series.push(Series::new("nan", PALETTE[1], vec![(f64::NAN, 1.0), (1.0, f64::NAN)]));
    chart.series.push(Series::new("one", PALETTE[2], vec![(5.0, 0.5)]));
    let (img, frame) = chart.render_with_frame(640, 400);
    assert!(frame.y.lo < 0.5 && frame.y.hi > 0.5);
    assert!(colour_near(&img, frame.to_pixel(5.0, 0.5).unwrap(), 0, PALETTE[2]));

    let mut chart = LineChart::new("constant", "step");
    chart.series.push(Series::new("c", PALETTE[4], (0..50).map(|i| (i as f64, 0.7)).collect()));
    let (img, frame) = chart.render_with_frame(640, 400);
    assert!(frame.y.lo < 0.7 && frame.y.hi > 0.7);
    assert!(colour_near(&img, frame.to_pixel(25.0, 0.7).unwrap(), 0, PALETTE[4]));

    let mut chart = LineChart::new("log", "step");
    chart.y_log = true;
    let pts: Vec<(f64, f64)> = (0..60).map(|i| (i as f64, 10f64.powf(-(i as f64) / 15.0))).collect();
    chart.series.push(Series::new("decay", PALETTE[5], pts));
    chart.series.push(Series::new("zero", PALETTE[6], vec![(0.0, 0.0), (10.0, -1.0)]));
    let (img, frame) = chart.render_with_frame(800, 500);
    assert!(frame.y.log && frame.y.lo <= 1e-4 * 1.0001 && frame.y.hi >= 1.0);
    let p = frame.to_pixel(30.0, 0.01).unwrap();
    assert!(colour_near(&img, p, 1, PALETTE[5]));
    assert!(frame.to_pixel(0.0, 0.0).is_none());
}

#[test]
fn png_save_is_atomic_and_decodes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chart.png");
    let mut chart = LineChart::new("t", "x");
    chart.series.push(Series::new("a", PALETTE[0], vec![(0.0, 1.0), (1.0, 2.0)]));
    chart.save_png(&path, 800, 500).unwrap();
    // Overwriting an existing picture also goes through a temp file.
    chart.save_png(&path, 800, 500).unwrap();
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("chart.png")]);
    let img = image::open(&path).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (800, 500));
    assert_eq!(img, chart.render(800, 500));
    // A missing directory is an error naming it, and leaves nothing behind.
    let err = prs::files::write_png_atomic(&img, &dir.path().join("no/such/x.png")).unwrap_err();
    assert!(format!("{err:#}").contains("no/such"), "{err:#}");
}

fn has_colour(img: &RgbImage, y0: u32, y1: u32, c: Rgb<u8>) -> bool {
    (y0..y1).any(|y| (0..img.width()).any(|x| *img.get_pixel(x, y) == c))
}

#[test]
fn training_curves_has_both_panels() {
    let dir = tempfile::tempdir().unwrap();
    let recs = run_records(1, 40);
    let (loss, val) = report::training_charts(&recs);
    let names: Vec<&str> = loss.series.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["train total", "train seg", "val total"], "absent parts are left out");
    assert_eq!(val.series.len(), 3);
    assert_eq!(val.series[0].points.len(), 8);

    let path = dir.path().join("curves.png");
    report::training_curves(&recs, &path).unwrap();
    let img = image::open(&path).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (report::CURVES_WIDTH, report::CURVES_HEIGHT));
    let mid = img.height() / 2;
    assert!(has_colour(&img, 0, mid, loss.series[0].colour));
    assert!(has_colour(&img, 0, mid, loss.series[2].colour));
    assert!(has_colour(&img, mid, img.height(), val.series[0].colour));
    // The panels share the step axis pixel for pixel, and the data lands where it should.
    let (img2, top, bottom) = report::training_curves_render(&recs, 900, 1000);
    assert_eq!(img2, img);
    assert_eq!((top.plot.x, top.plot.w), (bottom.plot.x, bottom.plot.w));
    assert_eq!((top.x.lo, top.x.hi), (0.0, 40.0));
    assert_eq!((bottom.x.lo, bottom.x.hi), (0.0, 40.0));
    assert!(top.plot.y + top.plot.h as i32 <= 500 && bottom.plot.y >= 500);
    let r = &recs.iter().find(|r| r.step == 20 && r.kind == Kind::Train).unwrap();
    assert!(colour_near(&img, top.to_pixel(20.0, r.loss.unwrap()).unwrap(), 1, loss.series[0].colour));
    assert!(colour_near(&img, bottom.to_pixel(20.0, 1.0).unwrap(), 2, val.series[0].colour));
    assert_eq!((bottom.y.lo, bottom.y.hi), (0.0, 1.0));

    // No records: still a picture, two "no data" panels.
    report::training_curves(&[], &path).unwrap();
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

    if let Ok(out) = std::env::var("PRS_REPORT_PREVIEW") {
        preview(Path::new(&out));
    }
}

/// Writes sample pictures for a human to look at (PRS_REPORT_PREVIEW=dir).
fn preview(out: &Path) {
    std::fs::create_dir_all(out).unwrap();
    let mut recs = Vec::new();
    let mut state = 12345u64;
    let mut noise = || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((state >> 33) as f64 / (1u64 << 31) as f64) - 0.5
    };
    for s in 1..=3000u64 {
        let t = s as f64 / 3000.0;
        let mut r = Record::train(s);
        r.loss_seg = Some(0.9 * (-3.0 * t).exp() + 0.15 + 0.08 * noise());
        r.loss_lm = Some(2.5 * (-5.0 * t).exp() + 0.3 + 0.1 * noise());
        r.loss_cls = Some(1.7 * (-8.0 * t).exp() + 0.02 + 0.02 * noise());
        r.loss = Some(r.loss_seg.unwrap() + r.loss_lm.unwrap() + r.loss_cls.unwrap());
        recs.push(r);
        if s % 250 == 0 {
            let mut e = Record::eval(s);
            e.val_loss = Some(3.0 * (-3.0 * t).exp() + 0.6);
            e.dice = Some(0.85 - 0.6 * (-4.0 * t).exp());
            e.iou = Some(0.76 - 0.6 * (-4.0 * t).exp());
            e.position_acc = Some(0.9 - 0.5 * (-6.0 * t).exp());
            recs.push(e);
        }
    }
    report::training_curves(&recs, &out.join("curves.png")).unwrap();
    let mut img = RgbImage::from_pixel(620, 120, WHITE);
    let all: String = (32u8..=126).map(char::from).collect();
    for (i, chunk) in all.as_bytes().chunks(48).enumerate() {
        let s = std::str::from_utf8(chunk).unwrap();
        draw_text(&mut img, 8, 8 + 24 * i as i32, s, Rgb([0, 0, 0]), 2);
    }
    draw_text(&mut img, 8, 60, "loss 1e-4 0.85 val dice step lr=3.2e-5", Rgb([0, 0, 0]), 2);
    draw_text(&mut img, 8, 90, "scale 1: val_loss 0.0123 position acc (%) [0,1]", Rgb([0, 0, 0]), 1);
    image::DynamicImage::ImageRgb8(img).save(out.join("font.png")).unwrap();
    let mut chart = LineChart::new("lr schedule (log y)", "step");
    chart.y_log = true;
    chart.y_label = "learning rate".into();
    let pts = (0..=100)
        .map(|i| {
            (i as f64 * 30.0, 1e-6 + (1e-4 - 1e-6) * 0.5 * (1.0 + (i as f64 / 100.0 * std::f64::consts::PI).cos()))
        })
        .collect();
    chart.series.push(Series::new("lr", PALETTE[3], pts));
    chart.save_png(&out.join("lr.png"), 800, 500).unwrap();
    let small = report::training_curves_image(&recs[..40], 420, 520);
    prs::files::write_png_atomic(&small, &out.join("small.png")).unwrap();
}
