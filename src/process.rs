//! Process-wide settings, made once at start-up before any thread or tensor exists.

/// Keeps freed tensor buffers in the heap instead of handing them back to the kernel.
///
/// glibc's defaults return a freed block above its dynamic mmap threshold, and a heap top
/// above its trim threshold, to the kernel at once; a training step that frees and allocates
/// the same few-MB activations then pays a zeroed page fault per 4 KiB, every step. On the
/// 2-core reference machine that was 1.24 M page faults and 4 s of kernel time in 20 tiny-model
/// steps (batch 8); with fixed thresholds 0.09 M and 1.2 s, the step 15-20% faster and the
/// peak RSS unchanged (BENCHMARKS.md, session 5).
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // 32 MiB is the largest mmap threshold glibc accepts on 64-bit (half its heap size).
        const MMAP_THRESHOLD: libc::c_int = 32 << 20;
        const TRIM_THRESHOLD: libc::c_int = 256 << 20;
        // SAFETY: mallopt only changes allocator parameters; called before other threads start.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        }
    }
}
