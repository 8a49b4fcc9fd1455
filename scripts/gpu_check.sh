#!/usr/bin/env bash
# The GPU checks and benchmarks, built here and run on a machine with a GPU (no Rust there).
#
#   scripts/gpu_check.sh build   on the build machine (no GPU needed): builds `prs` and the three
#                                check examples with `--features cuda` (toolkit from
#                                `make cuda-toolkit`), strips and xz-compresses them into dist/gpu/
#                                with Mistral's tokenizer.model (for the tiny model)
#   scripts/gpu_check.sh run [SECONDS] [OUT]
#                                on the GPU machine: runs the steps below (PRS_GPU_STEPS names a
#                                subset, in its order: model upsample fused pytorch
#                                train-bN[-off|-llm|-all][-4bit|-8bit] predict predict-separate
#                                launches profile demo serve), in this order, until SECONDS
#                                (default 480) are spent, each step under its own time limit,
#                                logging to OUT/gpu_check.log (default dist/gpu/out):
#     1. examples/gpu_model_check: the tiny model on CUDA vs CPU (losses, every gradient, AdamW,
#        greedy prediction, bf16); an error (not a tolerance miss) stops here: nothing after it
#        could run
#     2. examples/gpu_upsample_check: mask-upsampling kernels and fused ops vs CPU, then timings
#        against candle's composite and the card's copy bandwidth
#     3. examples/gpu_fused_check: the fused softmax / RMSNorm / SiLU-gate / rotary, depthwise-convolution
#        and multi-tensor AdamW kernels vs candle's composite on CUDA and vs CPU, value and gradient,
#        then kernel vs composite timings
#     4. the PyTorch reference step (../shared/bench), then prs bench train, 7B with random weights, per
#        batch x checkpointing (off/llm/all) x base storage (none/4bit)
#     5. prs bench predict, 7B, with the LoRA merged at load (the default) and separate; then kernel
#        launches, GEMMs, copies per step and per token, host busy vs blocked (launch counter preloaded)
#     6. prs profile-memory, 7B, batch 1,2,4,8 x checkpointing off/llm/all x base none/4bit, predicted vs measured
#     7. prs demo (the embedded default, on CUDA)
#     8. prs serve on CUDA with the demo's checkpoint: three requests (scripts/serve_smoke.py), SIGTERM
set -uo pipefail
cd "$(dirname "$0")/.."
DIST="${PRS_GPU_DIST:-dist/gpu}"
BINS="prs gpu_model_check gpu_upsample_check gpu_fused_check"

build() {
  set -e
  [[ -f .cache/cuda/env.sh ]] && . .cache/cuda/env.sh
  export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}" CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-2}"
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/cuda}"
  cargo build --release --features cuda --bin prs --example gpu_model_check --example gpu_upsample_check \
    --example gpu_fused_check
  mkdir -p "$DIST"
  for b in $BINS; do
    src="$CARGO_TARGET_DIR/release/$b"
    [[ -f "$src" ]] || src="$CARGO_TARGET_DIR/release/examples/$b"
    strip -o "$DIST/$b" "$src"
    xz -T2 -6 -f "$DIST/$b"
  done
  cp "${PRS_TOKENIZER_MODEL:-.cache/assets/tokenizer.model.v1}" "$DIST/tokenizer.model.v1"
  make -s launch-counter && cp target/launch_counter/libprs_launch_counter.so "$DIST/"
  # The PyTorch reference step and the TinyViT code it loads (../shared/bench/README.md).
  if [[ -f ../shared/bench/pytorch_prsmed_step.py ]]; then
    cp ../shared/bench/pytorch_prsmed_step.py "$DIST/"
    local w; w=$(mktemp -d)
    python3 -m pip download -q --no-deps -d "$w" mobilesam-mirror==1.0.0 &&
      mkdir -p "$DIST/pylib" && unzip -q -o "$w"/mobilesam_mirror-1.0.0-py3-none-any.whl 'mobile_sam/*' -d "$DIST/pylib"
  fi
  echo "$(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo ' + uncommitted changes')" >"$DIST/COMMIT"
  ls -l "$DIST"
}

run() {
  local budget="${1:-480}" out="${2:-$DIST/out}" work
  mkdir -p "$out"
  work=$(mktemp -d)
  local log="$out/gpu_check.log" t_end=$((SECONDS + budget))
  : >"$log" # a fresh log: the model step below greps it
  exec > >(tee -a "$log") 2>&1
  for b in $BINS; do
    [[ -f "$DIST/$b.xz" ]] || { echo "no $DIST/$b.xz: run '$0 build' on the build machine first"; exit 1; }
    if command -v xz >/dev/null; then xz -dc "$DIST/$b.xz" >"$work/$b"
    else python3 -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],"wb"))' "$DIST/$b.xz" "$work/$b"; fi
    chmod +x "$work/$b"
  done
  # Runtime libraries: the driver, and cuBLAS/cuRAND/NVRTC/cudart 13 from a CUDA install or pip wheels.
  local libdirs
  libdirs=$(find /usr/local/nvidia/lib64 /usr/local/cuda/lib64 /usr/local/cuda/targets /opt /usr/lib/python3* /usr/local/lib \
    -maxdepth 8 \( -name 'libcublas.so.13' -o -name 'libcurand.so.10' -o -name 'libnvrtc.so.13' -o -name 'libcudart.so.13' -o -name 'libcuda.so.1' \) \
    -printf '%h\n' 2>/dev/null | sort -u | tr '\n' ':')
  export LD_LIBRARY_PATH="${libdirs}${LD_LIBRARY_PATH:-}"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  echo "built from $(cat "$DIST/COMMIT" 2>/dev/null || echo '?'), run $(date -u +%FT%TZ)"
  if ldd "$work/prs" | grep 'not found'; then echo "missing runtime libraries (above)"; exit 1; fi
  export PATH="$work:$PATH"
  # PRS_GPU_CONFIG / PRS_GPU_DEVICE: a dry run of this script on a CPU build (tiny, cpu).
  local cfg="${PRS_GPU_CONFIG:-configs/prs-med-7b.toml}" dev="${PRS_GPU_DEVICE:-cuda}" failed=0
  # step NAME LIMIT CMD...: runs CMD under min(LIMIT, time left); returns its status.
  step() {
    local name=$1 limit=$2 left=$((t_end - SECONDS)) t0=$SECONDS rc; shift 2
    (( left < limit )) && limit=$left
    if (( limit < 10 )); then echo "== $name: skipped (time budget spent)" >&2; return 99; fi
    echo "== $name (limit ${limit}s): $*" >&2
    timeout "$limit" "$@"; rc=$?
    echo "== $name: exit $rc after $((SECONDS - t0)) s" >&2
    (( rc == 0 )) || failed=$((failed + 1))
    return $rc
  }
  local steps="${PRS_GPU_STEPS:-model upsample fused pytorch train-b1 train-b8-llm train-b8-all train-b1-all-4bit train-b4-all-4bit train-b1-off-4bit predict predict-separate launches profile demo serve}"
  for name in $steps; do
    case $name in
      model)
        step model-check 90 gpu_model_check "$DIST/tokenizer.model.v1"
        if (( $? != 0 )) && ! grep -q 'comparison(s) failed' "$log"; then
          echo "the tiny model does not run on CUDA: stopping before the 7B steps"; exit 1
        fi ;;
      upsample) step upsample-check 90 gpu_upsample_check ;;
      fused) step fused-check 150 gpu_fused_check ;;
      train-b*)
        # train-bN[-off|-llm|-all|-ckpt][-4bit|-8bit]: batch, checkpointing (-ckpt = all), base storage.
        local spec=${name#train-b} b ck=off q=none
        b=${spec%%-*}
        [[ $spec == *-llm* ]] && ck=llm
        [[ $spec == *-all* || $spec == *-ckpt* ]] && ck=all
        [[ $spec == *-4bit* ]] && q=4bit
        [[ $spec == *-8bit* ]] && q=8bit
        step "bench train b$b ckpt $ck base $q" 120 prs bench train --config $cfg --random-weights --device $dev \
          --batch-size $b --gradient-checkpointing $ck --base-quant $q --warmup 1 --steps 3 --phases ;;
      pytorch)
        # The PyTorch reference step, in the same session (speed and memory claims are ratios to it).
        local py
        py=$(ls /opt/*/.venv/bin/python 2>/dev/null | head -1); py=${py:-python3}
        if [[ -f "$DIST/pytorch_prsmed_step.py" ]] && "$py" -c 'import torch, transformers, peft' 2>/dev/null; then
          OUT="$out" BATCHES="${PRS_GPU_TORCH_BATCHES:-1,8}" CKPT=both step "pytorch reference" 240 "$py" "$DIST/pytorch_prsmed_step.py"
        else
          echo "== pytorch reference: skipped (no $DIST/pytorch_prsmed_step.py, or no torch + transformers + peft)"
        fi ;;
      predict) step "bench predict" 60 prs bench predict --config $cfg --random-weights --device $dev --warmup 1 --steps 3 ;;
      predict-separate) step "bench predict, LoRA as a separate branch" 60 prs bench predict --config $cfg \
        --random-weights --device $dev --warmup 1 --steps 3 --no-merge-lora ;;
      launches)
        # Driver and cuBLAS calls per step and per token, and the host's time busy against blocked
        # (scripts/launch_counter.c, preloaded).
        local counter; counter=$(realpath "$DIST/libprs_launch_counter.so")
        step "launch counts, train b8 ckpt llm" 120 env LD_PRELOAD="$counter" prs bench train --config $cfg \
          --random-weights --device $dev --batch-size 8 --gradient-checkpointing llm --warmup 1 --steps 2
        step "launch counts, predict" 60 env LD_PRELOAD="$counter" prs bench predict --config $cfg --random-weights \
          --device $dev --warmup 1 --steps 1 ;;
      profile)
        step profile-memory 240 prs profile-memory --config $cfg --device $dev --batch-sizes 1,2,4,8 --precision bf16 \
          --checkpointing off,llm,all --base-quant none,4bit --seq-len 640 --measure --json \
          --emit-config "$out/recommended.toml" >"$out/profile-memory.json"
        head -c 4000 "$out/profile-memory.json"; echo ;;
      demo)
        if step demo 150 prs demo --device cuda --out "$work/demo" --tokenizer "$DIST/tokenizer.model.v1"; then
          cp "$work/demo/run/curves.png" "$out/demo-curves.png" 2>/dev/null
          cp "$work/demo/run/metrics.jsonl" "$out/demo-metrics.jsonl" 2>/dev/null
          cp "$(find "$work/demo/predict" -name overlay.png | head -1)" "$out/demo-overlay.png" 2>/dev/null
        fi ;;
      serve)
        # prs serve on CUDA with the demo's checkpoint (the model runs on its own thread): three
        # requests, then SIGTERM.
        local ck; ck=$(ls -d "$work"/demo/run/checkpoints/step-* 2>/dev/null | tail -1)
        if [[ -z $ck ]]; then echo "== serve: skipped (no demo checkpoint: run the demo step first)"; continue; fi
        prs serve --checkpoint "$ck" --device $dev --port 0 >"$work/serve.out" 2>"$work/serve.err" &
        local pid=$! url=""
        for _ in $(seq 1 300); do url=$(grep -o 'http://[^ ]*' "$work/serve.out" 2>/dev/null | head -1); [[ -n $url ]] && break; sleep 0.2; done
        step serve 60 python3 scripts/serve_smoke.py "$url" "$(find "$work/demo/data" -name '*.png' -path '*test_images*' | head -1)"
        kill -TERM $pid; wait $pid; echo "prs serve exit $?"; cat "$work/serve.err" | tail -5 ;;
      *) echo "unknown step $name" ;;
    esac
  done
  echo "== done: $failed step(s) failed, $((SECONDS)) s"
}

case "${1:-run}" in
  build) build ;;
  run) run "${@:2}" ;;
  *) echo "usage: $0 build | run [SECONDS] [OUT]" >&2; exit 2 ;;
esac
