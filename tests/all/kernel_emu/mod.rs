//! The crate's CUDA kernels on a machine without a GPU: each kernel file is compiled unchanged
//! as host C++ against an emulation of the CUDA constructs it uses (`tests/kernel_emu/`: blocks
//! one at a time, a block's threads as real threads where it synchronises, shared memory,
//! full-warp shuffles), under the address sanitizer, and run with the launches the Rust host
//! code gives a GPU (`prs::kernels`' plans). Each test compares the outputs with the CPU op the
//! kernel replaces. This checks indexing, tiling, reductions and shared-memory use, not the
//! card's arithmetic or speed, which `examples/gpu_*_check` measure on a GPU.

mod adamw;
mod depthwise;
mod dequant;
mod fused;
mod upsample;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};
use prs::kernels::Launch;
use rand::{rngs::StdRng, Rng, SeedableRng};

/// The sanitizer an emulator is built with: the address sanitizer (with UBSan) for the value
/// checks, the thread sanitizer for races between a block's threads (a missing barrier).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Sanitizer {
    Address,
    Thread,
}

/// Builds `tests/kernel_emu/<name>.cpp` once per test run and sanitizer (a C++20 compiler with
/// the sanitizers is needed: the machine's g++).
fn emulator(name: &str, sanitizer: Sanitizer) -> PathBuf {
    type Built = Option<(tempfile::TempDir, HashMap<(String, Sanitizer), PathBuf>)>;
    static BUILT: Mutex<Built> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    let (dir, exes) = built.get_or_insert_with(|| (tempfile::tempdir().unwrap(), HashMap::new()));
    if let Some(exe) = exes.get(&(name.to_string(), sanitizer)) {
        return exe.clone();
    }
    let exe = dir.path().join(format!("{name}-{sanitizer:?}"));
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kernel_emu");
    let flags: &[&str] = match sanitizer {
        Sanitizer::Address => &["-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
        Sanitizer::Thread => &["-fsanitize=thread"],
    };
    let out = Command::new("c++")
        .args(["-std=c++20", "-O1", "-g"])
        .args(flags)
        .args(["-ffp-contract=off", "-pthread", "-Wall", "-Werror", "-Wno-unknown-pragmas", "-Wno-sign-compare", "-I"])
        .arg(root.join("include"))
        .arg(root.join(format!("{name}.cpp")))
        .arg("-o")
        .arg(&exe)
        .output()
        .expect("running c++ (a C++20 compiler is needed for this test)");
    assert!(out.status.success(), "building the {name} emulation: {}", String::from_utf8_lossy(&out.stderr));
    exes.insert((name.to_string(), sanitizer), exe.clone());
    exe
}

/// The `_<dtype>` suffix of a kernel name (bf16/f16/f32 storage).
fn tag(dt: DType) -> &'static str {
    match dt {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        other => panic!("no kernel variant for {other:?}"),
    }
}

/// Uniform values in [-4, 4) of `shape`, rounded to `dt`.
fn random(shape: &[usize], dt: DType, seed: u64) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let n = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.gen_range(-4.0f32..4.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap().to_dtype(dt).unwrap()
}

/// A tensor's raw little-endian elements, as a kernel reads them.
fn raw(t: &Tensor) -> Vec<u8> {
    let t = t.flatten_all().unwrap();
    match t.dtype() {
        DType::F16 => t.to_vec1::<f16>().unwrap().iter().flat_map(|v| v.to_bits().to_le_bytes()).collect(),
        DType::BF16 => t.to_vec1::<bf16>().unwrap().iter().flat_map(|v| v.to_bits().to_le_bytes()).collect(),
        DType::F32 => t.to_vec1::<f32>().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::F64 => t.to_vec1::<f64>().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::U8 => t.to_vec1::<u8>().unwrap(),
        other => panic!("no raw form for {other:?}"),
    }
}

/// A script for an emulated kernel file (`tests/kernel_emu/emu_main.h`): buffers, launches, and
/// the outputs to read back as tensors.
struct Script {
    file: &'static str,
    sanitizer: Sanitizer,
    dir: tempfile::TempDir,
    words: Vec<String>,
    buffers: usize,
    outputs: Vec<(usize, DType, Vec<usize>)>,
}

impl Script {
    fn new(file: &'static str) -> Self {
        Self::with(file, Sanitizer::Address)
    }

    fn with(file: &'static str, sanitizer: Sanitizer) -> Self {
        Self { file, sanitizer, dir: tempfile::tempdir().unwrap(), words: Vec::new(), buffers: 0, outputs: Vec::new() }
    }

    fn buffer(&mut self, step: [String; 2]) -> String {
        self.words.extend(step);
        self.buffers += 1;
        format!("b{}", self.buffers - 1)
    }

    /// A buffer holding these bytes (a tensor's elements, or a struct passed by value).
    fn bytes(&mut self, bytes: &[u8]) -> String {
        let path = self.dir.path().join(format!("in{}", self.buffers));
        std::fs::write(&path, bytes).unwrap();
        self.buffer(["in".into(), path.display().to_string()])
    }

    fn input(&mut self, t: &Tensor) -> String {
        self.bytes(&raw(t))
    }

    /// A buffer holding a tensor's elements that the kernels update in place, read back after
    /// the run as an output.
    fn in_out(&mut self, t: &Tensor) -> String {
        let b = self.input(t);
        self.outputs.push((self.buffers - 1, t.dtype(), t.dims().to_vec()));
        b
    }

    /// Writes buffer `target`'s address into buffer `table` at byte `offset` (a table of
    /// device pointers).
    fn address(&mut self, table: &str, offset: usize, target: &str) {
        self.words.extend(["addr".into(), table.into(), offset.to_string(), target.into()]);
    }

    /// A garbage-filled buffer the kernels work in.
    fn scratch(&mut self, bytes: usize) -> String {
        self.buffer(["new".into(), bytes.to_string()])
    }

    /// A garbage-filled buffer read back, after the run, as a `dt` tensor of `shape`.
    fn output(&mut self, dt: DType, shape: &[usize]) -> String {
        let n: usize = shape.iter().product();
        let b = self.scratch(n * dt.size_in_bytes());
        self.outputs.push((self.buffers - 1, dt, shape.to_vec()));
        b
    }

    /// Runs `name` with `launch`; `threads` for kernels that synchronise or shuffle.
    fn launch(&mut self, name: &str, l: &Launch, threads: bool, args: &[String]) {
        let (g, b) = (l.grid, l.block);
        self.words.extend(["launch".into(), name.into(), if threads { "threads" } else { "serial" }.into()]);
        self.words.extend([g.0, g.1, g.2, b.0, b.1, b.2, l.shared_mem_bytes].map(|v| v.to_string()));
        self.words.push(args.len().to_string());
        self.words.extend(args.iter().cloned());
    }

    fn run(mut self) -> Vec<Tensor> {
        let paths: Vec<PathBuf> = (0..self.outputs.len()).map(|i| self.dir.path().join(format!("out{i}"))).collect();
        for ((buf, _, _), path) in self.outputs.iter().zip(&paths) {
            self.words.extend(["out".into(), buf.to_string(), path.display().to_string()]);
        }
        let out = Command::new(emulator(self.file, self.sanitizer))
            .args(&self.words)
            .env("ASAN_OPTIONS", "detect_leaks=0")
            .env("TSAN_OPTIONS", "halt_on_error=1")
            .output()
            .unwrap();
        assert!(out.status.success(), "{} {:?}: {}", self.file, self.words, String::from_utf8_lossy(&out.stderr));
        self.outputs
            .iter()
            .zip(&paths)
            .map(|((_, dt, shape), p)| {
                Tensor::from_raw_buffer(&std::fs::read(p).unwrap(), *dt, shape, &Device::Cpu).unwrap()
            })
            .collect()
    }
}

/// (largest |a - b| / max(|b|, 1), elements that differ at all).
fn compare(a: &Tensor, b: &Tensor) -> (f64, usize) {
    assert_eq!(a.dims(), b.dims());
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let differ: Vec<(f64, f64)> = a.iter().zip(&b).filter(|(x, y)| x != y).map(|(x, y)| (*x, *y)).collect();
    let worst = differ.iter().map(|(x, y)| (x - y).abs() / y.abs().max(1.0)).fold(0.0, f64::max);
    (worst, differ.len())
}
