#!/usr/bin/env bash
# GPU check (examples/gpu_upsample_check.rs): the upsampling kernels and the fused softmax / RMS / BatchNorm ops vs CPU on random inputs,
# then kernel vs composite vs on-device copy timings.
#
#   scripts/gpu_check.sh build   on the build machine (no GPU needed): builds the example with
#                                `--features cuda` (toolkit env from `make cuda-toolkit`) and puts
#                                the stripped binary in dist/gpu_check/
#   scripts/gpu_check.sh run     on the GPU machine (no Rust, no network): runs that binary; the
#                                CUDA runtime libraries must be findable (see docs/cuda.md)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=dist/gpu_check/gpu_upsample_check

case "${1:-run}" in
  build)
    [[ -f .cache/cuda/env.sh ]] && . .cache/cuda/env.sh
    export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}" CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/cuda}"
    cargo build --release --features cuda --example gpu_upsample_check
    mkdir -p dist/gpu_check
    cp "$CARGO_TARGET_DIR/release/examples/gpu_upsample_check" "$BIN"
    strip "$BIN"
    ls -l "$BIN"
    ;;
  run)
    [[ -x "$BIN" ]] || { echo "no $BIN: run '$0 build' on the build machine first" >&2; exit 1; }
    # Runtime libraries: a PyTorch cu13 venv or a CUDA install, plus the driver (docs/cuda.md).
    for d in /opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib /usr/local/nvidia/lib64 \
             /usr/local/cuda/lib64 "${CUDA_HOME:-/nonexistent}/lib64"; do
      [[ -d "$d" ]] && LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    done
    export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    if ldd "$BIN" | grep 'not found'; then echo "missing runtime libraries (above)" >&2; exit 1; fi
    timeout "${GPU_CHECK_TIMEOUT:-300}" "$BIN" "${@:2}"
    ;;
  *) echo "usage: $0 build|run [--no-bench]" >&2; exit 2 ;;
esac
