//! The run log's companions: `metrics.csv` and the TensorBoard event file, decoded here by a
//! reader written from the format's description (bitwise crc32c, a minimal protobuf walk), and
//! the log-scale choice of the loss panel.

use std::path::Path;

use prs::report::tfevents::{CSV_FILE, EVENTS_PREFIX};
use prs::report::{training_charts, wants_log_scale, MetricsLog, Record};

/// crc32c, bit by bit (independent of the writer's table).
fn crc32c(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 == 1 { (c >> 1) ^ 0x82f63b78 } else { c >> 1 };
        }
    }
    !c
}

// Written as TFRecord's description states it, not as the writer does.
#[allow(clippy::manual_rotate)]
fn masked(data: &[u8]) -> u32 {
    let c = crc32c(data);
    ((c >> 15) | (c << 17)).wrapping_add(0xa282ead8)
}

fn varint(b: &[u8], i: &mut usize) -> u64 {
    let (mut v, mut shift) = (0u64, 0);
    loop {
        let x = b[*i];
        *i += 1;
        v |= ((x & 0x7f) as u64) << shift;
        if x & 0x80 == 0 {
            return v;
        }
        shift += 7;
    }
}

/// (field, wire type, payload) of each field of one protobuf message.
fn fields(b: &[u8]) -> Vec<(u64, u64, Vec<u8>)> {
    let (mut out, mut i) = (vec![], 0);
    while i < b.len() {
        let k = varint(b, &mut i);
        let (f, w) = (k >> 3, k & 7);
        let payload = match w {
            0 => varint(b, &mut i).to_le_bytes().to_vec(),
            1 => {
                i += 8;
                b[i - 8..i].to_vec()
            }
            2 => {
                let n = varint(b, &mut i) as usize;
                i += n;
                b[i - n..i].to_vec()
            }
            5 => {
                i += 4;
                b[i - 4..i].to_vec()
            }
            _ => panic!("wire type {w}"),
        };
        out.push((f, w, payload));
    }
    out
}

struct Event {
    wall: f64,
    step: i64,
    version: Option<String>,
    scalars: Vec<(String, f32)>,
}

fn read_events(path: &Path) -> Vec<Event> {
    let b = std::fs::read(path).unwrap();
    let (mut out, mut i) = (vec![], 0);
    while i < b.len() {
        let len_bytes = &b[i..i + 8];
        let n = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        assert_eq!(u32::from_le_bytes(b[i + 8..i + 12].try_into().unwrap()), masked(len_bytes), "length crc");
        let data = &b[i + 12..i + 12 + n];
        assert_eq!(u32::from_le_bytes(b[i + 12 + n..i + 16 + n].try_into().unwrap()), masked(data), "data crc");
        i += 16 + n;
        let mut e = Event { wall: 0.0, step: -1, version: None, scalars: vec![] };
        for (f, w, p) in fields(data) {
            match (f, w) {
                (1, 1) => e.wall = f64::from_le_bytes(p.try_into().unwrap()),
                (2, 0) => e.step = i64::from_le_bytes(p.try_into().unwrap()),
                (3, 2) => e.version = Some(String::from_utf8(p).unwrap()),
                (5, 2) => {
                    for (vf, _, v) in fields(&p) {
                        assert_eq!(vf, 1);
                        let (mut tag, mut val) = (String::new(), f32::NAN);
                        for (f, w, x) in fields(&v) {
                            match (f, w) {
                                (1, 2) => tag = String::from_utf8(x).unwrap(),
                                (2, 5) => val = f32::from_le_bytes(x.try_into().unwrap()),
                                other => panic!("unexpected Value field {other:?}"),
                            }
                        }
                        e.scalars.push((tag, val));
                    }
                }
                other => panic!("unexpected Event field {other:?}"),
            }
        }
        out.push(e);
    }
    assert_eq!(i, b.len());
    out
}

fn events_file(run: &Path) -> std::path::PathBuf {
    let found: Vec<_> = std::fs::read_dir(run)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(EVENTS_PREFIX))
        .collect();
    assert_eq!(found.len(), 1, "{found:?}");
    found[0].clone()
}

fn train(step: u64, loss: f64) -> Record {
    Record { loss: Some(loss), lr: Some(1e-4), epoch: Some(0), ..Record::train(step) }
}

/// (step, value) of `tag` across the events.
fn series(ev: &[Event], tag: &str) -> Vec<(i64, f32)> {
    ev.iter().flat_map(|e| e.scalars.iter().filter(|(t, _)| t == tag).map(move |(_, v)| (e.step, *v))).collect()
}

#[test]
fn the_log_is_also_a_csv_and_a_tensorboard_event_file_that_decodes_back() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let mut log = MetricsLog::create(&run).unwrap();
    log.append(&train(1, 2.5)).unwrap();
    log.append(&train(2, 1.25)).unwrap();
    log.append(&Record { dice: Some(0.5), val_loss: Some(1.5), ..Record::eval(2) }).unwrap();
    log.sync().unwrap();

    let ev = read_events(&events_file(&run));
    assert_eq!(ev[0].version.as_deref(), Some("brain.Event:2"));
    assert!(ev[0].scalars.is_empty() && ev[0].wall > 1.6e9);
    assert_eq!(ev.len(), 4);
    assert_eq!(series(&ev, "train/loss"), vec![(1, 2.5), (2, 1.25)]);
    assert_eq!(series(&ev, "train/lr"), vec![(1, 1e-4), (2, 1e-4)]);
    assert_eq!(series(&ev, "eval/dice"), vec![(2, 0.5)]);
    assert_eq!(series(&ev, "eval/val_loss"), vec![(2, 1.5)]);
    assert!(ev.iter().all(|e| e.scalars.iter().all(|(t, _)| t != "train/step" && t != "eval/step")));

    let csv = std::fs::read_to_string(run.join(CSV_FILE)).unwrap();
    let rows: Vec<Vec<&str>> = csv.lines().map(|l| l.split(',').collect()).collect();
    let col = |name: &str| rows[0].iter().position(|c| *c == name).unwrap();
    assert_eq!(rows.len(), 4);
    assert!(rows.iter().all(|r| r.len() == rows[0].len()));
    assert_eq!((rows[1][col("kind")], rows[1][col("step")], rows[1][col("loss")]), ("train", "1", "2.5"));
    assert_eq!((rows[3][col("kind")], rows[3][col("dice")], rows[3][col("loss")]), ("eval", "0.5", ""));

    // Resuming after step 1 keeps what the checkpoint saw, in all three files.
    drop(log);
    let mut log = MetricsLog::resume(&run, 1).unwrap();
    log.append(&train(2, 1.0)).unwrap();
    let ev = read_events(&events_file(&run));
    assert_eq!(series(&ev, "train/loss"), vec![(1, 2.5), (2, 1.0)]);
    assert!(series(&ev, "eval/dice").is_empty());
    let csv = std::fs::read_to_string(run.join(CSV_FILE)).unwrap();
    assert_eq!(csv.lines().count(), 3, "{csv}");
}

#[test]
fn the_loss_panel_goes_logarithmic_when_the_first_steps_dwarf_the_rest() {
    assert!(wants_log_scale(&[120.0, 3.0, 2.0, 1.5, 1.2, 1.1]));
    assert!(!wants_log_scale(&[3.0, 2.0, 1.5, 1.2, 1.1]));
    // A log axis cannot show zero or negative values; NaN is ignored.
    assert!(!wants_log_scale(&[120.0, 3.0, 0.0, 1.5, 1.2]));
    assert!(wants_log_scale(&[120.0, f64::NAN, 3.0, 2.0, 1.5]));
    // Just past and just under the ratio (max / median).
    assert!(wants_log_scale(&[20.5, 1.0, 1.0]) && !wants_log_scale(&[19.5, 1.0, 1.0]));

    let steep: Vec<Record> = [90.0, 4.0, 2.0, 1.8, 1.7].iter().enumerate().map(|(i, &l)| train(i as u64, l)).collect();
    let (loss, _) = training_charts(&steep);
    assert!(loss.y_log && loss.y_label.contains("log"), "{:?}", loss.y_label);
    let flat: Vec<Record> = [3.0, 2.5, 2.0, 1.8, 1.7].iter().enumerate().map(|(i, &l)| train(i as u64, l)).collect();
    let (loss, _) = training_charts(&flat);
    assert!(!loss.y_log && !loss.y_label.contains("log"), "{:?}", loss.y_label);
}
