#!/usr/bin/env bash
# The reference experiment behind figures/: SFT once, RL in each regime for three seeds, probes,
# figures and the claim table. About an hour on a 2-core CPU. Usage: scripts/reference_experiment.sh [OUT]
set -euo pipefail
OUT=${1:-runs/reference}
REGIMES=${REGIMES:-"off detach ce policy occ"}
SEEDS=${SEEDS:-"0 1 2"}
mkdir -p "$OUT"
[ -f "$OUT/sft/checkpoint/occ_model.json" ] || occ sft --config tiny --out "$OUT/sft"
# the SFT checkpoint's held-out accuracy, with the RL runs' eval settings: the baseline of every gain
[ -f "$OUT/sft/checkpoint/eval.json" ] || occ eval "$OUT/sft/checkpoint" --config reference
for seed in $SEEDS; do
  for regime in $REGIMES; do
    run="$OUT/${regime}__${seed}"
    if [ ! -f "$run/eval.json" ]; then
      if [ -f "$run/config.yaml" ]; then occ rl --resume "$run"
      else occ rl --config reference --init "$OUT/sft/checkpoint" --regime "$regime" --seed "$seed" --out "$run"; fi
    fi
    # an interrupted probe pass leaves no probes.parquet (it is written atomically): redo it
    if [ -d "$run/probes" ] && [ ! -f "$run/probes.parquet" ]; then occ probe "$run"; fi
    # the same probes on a grid capped where the MTP step equals the RL step (the local, second-order regime)
    if [ -d "$run/probes" ] && [ ! -f "$run/probes_cap1.parquet" ]; then
      occ probe "$run" --set diag.grid_cap=1 --out probes_cap1.parquet; fi
  done
done
# figures/ is the committed reference report: --force replaces it (figures/calibration/ is kept)
occ figures "$OUT" --out figures --force
occ figures "$OUT" --probes probes_cap1.parquet --out figures/grid_cap1 --force
