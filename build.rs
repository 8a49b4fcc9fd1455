//! With the `cuda` feature, compiles `kernels/*.cu` to PTX in OUT_DIR (for `src/kernels.rs`) using
//! cudaforge, the builder candle's own kernels use, so nvcc discovery (CUDA_HOME/CUDA_PATH/PATH,
//! NVCC) and the target architecture (CUDA_COMPUTE_CAP, else nvidia-smi) behave as for candle.
//! Without the feature it does nothing, so CPU builds need no CUDA toolkit.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    #[cfg(feature = "cuda")]
    if let Err(e) = cuda::build_ptx() {
        panic!("compiling kernels/*.cu to PTX failed: {e}");
    }
    // NCCL from the pip wheel (scripts/cuda_toolkit.sh) lives outside the loader's paths:
    // record its folder in the binary so that it runs without LD_LIBRARY_PATH.
    #[cfg(feature = "nccl")]
    {
        println!("cargo::rerun-if-env-changed=NCCL_LIB_DIR");
        if let Ok(dir) = std::env::var("NCCL_LIB_DIR") {
            println!("cargo::rustc-link-arg=-Wl,-rpath,{dir}");
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    pub fn build_ptx() -> cudaforge::Result<()> {
        println!("cargo::rerun-if-changed=kernels");
        // One PTX file per kernel source, OUT_DIR/<stem>.ptx. No fast-math: the kernels match
        // the CPU reference operation for operation.
        cudaforge::KernelBuilder::new().source_dir("kernels").arg("-std=c++17").arg("-O3").build_ptx().map(|_| ())
    }
}
