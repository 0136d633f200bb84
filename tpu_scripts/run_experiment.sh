#!/usr/bin/env bash
# The whole round trip: create the TPU VM, install the package on every worker, run one
# experiment on all hosts in the foreground, sync its logs to the bucket, and delete the VM (also
# when a step fails, unless --keep).
#
#   tpu_scripts/run_experiment.sh --name rlhf-v4 --zone us-central2-b --accelerator-type v4-8 \
#       --bucket gs://my-bucket/rlhf --config experiments/configs/gpt2_small_hh_v4-8.yaml \
#       --stage gs://my-bucket/data/hh-rlhf=data/hh-rlhf \
#       --stage gs://my-bucket/models/gpt2=models/gpt2 --dry-run
set -euo pipefail
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
HERE="$(dirname "${BASH_SOURCE[0]}")"

# shellcheck disable=SC2317  # called from lib.sh's parse_common_flag
usage() {
  cat <<'USAGE'
usage: run_experiment.sh --name NAME --zone ZONE --accelerator-type TYPE --bucket GCS
                         --config FILE [options]

  --accelerator-type TYPE   passed to create.sh
  --spot                    passed to create.sh
  --config FILE             experiment config, passed to launch.sh
  --bucket GCS              outputs and logs go to GCS/runs/RUN
  --run-name RUN            default: the config's file name without .yaml
  --stage GCS=DIR           passed to setup.sh; repeatable
  --git URL, --ref REF      passed to setup.sh
  --keep                    do not delete the VM at the end
  --name, --zone, --project, --queued, --dry-run: see tpu_scripts/lib.sh
USAGE
}

TPU_TYPE=""
CONFIG=""
BUCKET=""
RUN_NAME=""
KEEP=0
CREATE_EXTRA=()
SETUP_EXTRA=()
while (($#)); do
  case "$1" in
    --accelerator-type) TPU_TYPE="$(need_value "$1" "${2-}")"; shift 2 ;;
    --spot) CREATE_EXTRA+=(--spot); shift ;;
    --config) CONFIG="$(need_value "$1" "${2-}")"; shift 2 ;;
    --bucket) BUCKET="$(need_value "$1" "${2-}")"; shift 2 ;;
    --run-name) RUN_NAME="$(need_value "$1" "${2-}")"; shift 2 ;;
    --stage | --git | --ref) SETUP_EXTRA+=("$1" "$(need_value "$1" "${2-}")"); shift 2 ;;
    --keep) KEEP=1; shift ;;
    *) parse_common_flag "$@"; shift "$SHIFT_BY" ;;
  esac
done
require_common
[[ -n "$TPU_TYPE" ]] || die "--accelerator-type is required"
[[ -n "$CONFIG" ]] || die "--config is required"
[[ -n "$BUCKET" ]] || die "--bucket is required"
check_bucket --bucket "$BUCKET"
if [[ -z "$RUN_NAME" ]]; then
  RUN_NAME="$(basename "$CONFIG" .yaml)"
fi
check_run_name "$RUN_NAME"

common=(--name "$TPU_NAME" --zone "$TPU_ZONE")
[[ -n "$GCP_PROJECT" ]] && common+=(--project "$GCP_PROJECT")
[[ "$TPU_QUEUED" == "1" ]] && common+=(--queued)
[[ "$DRY_RUN" == "1" ]] && common+=(--dry-run)

# shellcheck disable=SC2317  # runs from the EXIT trap
cleanup() {
  local status=$?
  if ((!KEEP)); then
    "$HERE/delete.sh" "${common[@]}" || echo "warning: deleting $TPU_NAME failed; delete it by hand" >&2
  fi
  exit "$status"
}

"$HERE/create.sh" "${common[@]}" --accelerator-type "$TPU_TYPE" "${CREATE_EXTRA[@]+"${CREATE_EXTRA[@]}"}"
trap cleanup EXIT
"$HERE/setup.sh" "${common[@]}" "${SETUP_EXTRA[@]+"${SETUP_EXTRA[@]}"}"
launch_status=0
"$HERE/launch.sh" "${common[@]}" --run-name "$RUN_NAME" --bucket "$BUCKET" --config "$CONFIG" \
  --foreground || launch_status=$?
"$HERE/sync.sh" "${common[@]}" --run-name "$RUN_NAME" --bucket "$BUCKET"
exit "$launch_status"
