#!/usr/bin/env bash
# Does a 4-bit (or 8-bit) frozen base train as well as the unquantised one? Runs `prs demo` (the
# embedded tiny configuration, CPU) once per seed and base storage, and prints the held-out test
# Dice and position accuracy of each run with the mean per storage. About 4-5 minutes per run on
# two cores.
#
#   scripts/quant_quality.sh [OUT] [SEEDS] [STORAGES]
#       OUT       working folder (default runs/quant-quality; must not exist)
#       SEEDS     train.seed values (default "0 1 2")
#       STORAGES  model.base_quant values (default "none 4bit")
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/quant-quality}"
seeds="${2:-0 1 2}"
storages="${3:-none 4bit}"
prs="${PRS_BIN:-./target/release/prs}"
[[ -e "$out" ]] && { echo "$out exists: remove it or pick another folder" >&2; exit 1; }
mkdir -p "$out"
table="$out/summary.md"
echo "| base | seed | test Dice | position accuracy | seconds |" >"$table"
echo "|---|---:|---:|---:|---:|" >>"$table"
for q in $storages; do
  for s in $seeds; do
    run="$out/$q-seed$s"
    t0=$(date +%s)
    "$prs" demo --out "$run" --set "model.base_quant=\"$q\"" --set "train.seed=$s" >"$run.log" 2>&1 ||
      { echo "demo $q seed $s failed: $run.log" >&2; exit 1; }
    secs=$(($(date +%s) - t0))
    read -r dice pos < <(python3 -c 'import json,sys; o=json.load(open(sys.argv[1]))["overall"]; print(o["dice"]["mean"], o["position"]["accuracy"])' "$run/eval/summary.json")
    printf '| %s | %s | %.3f | %.3f | %s |\n' "$q" "$s" "$dice" "$pos" "$secs" | tee -a "$table"
  done
done
python3 - "$table" <<'EOF'
import sys, statistics as st
rows = [l.strip("|\n").split("|") for l in open(sys.argv[1]) if l.startswith("| ") and "base" not in l]
by = {}
for r in rows:
    by.setdefault(r[0].strip(), []).append((float(r[2]), float(r[3])))
with open(sys.argv[1], "a") as f:
    f.write("\n| base | runs | Dice mean (min-max) | position mean (min-max) |\n|---|---:|---|---|\n")
    for q, v in by.items():
        d, p = [x[0] for x in v], [x[1] for x in v]
        f.write(f"| {q} | {len(v)} | {st.mean(d):.3f} ({min(d):.3f}-{max(d):.3f}) | {st.mean(p):.3f} ({min(p):.3f}-{max(p):.3f}) |\n")
print(open(sys.argv[1]).read())
EOF
