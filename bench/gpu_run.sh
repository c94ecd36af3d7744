#!/usr/bin/env bash
# Run ON THE GPU MACHINE (the device tool's `run`, from the repository root, with carry=[".whl"] prepared by
# bench/gpu_prepare.sh): installs the carried wheels of whatever vqtok needs and the image lacks into
# /tmp/vqtok_deps, puts the checkout on PYTHONPATH (no pip install of vqtok: nothing can be fetched there),
# then runs bench/gpu_suite.py with a time budget that leaves the report written inside one 600-second
# command. Results: $OUT/gpu_results.json, $OUT/gpu_results.md (the table for bench/README.md) and
# $OUT/gpu_suite.log; the suite rewrites the two results files after every part, so a run cut short keeps
# the parts it finished. Extra arguments go to gpu_suite.py (e.g. --skip commands for a second try).
# Then, when .peers/ was carried, bench/compare_official.py's generator cases on the GPU (official vs vqtok,
# same weights and batch): $OUT/compare_official_cuda.json and its log; COMPARE=0 skips them.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
PY=${PYTHON:-python3}
BUDGET=${BUDGET:-330}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
missing=$($PY - <<'PY'
import importlib.util
# each module's wheel file is named after it (torch_fidelity-*.whl for torch-fidelity)
need = ("webdataset", "braceexpand", "lpips", "torch_fidelity")
print(" ".join(module for module in need if importlib.util.find_spec(module) is None))
PY
)
if [ -n "$missing" ]; then
    wheels=()
    for name in $missing; do
        found=$(ls .whl/"${name}"-*.whl 2>/dev/null | head -1)
        if [ -z "$found" ]; then
            echo "error: $name is not installed here and .whl/ has no ${name}-*.whl: run bench/gpu_prepare.sh on the" \
                 "build machine and pass carry=[\".whl\"]" | tee "$OUT/gpu_suite.log" >&2
            exit 2
        fi
        wheels+=("$found")
    done
    $PY -m pip install --quiet --no-deps --no-index --target /tmp/vqtok_deps "${wheels[@]}" || exit 2
    export PYTHONPATH=/tmp/vqtok_deps${PYTHONPATH:+:$PYTHONPATH}
    echo "installed from .whl/: $missing"
fi
export PYTHONPATH=$(pwd)${PYTHONPATH:+:$PYTHONPATH}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || true
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
} | tee "$OUT/gpu_suite.log"
$PY bench/gpu_suite.py --out "$OUT" --budget-s "$BUDGET" "$@" 2>&1 | tee -a "$OUT/gpu_suite.log"
rc=${PIPESTATUS[0]}
if [ "${COMPARE:-1}" != 0 ] && [ -d .peers/VAR ] && [ -d .peers/LlamaGen ]; then
    $PY bench/compare_official.py --peers .peers --device cuda --threads 4 --budget-min 2 \
        --only var_sampling,var_sampling_bf16,llamagen_sampling,llamagen_sampling_bf16 --json "$OUT/compare_official_cuda.json" \
        2>&1 | tee "$OUT/compare_official_cuda.log"
fi
exit "$rc"
