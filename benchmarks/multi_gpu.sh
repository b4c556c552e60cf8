#!/usr/bin/env bash
# The multi-GPU measurements of issue 18 (item 3) on one host of G GPUs, NCCL, NVLink multicast kept off.
#
#   bash benchmarks/multi_gpu.sh equality   # DDP and FSDP on G GPUs == 1 GPU with grad_accum G, 50 steps, float32
#   bash benchmarks/multi_gpu.sh scaling    # tokens/s of DDP training on 1, 2, 4 (, 8) GPUs, bf16, fixed batch per GPU
#   bash benchmarks/multi_gpu.sh context    # context parallelism, L = 128k .. 1M on 2 .. G GPUs vs one GPU's longest
#   bash benchmarks/multi_gpu.sh all
#   SINGLE_LENGTHS="" CONTEXT_GPUS="8" bash benchmarks/multi_gpu.sh context   # only the 8-GPU context runs
#
# Results go to $OUT (default outputs/multi_gpu): the runs' metrics.jsonl, context_parallel-*.json, and
# summary.md (the tables for docs/benchmarks.md). Model: the Mamba 130M shape (d_model 768, 24 layers) on
# the byte-level LM task (bytes_lm, 1024-byte windows), as in configs/bytes_mamba.yaml otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT="${OUT:-outputs/multi_gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
G="$("$PY" -c 'import torch; print(torch.cuda.device_count())')"
echo "GPUs: $G" | tee -a "$OUT/summary.md"

COMMON=(--config configs/bytes_mamba.yaml "task.kwargs={length: 1024, seed: 0}" model.d_model=768 model.n_layers=24
        train.device=cuda train.threads=null train.eval_every=0 train.eval_batches=1 train.checkpoint_every=0
        train.log_every=1 train.progress=false train.tensorboard=false train.warmup_steps=10 train.lr=1e-3)

equality() {
  local steps=50 batch=8
  "$PY" -m ssmkit train "${COMMON[@]}" train.steps=$steps train.batch_size=$batch train.grad_accum="$G" \
      train.out_dir="$OUT/equality/single"
  for kind in ddp fsdp; do
    "$PY" -m torch.distributed.run --standalone --nproc-per-node "$G" -m ssmkit train "${COMMON[@]}" \
        train.steps=$steps train.batch_size=$batch train.distributed=$kind train.out_dir="$OUT/equality/$kind"
  done
  "$PY" - "$OUT" "$G" <<'EOF' | tee -a "$OUT/summary.md"
import json, sys
out, g = sys.argv[1], sys.argv[2]
def losses(kind):
    return [r["loss"] for r in map(json.loads, open(f"{out}/equality/{kind}/metrics.jsonl")) if r["event"] == "train"]
single = losses("single")
print(f"\n### DDP / FSDP on {g} GPUs vs 1 GPU with grad_accum {g} (130M shape, float32, 50 steps)\n")
print("| run | steps | max relative loss difference | final loss |\n|---|---|---|---|")
for kind in ("ddp", "fsdp"):
    other = losses(kind)
    worst = max(abs(a - b) / max(abs(a), abs(b)) for a, b in zip(single, other))
    print(f"| {kind} | {len(other)} | {worst:.2e} {'(< 1e-4)' if worst < 1e-4 else '(ABOVE 1e-4)'} | {other[-1]:.5f} |")
print(f"| single, grad_accum {g} | {len(single)} | - | {single[-1]:.5f} |")
EOF
}

scaling() {
  local per_gpu=8 steps=40
  for n in 1 2 4 8; do
    [ "$n" -le "$G" ] || continue
    "$PY" -m torch.distributed.run --standalone --nproc-per-node "$n" -m ssmkit train "${COMMON[@]}" train.bf16=true \
        train.steps=$steps train.batch_size=$((per_gpu * n)) train.log_every=10 train.out_dir="$OUT/scaling/gpus$n"
  done
  "$PY" - "$OUT" <<'EOF' | tee -a "$OUT/summary.md"
import json, os, sys
out = sys.argv[1]
print("\n### Data-parallel scaling (DDP, 130M shape, bf16, 8 x 1024 tokens per GPU per step)\n")
print("| GPUs | tokens/s (steps 31-40) | per GPU | efficiency |\n|---|---|---|---|")
base = None
for n in (1, 2, 4, 8):
    path = f"{out}/scaling/gpus{n}/metrics.jsonl"
    if not os.path.exists(path):
        continue
    last = [r for r in map(json.loads, open(path)) if r["event"] == "train"][-1]  # the last 10-step window
    rate = last["tokens_per_s"]
    base = base or rate
    print(f"| {n} | {rate:,.0f} | {rate / n:,.0f} | {rate / (n * base):.0%} |")
EOF
}

context() {
  local args=(--checkpoint-blocks --steps 2 --out "$OUT/context")
  # one GPU: the longest length that fits (doubling until out of memory)
  # SINGLE_LENGTHS="" skips it; CONTEXT_GPUS picks the multi-GPU runs (to fit a 10-minute limit per command)
  local single="${SINGLE_LENGTHS-65536 131072 262144 524288 1048576 2097152}"
  if [ -n "$single" ]; then
    # shellcheck disable=SC2086
    "$PY" benchmarks/bench_context_parallel.py "${args[@]}" --lengths $single || true
  fi
  for n in ${CONTEXT_GPUS-2 4 8}; do
    [ "$n" -le "$G" ] || continue
    # an out-of-memory rank makes the others time out (3 min) rather than hang; the lengths before it are kept
    "$PY" -m torch.distributed.run --standalone --nproc-per-node "$n" benchmarks/bench_context_parallel.py "${args[@]}" \
        --lengths 131072 262144 524288 1048576 || true
  done
  "$PY" - "$OUT" <<'EOF' | tee -a "$OUT/summary.md"
import glob, json, sys
out = sys.argv[1]
print("\n### Context parallelism (Mamba 130M shape, batch 1, bf16, blocks recomputed in backward)\n")
print("| GPUs | L | positions / GPU | s / step | tokens/s | peak GiB / GPU (max) |\n|---|---|---|---|---|---|")
for path in sorted(glob.glob(f"{out}/context/context_parallel-*-R*.json"), key=lambda p: int(p.rsplit("R", 1)[1][:-5])):
    info = json.load(open(path))
    for r in info["rows"]:
        if r["oom"]:
            print(f"| {r['ranks']} | {r['length']:,} | {r['positions_per_rank']:,} | OOM | | |")
        else:
            print(f"| {r['ranks']} | {r['length']:,} | {r['positions_per_rank']:,} | {r['seconds_per_step']:.2f} "
                  f"| {r['tokens_per_s']:,.0f} | {r['peak_gib_max']:.1f} |")
EOF
}

case "${1:-all}" in
  equality) equality ;;
  scaling) scaling ;;
  context) context ;;
  all) equality; scaling; context ;;
  *) echo "usage: $0 equality|scaling|context|all" >&2; exit 2 ;;
esac
