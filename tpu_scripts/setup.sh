#!/usr/bin/env bash
# Install rlhf_jax on every worker of a TPU VM: ship the source (the local checkout's tracked
# files, or a git clone), create a virtual environment with jax[tpu], and optionally stage data
# and model checkpoints from a bucket onto each worker's disk.
#
#   tpu_scripts/setup.sh --name rlhf-v4 --zone us-central2-b
#   tpu_scripts/setup.sh --name rlhf-v4 --zone us-central2-b \
#       --git https://github.com/ORG/rlhf_jax.git --ref main \
#       --stage gs://my-bucket/hh-rlhf=data/hh-rlhf --stage gs://my-bucket/models/gpt2=models/gpt2
set -euo pipefail
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'USAGE'
usage: setup.sh --name NAME --zone ZONE [options]

  --git URL             clone this repository on every worker instead of copying the local
                        checkout's tracked files
  --ref REF             branch, tag or commit to check out with --git (default: main)
  --jax-spec SPEC       pip requirement for JAX on TPU (default: jax[tpu])
  --extras EXTRAS       package extras to install, e.g. test (default: none)
  --stage GCS=DIR       copy a bucket prefix to DIR (relative to the remote checkout, where
                        launch.sh runs and the configs' relative paths resolve) on every
                        worker; repeatable (datasets, HF checkpoints, tokenizers)
  --name, --zone, --project, --queued, --dry-run: see tpu_scripts/lib.sh
USAGE
}

GIT_URL=""
GIT_REF="main"
JAX_SPEC="jax[tpu]"
EXTRAS=""
STAGES=()
while (($#)); do
  case "$1" in
    --git) GIT_URL="$(need_value "$1" "${2-}")"; shift 2 ;;
    --ref) GIT_REF="$(need_value "$1" "${2-}")"; shift 2 ;;
    --jax-spec) JAX_SPEC="$(need_value "$1" "${2-}")"; shift 2 ;;
    --extras) EXTRAS="$(need_value "$1" "${2-}")"; shift 2 ;;
    --stage) STAGES+=("$(need_value "$1" "${2-}")"); shift 2 ;;
    *) parse_common_flag "$@"; shift "$SHIFT_BY" ;;
  esac
done
require_common
for stage in "${STAGES[@]+"${STAGES[@]}"}"; do
  [[ "$stage" == gs://*=* ]] || die "--stage '$stage' must read gs://BUCKET/PREFIX=LOCAL_DIR"
  check_bucket --stage "${stage%%=*}"
  dest="${stage#*=}"
  [[ -n "$dest" && "$dest" != /* && "$dest" != *..* ]] \
    || die "--stage '$stage': LOCAL_DIR must be a relative path under the remote checkout"
done
[[ "$EXTRAS" =~ ^[a-z,]*$ ]] || die "--extras '$EXTRAS' must be comma-separated lowercase names"

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# 1. Source code on every worker.
if [[ -n "$GIT_URL" ]]; then
  tpu_ssh all "rm -rf $REMOTE_DIR && git clone --quiet $(shell_quote "$GIT_URL") $REMOTE_DIR && git -C $REMOTE_DIR checkout --quiet $(shell_quote "$GIT_REF")"
else
  archive="${TMPDIR:-/tmp}/rlhf_jax-src.tar.gz"
  # The files git tracks or would track (uncommitted and untracked-but-not-ignored files included).
  if [[ "$DRY_RUN" == "1" ]]; then
    printf '%s | %s\n' "$(format_command git -C "$REPO_ROOT" ls-files -z --cached --others --exclude-standard)" \
      "$(format_command tar -C "$REPO_ROOT" --null -T - -czf "$archive")"
  else
    git -C "$REPO_ROOT" ls-files -z --cached --others --exclude-standard | tar -C "$REPO_ROOT" --null -T - -czf "$archive"
  fi
  tpu_scp all "$archive" "rlhf_jax-src.tar.gz"
  tpu_ssh all "rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -xzf rlhf_jax-src.tar.gz -C $REMOTE_DIR"
fi

# 2. A virtual environment with JAX for TPU and the package (editable, so configs resolve).
target="."
[[ -n "$EXTRAS" ]] && target=".[$EXTRAS]"
tpu_ssh all "cd $REMOTE_DIR && python3 -m venv .venv && .venv/bin/pip install --quiet --upgrade pip && .venv/bin/pip install --quiet $(shell_quote "$JAX_SPEC") && .venv/bin/pip install --quiet -e $(shell_quote "$target") && .venv/bin/python -c 'import jax, rlhf_jax; print(jax.__version__)'"

# 3. Data and checkpoints from the bucket onto every worker.
for stage in "${STAGES[@]+"${STAGES[@]}"}"; do
  src="${stage%%=*}"
  dest="${stage#*=}"
  tpu_ssh all "cd $REMOTE_DIR && mkdir -p $(shell_quote "$dest") && gcloud storage rsync --recursive $(shell_quote "$src") $(shell_quote "$dest")"
done
