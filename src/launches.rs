//! What a CUDA build asks of the driver and cuBLAS (kernel launches, GEMM calls, copies,
//! allocations, stream synchronisations, with the host time spent inside each), read from
//! `libprs_launch_counter.so` (`scripts/launch_counter.c`, `make launch-counter`) when it is
//! preloaded: `prs bench` reports them per training step and per generated token. Without the
//! library every read is None.

use std::ffi::{c_char, c_int, c_void};

/// The library's counters, in its order.
pub const COUNTERS: [&str; 9] = [
    "kernel launches",
    "GEMM calls",
    "host-to-device copies",
    "device-to-host copies",
    "device-to-device copies",
    "memsets",
    "allocations",
    "frees",
    "stream synchronisations",
];
const KERNELS: usize = 0;
const GEMMS: usize = 1;
const HOST_TO_DEVICE: usize = 2;
const ALLOCATIONS: usize = 6;
const SYNCS: usize = 8;

/// Totals since the process started (or a difference of two reads).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LaunchCounts {
    pub counts: [u64; COUNTERS.len()],
    /// Host nanoseconds spent inside the calls.
    pub nanos: [u64; COUNTERS.len()],
}

type CountsFn = unsafe extern "C" fn(*mut u64, c_int) -> c_int;

#[cfg(target_os = "linux")]
fn counts_fn() -> Option<CountsFn> {
    extern "C" {
        fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
    }
    // glibc's RTLD_DEFAULT: search the global scope, where a preloaded library is.
    const RTLD_DEFAULT: *mut c_void = std::ptr::null_mut();
    // SAFETY: a NUL-terminated name; the symbol, when present, has the signature above (it is
    // ours: scripts/launch_counter.c).
    unsafe {
        let f = dlsym(RTLD_DEFAULT, c"prs_launch_counts".as_ptr());
        (!f.is_null()).then(|| std::mem::transmute::<*mut c_void, CountsFn>(f))
    }
}

#[cfg(not(target_os = "linux"))]
fn counts_fn() -> Option<CountsFn> {
    None
}

impl LaunchCounts {
    /// The counters now; None when the library is not loaded.
    pub fn read() -> Option<Self> {
        let f = counts_fn()?;
        let mut raw = [0u64; 2 * COUNTERS.len()];
        // SAFETY: `raw` holds 2 x COUNTERS.len() values, the most the call writes.
        let have = unsafe { f(raw.as_mut_ptr(), COUNTERS.len() as c_int) };
        if have < COUNTERS.len() as c_int {
            tracing::warn!("libprs_launch_counter has {have} counters, this prs expects {}: ignored", COUNTERS.len());
            return None;
        }
        let mut c = Self::default();
        for i in 0..COUNTERS.len() {
            (c.counts[i], c.nanos[i]) = (raw[2 * i], raw[2 * i + 1]);
        }
        Some(c)
    }

    /// What happened between `earlier` and this read.
    pub fn since(&self, earlier: &Self) -> Self {
        let mut d = *self;
        for i in 0..COUNTERS.len() {
            d.counts[i] = d.counts[i].saturating_sub(earlier.counts[i]);
            d.nanos[i] = d.nanos[i].saturating_sub(earlier.nanos[i]);
        }
        d
    }

    /// Seconds the host waited in stream synchronisation.
    pub fn sync_secs(&self) -> f64 {
        self.nanos[SYNCS] as f64 * 1e-9
    }

    /// One line for `n` units (steps, tokens) that took `wall_secs` in all: the mean count of
    /// each kind per unit, and the host's time busy (enqueueing) against blocked (waiting).
    pub fn summary(&self, n: u64, unit: &str, wall_secs: f64) -> String {
        let n = n.max(1) as f64;
        let per = |i: usize| self.counts[i] as f64 / n;
        let blocked = self.sync_secs() / n;
        let wall = wall_secs / n;
        format!(
            "per {unit}: {:.0} kernel launches + {:.0} GEMM calls, {:.0} host-to-device copies, {:.0} allocations; \
             host busy {:.4} s and blocked in synchronisation {:.4} s of {:.4} s",
            per(KERNELS),
            per(GEMMS),
            per(HOST_TO_DEVICE),
            per(ALLOCATIONS),
            (wall - blocked).max(0.0),
            blocked,
            wall
        )
    }
}
