//! The device a command runs on: `--device` parsing (auto, cpu, cuda, cuda:N), its name in
//! results, the CUDA memory pool candle allocates from, and memory queries (the pool's
//! high-water mark on a GPU, the resident set on the CPU).

use anyhow::{bail, Result};
use candle_core::Device;

/// Refuses a CUDA device name at once in a binary built without CUDA, saying how to get one
/// (commands that spend time before opening the device call this first).
pub fn check_built_for(s: &str) -> Result<()> {
    if s.starts_with("cuda") && !cfg!(feature = "cuda") {
        bail!(
            "--device {s}: this prs binary was built without CUDA; build one with `make build-cuda` \
             (docs/cuda.md), or use --device cpu"
        );
    }
    Ok(())
}

/// The device `--device` names: auto (CUDA when this binary has it and a GPU is present), cpu,
/// cuda or cuda:N.
pub fn parse_device(s: &str) -> Result<Device> {
    check_built_for(s)?;
    let dev = match s {
        "auto" => Device::cuda_if_available(0)?,
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0)?,
        other => match other.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => Device::new_cuda(n)?,
            None => bail!("--device `{other}`: expected auto, cpu, cuda or cuda:N"),
        },
    };
    // Keep freed blocks in the CUDA pool (release threshold raised): returning them to the
    // driver at each synchronisation and asking again costs time every step.
    #[cfg(feature = "cuda")]
    if dev.is_cuda() {
        pool::Pool::new(&dev)?;
    }
    tracing::debug!("--device {s}: {dev:?}");
    Ok(dev)
}

/// "cpu", "cuda:0", ... as results record it.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Peak memory of this process on `dev` so far, in bytes: on CUDA the pool's used high-water
/// mark plus what lies outside the pool (context, cuBLAS workspaces); on CPU the peak resident
/// set (VmHWM). None where it cannot be read.
pub fn peak_memory_bytes(dev: &candle_core::Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if dev.is_cuda() {
        let p = pool::Pool::new(dev).ok()?;
        return Some(p.used_high().ok()? + p.outside().ok()?);
    }
    let _ = dev;
    let (_, peak) = rss();
    (peak > 0).then_some(peak)
}

/// Resets what [`peak_memory_bytes`] reports to the memory in use now.
pub fn reset_peak_memory(dev: &candle_core::Device) {
    #[cfg(feature = "cuda")]
    if dev.is_cuda() {
        if let Ok(p) = pool::Pool::new(dev) {
            let _ = p.reset_high();
        }
        return;
    }
    let _ = dev;
    reset_peak_rss();
}

pub fn status_kb(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    line[field.len()..].trim().trim_end_matches("kB").trim().parse::<u64>().ok().map(|k| k * 1024)
}

/// Current and peak resident set of this process (bytes).
pub fn rss() -> (u64, u64) {
    (status_kb("VmRSS:").unwrap_or(0), status_kb("VmHWM:").unwrap_or(0))
}

/// Resets VmHWM to the current RSS.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The CUDA default memory pool, which candle allocates every tensor from.
#[cfg(feature = "cuda")]
pub mod pool {
    use anyhow::Result;
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    use candle_core::Device;

    type Attr = sys::CUmemPool_attribute_enum;

    pub struct Pool {
        pool: sys::CUmemoryPool,
        ctx: std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaContext>,
    }

    impl Pool {
        pub fn new(dev: &Device) -> Result<Self> {
            let ctx = dev.as_cuda_device()?.cuda_stream().context().clone();
            ctx.bind_to_thread()?;
            let pool = unsafe { result::device::get_default_mem_pool(ctx.cu_device())? };
            let p = Self { pool, ctx };
            p.set(Attr::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, u64::MAX)?;
            Ok(p)
        }
        fn set(&self, a: Attr, mut v: u64) -> Result<()> {
            unsafe { result::mem_pool::set_attribute(self.pool, a, &mut v as *mut u64 as *mut _)? };
            Ok(())
        }
        fn get(&self, a: Attr) -> Result<u64> {
            let mut v = 0u64;
            unsafe { result::mem_pool::get_attribute(self.pool, a, &mut v as *mut u64 as *mut _)? };
            Ok(v)
        }
        pub fn reset_high(&self) -> Result<()> {
            self.set(Attr::CU_MEMPOOL_ATTR_USED_MEM_HIGH, 0)
        }
        pub fn used_high(&self) -> Result<u64> {
            self.get(Attr::CU_MEMPOOL_ATTR_USED_MEM_HIGH)
        }
        pub fn used_now(&self) -> Result<u64> {
            self.get(Attr::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)
        }
        /// Device memory in use outside the pool: context, cuBLAS workspaces, other processes.
        pub fn outside(&self) -> Result<u64> {
            let (free, total) = self.ctx.mem_get_info()?;
            let reserved = self.get(Attr::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)?;
            Ok(((total - free) as u64).saturating_sub(reserved))
        }
    }
}
