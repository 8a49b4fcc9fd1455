//! Exit codes: what kind of failure an error is, so scripts and schedulers can tell a bad input
//! (fix the file and rerun) from an out-of-memory step (shrink the batch) from a bug.
//!
//! Input-checking code marks its errors with [`InputError`] (as the error, or as anyhow context:
//! anyhow downcasts through context); errors of the parsers prs reads files with (I/O, image,
//! CSV, TOML, JSON, safetensors) are recognised by type anywhere in the chain. This module sits
//! below every other, so the data layer's own error types are added by `cli::exit_kind`.

use std::io::ErrorKind;

/// The exit statuses of `prs`, as `prs --help` and the README list them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitKind {
    /// Anything not recognised below: a failure inside prs or its libraries.
    Internal = 1,
    /// clap's own status for a bad flag or a missing argument (clap exits itself).
    Usage = 2,
    /// A missing or corrupt file, a bad CSV row, an invalid config value, bad weights, a refused
    /// output folder.
    Input = 3,
    /// The device ran out of memory.
    OutOfMemory = 4,
}

/// The exit-status table as a literal, so `cli.rs` can `concat!` it into `prs --help`
/// (README.md repeats it).
macro_rules! exit_codes_help {
    () => {
        "Exit status:
  0  success
  1  internal or other error
  2  bad usage (an unknown flag, a missing or invalid argument value)
  3  bad input: a missing or corrupt file, a bad CSV row, an invalid config value, bad weights,
     a refused output folder
  4  out of memory (CUDA_ERROR_OUT_OF_MEMORY or an allocation failure)"
    };
}
pub(crate) use exit_codes_help;

pub const EXIT_CODES_HELP: &str = exit_codes_help!();

/// An error in what the user gave prs (a file, a row, a config value, an output folder). Use it
/// as the error itself or as context: `.with_context(|| InputError(format!("reading {}", p)))`.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InputError(pub String);

/// Marks `e` as an input error without changing its message (for sites whose checks are plain
/// `ensure!`s, e.g. `Config::validate`).
pub fn input(e: anyhow::Error) -> anyhow::Error {
    if classify(&e) == ExitKind::Input {
        return e;
    }
    anyhow::Error::new(InputError(format!("{e:#}")))
}

/// What kind of failure `e` is. Out-of-memory wins: an OOM met while reading a file is still
/// an OOM.
pub fn classify(e: &anyhow::Error) -> ExitKind {
    if is_out_of_memory(&format!("{e:#}")) {
        return ExitKind::OutOfMemory;
    }
    if e.downcast_ref::<InputError>().is_some() || e.chain().any(is_input) {
        return ExitKind::Input;
    }
    ExitKind::Internal
}

/// Whether an error message is a device or allocator out-of-memory report (cudarc's
/// `CUDA_ERROR_OUT_OF_MEMORY`, cuBLAS's `CUBLAS_STATUS_ALLOC_FAILED`, "out of memory").
pub fn is_out_of_memory(msg: &str) -> bool {
    let m = msg.to_ascii_lowercase();
    m.contains("out_of_memory") // CUDA_ERROR_OUT_OF_MEMORY and the like
        || m.contains("cublas_status_alloc_failed")
        || m.contains("out of memory")
        || m.contains("memory allocation of") // Rust's allocator: "memory allocation of N bytes failed"
}

/// The hint printed under an out-of-memory error.
pub const OOM_HINT: &str = "hint: this step does not fit in the GPU's memory. `prs profile-memory --config FILE \
    --device cuda:0` measures what fits; a smaller --batch-size with more --gradient-accumulation-steps keeps the \
    effective batch, and --gradient-checkpointing trades time for memory";

fn is_input(e: &(dyn std::error::Error + 'static)) -> bool {
    if let Some(io) = e.downcast_ref::<std::io::Error>() {
        return io_is_input(io);
    }
    if let Some(c) = e.downcast_ref::<candle_core::Error>() {
        return candle_is_input(c);
    }
    e.is::<InputError>()
        || e.is::<image::ImageError>()
        || e.is::<csv::Error>()
        || e.is::<toml::de::Error>()
        || e.is::<serde_json::Error>()
}

fn io_is_input(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::NotFound | ErrorKind::PermissionDenied | ErrorKind::InvalidData | ErrorKind::UnexpectedEof
    )
}

/// candle keeps I/O and safetensors errors inside its own type (transparently, so they are not
/// in the `source()` chain); bad weights (`weights::checked`) arrive as `Io(InvalidData)`.
fn candle_is_input(e: &candle_core::Error) -> bool {
    use candle_core::Error as E;
    match e {
        E::Io(io) => io_is_input(io),
        E::SafeTensor(_) | E::UnsupportedSafeTensorDtype(_) | E::Npy(_) | E::Zip(_) => true,
        E::WithPath { inner, .. } | E::WithBacktrace { inner, .. } | E::Context { inner, .. } => candle_is_input(inner),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn each_kind_is_classified() {
        // A CUDA OOM as candle reports it (cudarc's DriverError inside candle's Cuda variant).
        let oom = candle_core::Error::Cuda("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into());
        let e = anyhow::Error::from(oom).context("step 3");
        assert_eq!(classify(&e), ExitKind::OutOfMemory);
        assert_eq!(classify(&anyhow::anyhow!("a shape mismatch")), ExitKind::Internal);
        // InputError as the error, and as context below other context.
        assert_eq!(classify(&anyhow::Error::new(InputError("bad row".into()))), ExitKind::Input);
        let r: anyhow::Result<()> = Err(anyhow::anyhow!("x"));
        let e = r.context(InputError("in config c.toml".into())).context("finetune").unwrap_err();
        assert_eq!(classify(&e), ExitKind::Input);
        // Typed errors of the readers, anywhere in the chain.
        let nf = std::io::Error::new(ErrorKind::NotFound, "gone");
        assert_eq!(classify(&anyhow::Error::from(nf).context("reading a.png")), ExitKind::Input);
        let broken = std::io::Error::new(ErrorKind::BrokenPipe, "pipe");
        assert_eq!(classify(&anyhow::Error::from(broken)), ExitKind::Internal);
        let img = image::load_from_memory(b"not a png").unwrap_err();
        assert_eq!(classify(&anyhow::Error::from(img).context("row 2")), ExitKind::Input);
        let toml = toml::from_str::<toml::Table>("a = ").unwrap_err();
        assert_eq!(classify(&anyhow::Error::from(toml)), ExitKind::Input);
        let json = serde_json::from_str::<serde_json::Value>("{").unwrap_err();
        assert_eq!(classify(&anyhow::Error::from(json)), ExitKind::Input);
        let csv = csv::Reader::from_reader("a,b\n1\n".as_bytes()).records().find_map(|r| r.err()).unwrap();
        assert_eq!(classify(&anyhow::Error::from(csv)), ExitKind::Input);
        // Bad weights: candle's Io(InvalidData), behind candle's path and context wrappers.
        let bad = candle_core::Error::Io(std::io::Error::new(ErrorKind::InvalidData, "NaN in w"));
        assert_eq!(classify(&anyhow::Error::from(bad.with_path("m.safetensors"))), ExitKind::Input);
        // `input` keeps the message and marks it.
        let e = input(anyhow::anyhow!("inner").context("outer"));
        assert_eq!((classify(&e), format!("{e:#}")), (ExitKind::Input, "outer: inner".to_string()));
    }

    /// The one out-of-memory test, shared by the exit status and profile-memory's trials.
    #[test]
    fn out_of_memory_messages_of_cuda_cublas_and_the_allocator() {
        for msg in [
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")",
            "cublas error: CUBLAS_STATUS_ALLOC_FAILED",
            "memory allocation of 17179869184 bytes failed",
            "trial: Out of memory",
        ] {
            assert!(is_out_of_memory(msg), "{msg}");
        }
        for msg in ["shape mismatch in matmul", "no memory of this checkpoint", "allocation tracker: 3 MB"] {
            assert!(!is_out_of_memory(msg), "{msg}");
        }
    }
}
