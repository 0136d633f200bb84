#!/usr/bin/env bash
# Copy a run's logs (and anything else it wrote under runs/RUN on the workers) from every host to
# a bucket, and optionally download the bucket copy to this machine. Hosts write disjoint log
# files (host-<index>.log), so syncing all of them into one prefix loses nothing.
#
#   tpu_scripts/sync.sh --name rlhf-v4 --zone us-central2-b --run-name gpt2-hh \
#       --bucket gs://my-bucket/rlhf --download runs/
set -euo pipefail
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'USAGE'
usage: sync.sh --name NAME --zone ZONE --run-name RUN --bucket GCS [options]

  --run-name RUN     the run to sync (runs/RUN on every worker)
  --bucket GCS       destination prefix; files land in GCS/runs/RUN
  --download DIR     afterwards copy GCS/runs/RUN to DIR/RUN on this machine
  --no-upload        skip the worker -> bucket step (only download)
  --name, --zone, --project, --queued, --dry-run: see tpu_scripts/lib.sh
USAGE
}

RUN_NAME=""
BUCKET=""
DOWNLOAD=""
UPLOAD=1
while (($#)); do
  case "$1" in
    --run-name) RUN_NAME="$(need_value "$1" "${2-}")"; shift 2 ;;
    --bucket) BUCKET="$(need_value "$1" "${2-}")"; shift 2 ;;
    --download) DOWNLOAD="$(need_value "$1" "${2-}")"; shift 2 ;;
    --no-upload) UPLOAD=0; shift ;;
    *) parse_common_flag "$@"; shift "$SHIFT_BY" ;;
  esac
done
require_common
[[ -n "$RUN_NAME" ]] || die "--run-name is required"
check_run_name "$RUN_NAME"
[[ -n "$BUCKET" ]] || die "--bucket is required"
check_bucket --bucket "$BUCKET"
if ((!UPLOAD)) && [[ -z "$DOWNLOAD" ]]; then
  die "--no-upload without --download does nothing"
fi

DEST="${BUCKET%/}/runs/$RUN_NAME"
if ((UPLOAD)); then
  tpu_ssh all "set -e; if [ -d \"\$HOME/$REMOTE_RUNS/$RUN_NAME\" ]; then gcloud storage rsync --recursive \"\$HOME/$REMOTE_RUNS/$RUN_NAME\" $DEST; else echo \"no $REMOTE_RUNS/$RUN_NAME on \$(hostname)\"; fi"
fi
if [[ -n "$DOWNLOAD" ]]; then
  if [[ "$DRY_RUN" != "1" ]]; then
    mkdir -p "$DOWNLOAD/$RUN_NAME"
  fi
  run "$GCLOUD" storage rsync --recursive "$DEST" "${DOWNLOAD%/}/$RUN_NAME"
fi
