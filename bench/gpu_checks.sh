#!/usr/bin/env bash
# The GPU paths, on a CUDA machine (CI has none, so the test suite cannot cover them):
#   throughput  training tokens/s and MFU, llmlab eager / compiled vs transformers, small-14m and gpt2-124m
#   pretrain    `llmlab pretrain --preset gpt2-124m` for a few steps under torchrun with FSDP2 over NCCL,
#               then a resume on top of it (bf16 autocast, flash SDPA, torch.compile as the preset sets)
#   sft         the tiny-tasks SFT recipe on the demo base (runs/demo/final), SFT_STEPS steps
#   align       every alignment stage for a few steps on CUDA: reward model, DPO (on-policy pairs), PPO with
#               that reward model, GRPO; starts from ALIGN_MODEL (default runs/demo/final)
#
#   bash bench/gpu_checks.sh OUTDIR [throughput] [pretrain] [sft] [align]     (default: throughput pretrain)
#
# Uses the machine's python3 and torch (PYTHON= overrides); llmlab runs from this checkout via PYTHONPATH.
set -uo pipefail
OUT=${1:?usage: bash bench/gpu_checks.sh OUTDIR [throughput] [pretrain] [sft] [align]}
shift
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(throughput pretrain)
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# tqdm bars are redrawn many times a second; keep the logs readable.
export TQDM_MININTERVAL=30

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, \
'cuda', torch.version.cuda, 'flash sdpa', torch.backends.cuda.flash_sdp_enabled())"

for step in "${STEPS[@]}"; do
  echo "=== $step ($(date -u +%H:%M:%S))"
  case $step in
    throughput)
      $PY bench/train_throughput.py --device cuda --preset small-14m --batch 8 --seq 256 \
        --rounds 5 --steps 10 --warmup 5 --json "$OUT/throughput_small14m_8x256.json"
      $PY bench/train_throughput.py --device cuda --preset small-14m --batch 64 --seq 256 \
        --rounds 5 --steps 10 --warmup 5 --json "$OUT/throughput_small14m_64x256.json"
      $PY bench/train_throughput.py --device cuda --preset gpt2-124m --batch 16 --seq 1024 \
        --rounds 4 --steps 5 --warmup 3 --json "$OUT/throughput_gpt2_16x1024.json"
      ;;
    pretrain)
      run=/tmp/llmlab-gpt2
      rm -rf "$run"
      torchrun --standalone --nproc_per_node 1 -m llmlab pretrain --preset gpt2-124m --out "$run" \
        max_steps=60 grad_accum_steps=2 warmup_steps=10 eval_every=30 eval_batches=10 save_every=30 \
        parallel=fsdp 2>&1 | tr '\r' '\n' | grep -v '^\s*$' | grep -E "llmlab|done|step|error|Error" | tail -25
      torchrun --standalone --nproc_per_node 1 -m llmlab pretrain --preset gpt2-124m --out "$run" --resume \
        max_steps=90 grad_accum_steps=2 warmup_steps=10 eval_every=30 eval_batches=10 save_every=30 \
        parallel=fsdp 2>&1 | tr '\r' '\n' | grep -E "llmlab|done|resum|error|Error" | tail -10
      cp "$run/metrics.jsonl" "$OUT/pretrain_gpt2_metrics.jsonl" 2>/dev/null
      ;;
    sft)
      $PY -m llmlab sft --preset tiny-tasks --base runs/demo/final --out /tmp/llmlab-sft \
        max_steps="${SFT_STEPS:-5000}" task_eval_per_task="${SFT_EVAL_PER_TASK:-20}" ${SFT_ARGS:-} 2>&1 \
        | tr '\r' '\n' | grep -v "it/s\]$" | tail -40
      cp /tmp/llmlab-sft/sft_report.json "$OUT/sft_report.json" 2>/dev/null
      ;;
    align)
      M=${ALIGN_MODEL:-runs/demo/final}
      a() { name=$1; shift; $PY -m llmlab "$@" > "$OUT/align_$name.log" 2>&1; echo "$name rc=$?"; \
            tr '\r' '\n' < "$OUT/align_$name.log" | grep -v "/s\]$" | grep -v '^\s*$' | tail -4; }
      a rm rm --out /tmp/llmlab-rm model="$M" data=[tasks] heldout=null n_heldout=100 train.max_steps=30
      a dpo align --preset tiny-dpo --out /tmp/llmlab-dpo model="$M" train.max_steps=20 max_pairs=400
      a ppo ppo --out /tmp/llmlab-ppo model="$M" reward=rm reward_model=/tmp/llmlab-rm/final \
        train.max_steps=3 n_eval=18
      a grpo grpo --out /tmp/llmlab-grpo model="$M" train.max_steps=3 n_eval=18
      ;;
    *) echo "unknown step $step" >&2 ;;
  esac
done
