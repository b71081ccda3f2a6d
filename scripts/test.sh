#!/usr/bin/env bash
# The test suite: set up .venv if needed, then run pytest. Fails on any failure AND on zero tests.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh" || exit 1
cd "$root"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/python -m pytest -q "$@"
rc=$?
if [[ $rc -eq 5 ]]; then echo "error: pytest collected no tests" >&2; exit 1; fi
exit $rc
