#!/usr/bin/env bash
# The GPU checks and benchmarks of this project in one run, one summary table at the end.
#
#   bash scripts/bench/gpu.sh            # on a GPU machine: under 8 minutes on one GPU
#   bash scripts/bench/gpu.sh --smoke    # on a CPU: the same scripts at tiny sizes (CI, seconds)
#
# Installs nothing (the environment must already have the package, jax for the GPU, torch and diffusers).
# Runs from the repository root; each step has its own time limit and a failed step is reported in the
# table without stopping the others. Benchmarks print their table rows ('| ... |') with --table-row.
set -u
cd "$(dirname "$0")/../.."
SMOKE=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL=3
LOG=$(mktemp -d)
ROWS="$LOG/rows"
: > "$ROWS"

# step NAME TIMEOUT_S COMMAND...: runs it, keeps its output, adds its '| ... |' rows (or a FAILED row).
step() {
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*"
  local start=$SECONDS
  timeout "$limit" "$@" > "$LOG/$name.out" 2>&1
  local rc=$?
  tail -n 8 "$LOG/$name.out"
  if [[ $rc -ne 0 ]]; then
    echo "| $name | FAILED (exit $rc after $((SECONDS - start)) s; log $LOG/$name.out) | | | | | |" >> "$ROWS"
  else
    grep '^| ' "$LOG/$name.out" >> "$ROWS" || echo "| $name | ok in $((SECONDS - start)) s | | | | | |" >> "$ROWS"
  fi
}

python - <<'EOF'
import jax
d = jax.devices()[0]
print(f"jax {jax.__version__}: {jax.device_count()} x {d.device_kind} ({jax.default_backend()})")
EOF
TORCH_CUDA=$(python -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)

if [[ $SMOKE -eq 1 ]]; then
  # CI-sized: cheap XLA compiles (the programs are tiny; compile time dominates on a CPU).
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
  step train_step_micro 400 python scripts/bench/train_step.py --size micro --runs 1 --attention xla \
    --remat full --vs-torch --table-row
  # The U-Net forward benchmark builds the full SD-1.5 U-Net in both frameworks (minutes on a CPU): smoke
  # mode checks that it still starts.
  step unet_forward_cli 60 python scripts/bench/unet_forward.py --help
  step metrics_lpips 120 python scripts/bench/metrics.py --size 64 --batch 1 --repeats 1 --metrics lpips \
    --skip-torch --table-row
  step infer_tiny 200 python scripts/bench/infer.py --model tiny --lr-size 8 --steps 1 --repeats 1 --table-row
else
  VS_TORCH=()
  [[ $TORCH_CUDA -eq 1 ]] && VS_TORCH=(--vs-torch)
  step attention_tests 150 python -m pytest -q -x -p no:cacheprovider tests/test_attention.py
  step unet_forward 150 python scripts/bench/unet_forward.py --latent 64 --runs 3
  step train_step_sd15_ma_off 180 python scripts/bench/train_step.py --sd15 --resolution 512 --batch 4 \
    --dtype bfloat16 --no-multiple-attention --runs 5 --table-row "${VS_TORCH[@]}"
  step train_step_sd15 180 python scripts/bench/train_step.py --sd15 --resolution 512 --batch 4 \
    --dtype bfloat16 --runs 5 --table-row
  step metrics 150 python scripts/bench/metrics.py --size 512 --batch 8 --skip-torch --table-row
  # The inference goal: 128 -> 512, 20 steps with CFG, batch 1, under 0.5 s/image on one H100 (the row says
  # met / MISSED); batch 8 for throughput; with CUDA torch also diffusers' ControlNet pipeline and full CasSR.
  step infer_sd15 420 python scripts/bench/infer.py --sd15 --lr-size 128 --steps 20 --batch 1 8 \
    --attention auto --repeats 3 --table-row "${VS_TORCH[@]}"
fi

# unet_forward.py prints prose; its medians become a row here.
if [[ -f "$LOG/unet_forward.out" ]] && grep -q "ratio ours/torch" "$LOG/unet_forward.out"; then
  ours=$(grep -o "ours (jax.*median [0-9.]* s" "$LOG/unet_forward.out" | grep -o "[0-9.]* s$")
  ratio=$(grep -o "medians [0-9.]*" "$LOG/unet_forward.out" | grep -o "[0-9.]*$")
  echo "| U-Net forward SD-1.5 64x64 latent b1 fp32 (torch on CPU) | $ours | | | | | $ratio |" >> "$ROWS"
fi

echo
echo "## Benchmarks ($(python -c 'import jax; print(jax.devices()[0].device_kind)' 2>/dev/null))"
echo "| what | step / status | images/s | TFLOP/step | MFU | peak memory | ours/torch |"
echo "|---|---|---|---|---|---|---|"
cat "$ROWS"
! grep -q FAILED "$ROWS"
