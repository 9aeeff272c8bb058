#!/usr/bin/env bash
# The reference experiment behind figures/: one tiny SFT checkpoint, then RL at the calibrated point
# (configs/reference.yaml) in each arm and seed, two runs at a time on one thread each, probes, the arms' step
# cost timed side by side (occ cost -> OUT/step_cost.json), figures, the claim table and summary.json.
# Resumable: rerun the same command after an interruption.
# Usage: scripts/reference_experiment.sh [OUT]
#   ARMS   arms to run (default below): a regime, regime@mtp_coef, occ/<proxy>, or <arm>/<clip_scope> (detach/separate)
#   SEEDS  seeds of every arm (default "0 1 2 3"); runs go seed by seed, so a partial experiment has every arm
#   MORE_SEEDS, MORE_ARMS  further seeds (default "4 5") of the arms the verdicts rest on (default "detach
#          occ/reference real"), run after the others
#   SFT    the SFT run to start from (default OUT/sft; made with `occ sft --config tiny` when missing); its checkpoint's
#          held-out evaluation is the negative-control arm `sft` of claim 4
#   JOBS   runs at a time (default 2)
#   FIG    where the report goes (default figures; --force replaces it, figures/calibration/ is kept)
#   FINISHED_ONLY  1: run nothing; the report from the runs that finished (eval.json, and the probes' table when
#          they probed), e.g. after stopping the experiment part-way
#   REPROBE  a file name (e.g. probes_final.parquet): each finished run's probes recomputed from its bundles by this
#          version of the toolkit into RUN/REPROBE (3-5 min a run), and the report read from it; for runs trained by
#          an earlier version, whose online values lack keys this version's analysis reads. Default: the values each
#          run computed online (probes.parquet, seconds; the same numbers when the versions agree)
set -euo pipefail
OUT=${1:-runs/reference}
# detach is the baseline (off trains the policy identically) and detach/separate its clip remedy (θ_S and θ_M clipped
# apart); ce and policy at a λ below and above the logged λ_bal scale (about 0.4 for ce and 2 for policy at this lr);
# occ with the paper's proxy and the fisher one (bounded by rl.coef_max); real (λ from the clipped step's
# second-order model); the gradient-similarity baselines cosine and upgrad
ARMS=${ARMS:-"detach detach/separate ce@0.1 ce@1 policy@0.3 policy@3 occ/reference occ/fisher real cosine upgrad"}
SEEDS=${SEEDS:-"0 1 2 3"}
MORE_SEEDS=${MORE_SEEDS-"4 5"}
MORE_ARMS=${MORE_ARMS:-"detach occ/reference real"}
SFT=${SFT:-$OUT/sft}
JOBS=${JOBS:-2}
FIG=${FIG:-figures}
REPROBE=${REPROBE:-}
PROBES=${REPROBE:-probes.parquet}
mkdir -p "$OUT"
[ -f "$SFT/checkpoint/occ_model.json" ] || occ sft --config tiny --out "$SFT"
# the SFT checkpoint's held-out accuracy, with the RL runs' eval settings: the baseline of every gain
[ -f "$SFT/checkpoint/eval.json" ] || occ eval "$SFT/checkpoint" --config reference

run_one() {  # one arm and seed: train (or resume), then collect its probes (set -e does not reach a function
  # called in an && list, hence the explicit returns)
  local arm=$1 seed=$2 regime extra=()
  local run="$OUT/${arm//\//-}__$seed"
  regime=${arm%%[@/]*}
  local rest=${arm#"$regime"}
  if [ "$regime" = occ ] && [[ $rest == /* ]]; then  # occ/<proxy>[/<clip_scope>]
    rest=${rest#/}; extra+=(--set "rl.proxy=${rest%%/*}"); rest=${rest#"${rest%%/*}"}; fi
  if [[ $rest == @* ]]; then rest=${rest#@}; extra+=(--set "rl.mtp_coef=${rest%%/*}"); rest=${rest#"${rest%%/*}"}; fi
  if [[ $rest == /* ]]; then extra+=(--set "rl.clip_scope=${rest#/}"); fi
  if [ ! -f "$run/eval.json" ]; then
    if [ -f "$run/config.yaml" ]; then occ rl --resume "$run" || return 1
    else occ rl --config reference --init "$SFT/checkpoint" --regime "$regime" --seed "$seed" "${extra[@]}" --out "$run" \
      || return 1; fi
  fi
  # the probes' table: the values the run computed online, collected (occ probe without --online recomputes them)
  if [ -d "$run/probes" ] && [ ! -f "$run/probes.parquet" ]; then occ probe "$run" --online || return 1; fi
  if [ -n "$REPROBE" ] && [ -d "$run/probes" ] && [ ! -f "$run/$REPROBE" ]; then
    occ probe "$run" --probes "$REPROBE" || return 1; fi
}

if [ "${FINISHED_ONLY:-0}" = 1 ]; then
  runs=()
  for d in "$OUT"/*/; do
    d=${d%/}
    [ -f "$d/eval.json" ] && { [ ! -d "$d/probes" ] || [ -f "$d/$PROBES" ]; } && runs+=("$d")
  done
  [ "${#runs[@]}" -gt 0 ] || { echo "no finished run in $OUT" >&2; exit 1; }
  echo "report from ${#runs[@]} finished runs"
else
  running=0 failed=0
  plan=()
  for seed in $SEEDS; do for arm in $ARMS; do plan+=("$arm $seed"); done; done
  for seed in $MORE_SEEDS; do for arm in $MORE_ARMS; do plan+=("$arm $seed"); done; done
  for item in "${plan[@]}"; do
    arm=${item% *} seed=${item#* }
    log="$OUT/${arm//\//-}__$seed.log"
    run_one "$arm" "$seed" >> "$log" 2>&1 && echo "done $arm seed $seed" || { echo "FAILED $arm seed $seed: see $log"; exit 1; } &
    running=$((running + 1))
    if [ "$running" -ge "$JOBS" ]; then wait -n || failed=1; running=$((running - 1)); fi
  done
  while [ "$running" -gt 0 ]; do wait -n || failed=1; running=$((running - 1)); done
  [ "$failed" = 0 ] || { echo "some runs failed; rerun the same command to resume them" >&2; exit 1; }

  runs=("$OUT")
fi

# claim 6: one optimizer step of each arm timed round-robin on one minibatch (occ cost; about 3 min), once
[ -f "$OUT/step_cost.json" ] || occ cost "${runs[@]}" --rounds 60 --json "$OUT/step_cost.json"
occ figures "${runs[@]}" --out "$FIG" --force --step-cost "$OUT/step_cost.json" --probes "$PROBES"
# docs/results.md's tables are generated from the committed summary.json (a test checks they agree)
if [ "$FIG" = figures ]; then python -m analysis.readme_table figures/summary.json docs/results.md
else python -m analysis.readme_table "$FIG/summary.json"; fi
