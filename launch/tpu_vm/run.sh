#!/usr/bin/env bash
# One party (a site or a single-site trainer) on a Cloud TPU VM slice: the same
# command on every worker (gcloud ... ssh --worker=all); the workers form one JAX job
# by themselves (JAX reads the TPU metadata server: no process flags).
#
#   launch/tpu_vm/run.sh setup TPU_NAME ZONE    # copy this checkout, make the venv
#   launch/tpu_vm/run.sh run TPU_NAME ZONE launch.site \
#       --config=experiments/configs/federation.py:tiny --workdir=/mnt/shared/fed --site=latin
#   launch/tpu_vm/run.sh stop TPU_NAME ZONE     # end a run left on the workers
#
# PROJECT=... picks the Google Cloud project (default: gcloud's). setup ships
# `git archive HEAD` (commit first) to ~/tapestry on every worker and installs it
# with jax[tpu] in ~/tapestry/.venv. --workdir must be a directory every worker sees
# (Filestore, or a Cloud Storage FUSE mount): each writes its own checkpoint shards.
# A run's output is in ~/tapestry/run.log on each worker.
set -euo pipefail

usage() {
  echo "usage: $0 setup|stop TPU_NAME ZONE | run TPU_NAME ZONE launch.MODULE [FLAGS...]" >&2
  exit 2
}
[[ $# -ge 3 ]] || usage
action=$1 tpu=$2 zone=$3
shift 3
JAX_VERSION=${JAX_VERSION:-0.10.2}
gcloud_args=(--zone="$zone" --worker=all)
if [[ -n ${PROJECT:-} ]]; then
  gcloud_args+=(--project="$PROJECT")
fi

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$tpu" "${gcloud_args[@]}" --command="$1"
}

case $action in
  setup)
    archive=$(mktemp --suffix=.tar.gz)
    trap 'rm -f "$archive"' EXIT
    git -C "$(dirname "$0")/../.." archive --format=tar.gz -o "$archive" HEAD
    gcloud compute tpus tpu-vm scp "$archive" "$tpu:tapestry.tar.gz" "${gcloud_args[@]}"
    on_all_workers "set -e; rm -rf ~/tapestry; mkdir -p ~/tapestry
      tar -xzf ~/tapestry.tar.gz -C ~/tapestry; cd ~/tapestry
      python3 -m venv .venv; .venv/bin/pip install -q -U pip
      .venv/bin/pip install -q -e . 'jax[tpu]==$JAX_VERSION'
      .venv/bin/python -c 'import jax; print(\"jax\", jax.__version__)'"
    ;;
  run)
    [[ $# -ge 1 && $1 == launch.* ]] || usage
    # Quoted once here, so flags with spaces or globs reach python unchanged.
    command=$(printf '%q ' .venv/bin/python -m "$@")
    on_all_workers "cd ~/tapestry && $command 2>&1 | tee run.log"
    ;;
  stop)
    on_all_workers "pkill -f '[t]apestry/.venv/bin/python -m launch' || true"
    ;;
  *) usage ;;
esac
