#!/usr/bin/env bash
# The calibration sweep behind figures/calibration/: one tiny SFT checkpoint (evaluated with the sweep's eval
# settings), then the baseline regime at each learning rate, two runs at a time on one thread each; resumable.
# Usage: scripts/calibrate.sh [OUT]   (LRS="3e-5 1e-4 3e-4", EXTRA="--set rl.kl_coef=0.05" and FIG=figures/calibration
# to vary it; every run of one OUT must share EXTRA)
set -euo pipefail
OUT=${1:-runs/calibration}
LRS=${LRS:-"3e-5 1e-4 3e-4"}
EXTRA=${EXTRA:-}
FIG=${FIG:-figures/calibration}
mkdir -p "$OUT"
SFT=${SFT:-$OUT/sft}   # SFT=runs/calibration/sft reuses another sweep's checkpoint
[ -f "$SFT/checkpoint/occ_model.json" ] || occ sft --config tiny --out "$SFT"
[ -f "$SFT/checkpoint/eval.json" ] || occ eval "$SFT/checkpoint" --config calibration
run_one() {
  local lr=$1 run="$OUT/lr_$1"
  if [ -f "$run/eval.json" ]; then return; fi
  if [ -f "$run/config.yaml" ]; then occ rl --resume "$run"
  else occ rl --config calibration --init "$SFT/checkpoint" --set rl.lr="$lr" $EXTRA --out "$run"; fi
}
jobs=0
for lr in $LRS; do
  run_one "$lr" > "$OUT/lr_$lr.log" 2>&1 &
  jobs=$((jobs + 1))
  if [ "$jobs" -ge 2 ]; then wait -n; jobs=$((jobs - 1)); fi
done
wait
python -m analysis.calibration $(for lr in $LRS; do echo "$OUT/lr_$lr"; done) --out "$FIG"
