#!/usr/bin/env bash
# Delete a TPU VM (or its queued resource, which deletes the VM with it).
#
#   tpu_scripts/delete.sh --name rlhf-v4 --zone us-central2-b
#   tpu_scripts/delete.sh --name rlhf-v5e --zone us-west4-a --queued --dry-run
set -euo pipefail
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'USAGE'
usage: delete.sh --name NAME --zone ZONE [options]

  --async            return without waiting for the deletion to finish
  --name, --zone, --project, --queued, --dry-run: see tpu_scripts/lib.sh
USAGE
}

ASYNC=0
while (($#)); do
  case "$1" in
    --async) ASYNC=1; shift ;;
    *) parse_common_flag "$@"; shift "$SHIFT_BY" ;;
  esac
done
require_common

location_flags
if [[ "$TPU_QUEUED" == "1" ]]; then
  # --force deletes the node that the queued resource provisioned as well.
  cmd=("$GCLOUD" compute tpus queued-resources delete "$(queued_resource_id)" "${LOCATION_FLAGS[@]}"
    --force --quiet)
else
  cmd=("$GCLOUD" compute tpus tpu-vm delete "$TPU_NAME" "${LOCATION_FLAGS[@]}" --quiet)
fi
if ((ASYNC)); then
  cmd+=(--async)
fi
run "${cmd[@]}"
