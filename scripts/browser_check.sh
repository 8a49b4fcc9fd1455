#!/usr/bin/env bash
# `make browser-test`: the page of `prs serve` in headless Chromium. A tiny model trained for two
# steps on a small synthetic dataset is served on a free port; tests/browser/page_check.mjs
# drives the page. Screenshots land in $OUT (default runs/browser).
set -euo pipefail
PRS=${PRS:-target/debug/prs}
OUT=${OUT:-runs/browser}
work=$(mktemp -d)
server=""
cleanup() {
  if [ -n "$server" ]; then kill -TERM "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

sed "s#data/tiny/#$work/#" configs/tiny.toml > "$work/tiny.toml"
"$PRS" -q init --config "$work/tiny.toml"
"$PRS" -q synth-data --out "$work/data" --train 4 --val 0 --test 2
"$PRS" -q finetune --config "$work/tiny.toml" --data-root "$work/data" --out "$work/run" --max-steps 2 --set train.warmup_steps=1 --device cpu > /dev/null
ckpt=$(ls -d "$work"/run/checkpoints/step-* | tail -1)
image=$(ls "$work"/data/*/test_images/* | head -1)

"$PRS" serve --checkpoint "$ckpt" --device cpu --port 0 > "$work/serve.out" 2> "$work/serve.err" &
server=$!
for _ in $(seq 1 600); do
  grep -q "listening on" "$work/serve.out" 2>/dev/null && break
  kill -0 "$server" 2>/dev/null || { cat "$work/serve.err"; echo "prs serve did not start"; exit 1; }
  sleep 0.1
done
url=$(grep -o "http://[^ ]*" "$work/serve.out" | head -1)
echo "browser check against $url ($image)"
node tests/browser/page_check.mjs "$url" "$image" "$OUT" \
  || { echo "--- prs serve's log"; cat "$work/serve.err"; exit 1; }
echo "screenshots: $OUT/desktop.png, $OUT/phone.png"
