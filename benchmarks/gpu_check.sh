#!/usr/bin/env bash
# The GPU check: CUDA tests, SimCLR ResNet-18 against lightly, the default recipe's images/s, a 2-GPU
# NCCL smoke run, peak GPU memory of each; one JSON and a table. Every part has its own timeout; the
# whole stays under 8 minutes; a dense part (DenseCL on the scenes, the dense protocols) since issue #30. See benchmarks/gpu/README.md for running it through the device tool.
#
#   bash benchmarks/gpu_check.sh [--out FILE.json] [--parts tests,vs_lightly,recipe,nccl] [--budget S]
#   bash benchmarks/gpu_check.sh --prepare   # here, with the network: lightly + Fashion-MNIST to carry
#
# Python: $PYTHON if set, else the repository's .venv (make setup), else python3 (the GPU machine's,
# which holds PyTorch). Without a CUDA device it exits 2 at once with one line saying so.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2

if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

no_cuda() {
  echo "gpu_check: no CUDA device is visible ($1). Run it on a machine with an NVIDIA GPU: through the device tool, see benchmarks/gpu/README.md." >&2
  exit 2
}

prepare=0
for arg in "$@"; do
  case "$arg" in --prepare) prepare=1 ;; -h|--help) exec "$PYTHON" benchmarks/gpu/gpu_check.py --help ;; esac
done

if [ "$prepare" = 0 ]; then
  # The cheap checks first, so a machine without a GPU is told in milliseconds, before torch is imported.
  if [ "${CUDA_VISIBLE_DEVICES+set}" = set ] && { [ -z "$CUDA_VISIBLE_DEVICES" ] || [ "$CUDA_VISIBLE_DEVICES" = "-1" ]; }; then
    no_cuda "CUDA_VISIBLE_DEVICES is '${CUDA_VISIBLE_DEVICES}'"
  fi
  if ! command -v nvidia-smi >/dev/null 2>&1 && ! compgen -G "/dev/nvidia[0-9]*" >/dev/null; then
    no_cuda "no nvidia-smi and no /dev/nvidia* on $(hostname)"
  fi
  command -v timeout >/dev/null || { echo "gpu_check: the 'timeout' command (coreutils) is missing" >&2; exit 2; }
fi

exec "$PYTHON" benchmarks/gpu/gpu_check.py "$@"
