//! The launch counter (`scripts/launch_counter.c`): preloaded, it counts and times the calls it
//! wraps and hands every call on with its arguments intact (checked against a stand-in CUDA
//! library, `tests/launch_counter/`), and `prs bench` finds it and prints its line.

use std::path::{Path, PathBuf};
use std::process::Command;

fn cc(args: &[&str]) {
    let out = Command::new("cc").args(args).output().expect("running cc (a C compiler is needed for this test)");
    assert!(out.status.success(), "cc {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn repo(p: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p).display().to_string()
}

/// Builds the counter, the stand-in library and the driver program into `dir`.
fn build(dir: &Path) -> (PathBuf, PathBuf) {
    let d = |f: &str| dir.join(f).display().to_string();
    cc(&[
        "-shared",
        "-fPIC",
        "-O2",
        "-Wall",
        "-o",
        &d("libprs_launch_counter.so"),
        &repo("scripts/launch_counter.c"),
        "-ldl",
    ]);
    cc(&["-shared", "-fPIC", "-o", &d("libfakecuda.so"), &repo("tests/launch_counter/fake_cuda.c")]);
    let rpath = format!("-Wl,-rpath,{}", dir.display());
    let libdir = format!("-L{}", dir.display());
    cc(&["-o", &d("driver"), &repo("tests/launch_counter/driver.c"), &libdir, "-lfakecuda", &rpath, "-ldl"]);
    (dir.join("libprs_launch_counter.so"), dir.join("driver"))
}

#[test]
fn the_counter_counts_times_and_forwards_every_wrapped_call() {
    let dir = tempfile::tempdir().unwrap();
    let (lib, driver) = build(dir.path());
    // Without the counter the calls reach the stand-in directly and there is nothing to read.
    let plain = Command::new(&driver).output().unwrap();
    assert_eq!(plain.status.code(), Some(3), "{plain:?}");
    let out = Command::new(&driver).env("LD_PRELOAD", &lib).output().unwrap();
    // Exit 2 would mean a wrapped call lost its result or an argument on the way.
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let nums = |after: &str| -> Vec<u64> {
        let rest = text.split(after).nth(1).unwrap();
        rest.split_whitespace().take_while(|w| w.parse::<u64>().is_ok()).map(|w| w.parse().unwrap()).collect()
    };
    assert!(text.starts_with("counters 9 "), "{text}");
    let counts = nums(" counts ");
    // kernels, GEMMs, H2D, D2H, D2D, memsets, allocations, frees, synchronisations
    assert_eq!(counts, [3, 2, 0, 0, 0, 0, 1, 0, 1], "{text}");
    let nanos = nums(" nanos ");
    assert!(nanos[8] >= 19_000_000, "the 20 ms synchronisation was timed as {} ns", nanos[8]);
    assert!(nanos[0] < nanos[8], "{text}");
}

#[test]
fn bench_prints_the_counts_when_the_counter_is_preloaded() {
    let dir = tempfile::tempdir().unwrap();
    let (lib, _) = build(dir.path());
    let run = |preload: bool| -> String {
        let mut c = Command::new(env!("CARGO_BIN_EXE_prs"));
        c.args(["bench", "predict", "--config", &repo("configs/tiny.toml"), "--device", "cpu"]);
        c.args(["--max-new-tokens", "3", "--warmup", "0", "--steps", "1", "--seq-len", "80"]);
        if preload {
            c.env("LD_PRELOAD", &lib);
        }
        let out = c.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    // The CPU makes no CUDA call: the line is there, with zero launches.
    let with = run(true);
    assert!(with.contains("per token: 0 kernel launches + 0 GEMM calls"), "{with}");
    let without = run(false);
    assert!(!without.contains("per token:"), "{without}");
}
