//! Where TinySAM's training peak comes from, on the CPU: a counting allocator tracks every live
//! allocation of 1 MB or more with its (unresolved) backtrace, snapshots that list whenever the
//! total reaches a new peak (in steps of 4 MB), and at the end prints the peak's live
//! allocations grouped by where they were made (this crate's source lines and candle's
//! backprop), largest first. One forward and backward of the released TinySAM with random
//! weights, batch 1. Build with debug info (the dev profile) for line numbers:
//! `cargo run --example peak_probe -- [SIDE=512] [all|off]`
use std::alloc::{GlobalAlloc, Layout, System};
use std::backtrace::Backtrace;
use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use prs::model::tinysam::{TinySam, TinySamConfig};
use prs::nn::checkpoint::Checkpointer;
use prs::nn::param::{ParamBuilder, TrainedParams};

const TRACKED: usize = 1 << 20;
static CUR: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static LAST: AtomicUsize = AtomicUsize::new(0);
static ARMED: AtomicBool = AtomicBool::new(false);
type Live = HashMap<usize, (usize, Arc<Backtrace>)>;
static LIVE: Mutex<Option<Live>> = Mutex::new(None);
static SNAPSHOT: Mutex<Vec<(usize, Arc<Backtrace>)>> = Mutex::new(Vec::new());

thread_local! {
    /// Set while this thread runs the probe's own bookkeeping (which allocates).
    static BUSY: Cell<bool> = const { Cell::new(false) };
}

struct Counting;

fn bookkeeping(f: impl FnOnce()) {
    if BUSY.with(|b| b.replace(true)) {
        return;
    }
    f();
    BUSY.with(|b| b.set(false));
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: forwarded to the system allocator with the caller's layout.
        let p = unsafe { System.alloc(l) };
        let c = CUR.fetch_add(l.size(), Ordering::SeqCst) + l.size();
        let new_peak = PEAK.fetch_max(c, Ordering::SeqCst) < c;
        if ARMED.load(Ordering::SeqCst) && l.size() >= TRACKED {
            bookkeeping(|| {
                let bt = Arc::new(Backtrace::force_capture());
                let mut live = LIVE.lock().unwrap();
                let live = live.get_or_insert_with(HashMap::new);
                live.insert(p as usize, (l.size(), bt));
                if new_peak && c >= LAST.load(Ordering::SeqCst) + (4 << 20) {
                    LAST.store(c, Ordering::SeqCst);
                    *SNAPSHOT.lock().unwrap() = live.values().cloned().collect();
                }
            });
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        CUR.fetch_sub(l.size(), Ordering::SeqCst);
        if l.size() >= TRACKED {
            bookkeeping(|| {
                if let Some(live) = LIVE.lock().unwrap().as_mut() {
                    live.remove(&(p as usize));
                }
            });
        }
        // SAFETY: `p` came from `alloc` with this layout.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static A: Counting = Counting;

/// The allocation site: the first three of this crate's source lines or candle's backprop lines.
fn site(bt: &Backtrace) -> String {
    let s = bt.to_string();
    let lines: Vec<&str> = s
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("at ./src/") || l.contains("backprop.rs"))
        .map(|l| l.trim_start_matches("at "))
        .map(|l| l.rsplit_once("/src/").map_or(l, |(_, tail)| tail))
        .take(3)
        .collect();
    if lines.is_empty() {
        "(no crate frame)".into()
    } else {
        lines.join(" < ")
    }
}

fn main() -> anyhow::Result<()> {
    let side: usize = std::env::args().nth(1).map(|s| s.parse()).transpose()?.unwrap_or(512);
    let ckpt = std::env::args().nth(2).is_some_and(|s| s == "all");
    let cfg = TinySamConfig { img_size: side, ..TinySamConfig::tinyvit_5m() };
    let dev = Device::Cpu;
    let reg = TrainedParams::new();
    let model = TinySam::new(&ParamBuilder::fresh(0, "image_encoder", true, DType::F32, &dev, &reg), &cfg)?;
    let x = Tensor::randn(0f32, 1.0, (1, 3, side, side), &dev)?;
    let _mode = prs::nn::ops::TrainingMode::enter(0);
    let base = CUR.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    LAST.store(base, Ordering::SeqCst);
    ARMED.store(true, Ordering::SeqCst);
    let c = Checkpointer::new(&reg);
    let y = model.forward_with(&x, if ckpt { Some(&c) } else { None })?;
    let after_forward = CUR.load(Ordering::SeqCst) - base;
    let r = Tensor::randn(0f32, 1.0, y.dims(), &dev)?;
    let g = (y * r)?.sum_all()?.backward()?;
    drop(g);
    ARMED.store(false, Ordering::SeqCst);
    println!("TinySAM {side} px, checkpointing {}", if ckpt { "all" } else { "off" });
    println!(
        "live after forward: {:.1} MB; peak over the start: {:.1} MB",
        after_forward as f64 / 1e6,
        (PEAK.load(Ordering::SeqCst) - base) as f64 / 1e6
    );
    let snap = std::mem::take(&mut *SNAPSHOT.lock().unwrap());
    let mut groups: HashMap<String, (usize, usize)> = HashMap::new();
    for (size, bt) in &snap {
        let e = groups.entry(site(bt)).or_default();
        e.0 += size;
        e.1 += 1;
    }
    let mut groups: Vec<_> = groups.into_iter().collect();
    groups.sort_by_key(|g| std::cmp::Reverse(g.1 .0));
    let total: usize = snap.iter().map(|(s, _)| s).sum();
    println!("at the peak, {:.1} MB in {} allocations of >= 1 MB, by site:", total as f64 / 1e6, snap.len());
    for (site, (bytes, n)) in groups.iter().take(25) {
        println!("{:>9.1} MB {n:>4}x  {site}", *bytes as f64 / 1e6);
    }
    Ok(())
}
