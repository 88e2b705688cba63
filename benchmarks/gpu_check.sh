#!/usr/bin/env bash
# Validate a single-GPU node in one command (budget: 8 minutes on an H100/H200): the
# default job (./run_train.sh), SFT throughput of qwen3_0_6b and qwen3_1_7b, and one RL step
# at 0.6B scale with the native engine, printed and written as markdown tables to
# outputs/gpu_check/gpu_check.md. What each row measures: benchmarks/gpu_check.py.
#
#   benchmarks/gpu_check.sh                  # CUDA when present, else the tiny CPU mode
#   benchmarks/gpu_check.sh --cpu            # tiny sizes on CPU (tests/test_gpu_check.py)
#   benchmarks/gpu_check.sh --only sft,rl    # sections: default, sft, rl, vllm
#   benchmarks/gpu_check.sh --out DIR        # instead of outputs/gpu_check
#
# Offline GPU machine (torch preinstalled, no package index, the project's other
# dependencies as wheels in .whl/): install the wheels beside the system torch, then run.
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
#   benchmarks/gpu_check.sh
# or let the script do those two steps first: benchmarks/gpu_check.sh --install-wheels .whl
# Without that flag it installs nothing. It needs no model hub (random init, the built-in
# arithmetic tokenizer). PYTHON picks the interpreter (default python3); run_train.sh
# needs torchrun on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ "${1:-}" = "--install-wheels" ]; then
  wheels=${2:?--install-wheels needs a folder of wheels}
  shift 2
  "$python" -m pip install -q --no-index --no-deps --target /tmp/site "$wheels"/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$python" benchmarks/gpu_check.py "$@"
