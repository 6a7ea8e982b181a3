#!/usr/bin/env bash
# The decode step on CUDA, checked in one short run (issue 11; under 5 minutes on an H200): CUDA vs CPU logits in
# float32, CUDA-graph replay vs eager at batches 1/3/8, decode tok/s at batches 1 and 64 with graphs on and off.
# The Python part is benchmarks/gpu_check.py; this prints its report and a final JSON line.
#
#   bash benchmarks/gpu_check.sh                      # on a machine with CUDA (installs nothing)
#   bash benchmarks/gpu_check.sh --gguf PATH.gguf     # also the default model, from a file
#   TOKENLOOM_HOME=DIR bash benchmarks/gpu_check.sh   # ... or from a cache that holds it (never downloaded)
#   bash benchmarks/gpu_check.sh --device cpu         # dry run here: the CPU-possible parts, tiny model
#
# Needs torch (with CUDA for the real run) and tokenloom's pure-Python dependencies; the repo itself is put on
# PYTHONPATH, so tokenloom need not be installed. The gguf package is the one the H200 image lacks: carry its
# wheel in .whl/ (python3 -m pip download --no-deps -d .whl gguf==0.19.0, here) and this installs it to /tmp.
# Without CUDA (and no --device cpu) it says so and exits 0. Exit 1: a check mismatched.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null || PY=python

device=cuda
prev=
for arg in "$@"; do
  case "$prev" in --device) device=$arg ;; esac
  case "$arg" in --device=*) device=${arg#--device=} ;; esac
  prev=$arg
done

if [[ $device == cuda* ]] && ! "$PY" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
  echo "gpu_check: torch sees no CUDA device here (torch.cuda.is_available() is false, or torch is missing):"
  echo "gpu_check: nothing checked. Run it where CUDA is, or 'bash benchmarks/gpu_check.sh --device cpu' for a dry run."
  exit 0
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import gguf" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_check_site \
      .whl/*.whl
    export PYTHONPATH="/tmp/gpu_check_site:$PYTHONPATH"
  else
    echo "gpu_check: the gguf package is missing and .whl/ holds no wheel of it (see the header of this script)"
    exit 2
  fi
fi

# The CPU reference runs torch's own ops: building tokenloom's C++ kernels there would cost a minute of the run.
export TOKENLOOM_CPP_KERNELS=${TOKENLOOM_CPP_KERNELS:-0}
export PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu_check.py "$@"
