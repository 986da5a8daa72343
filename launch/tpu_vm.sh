#!/usr/bin/env bash
# Run fipo_jax on a Cloud TPU VM slice (single host or pod), one process per host.
#
#   launch/tpu_vm.sh create             # create the slice (ACCEL, ZONE, RUNTIME)
#   launch/tpu_vm.sh setup              # check Python, clone REPO@BRANCH, pip install -e .[tpu], everywhere
#   launch/tpu_vm.sh stage SRC DEST     # copy weights/data to DEST on every worker (see "Staging")
#   launch/tpu_vm.sh aot                # compile-only HBM check, on this machine (no TPU needed)
#   launch/tpu_vm.sh run [flags...]     # start `python -m fipo_jax.main` on all workers, detached
#   launch/tpu_vm.sh logs               # follow worker 0's log
#   launch/tpu_vm.sh stop | delete      # kill the run | delete the slice
#   launch/tpu_vm.sh check-python       # the Python check `setup` and `run` do on each worker, here
#   DRY_RUN=1 launch/tpu_vm.sh CMD ...  # print the gcloud commands instead of running them
#
# Every worker runs the same command (`gcloud compute tpus tpu-vm ssh --worker=all`) with
# FIPO_DISTRIBUTED=1, so `jax.distributed.initialize()` joins all workers of the slice (JAX reads
# the coordinator from the TPU metadata; docs/multihost.md). Before anything else each worker
# checks that $PYTHON satisfies pyproject.toml's requires-python and stops with one line if not
# (older TPU VM images ship Python 3.10: use a newer RUNTIME, or install 3.11+ and set PYTHON).
# Logs go to a local file on each worker and are copied to $LOG_BUCKET/$RUN_NAME/worker-<i>.log
# every minute and when the run ends. Extra arguments after `run` go to fipo_jax.main
# (e.g. --config.rl.decay_rate=64).
#
# Staging weights and data: every worker must read the same model and data paths. Either
#  (a) keep them in a bucket and pass gs:// paths; each worker copies them once into its local
#      cache ($FIPO_JAX_CACHE, default ~/.cache/fipo_jax/remote) before loading:
#        gcloud storage cp -r ~/models/Qwen2.5-32B gs://my-bucket/models/
#        gcloud storage cp dapo-math-17k.parquet aime-2024.parquet gs://my-bucket/data/
#        launch/tpu_vm.sh run --config.model.hf_dir=gs://my-bucket/models/Qwen2.5-32B \
#          --config.data.train_files=gs://my-bucket/data/dapo-math-17k.parquet \
#          --config.data.val_files=gs://my-bucket/data/aime-2024.parquet
#  (b) or copy them to the same absolute path on every worker and pass that path (gcloud logs
#      in as your local user, so /home/$USER is that user's home on the workers):
#        launch/tpu_vm.sh stage gs://my-bucket/models/Qwen2.5-32B /home/$USER/models  # pulled
#        launch/tpu_vm.sh stage ./dapo-math-17k.parquet /home/$USER/data             # scp'd
#        launch/tpu_vm.sh run --config.model.hf_dir=/home/$USER/models/Qwen2.5-32B \
#          --config.data.train_files=/home/$USER/data/dapo-math-17k.parquet ...
#      A gs:// SRC runs `gcloud storage cp -r` on each worker (fast inside GCP); a local SRC is
#      sent from this machine with `gcloud compute tpus tpu-vm scp --worker=all`. Mind the boot
#      disk size: a 32B model in bf16 is ~65 GB.
# The workdir ($WORKDIR, default $BUCKET/runs/$RUN_NAME) is a bucket path all workers share.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
: "${PROJECT:=$(gcloud config get-value project 2>/dev/null || true)}"
: "${ZONE:=us-east5-a}"                      # a zone with the accelerator (v5p: us-east5-a)
: "${ACCEL:=v5p-128}"                        # v5p-128 = 64 chips; v6e-256; v5litepod-256
: "${TPU_NAME:=fipo-${ACCEL}}"
: "${RUNTIME:=}"                             # TPU VM image; default chosen from ACCEL below
: "${SPOT:=0}"                               # 1 = --spot
: "${REPO:=$(git -C "${ROOT}" remote get-url origin 2>/dev/null || true)}"  # git URL
: "${BRANCH:=main}"
: "${CONFIG:=configs/fipo_qwen2_5_32b.py}"
: "${BUCKET:=}"                              # gs://... : checkpoints, metrics and logs (run)
: "${RUN_NAME:=$(basename "${CONFIG}" .py)-$(date +%Y%m%d-%H%M%S)}"
: "${WORKDIR:=${BUCKET}/runs/${RUN_NAME}}"
: "${LOG_BUCKET:=${BUCKET}/logs}"
: "${TOPOLOGY:=${ACCEL/v5litepod/v5e}}"      # for `aot`: fipo_jax.aot's name (v5e-256, v5p-128)
: "${PYTHON:=python3}"                       # the workers' interpreter (e.g. python3.11)
: "${FIPO_DISTRIBUTED:=1}"                   # 0 only for a single-host slice without jax.distributed
: "${DRY_RUN:=0}"                            # 1 = print the gcloud commands, run nothing

# requires-python of pyproject.toml (">=3.11" -> 3.11): the one place the minimum is written.
MIN_PYTHON="$(sed -n 's/^requires-python *= *">= *\([0-9.]*\)".*/\1/p' "${ROOT}/pyproject.toml")"
[[ -n "${MIN_PYTHON}" ]] || { echo "no requires-python in ${ROOT}/pyproject.toml" >&2; exit 2; }

python_check() {  # python_check PY MIN: one line on stderr and status 2 unless PY is Python >= MIN
  local py="$1" min="$2" v
  if ! v="$("${py}" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)"; then
    echo "${HOSTNAME}: no working '${py}'; fipo_jax needs Python >= ${min} (set PYTHON)" >&2
    return 2
  fi
  if [[ "$(printf '%s\n' "${min}" "${v}" | sort -V | head -n 1)" != "${min}" ]]; then
    echo "${HOSTNAME}: '${py}' is Python ${v}; fipo_jax needs >= ${min} (requires-python in" \
      "pyproject.toml): use a newer TPU VM image (RUNTIME=...) or install Python ${min}+ and" \
      "set PYTHON=python${min}" >&2
    return 2
  fi
}
# The same function, sent to the workers as shell text.
CHECK="$(declare -f python_check); python_check ${PYTHON} ${MIN_PYTHON}"

if [[ -z "${RUNTIME}" ]]; then
  case "${ACCEL}" in
    v5p-*) RUNTIME=v2-alpha-tpuv5 ;;
    v6e-*) RUNTIME=v2-alpha-tpuv6e ;;
    v5litepod-*) RUNTIME=v2-alpha-tpuv5-lite ;;
    *) echo "set RUNTIME for ACCEL=${ACCEL}" >&2; exit 2 ;;
  esac
fi

gc() {  # gcloud, or (DRY_RUN=1) its command line, shell-quoted where needed
  [[ "${DRY_RUN}" == 1 ]] || { gcloud "$@"; return; }
  local a line=gcloud q="'"
  for a in "$@"; do
    if [[ "${a}" =~ ^[][A-Za-z0-9_=:/.,@%+~-]+$ ]]; then line+=" ${a}"
    else line+=" ${q}${a//${q}/${q}\\${q}${q}}${q}"; fi
  done
  echo "${line}"
}

ssh_all() {  # ssh_all <command>: the same command on every worker of the slice
  gc compute tpus tpu-vm ssh "${TPU_NAME}" --project="${PROJECT}" --zone="${ZONE}" \
    --worker=all --command="$1"
}

ssh_0() {
  gc compute tpus tpu-vm ssh "${TPU_NAME}" --project="${PROJECT}" --zone="${ZONE}" \
    --worker=0 --command="$1"
}

# The worker's index inside the slice, from the TPU VM metadata server.
WORKER_ID='$(curl -s -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number)'

cmd="${1:-}"
shift || true
case "${cmd}" in
  create)
    gc compute tpus tpu-vm create "${TPU_NAME}" --project="${PROJECT}" --zone="${ZONE}" \
      --accelerator-type="${ACCEL}" --version="${RUNTIME}" $([[ "${SPOT}" == 1 ]] && echo --spot)
    ;;
  setup)
    [[ -n "${REPO}" ]] || { echo "set REPO=<git URL of fipo_jax>" >&2; exit 2; }
    ssh_all "set -e; ${CHECK}
      if [ -d ~/fipo_jax ]; then git -C ~/fipo_jax fetch -q origin ${BRANCH} && git -C ~/fipo_jax checkout -q FETCH_HEAD;
      else git clone -q -b ${BRANCH} ${REPO} ~/fipo_jax; fi
      ${PYTHON} -m pip install -q -U pip && ${PYTHON} -m pip install -q -e ~/fipo_jax[tpu]
      ${PYTHON} -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count())'"
    ;;
  stage)  # stage SRC DEST: SRC (local path or gs://) to DEST on every worker
    [[ $# -eq 2 ]] || { echo "usage: launch/tpu_vm.sh stage SRC DEST" >&2; exit 2; }
    if [[ "$1" == gs://* ]]; then
      ssh_all "mkdir -p $2 && gcloud storage cp -r $1 $2"
    else
      ssh_all "mkdir -p $2"
      gc compute tpus tpu-vm scp --recurse "$1" "${TPU_NAME}:$2" --project="${PROJECT}" \
        --zone="${ZONE}" --worker=all
    fi
    ;;
  aot)  # runs here, not on the slice: compile-only, needs `pip install -e .[tpu]` locally
    python_check "${PYTHON}" "${MIN_PYTHON}" || exit 2
    "${PYTHON}" -m fipo_jax.aot --config "${CONFIG}" --topology "${TOPOLOGY}"
    ;;
  run)
    [[ -n "${BUCKET}" ]] || { echo "set BUCKET=gs://your-bucket" >&2; exit 2; }
    args="$*"
    log="/tmp/${RUN_NAME}.log"
    dest="${LOG_BUCKET}/${RUN_NAME}/worker-${WORKER_ID}.log"
    # setsid + nohup: the run survives the ssh session and is its own process group (for `stop`);
    # a side loop copies the log to the bucket every minute and once more at the end.
    ssh_all "${CHECK} || exit 2
      cd ~/fipo_jax && echo ${RUN_NAME} > ~/fipo_run_name && setsid nohup bash -c '
        ( while sleep 60; do gcloud storage cp -q ${log} ${dest} 2>/dev/null; done ) & up=\$!
        FIPO_DISTRIBUTED=${FIPO_DISTRIBUTED} ${PYTHON} -m fipo_jax.main --config ${CONFIG} --workdir ${WORKDIR} ${args} > ${log} 2>&1
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
    gc compute tpus tpu-vm delete "${TPU_NAME}" --project="${PROJECT}" --zone="${ZONE}" --quiet
    ;;
  check-python)
    python_check "${PYTHON}" "${MIN_PYTHON}" && echo "${PYTHON}: ok (>= ${MIN_PYTHON})"
    ;;
  *)
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    exit 2
    ;;
esac
