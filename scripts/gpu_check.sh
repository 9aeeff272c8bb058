#!/usr/bin/env bash
# A prepared check for a CUDA machine (a few minutes): the small config in bf16 autocast, a short SFT,
# a few RL steps in the occ regime with one probe (full-precision diagnostics), the probe recomputed
# offline, and the benchmarks on the GPU. Usage: scripts/gpu_check.sh [OUT]   (output in OUT/, default /tmp/gpu_check)
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
echo "gpu_check done in $(( $(date +%s) - t0 ))s"
