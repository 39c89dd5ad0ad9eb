#!/usr/bin/env bash
# TPU VM pod workflow for nash-lm with gcloud: create, set up every worker, run on all workers, tail logs,
# tear down. Every worker runs the same command; jax.distributed finds its peers from the TPU metadata
# (NASH_LM_DISTRIBUTED=auto -> jax.distributed.initialize() with no arguments).
#
#   export TPU_NAME=nash-v5e-32 ZONE=us-west4-a ACCELERATOR=v5litepod-32 RUNTIME=v2-alpha-tpuv5-lite
#   export PROJECT=my-gcp-project BUCKET=my-bucket              # the workdir must be shared by all workers:
#   launch/tpu_pod.sh create                                    # setup mounts gs://$BUCKET at $MOUNT (gcsfuse)
#   launch/tpu_pod.sh setup                                     # copies this checkout, installs on all workers
#   launch/tpu_pod.sh run --config=configs/tiny.py --workdir=/mnt/nash-lm/runs/tiny --config.mesh.fsdp=-1
#   launch/tpu_pod.sh tail                                      # follows worker 0's log (WORKER=3 for another)
#   launch/tpu_pod.sh stop                                      # SIGTERM: checkpoint, then exit (all workers)
#   launch/tpu_pod.sh delete
#
# Options by environment: SPOT=1 (spot capacity), REPO_DIR (remote checkout, default ~/nash-lm),
# LOG (remote log file, default ~/nash-lm.log), MOUNT (default /mnt/nash-lm), and for setup: EXTRAS (extras of
# setup.py to install, default tpu: jax 0.12.1 with libtpu), EXTRA_PIP (more pip specs), PYTHON_VERSION (default
# 3.12). setup runs launch/setup_venv.sh on every worker: the runtime images' python3 is 3.10, so it builds the
# venv with uv on Python 3.12 (the machine's, or uv's own build) and installs the tested set, constraints/py312.txt.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}"
: "${ZONE:?set ZONE}"
ACCELERATOR="${ACCELERATOR:-v5litepod-8}"
RUNTIME="${RUNTIME:-v2-alpha-tpuv5-lite}"
REPO_DIR="${REPO_DIR:-~/nash-lm}"
LOG="${LOG:-~/nash-lm.log}"
PID_FILE="${PID_FILE:-~/nash-lm.pid}"
MOUNT="${MOUNT:-/mnt/nash-lm}"
EXTRAS="${EXTRAS-tpu}"
EXTRA_PIP="${EXTRA_PIP:-}"
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"
PROJECT_FLAG=()
[[ -n "${PROJECT:-}" ]] && PROJECT_FLAG=(--project="$PROJECT")
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

ssh_all() {  # ssh_all COMMAND: runs on every worker at once
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}" --worker=all --command="$1"
}

cmd="${1:-help}"
shift || true
case "$cmd" in
  create)
    spot=()
    [[ "${SPOT:-0}" == 1 ]] && spot=(--spot)
    gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}" \
      --accelerator-type="$ACCELERATOR" --version="$RUNTIME" "${spot[@]}"
    ;;
  setup)
    # Ship this checkout (tracked files of HEAD) to every worker; launch/setup_venv.sh builds .venv there.
    tarball="$(mktemp /tmp/nash-lm-XXXX.tar.gz)"
    git -C "$HERE" archive --format=tar.gz -o "$tarball" HEAD
    gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME":nash-lm.tar.gz --zone="$ZONE" \
      "${PROJECT_FLAG[@]}" --worker=all
    rm -f "$tarball"
    settings="$(printf 'EXTRAS=%q EXTRA_PIP=%q PYTHON_VERSION=%q' "$EXTRAS" "$EXTRA_PIP" "$PYTHON_VERSION")"
    ssh_all "set -e; mkdir -p $REPO_DIR && tar -xzf ~/nash-lm.tar.gz -C $REPO_DIR && cd $REPO_DIR && \
      $settings bash launch/setup_venv.sh && \
      .venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count(), jax.default_backend())'"
    if [[ -n "${BUCKET:-}" ]]; then  # one workdir for all workers: orbax and process 0's files go there
      ssh_all "sudo mkdir -p $MOUNT && sudo chown \$(id -u) $MOUNT && (mountpoint -q $MOUNT || \
        gcsfuse --implicit-dirs $BUCKET $MOUNT)"
    fi
    ;;
  run)
    # Same command on all workers, detached from the ssh session; output to $LOG on each worker.
    args="$(printf ' %q' "$@")"
    ssh_all "cd $REPO_DIR && NASH_LM_DISTRIBUTED=auto nohup .venv/bin/python -m nash_lm.main $args \
      > $LOG 2>&1 < /dev/null & echo \$! > $PID_FILE; echo started on \$(hostname)"
    ;;
  tail)
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}" --worker="${WORKER:-0}" \
      --command="tail -n 200 -F $LOG"
    ;;
  logs)
    # Last lines of every worker's log (prefixed by gcloud with the worker's address).
    ssh_all "tail -n ${LINES:-20} $LOG"
    ;;
  stop)
    # SIGTERM: nash-lm checkpoints the current step and exits (every worker must get it).
    ssh_all "[ -f $PID_FILE ] && kill -TERM \$(cat $PID_FILE) || true"
    ;;
  delete)
    gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" "${PROJECT_FLAG[@]}" --quiet
    ;;
  help|*)
    awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"
    ;;
esac
