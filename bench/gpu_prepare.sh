#!/usr/bin/env bash
# Run HERE (a machine with the package registries), before the GPU machine's one `run`: puts into .whl/
# (git-ignored) the wheels of vqtok's pure-Python dependencies that the lent GPU machine's image lacks
# (webdataset and braceexpand, lpips, torch-fidelity: see /work/.library/device/KINDS.md), for
# bench/gpu_run.sh to install there, where nothing can be downloaded. About 220 KB. It also copies the
# official VAR and LlamaGen sources (../shared/peers, or $PEERS) into .peers/ (git-ignored, about 1.2 MB), for
# the generator cases of bench/compare_official.py that gpu_run.sh runs on the GPU after the suite (the
# image has their other imports: timm, einops, huggingface_hub).
#
#   bash bench/gpu_prepare.sh
#   then the device tool: run(command="bash bench/gpu_run.sh", carry=[".whl", ".peers"], timeout_s=590)
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
[ -x "$PIP" ] || PIP="python3 -m pip"
mkdir -p .whl
$PIP download --quiet --no-deps --only-binary=:all: --dest .whl webdataset braceexpand lpips torch-fidelity
ls -l .whl
PEERS=${PEERS:-../shared/peers}
if [ -d "$PEERS/VAR" ] && [ -d "$PEERS/LlamaGen" ]; then
    rm -rf .peers && mkdir -p .peers
    cp -r "$PEERS/VAR" "$PEERS/LlamaGen" .peers/
    find .peers -name '*.ipynb' -delete
    du -sh .peers
else
    echo "no $PEERS/VAR and $PEERS/LlamaGen: gpu_run.sh will skip the official-vs-vqtok cases" >&2
fi
