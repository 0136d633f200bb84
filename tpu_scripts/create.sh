#!/usr/bin/env bash
# Create a TPU VM (or a queued resource that provisions one) and wait until it is ready.
#
#   tpu_scripts/create.sh --name rlhf-v4 --zone us-central2-b --accelerator-type v4-8
#   tpu_scripts/create.sh --name rlhf-v5e --zone us-west4-a --accelerator-type v5litepod-8 \
#       --queued --spot --dry-run
set -euo pipefail
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'USAGE'
usage: create.sh --name NAME --zone ZONE --accelerator-type TYPE [options]

  --accelerator-type TYPE  v4-8, v4-16, v5litepod-8, v5p-8, v6e-8, ... [TPU_TYPE]
  --version VERSION        TPU software version (default: by TPU generation)  [TPU_VERSION]
  --spot                   request spot capacity
  --valid-until DURATION   queued resources only: give up after DURATION (e.g. 6h)
  --no-wait                return after the create request instead of waiting for READY/ACTIVE
  --name, --zone, --project, --queued, --dry-run: see tpu_scripts/lib.sh
USAGE
}

TPU_TYPE="${TPU_TYPE:-}"
TPU_VERSION="${TPU_VERSION:-}"
SPOT=0
VALID_UNTIL=""
WAIT=1
while (($#)); do
  case "$1" in
    --accelerator-type) TPU_TYPE="$(need_value "$1" "${2-}")"; shift 2 ;;
    --version) TPU_VERSION="$(need_value "$1" "${2-}")"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --valid-until) VALID_UNTIL="$(need_value "$1" "${2-}")"; shift 2 ;;
    --no-wait) WAIT=0; shift ;;
    *) parse_common_flag "$@"; shift "$SHIFT_BY" ;;
  esac
done
require_common
[[ -n "$TPU_TYPE" ]] || die "--accelerator-type (or TPU_TYPE) is required"
[[ "$TPU_TYPE" =~ ^(v2|v3|v4|v5p|v5litepod|v6e)-[0-9]+$ ]] \
  || die "--accelerator-type '$TPU_TYPE' must be one of v2-N, v3-N, v4-N, v5p-N, v5litepod-N, v6e-N"
if [[ -n "$VALID_UNTIL" && "$TPU_QUEUED" != "1" ]]; then
  die "--valid-until applies only with --queued"
fi

# Default software version for each TPU generation.
if [[ -z "$TPU_VERSION" ]]; then
  case "$TPU_TYPE" in
    v2-* | v3-* | v4-*) TPU_VERSION="tpu-ubuntu2204-base" ;;
    v5litepod-*) TPU_VERSION="v2-alpha-tpuv5-lite" ;;
    v5p-*) TPU_VERSION="v2-alpha-tpuv5" ;;
    v6e-*) TPU_VERSION="v2-alpha-tpuv6e" ;;
  esac
fi

location_flags
if [[ "$TPU_QUEUED" == "1" ]]; then
  QR_ID="$(queued_resource_id)"
  cmd=("$GCLOUD" compute tpus queued-resources create "$QR_ID" "--node-id=$TPU_NAME"
    "${LOCATION_FLAGS[@]}" "--accelerator-type=$TPU_TYPE" "--runtime-version=$TPU_VERSION")
  ((SPOT)) && cmd+=(--spot)
  [[ -n "$VALID_UNTIL" ]] && cmd+=("--valid-until-duration=$VALID_UNTIL")
  run "${cmd[@]}"
  describe=("$GCLOUD" compute tpus queued-resources describe "$QR_ID" "${LOCATION_FLAGS[@]}"
    "--format=value(state.state)")
  ready_state="ACTIVE"
else
  cmd=("$GCLOUD" compute tpus tpu-vm create "$TPU_NAME" "${LOCATION_FLAGS[@]}"
    "--accelerator-type=$TPU_TYPE" "--version=$TPU_VERSION")
  ((SPOT)) && cmd+=(--spot)
  run "${cmd[@]}"
  describe=("$GCLOUD" compute tpus tpu-vm describe "$TPU_NAME" "${LOCATION_FLAGS[@]}"
    "--format=value(state)")
  ready_state="READY"
fi

((WAIT)) || exit 0
if [[ "$DRY_RUN" == "1" ]]; then
  # The poll that the real run repeats every 30 s until the state reads $ready_state.
  run "${describe[@]}"
  exit 0
fi
echo "waiting for $TPU_NAME to be $ready_state ..." >&2
while true; do
  state="$("${describe[@]}" 2>/dev/null || true)"
  echo "  state: ${state:-unknown}" >&2
  case "$state" in
    "$ready_state") break ;;
    FAILED | SUSPENDED | PREEMPTED) die "$TPU_NAME entered state $state" ;;
  esac
  sleep 30
done
echo "$TPU_NAME is $ready_state" >&2
