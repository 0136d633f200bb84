#!/usr/bin/env bash
# Rehearse launch.sh on this machine: run the same experiments.pipeline command as a slice of
# N hosts, each a local process with D CPU devices (python -m rlhf_jax.launch: JAX's distributed
# runtime on localhost, gloo collectives between processes). Outputs go to runs/RUN in the
# repository, or to BUCKET/runs/RUN with --bucket (e.g. a local emulated bucket; docs/tpu.md).
#
#   tpu_scripts/launch_local.sh --run-name gpt2-hh --config experiments/configs/gpt2_small_hh_v4-8.yaml
#   tpu_scripts/launch_local.sh --run-name dpo1 --num-processes 2 -- \
#       python -m rlhf_jax dpo --config my_dpo.yaml
set -euo pipefail
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# shellcheck disable=SC2317  # called from lib.sh's parse_common_flag
usage() {
  cat <<'USAGE'
usage: launch_local.sh --run-name RUN (--config FILE | -- COMMAND...) [options]

  --run-name RUN              name of this run (outputs: runs/RUN, or GCS/runs/RUN)
  --config FILE               experiment config (path inside the repository); runs
                              python -m experiments.pipeline --config FILE --output-dir OUTPUT_DIR
  --bucket GCS                write the run's outputs to GCS/runs/RUN
  --num-processes N           local processes, one per rehearsed host (default: 2)
  --devices-per-process D     CPU devices of each process (default: 4)
  --env KEY=VALUE             extra environment variable for the program; repeatable
  -- COMMAND...               any other command, run from the repository
  --dry-run                   print the command instead of running it
USAGE
}

RUN_NAME=""
CONFIG=""
BUCKET=""
PROCESSES=2
DEVICES=4
ENVS=()
COMMAND=()
while (($#)); do
  case "$1" in
    --run-name) RUN_NAME="$(need_value "$1" "${2-}")"; shift 2 ;;
    --config) CONFIG="$(need_value "$1" "${2-}")"; shift 2 ;;
    --bucket) BUCKET="$(need_value "$1" "${2-}")"; shift 2 ;;
    --num-processes) PROCESSES="$(need_value "$1" "${2-}")"; shift 2 ;;
    --devices-per-process) DEVICES="$(need_value "$1" "${2-}")"; shift 2 ;;
    --env) ENVS+=("$(need_value "$1" "${2-}")"); shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; COMMAND=("$@"); break ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[[ "$PROCESSES" =~ ^[1-9][0-9]*$ ]] || die "--num-processes '$PROCESSES' must be a positive integer"
[[ "$DEVICES" =~ ^[1-9][0-9]*$ ]] || die "--devices-per-process '$DEVICES' must be a positive integer"
# The checks and the pipeline command of launch.sh; outputs under runs/ in the repository.
resolve_launch "$REMOTE_RUNS"

cd "$REPO_ROOT"
if [[ -d .venv/bin ]]; then
  export PATH="$PWD/.venv/bin:$PATH"
fi
run env RLHF_JAX_RUN_NAME="$RUN_NAME" "${ENVS[@]+"${ENVS[@]}"}" \
  python -m rlhf_jax.launch --num-processes "$PROCESSES" --devices-per-process "$DEVICES" \
  -- "${COMMAND[@]}"
