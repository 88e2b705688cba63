#!/usr/bin/env bash
# TorchTitan-style launcher.
#   ./run_train.sh                                   # default job, all local GPUs (1 process on CPU)
#   NGPU=2 ./run_train.sh --mtp.regime policy        # CLI overrides pass through
#   CONFIG_FILE=train_configs/occ.toml ./run_train.sh
#   ./run_train.sh --job.config_file train_configs/debug_occ.toml
# On SLURM (one task per node; torchrun spawns the local processes):
#   srun --nodes=$N --ntasks-per-node=1 env NNODES=$N RDZV_HOST=$(hostname) ./run_train.sh
set -euo pipefail
caller_dir=$PWD
cd "$(dirname "$0")"

# A relative config path is the caller's when it exists there, else the repo's.
resolve() {
  case "$1" in
    /*) printf '%s' "$1" ;;
    *) if [ -e "$caller_dir/$1" ]; then printf '%s' "$caller_dir/$1"; else printf '%s' "$1"; fi ;;
  esac
}

if [ -z "${NGPU:-}" ]; then
  NGPU=$(python -c "import torch; print(torch.cuda.device_count() or 1)" 2>/dev/null || echo 1)
fi
CONFIG_FILE=$(resolve "${CONFIG_FILE:-train_configs/debug_occ.toml}")
NNODES=${NNODES:-${SLURM_NNODES:-1}}
LOG_RANK=${LOG_RANK:-0}

config_args=(--job.config_file "$CONFIG_FILE")
args=()
expect_file=0
for arg in "$@"; do
  if [ "$expect_file" = 1 ]; then arg=$(resolve "$arg"); expect_file=0; fi
  case "$arg" in
    --job.config_file|--job.config-file) config_args=(); expect_file=1 ;;
    --job.config_file=*|--job.config-file=*) config_args=(); arg="${arg%%=*}=$(resolve "${arg#*=}")" ;;
  esac
  args+=("$arg")
done

if [ "$NNODES" -gt 1 ]; then
  rdzv=(--nnodes "$NNODES" --rdzv_backend c10d --rdzv_endpoint "${RDZV_HOST:?set RDZV_HOST}:${RDZV_PORT:-29500}" --rdzv_id "${SLURM_JOB_ID:-torchtitan_mtp}")
else
  rdzv=(--standalone --nnodes 1)
fi

exec torchrun "${rdzv[@]}" --nproc_per_node "$NGPU" --local-ranks-filter "$LOG_RANK" --role rank --tee 3 \
  -m torchtitan_mtp.train "${config_args[@]}" "${args[@]}"
