#!/usr/bin/env bash
# A prepared check for a CUDA machine (a few minutes): the small config in bf16 autocast, a short SFT,
# a few RL steps in the occ regime with one probe (full-precision diagnostics), the probe recomputed
# offline, and the benchmarks on the GPU; then dist.strategy=fsdp (FSDP2) on the SmolLM2 GPU config.
# Usage: scripts/gpu_check.sh [OUT]   (output in OUT/, default /tmp/gpu_check)
# The fsdp part needs SmolLM2-135M-Instruct: SMOLLM2_DIR=DIR, or `occ models fetch smollm2` (network, once);
# without either it is reported as not measured.
set -euo pipefail
OUT=${1:-/tmp/gpu_check}
rm -rf "$OUT"; mkdir -p "$OUT"
python - <<'PY'
import torch, transformers
assert torch.cuda.is_available(), "no CUDA device: this check is for a GPU machine"
print("torch", torch.__version__, "transformers", transformers.__version__, "device", torch.cuda.get_device_name(0))
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
t0=$(date +%s)
occ sft --config small --set sft.steps=150 --set sft.eval_every=0 --set sft.eval_size=32 \
  --out "$OUT/sft" 2>&1 | tail -n 3
occ rl --config small --init "$OUT/sft/checkpoint" --regime occ --set rl.steps=8 \
  --set diag.every=0 --set "diag.at=[6]" --set eval.size=32 --set eval.samples=1 --out "$OUT/rl" 2>&1 | tail -n 3
occ probe "$OUT/rl" 2>&1 | tail -n 1
python - "$OUT/rl" <<'PY'
import json, sys, math
import pandas as pd
run = sys.argv[1]
recs = [json.loads(l) for l in open(f"{run}/metrics.jsonl")]
print("steps", len(recs), "reward", [round(r["reward/mean"], 3) for r in recs])
print("step_s", [round(r["perf/step_s"], 3) for r in recs])
df = pd.read_parquet(f"{run}/probes.parquet")
online = json.load(open(f"{run}/probes/step_000006/online.json"))
for k in ("diag/sgd/corr", "diag/adam/corr", "diag/adam/curv", "diag/adam/lambda_star", "diag/curve/beta",
          "diag/curve/r2", "lambda/reference", "lambda/fisher", "diag/identity3/rel_err"):
    off = df[k].iloc[0] if k in df else float("nan")
    print(f"{k:28s} online {online.get(k)!s:>24s} offline {off!s:>24s}")
PY
occ bench hvp step rollout --sizes tiny,small --json "$OUT/bench.json" 2>&1 | tail -n 40

# ---- dist.strategy=fsdp on the SmolLM2 GPU config: 2 processes on 2 GPUs (NCCL needs a GPU per process), else
# one process in a process group of one (FSDP2's code path, nothing to shard), beside the same run unsharded.
# Four RL steps, one probe at step 3 (its bundle re-probed offline), peak GPU memory per process (nvidia-smi).
SMOL=${SMOLLM2_DIR:-$(occ models fetch smollm2 2>/dev/null | tail -n 1 || true)}
if [[ -z "$SMOL" || ! -e "$SMOL" ]]; then
  echo "fsdp: not measured (no SmolLM2 model: set SMOLLM2_DIR or allow occ models fetch smollm2)"
else
  NGPU=$(nvidia-smi -L | wc -l); NP=$(( NGPU >= 2 ? 2 : 1 ))
  RL_SETS=(--set rl.steps=4 --set rl.prompts_per_rollout=8 --set rl.group_size=4 --set rl.minibatches=2
           --set rl.max_new_tokens=64 --set diag.every=0 --set "diag.at=[3]" --set eval.size=8 --set eval.samples=1
           --set eval.max_new_tokens=64)
  for strategy in ddp fsdp; do
    nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits -lms 200 > "$OUT/mem_$strategy.csv" &
    SMI=$!
    s0=$(date +%s)
    torchrun --nproc_per_node "$NP" --master_port 29511 -m occ_theory.cli rl --config smollm2_gpu --model "$SMOL" \
      --regime occ --set dist.strategy=$strategy "${RL_SETS[@]}" --out "$OUT/smollm2_$strategy" 2>&1 | tail -n 2
    kill $SMI || true
    peak=$(awk -F', ' '{if ($2 > m[$1]) m[$1] = $2} END {for (p in m) printf "%s MiB ", m[p]}' "$OUT/mem_$strategy.csv")
    echo "smollm2 $strategy on $NP process(es): $(( $(date +%s) - s0 ))s, peak GPU memory per process: $peak"
  done
  occ probe "$OUT/smollm2_fsdp" 2>&1 | tail -n 1
  python - "$OUT/smollm2_ddp" "$OUT/smollm2_fsdp" <<'PY'
import json, math, sys
import pandas as pd
ddp, fsdp = ([json.loads(l) for l in open(f"{run}/metrics.jsonl")] for run in sys.argv[1:])
print("fsdp step_s", [round(r["perf/step_s"], 2) for r in fsdp], "ddp step_s", [round(r["perf/step_s"], 2) for r in ddp])
for k in ("rl/loss", "rl/grad_norm", "lambda/used", "diag/adam/corr", "diag/adam/curv", "diag/identity3/rel_err"):
    print(f"{k:26s} ddp {ddp[2].get(k)!s:>24s} fsdp {fsdp[2].get(k)!s:>24s}")
online = json.load(open(f"{sys.argv[2]}/probes/step_000003/online.json"))
df = pd.read_parquet(f"{sys.argv[2]}/probes.parquet")
worst = max((abs(df[k].iloc[0] - v) / max(abs(v), 1e-12), k) for k, v in online.items()
            if isinstance(v, float) and k in df and isinstance(df[k].iloc[0], float) and math.isfinite(v))
print("fsdp bundle re-probed offline: worst relative difference to online.json", worst)
PY
fi
echo "gpu_check done in $(( $(date +%s) - t0 ))s"
