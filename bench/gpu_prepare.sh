#!/usr/bin/env bash
# Run HERE (a machine with the package registries), before the GPU machine's one `run`: puts into .whl/
# (git-ignored) the wheels of vqtok's pure-Python dependencies that the lent GPU machine's image lacks
# (webdataset and braceexpand, lpips, torch-fidelity: see /work/.library/device/KINDS.md), for
# bench/gpu_run.sh to install there, where nothing can be downloaded. About 220 KB.
#
#   bash bench/gpu_prepare.sh
#   then the device tool: run(command="bash bench/gpu_run.sh", carry=[".whl"], timeout_s=590)
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
[ -x "$PIP" ] || PIP="python3 -m pip"
mkdir -p .whl
$PIP download --quiet --no-deps --only-binary=:all: --dest .whl webdataset braceexpand lpips torch-fidelity
ls -l .whl
