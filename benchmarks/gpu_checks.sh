#!/usr/bin/env bash
# The GPU checks on a GPU host, as one script (device time is scarce):
#   bash benchmarks/gpu_checks.sh [golden_dir]
# Runs the loss, future-KL, advantage and GPU tests with JAX on CUDA (golden files from $1,
# default tests/testdata/golden; tests/test_model_gpu.py runs the Pallas flash kernel on packed
# rows and the paged decode on the GPU), then the GPU report (benchmarks/gpu_report.py: the
# packed train step, the paged decode and the sampling engine, one RL step, each kernel against
# its fallback; its last line is JSON), then the future_kl / loss+grad benchmark.
set -o pipefail
export PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda
export FIPO_GOLDEN_DIR="${1:-${FIPO_GOLDEN_DIR:-tests/testdata/golden}}"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m pytest -q -p no:cacheprovider tests/test_future_kl.py tests/test_losses.py \
  tests/test_advantages.py tests/test_model_gpu.py 2>&1 | tail -25
python3 benchmarks/gpu_report.py
python3 benchmarks/future_kl.py --lengths 2048 20480 --repeats 20 --rounds 3 --official-repeats 1
