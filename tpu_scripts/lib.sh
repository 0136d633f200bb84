#!/usr/bin/env bash
# Globals set here are read by the scripts that source this file.
# shellcheck disable=SC2034
# Shared helpers for the tpu_scripts: argument parsing, validation, and a `run` wrapper that
# either executes a command or, under --dry-run, prints it as one copy-pasteable shell line.
#
# Sourced by every script in this directory; not meant to be executed on its own.
# Every common flag can also come from the environment (shown in brackets):
#   --name NAME              TPU VM (node) name                     [TPU_NAME]
#   --zone ZONE              GCP zone, e.g. us-central2-b           [TPU_ZONE]
#   --project PROJECT        GCP project (default: gcloud's)        [GCP_PROJECT]
#   --queued                 use a queued resource named NAME-qr   [TPU_QUEUED=1]
#   --dry-run                print the gcloud commands, run nothing [DRY_RUN=1]
#   -h, --help               show the script's usage

set -euo pipefail

TPU_NAME="${TPU_NAME:-}"
TPU_ZONE="${TPU_ZONE:-}"
GCP_PROJECT="${GCP_PROJECT:-}"
TPU_QUEUED="${TPU_QUEUED:-0}"
DRY_RUN="${DRY_RUN:-0}"
# Where the package lives on every worker.
REMOTE_DIR="${REMOTE_DIR:-rlhf_jax}"
# Where runs write their local logs on every worker (relative to the remote home).
REMOTE_RUNS="${REMOTE_RUNS:-runs}"
GCLOUD="${GCLOUD:-gcloud}"
# Number of arguments consumed by the last parse_common_flag call.
SHIFT_BY=0

die() {
  echo "error: $*" >&2
  exit 2
}

# Quote one argument for a POSIX shell: plain words stay as they are, anything else is wrapped in
# single quotes (an embedded single quote becomes '\'').
shell_quote() {
  local arg="$1"
  if [[ -n "$arg" && "$arg" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$arg"
  else
    printf "'%s'" "${arg//\'/\'\\\'\'}"
  fi
}

# Print a command as one shell line.
format_command() {
  local out="" arg
  for arg in "$@"; do
    out+="${out:+ }$(shell_quote "$arg")"
  done
  printf '%s\n' "$out"
}

# run CMD ARGS...: under --dry-run print the command line, otherwise echo it to stderr and run it.
run() {
  if [[ "$DRY_RUN" == "1" ]]; then
    format_command "$@"
  else
    format_command "$@" | sed 's/^/+ /' >&2
    "$@"
  fi
}

# need_value FLAG VALUE: the value of a flag that takes one, or a clear error.
need_value() {
  if [[ $# -lt 2 || -z "$2" || "$2" == --* ]]; then
    die "$1 needs a value"
  fi
  printf '%s' "$2"
}

# parse_common_flag "$@": consume one common flag from the front of the arguments and set
# SHIFT_BY to the number of words used; unknown flags are an error naming the flag.
parse_common_flag() {
  case "$1" in
    --name) TPU_NAME="$(need_value "$1" "${2-}")"; SHIFT_BY=2 ;;
    --zone) TPU_ZONE="$(need_value "$1" "${2-}")"; SHIFT_BY=2 ;;
    --project) GCP_PROJECT="$(need_value "$1" "${2-}")"; SHIFT_BY=2 ;;
    --queued) TPU_QUEUED=1; SHIFT_BY=1 ;;
    --dry-run) DRY_RUN=1; SHIFT_BY=1 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
}

# Check the common settings every script needs.
require_common() {
  [[ -n "$TPU_NAME" ]] || die "--name (or TPU_NAME) is required"
  [[ "$TPU_NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] \
    || die "--name '$TPU_NAME' must be lowercase letters, digits and hyphens, starting with a letter"
  [[ -n "$TPU_ZONE" ]] || die "--zone (or TPU_ZONE) is required"
  [[ "$TPU_ZONE" =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] \
    || die "--zone '$TPU_ZONE' does not look like a GCP zone (e.g. us-central2-b)"
  [[ "$TPU_QUEUED" == "0" || "$TPU_QUEUED" == "1" ]] || die "TPU_QUEUED must be 0 or 1"
  [[ "$DRY_RUN" == "0" || "$DRY_RUN" == "1" ]] || die "DRY_RUN must be 0 or 1"
}

# The queued resource's id for a node name.
queued_resource_id() {
  printf '%s-qr' "$TPU_NAME"
}

# The flags every gcloud call carries: zone, and project when given.
location_flags() {
  LOCATION_FLAGS=("--zone=$TPU_ZONE")
  if [[ -n "$GCP_PROJECT" ]]; then
    LOCATION_FLAGS+=("--project=$GCP_PROJECT")
  fi
}

# check_bucket FLAG URI: a gs:// URI or a clear error naming the flag.
check_bucket() {
  [[ "$2" =~ ^gs://[a-z0-9][-a-z0-9_.]{1,61}[a-z0-9](/.*)?$ ]] \
    || die "$1 '$2' must be a gs:// URI (e.g. gs://my-bucket/rlhf)"
}

# check_run_name NAME: a single path component.
check_run_name() {
  [[ "$1" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*$ ]] \
    || die "--run-name '$1' must be letters, digits, '.', '_' or '-' (one path component)"
}

# resolve_launch LOCAL_ROOT: the checks and the output directory that launch.sh and
# launch_local.sh share. Reads RUN_NAME, CONFIG, BUCKET, COMMAND and ENVS; checks the run name,
# that exactly one of --config FILE (inside the repository) and -- COMMAND... is given, the
# bucket and every --env KEY=VALUE; sets REPO_ROOT, OUTPUT_DIR (BUCKET/runs/RUN with --bucket,
# else LOCAL_ROOT/RUN) and, for --config, COMMAND to the experiments.pipeline command.
resolve_launch() {
  [[ -n "$RUN_NAME" ]] || die "--run-name is required"
  check_run_name "$RUN_NAME"
  if [[ -n "$CONFIG" && ${#COMMAND[@]} -gt 0 ]]; then
    die "give either --config FILE or -- COMMAND..., not both"
  fi
  if [[ -z "$CONFIG" && ${#COMMAND[@]} -eq 0 ]]; then
    die "give --config FILE or -- COMMAND..."
  fi
  REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  if [[ -n "$CONFIG" ]]; then
    [[ "$CONFIG" != /* ]] || die "--config '$CONFIG' must be a path inside the repository"
    [[ -f "$REPO_ROOT/$CONFIG" ]] || die "--config '$CONFIG' not found under $REPO_ROOT"
  fi
  if [[ -n "$BUCKET" ]]; then
    check_bucket --bucket "$BUCKET"
    OUTPUT_DIR="${BUCKET%/}/runs/$RUN_NAME"
  else
    OUTPUT_DIR="$1/$RUN_NAME"
  fi
  if [[ -n "$CONFIG" ]]; then
    COMMAND=(python -m experiments.pipeline --config "$CONFIG" --output-dir "$OUTPUT_DIR")
  fi
  local kv
  for kv in "${ENVS[@]+"${ENVS[@]}"}"; do
    [[ "$kv" =~ ^[A-Za-z_][A-Za-z0-9_]*=.*$ ]] || die "--env '$kv' must read KEY=VALUE"
  done
}

# tpu_ssh WORKER REMOTE_COMMAND: run a command on one worker (an index) or on all of them.
tpu_ssh() {
  location_flags
  run "$GCLOUD" compute tpus tpu-vm ssh "$TPU_NAME" "${LOCATION_FLAGS[@]}" \
    "--worker=$1" "--command=$2"
}

# tpu_scp WORKER SRC DEST: copy a local file to a worker (or all) under the remote home.
tpu_scp() {
  location_flags
  run "$GCLOUD" compute tpus tpu-vm scp "$2" "$TPU_NAME:$3" "${LOCATION_FLAGS[@]}" "--worker=$1"
}

# The remote shell snippet that sets WORKER_ID to the host's index in the slice (from the TPU VM
# metadata server; 0 on a single host when the attribute is missing).
# shellcheck disable=SC2016,SC2034  # expanded by the remote shell, not here
readonly WORKER_ID_SNIPPET='WORKER_ID=$(curl -sf -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || echo 0)'
