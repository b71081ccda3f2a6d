#!/usr/bin/env bash
# The main job: set up .venv if needed, then fine-tune the real MiniLM offline (CapaBoost-LoRA vs LoRA).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$root/.venv/bin/capaboost" demo "$@"
