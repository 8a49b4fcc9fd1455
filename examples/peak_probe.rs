//! Where TinySAM's training peak comes from, on the CPU: a counting allocator records the
//! source lines (this crate's and candle's backprop) of the allocation that set the last new
//! peak (in steps of 4 MB), over one forward and backward of the released TinySAM with random
//! weights, batch 1. Session 12 found the BatchNorm backward inside a recomputed MBConv block
//! this way. Build with debug info (the dev profile) for line numbers:
//! `cargo run --example peak_probe -- [SIDE=512] [all|off]`
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use prs::model::tinysam::{TinySam, TinySamConfig};
use prs::nn::checkpoint::Checkpointer;
use prs::nn::param::{ParamBuilder, TrainedParams};

struct Counting;
static CUR: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static LAST: AtomicUsize = AtomicUsize::new(0);
static ARMED: AtomicBool = AtomicBool::new(false);
static IN: AtomicBool = AtomicBool::new(false);
static TRACE: Mutex<String> = Mutex::new(String::new());

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = System.alloc(l);
        let c = CUR.fetch_add(l.size(), Ordering::SeqCst) + l.size();
        if c > PEAK.load(Ordering::SeqCst) {
            PEAK.store(c, Ordering::SeqCst);
            if ARMED.load(Ordering::SeqCst)
                && c > LAST.load(Ordering::SeqCst) + (4 << 20)
                && l.size() > (1 << 20)
                && !IN.swap(true, Ordering::SeqCst)
            {
                LAST.store(c, Ordering::SeqCst);
                let bt = std::backtrace::Backtrace::force_capture().to_string();
                let frames: Vec<&str> = bt
                    .lines()
                    .filter(|s| s.contains("at ./src/") || s.contains("at /work/main/src") || s.contains("backprop.rs"))
                    .take(24)
                    .collect();
                *TRACE.lock().unwrap() = format!(
                    "peak {:.1} MB, alloc {:.1} MB\n{}",
                    c as f64 / 1e6,
                    l.size() as f64 / 1e6,
                    frames.join("\n")
                );
                IN.store(false, Ordering::SeqCst);
            }
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        CUR.fetch_sub(l.size(), Ordering::SeqCst);
        System.dealloc(p, l)
    }
}
#[global_allocator]
static A: Counting = Counting;

fn main() -> anyhow::Result<()> {
    let side: usize = std::env::args().nth(1).map(|s| s.parse().unwrap()).unwrap_or(512);
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
    println!("after forward: {:.1} MB live", (CUR.load(Ordering::SeqCst) - base) as f64 / 1e6);
    let r = Tensor::randn(0f32, 1.0, y.dims(), &dev)?;
    let g = (y * r)?.sum_all()?.backward()?;
    drop(g);
    println!("peak over base: {:.1} MB", (PEAK.load(Ordering::SeqCst) - base) as f64 / 1e6);
    println!("{}", TRACE.lock().unwrap());
    Ok(())
}
