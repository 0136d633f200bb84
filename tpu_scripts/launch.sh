#!/usr/bin/env bash
# Launch an experiment on every host of a TPU VM at once. Each host runs the same command; the
# program calls jax.distributed.initialize(), which on Cloud TPU finds the coordinator (worker 0),
# the process count and this host's index from the VM metadata. Each host logs to
# runs/RUN/logs/host-<index>.log in its home directory; checkpoints and metrics go to
# --output-dir (a gs:// path when --bucket is given, so that every host writes to one place).
#
#   tpu_scripts/launch.sh --name rlhf-v4 --zone us-central2-b --run-name gpt2-hh \
#       --bucket gs://my-bucket/rlhf --config experiments/configs/gpt2_small_hh_v4-8.yaml
#   tpu_scripts/launch.sh --name rlhf-v4 --zone us-central2-b --run-name dpo1 -- \
#       python -m rlhf_jax dpo --config my_dpo.yaml
set -euo pipefail
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'USAGE'
usage: launch.sh --name NAME --zone ZONE --run-name RUN (--config FILE | -- COMMAND...) [options]

  --run-name RUN      name of this run (logs: runs/RUN on every worker)
  --config FILE       experiment config (path inside the repository); runs
                      python -m experiments.pipeline --config FILE --output-dir OUTPUT_DIR
  --bucket GCS        write the run's outputs to GCS/runs/RUN (default: runs/RUN on each host)
  --worker W          run on one worker index instead of all (debugging)
  --env KEY=VALUE     extra environment variable for the program; repeatable
  --foreground        stay attached and stream the output (default: run under nohup and return)
  -- COMMAND...       any other command, run from the repository with its .venv/bin on PATH
  --name, --zone, --project, --queued, --dry-run: see tpu_scripts/lib.sh
USAGE
}

RUN_NAME=""
CONFIG=""
BUCKET=""
WORKER="all"
FOREGROUND=0
ENVS=()
COMMAND=()
while (($#)); do
  case "$1" in
    --run-name) RUN_NAME="$(need_value "$1" "${2-}")"; shift 2 ;;
    --config) CONFIG="$(need_value "$1" "${2-}")"; shift 2 ;;
    --bucket) BUCKET="$(need_value "$1" "${2-}")"; shift 2 ;;
    --worker) WORKER="$(need_value "$1" "${2-}")"; shift 2 ;;
    --env) ENVS+=("$(need_value "$1" "${2-}")"); shift 2 ;;
    --foreground) FOREGROUND=1; shift ;;
    --) shift; COMMAND=("$@"); break ;;
    *) parse_common_flag "$@"; shift "$SHIFT_BY" ;;
  esac
done
require_common
[[ "$WORKER" == "all" || "$WORKER" =~ ^[0-9]+$ ]] || die "--worker '$WORKER' must be 'all' or an index"
# On the VM, runs/RUN under each worker's home ($HOME is expanded by the remote shell).
resolve_launch "\$HOME/$REMOTE_RUNS"

env_part="RLHF_JAX_DISTRIBUTED=1 RLHF_JAX_RUN_NAME=$(shell_quote "$RUN_NAME")"
for kv in "${ENVS[@]+"${ENVS[@]}"}"; do
  env_part+=" $(shell_quote "$kv")"
done
cmd_part=""
for arg in "${COMMAND[@]}"; do
  # $HOME is left for the remote shell to expand; everything else is quoted.
  if [[ "$arg" == "\$HOME/"* ]]; then
    cmd_part+="${cmd_part:+ }\"$arg\""
  else
    cmd_part+="${cmd_part:+ }$(shell_quote "$arg")"
  fi
done
log_dir="\$HOME/$REMOTE_RUNS/$RUN_NAME/logs"
log_file="$log_dir/host-\$WORKER_ID.log"
prefix="set -eo pipefail; cd $REMOTE_DIR; export PATH=\"\$PWD/.venv/bin:\$PATH\"; mkdir -p \"$log_dir\"; $WORKER_ID_SNIPPET; export $env_part"
if ((FOREGROUND)); then
  remote="$prefix; $cmd_part 2>&1 | tee \"$log_file\""
else
  remote="$prefix; nohup $cmd_part > \"$log_file\" 2>&1 < /dev/null & echo \"started on worker \$WORKER_ID: $log_file\""
fi
tpu_ssh "$WORKER" "$remote"
