#!/usr/bin/env bash
# Run fipo_jax on a Cloud TPU VM slice (single host or pod), one process per host.
#
#   launch/tpu_vm.sh create            # create the slice (ACCEL, ZONE, RUNTIME)
#   launch/tpu_vm.sh setup             # clone REPO@BRANCH and `pip install -e .[tpu]` on every worker
#   launch/tpu_vm.sh aot               # compile-only HBM check, on this machine (no TPU needed)
#   launch/tpu_vm.sh run [flags...]    # start `python -m fipo_jax.main` on all workers, detached
#   launch/tpu_vm.sh logs              # follow worker 0's log
#   launch/tpu_vm.sh stop | delete     # kill the run | delete the slice
#
# Every worker runs the same command (`gcloud compute tpus tpu-vm ssh --worker=all`); inside,
# `jax.distributed.initialize()` finds the coordinator from the TPU metadata, so no flags are
# needed. Logs go to a local file on each worker and are copied to
# $LOG_BUCKET/$RUN_NAME/worker-<i>.log every minute and when the run ends.
# Extra arguments after `run` are passed to fipo_jax.main (e.g. --config.rl.decay_rate=64).
set -euo pipefail

: "${PROJECT:=$(gcloud config get-value project 2>/dev/null)}"
: "${ZONE:=us-east5-a}"                      # a zone with the accelerator (v5p: us-east5-a)
: "${ACCEL:=v5p-128}"                        # v5p-128 = 64 chips; v6e-256; v5litepod-256
: "${TPU_NAME:=fipo-${ACCEL}}"
: "${RUNTIME:=}"                             # TPU VM image; default chosen from ACCEL below
: "${SPOT:=0}"                               # 1 = --spot
: "${REPO:=$(git -C "$(dirname "$0")/.." remote get-url origin 2>/dev/null || true)}"  # git URL
: "${BRANCH:=main}"
: "${CONFIG:=configs/fipo_qwen2_5_32b.py}"
: "${BUCKET:=}"                              # gs://... : checkpoints, metrics and logs (run)
: "${RUN_NAME:=$(basename "${CONFIG}" .py)-$(date +%Y%m%d-%H%M%S)}"
: "${WORKDIR:=${BUCKET}/runs/${RUN_NAME}}"
: "${LOG_BUCKET:=${BUCKET}/logs}"
: "${TOPOLOGY:=${ACCEL/v5litepod/v5e}}"      # for `aot`: fipo_jax.aot's name (v5e-256, v5p-128)

if [[ -z "${RUNTIME}" ]]; then
  case "${ACCEL}" in
    v5p-*) RUNTIME=v2-alpha-tpuv5 ;;
    v6e-*) RUNTIME=v2-alpha-tpuv6e ;;
    v5litepod-*) RUNTIME=v2-alpha-tpuv5-lite ;;
    *) echo "set RUNTIME for ACCEL=${ACCEL}" >&2; exit 2 ;;
  esac
fi

ssh_all() {  # ssh_all <command>: the same command on every worker of the slice
  gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --project="${PROJECT}" --zone="${ZONE}" \
    --worker=all --command="$1"
}

ssh_0() {
  gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --project="${PROJECT}" --zone="${ZONE}" \
    --worker=0 --command="$1"
}

# The worker's index inside the slice, from the TPU VM metadata server.
WORKER_ID='$(curl -s -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number)'

cmd="${1:-}"
shift || true
case "${cmd}" in
  create)
    gcloud compute tpus tpu-vm create "${TPU_NAME}" --project="${PROJECT}" --zone="${ZONE}" \
      --accelerator-type="${ACCEL}" --version="${RUNTIME}" $([[ "${SPOT}" == 1 ]] && echo --spot)
    ;;
  setup)
    [[ -n "${REPO}" ]] || { echo "set REPO=<git URL of fipo_jax>" >&2; exit 2; }
    ssh_all "set -e
      if [ -d ~/fipo_jax ]; then git -C ~/fipo_jax fetch -q origin ${BRANCH} && git -C ~/fipo_jax checkout -q FETCH_HEAD;
      else git clone -q -b ${BRANCH} ${REPO} ~/fipo_jax; fi
      python3 -m pip install -q -U pip && python3 -m pip install -q -e ~/fipo_jax[tpu]
      python3 -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count())'"
    ;;
  aot)  # runs here, not on the slice: compile-only, needs `pip install -e .[tpu]` locally
    python3 -m fipo_jax.aot --config "${CONFIG}" --topology "${TOPOLOGY}"
    ;;
  run)
    [[ -n "${BUCKET}" ]] || { echo "set BUCKET=gs://your-bucket" >&2; exit 2; }
    args="$*"
    log="/tmp/${RUN_NAME}.log"
    dest="${LOG_BUCKET}/${RUN_NAME}/worker-${WORKER_ID}.log"
    # setsid + nohup: the run survives the ssh session and is its own process group (for `stop`);
    # a side loop copies the log to the bucket every minute and once more at the end.
    ssh_all "cd ~/fipo_jax && echo ${RUN_NAME} > ~/fipo_run_name && setsid nohup bash -c '
        ( while sleep 60; do gcloud storage cp -q ${log} ${dest} 2>/dev/null; done ) & up=\$!
        python3 -m fipo_jax.main --config ${CONFIG} --workdir ${WORKDIR} ${args} > ${log} 2>&1
        rc=\$?; kill \$up; gcloud storage cp -q ${log} ${dest}; exit \$rc' > /dev/null 2>&1 < /dev/null &
      echo \$! > ~/fipo_run.pid; echo started worker ${WORKER_ID}: ${log} '->' ${dest}"
    echo "workdir: ${WORKDIR}"
    echo "logs:    ${LOG_BUCKET}/${RUN_NAME}/"
    ;;
  logs)
    ssh_0 'tail -n 100 -F /tmp/$(cat ~/fipo_run_name).log'
    ;;
  stop)
    ssh_all 'kill -INT -- -$(cat ~/fipo_run.pid) 2>/dev/null || true'
    ;;
  delete)
    gcloud compute tpus tpu-vm delete "${TPU_NAME}" --project="${PROJECT}" --zone="${ZONE}" --quiet
    ;;
  *)
    sed -n '2,16p' "$0"
    exit 2
    ;;
esac
